//! Starting processes and waiting on what they print, never on sleeps:
//! the real `anp-proxy` binary as a gateway or a receiver (from a config
//! the harness writes, or a config file the test wrote), or any other
//! program a test runs beside them. Every stdout and stderr line is kept
//! (to wait for, or to count) and forwarded through `eprintln!`, so
//! libtest shows it only for failing tests. Children are SIGKILLed on drop.

use std::ffi::OsStr;
use std::io::{BufRead, BufReader, Read};
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, ExitStatus, Output, Stdio};
use std::sync::mpsc::{self, Receiver as Rx};
use std::sync::{Arc, Condvar, Mutex, MutexGuard};
use std::thread;
use std::time::{Duration, Instant};
use tempfile::TempDir;

use super::wait::wait_until;

/// Hang guard for start-up and tunnel connection.
pub const START_WAIT: Duration = Duration::from_secs(30);

pub const ALICE_TOKEN: &str = "alice-secret";
pub const BOB_TOKEN: &str = "bob-secret";

/// One `[[gateway.auth.tokens]]` entry.
#[derive(Clone, Debug)]
pub struct Token {
    pub name: String,
    pub token: String,
    pub paths: Vec<String>,
}

/// The `[gateway]` section; `Default` is what most tests want.
#[derive(Clone, Debug)]
pub struct GatewayConfig {
    /// 0 = any free port (the usual); a fixed one to restart on the same port.
    pub port: u16,
    pub workers: u32,
    pub tunnel_path: String,
    /// Seconds (the config takes a float).
    pub timeout: f64,
    pub keepalive_timeout: f64,
    pub max_connections: u64,
    pub max_body_size: u64,
    pub chunk_size: u64,
    pub ping_interval: f64,
    pub tokens: Vec<Token>,
    /// Raw TOML appended to the `[gateway]` table (before the token tables).
    pub extra_gateway_toml: String,
    /// The body of the `[logging]` table.
    pub logging_toml: String,
    /// Start with `--takeover`: join a port another gateway listens on, on
    /// purpose (a restart). Without it a start on a held port is refused.
    pub takeover: bool,
}

impl Default for GatewayConfig {
    fn default() -> Self {
        GatewayConfig {
            port: 0,
            workers: 2,
            tunnel_path: "/ws".into(),
            timeout: 30.0,
            keepalive_timeout: 60.0,
            max_connections: 10_000,
            max_body_size: 67_108_864,
            chunk_size: 65_536,
            ping_interval: 20.0,
            tokens: vec![
                Token {
                    name: "alice".into(),
                    token: ALICE_TOKEN.into(),
                    paths: vec!["/alice".into(), "/shared/alice".into()],
                },
                Token {
                    name: "bob".into(),
                    token: BOB_TOKEN.into(),
                    paths: vec!["/bob".into()],
                },
            ],
            extra_gateway_toml: String::new(),
            logging_toml: "level = \"info\"\nlog_dir = \"\"\n".into(),
            takeover: false,
        }
    }
}

fn toml_str(s: &str) -> String {
    serde_json::to_string(s).unwrap() // a JSON string literal is a valid TOML basic string
}

impl GatewayConfig {
    /// The command-line flags after `gateway --config FILE`.
    pub fn flags(&self) -> &'static [&'static str] {
        if self.takeover {
            &["--takeover"]
        } else {
            &[]
        }
    }

    pub fn to_toml(&self) -> String {
        let mut t = String::new();
        t += "mode = \"gateway\"\n\n[logging]\n";
        t += &self.logging_toml;
        t += "\n[gateway]\n";
        t += &format!("host = \"127.0.0.1\"\nport = {}\n", self.port);
        t += &format!("workers = {}\n", self.workers);
        t += &format!("tunnel_path = {}\n", toml_str(&self.tunnel_path));
        t += &format!("timeout = {:?}\n", self.timeout);
        t += &format!("keepalive_timeout = {:?}\n", self.keepalive_timeout);
        t += &format!("max_connections = {}\n", self.max_connections);
        t += &format!("max_body_size = {}\n", self.max_body_size);
        t += &format!("chunk_size = {}\n", self.chunk_size);
        t += &format!("ping_interval = {:?}\n", self.ping_interval);
        t += &self.extra_gateway_toml;
        t += "\n";
        for tok in &self.tokens {
            t += "\n[[gateway.auth.tokens]]\n";
            t += &format!("name = {}\n", toml_str(&tok.name));
            t += &format!("token = {}\n", toml_str(&tok.token));
            let paths: Vec<String> = tok.paths.iter().map(|p| toml_str(p)).collect();
            t += &format!("paths = [{}]\n", paths.join(", "));
        }
        t
    }
}

/// The `[receiver]` section.
#[derive(Clone, Debug)]
pub struct ReceiverConfig {
    pub gateway_url: String,
    pub upstream: String,
    pub token: String,
    pub tunnels: u32,
    pub max_concurrent: u32,
    /// Raw TOML appended to the `[receiver]` table.
    pub extra_toml: String,
    /// Environment variables for the process (fault injection).
    pub env: Vec<(String, String)>,
}

impl ReceiverConfig {
    pub fn new(gateway: SocketAddr, app: SocketAddr, token: &str, tunnels: u32) -> Self {
        ReceiverConfig {
            gateway_url: format!("ws://{gateway}/ws"),
            upstream: format!("http://{app}"),
            token: token.into(),
            tunnels,
            max_concurrent: 256,
            extra_toml: String::new(),
            env: Vec::new(),
        }
    }

    pub fn to_toml(&self) -> String {
        format!(
            "mode = \"receiver\"\n\n[logging]\nlevel = \"info\"\nlog_dir = \"\"\n\n[receiver]\n\
             gateway_url = {}\nupstream = {}\ntoken = {}\ntunnels = {}\nmax_concurrent = {}\n{}",
            toml_str(&self.gateway_url),
            toml_str(&self.upstream),
            toml_str(&self.token),
            self.tunnels,
            self.max_concurrent,
            self.extra_toml
        )
    }
}

/// Every line one output pipe of a child has written so far, and whether
/// the pipe has ended; waiters are woken on each new line.
#[derive(Default)]
struct Stream {
    state: Mutex<StreamState>,
    grew: Condvar,
}

#[derive(Default)]
struct StreamState {
    lines: Vec<String>,
    ended: bool,
}

impl Stream {
    /// Reads `pipe` line by line on a thread of its own (so the child never
    /// blocks on a full pipe), echoing each line through `eprintln!` with
    /// `tag` (libtest shows it for failing tests only).
    fn pump(pipe: impl Read + Send + 'static, tag: String) -> Arc<Stream> {
        let stream = Arc::new(Stream::default());
        let s = stream.clone();
        thread::spawn(move || {
            for line in BufReader::new(pipe).lines() {
                let Ok(line) = line else { break };
                eprintln!("{tag}: {line}");
                s.lock().lines.push(line);
                s.grew.notify_all();
            }
            s.lock().ended = true;
            s.grew.notify_all();
        });
        stream
    }

    fn lock(&self) -> MutexGuard<'_, StreamState> {
        self.state.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// The first line from `*next` on that `pred` accepts, waiting for it
    /// until `within` has passed; `*next` moves past every line looked at.
    /// `Err` with the lines passed over when it times out or the pipe ends.
    fn wait(
        &self,
        next: &mut usize,
        within: Duration,
        mut pred: impl FnMut(&str) -> bool,
    ) -> Result<String, (Vec<String>, bool)> {
        let deadline = Instant::now() + within;
        let first = *next;
        let mut g = self.lock();
        loop {
            while *next < g.lines.len() {
                *next += 1;
                if pred(&g.lines[*next - 1]) {
                    return Ok(g.lines[*next - 1].clone());
                }
            }
            let left = deadline.saturating_duration_since(Instant::now());
            if g.ended || left.is_zero() {
                return Err((g.lines[first..].to_vec(), g.ended));
            }
            g = self
                .grew
                .wait_timeout(g, left)
                .unwrap_or_else(|e| e.into_inner())
                .0;
        }
    }
}

/// A child process whose stdout and stderr lines are kept, to be waited
/// for (each pipe has a read position that the waits move on) or counted.
/// SIGKILLed on drop.
pub struct Proc {
    pub name: String,
    pub child: Child,
    /// Its working directory, fresh and temporary.
    pub dir: TempDir,
    stdout: Arc<Stream>,
    stderr: Arc<Stream>,
    stdout_next: usize,
    stderr_next: usize,
}

/// The binary under test; `ANP_PROXY_BIN` may point at another build.
pub fn binary() -> String {
    std::env::var("ANP_PROXY_BIN").unwrap_or_else(|_| env!("CARGO_BIN_EXE_anp-proxy").to_string())
}

/// Runs `anp-proxy ARGS` to completion (a CLI command: `routes …`,
/// `did new …`) and returns what it printed.
pub fn run<S: AsRef<OsStr>>(args: impl IntoIterator<Item = S>) -> Output {
    let args: Vec<S> = args.into_iter().collect();
    Command::new(binary())
        .args(&args)
        .env_remove("RUST_LOG")
        .stdin(Stdio::null())
        .output()
        .unwrap_or_else(|e| {
            let shown: Vec<_> = args.iter().map(|a| a.as_ref().to_string_lossy()).collect();
            panic!("expected to run {} {shown:?}: {e}", binary())
        })
}

/// The Python of the test virtualenv (`target/interop-venv`: ANP's SDKs
/// and `websockets`, pinned, from PyPI), made by
/// `tests/interop/setup_venv.sh` on first use in this test binary.
pub fn interop_python() -> &'static Path {
    static PY: std::sync::OnceLock<PathBuf> = std::sync::OnceLock::new();
    PY.get_or_init(|| {
        let root = Path::new(env!("CARGO_MANIFEST_DIR"));
        let venv = root.join("target/interop-venv");
        let st = Command::new("bash")
            .arg(root.join("tests/interop/setup_venv.sh"))
            .arg(&venv)
            .status()
            .expect("run tests/interop/setup_venv.sh");
        assert!(
            st.success(),
            "expected tests/interop/setup_venv.sh to install the pinned packages"
        );
        venv.join("bin/python")
    })
}

/// `anp-proxy cert new 127.0.0.1 localhost --file NAME --out DIR`: a CA
/// and a certificate for both names, `(ca.crt, NAME.crt, NAME.key)`.
pub fn cert_new(dir: &Path, name: &str) -> (PathBuf, PathBuf, PathBuf) {
    let out = run([
        "cert",
        "new",
        "127.0.0.1",
        "localhost",
        "--file",
        name,
        "--out",
        dir.to_str().unwrap(),
    ]);
    assert!(
        out.status.success(),
        "cert new: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    (
        dir.join("ca.crt"),
        dir.join(format!("{name}.crt")),
        dir.join(format!("{name}.key")),
    )
}

/// `SUBCOMMAND --config CONFIG FLAGS…`.
fn args<'a>(subcommand: &'a str, config: &'a Path, flags: &'a [&'a str]) -> Vec<&'a OsStr> {
    let mut v = vec![
        OsStr::new(subcommand),
        OsStr::new("--config"),
        config.as_os_str(),
    ];
    v.extend(flags.iter().map(OsStr::new));
    v
}

/// The socket address in a ready line, after `://` (any scheme: `http`,
/// `https`, `ws`, `wss`) up to the next space or `/`.
pub fn addr_in(line: &str) -> SocketAddr {
    line.split_once("://")
        .and_then(|(_, rest)| rest.split([' ', '/']).next())
        .and_then(|a| a.parse().ok())
        .unwrap_or_else(|| panic!("expected `scheme://ADDRESS` in {line:?}"))
}

impl Proc {
    /// Starts `program ARGS` (stdin closed, `RUST_LOG` removed so the log
    /// lines tests wait on follow the config) with `env` added, in a fresh
    /// temporary working directory.
    pub fn start<S: AsRef<OsStr>>(
        name: &str,
        program: impl AsRef<OsStr>,
        args: impl IntoIterator<Item = S>,
        env: &[(String, String)],
    ) -> Proc {
        Proc::start_in(work_dir(name), name, program.as_ref(), args, env)
    }

    /// `anp-proxy SUBCOMMAND --config CONFIG FLAGS…`, with `env` added.
    pub fn anp_proxy(
        name: &str,
        subcommand: &str,
        config: &Path,
        flags: &[&str],
        env: &[(String, String)],
    ) -> Proc {
        Proc::start_in(
            work_dir(name),
            name,
            binary().as_ref(),
            args(subcommand, config, flags),
            env,
        )
    }

    /// As [`Proc::anp_proxy`], with `config` written to `config.toml` in the
    /// process's working directory; returns that file's path too.
    pub fn anp_proxy_toml(
        name: &str,
        subcommand: &str,
        config: &str,
        flags: &[&str],
        env: &[(String, String)],
    ) -> (Proc, PathBuf) {
        Proc::anp_proxy_toml_via(name, subcommand, config, flags, env, None)
    }

    /// [`Proc::anp_proxy_toml`], started by bash after `ulimit {limits}`
    /// when `ulimit` is given (e.g. `-Sn 256`): the resource limits a shell
    /// or service manager would give it.
    fn anp_proxy_toml_via(
        name: &str,
        subcommand: &str,
        config: &str,
        flags: &[&str],
        env: &[(String, String)],
        ulimit: Option<&str>,
    ) -> (Proc, PathBuf) {
        let dir = work_dir(name);
        let path = dir.path().join("config.toml");
        std::fs::write(&path, config).expect("write config");
        let bin = binary();
        let args = args(subcommand, &path, flags);
        let proc = match ulimit {
            None => Proc::start_in(dir, name, bin.as_ref(), args, env),
            Some(limits) => {
                let script = format!("ulimit {limits} && exec \"$0\" \"$@\"");
                let mut argv: Vec<&OsStr> = vec![OsStr::new("-c"), OsStr::new(&script)];
                argv.push(bin.as_ref());
                argv.extend(args);
                Proc::start_in(dir, name, OsStr::new("bash"), argv, env)
            }
        };
        (proc, path)
    }

    /// [`Proc::anp_proxy_toml`] without env, the process only.
    pub fn spawn(name: &str, subcommand: &str, flags: &[&str], config: &str) -> Proc {
        Proc::anp_proxy_toml(name, subcommand, config, flags, &[]).0
    }

    fn start_in<S: AsRef<OsStr>>(
        dir: TempDir,
        name: &str,
        program: &OsStr,
        args: impl IntoIterator<Item = S>,
        env: &[(String, String)],
    ) -> Proc {
        let mut child = Command::new(program)
            .args(args)
            .current_dir(dir.path())
            .env_remove("RUST_LOG")
            .envs(env.iter().map(|(k, v)| (k.as_str(), v.as_str())))
            .stdin(Stdio::null())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .spawn()
            .unwrap_or_else(|e| panic!("expected to spawn {name} ({program:?}): {e}"));
        let tag = format!("{name}[{}]", child.id());
        let stdout = Stream::pump(child.stdout.take().unwrap(), format!("{tag} stdout"));
        let stderr = Stream::pump(child.stderr.take().unwrap(), tag);
        Proc {
            name: name.into(),
            child,
            dir,
            stdout,
            stderr,
            stdout_next: 0,
            stderr_next: 0,
        }
    }

    pub fn pid(&self) -> u32 {
        self.child.id()
    }

    /// Waits for a stdout line satisfying `pred` (past the lines already
    /// waited over); panics with `what` on timeout or if stdout ends first.
    pub fn wait_line(&mut self, what: &str, pred: impl FnMut(&str) -> bool) -> String {
        match self.stdout.wait(&mut self.stdout_next, START_WAIT, pred) {
            Ok(line) => line,
            Err((seen, ended)) => self.missed(what, "stdout", seen, ended),
        }
    }

    /// [`Proc::wait_line`] with its own time limit (a run longer than
    /// [`START_WAIT`], e.g. 10,000 tunnels on a loaded machine).
    pub fn wait_line_within(
        &mut self,
        what: &str,
        within: Duration,
        pred: impl FnMut(&str) -> bool,
    ) -> String {
        match self.stdout.wait(&mut self.stdout_next, within, pred) {
            Ok(line) => line,
            Err((seen, ended)) => self.missed(what, "stdout", seen, ended),
        }
    }

    /// Waits for a stdout line containing `needle`.
    pub fn wait_stdout(&mut self, needle: &str) -> String {
        self.wait_line(&format!("a line with {needle:?}"), |l| l.contains(needle))
    }

    /// Waits for a stderr (log) line containing every one of `needles`
    /// (past the log lines already waited over).
    pub fn wait_log(&mut self, needles: &[&str]) -> String {
        let pred = |l: &str| needles.iter().all(|n| l.contains(n));
        match self.stderr.wait(&mut self.stderr_next, START_WAIT, pred) {
            Ok(line) => line,
            Err((seen, ended)) => {
                self.missed(&format!("a line with {needles:?}"), "stderr", seen, ended)
            }
        }
    }

    /// Waits for a stderr (log) line satisfying `pred` (past the log
    /// lines already waited over).
    pub fn wait_log_where(&mut self, what: &str, pred: impl FnMut(&str) -> bool) -> String {
        match self.stderr.wait(&mut self.stderr_next, START_WAIT, pred) {
            Ok(line) => line,
            Err((seen, ended)) => self.missed(what, "stderr", seen, ended),
        }
    }

    fn missed(&mut self, what: &str, pipe: &str, seen: Vec<String>, ended: bool) -> ! {
        let seen = seen[seen.len().saturating_sub(20)..].join("\n  ");
        if ended {
            let status = self
                .child
                .wait()
                .map(|s| s.to_string())
                .unwrap_or_else(|e| e.to_string());
            panic!(
                "{}: expected {what} on {pipe}, but the process closed it (exit: {status}); last lines:\n  {seen}",
                self.name
            )
        }
        panic!(
            "{}: expected {what} on {pipe} within {START_WAIT:?}; last lines:\n  {seen}",
            self.name
        )
    }

    /// The stdout lines not waited over yet, without waiting; the next
    /// wait starts after them.
    pub fn stdout_so_far(&mut self) -> Vec<String> {
        let g = self.stdout.lock();
        let new = g.lines[self.stdout_next..].to_vec();
        self.stdout_next = g.lines.len();
        new
    }

    /// The stderr (log) lines received so far, from line `from` on.
    pub fn stderr_lines(&self, from: usize) -> Vec<String> {
        let g = self.stderr.lock();
        g.lines
            .get(from..)
            .map(<[String]>::to_vec)
            .unwrap_or_default()
    }

    /// How many stderr lines have been received so far.
    pub fn stderr_len(&self) -> usize {
        self.stderr.lock().lines.len()
    }

    /// Sends `sig` (e.g. `libc::SIGHUP`).
    pub fn signal(&self, sig: i32) {
        super::sys::signal(self.pid(), sig);
    }

    /// Waits for a stdout line satisfying `pred` or for the process to
    /// close its stdout (it exited): `Ok(line)`, or `Err(exit status)`.
    /// Panics with `what` after [`START_WAIT`].
    pub fn wait_line_or_exit(
        &mut self,
        what: &str,
        pred: impl FnMut(&str) -> bool,
    ) -> Result<String, std::process::ExitStatus> {
        match self.stdout.wait(&mut self.stdout_next, START_WAIT, pred) {
            Ok(line) => Ok(line),
            Err((_, true)) => Err(self.child.wait().expect("wait for the child")),
            Err((_, false)) => panic!(
                "{}: expected {what} on stdout or an exit within {START_WAIT:?}, got neither",
                self.name
            ),
        }
    }

    pub fn kill(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }

    /// Kills it and returns every stdout line not waited over, up to the
    /// end of the pipe.
    pub fn finish(mut self) -> Vec<String> {
        self.kill();
        let mut end = self.stdout_next;
        // Nothing matches: this waits for the pipe's end.
        let _ = self.stdout.wait(&mut end, START_WAIT, |_| false);
        self.stdout_so_far()
    }

    /// Non-blocking: has it exited?
    pub fn exited(&mut self) -> Option<ExitStatus> {
        self.child.try_wait().ok().flatten()
    }

    /// Waits (up to `within`) for the process to exit on its own; its status.
    pub fn wait_exit(&mut self, within: Duration) -> ExitStatus {
        let mut status = None;
        let what = format!("{} to exit", self.name);
        wait_until(&what, within, || {
            status = self.exited();
            status.is_some()
        });
        status.unwrap()
    }
}

impl Drop for Proc {
    fn drop(&mut self) {
        self.kill();
    }
}

fn work_dir(name: &str) -> TempDir {
    tempfile::Builder::new()
        .prefix(&format!("anp-e2e-{name}-"))
        .tempdir()
        .expect("tempdir")
}

pub struct Gateway {
    pub addr: SocketAddr,
    /// The line it printed when ready:
    /// `anp-proxy gateway listening on http(s)://ADDR (tunnel path …, N workers)`.
    pub listening: String,
    /// The config file it was started with.
    pub config_path: PathBuf,
    pub proc: Proc,
}

impl Gateway {
    pub fn start(cfg: &GatewayConfig) -> Gateway {
        Gateway::start_toml_with(&cfg.to_toml(), cfg.flags())
    }

    /// Starts a gateway with its admin listener on an ephemeral port
    /// (`admin_port = 0` appended to `[gateway]`); returns it with the
    /// admin address from `anp-proxy admin listening on http://…`.
    pub fn start_with_admin(cfg: &GatewayConfig) -> (Gateway, SocketAddr) {
        let mut cfg = cfg.clone();
        cfg.extra_gateway_toml += "admin_port = 0\n";
        let (proc, path) =
            Proc::anp_proxy_toml("gateway", "gateway", &cfg.to_toml(), cfg.flags(), &[]);
        let (gw, admin) = Gateway::ready(proc, path, true);
        (gw, admin.unwrap())
    }

    /// Starts a gateway from a whole config text (e.g. [`GatewayConfig::to_toml`]
    /// with a fixed `port`), waiting for its ready line.
    pub fn start_toml(toml: &str) -> Gateway {
        Gateway::start_toml_with(toml, &[])
    }

    /// [`Gateway::start_toml`] with command-line flags (`--takeover`).
    pub fn start_toml_with(toml: &str, flags: &[&str]) -> Gateway {
        Gateway::launch(toml, flags, &[])
    }

    /// [`Gateway::start_toml`] with extra environment variables.
    pub fn start_toml_env(toml: &str, env: &[(String, String)]) -> Gateway {
        Gateway::launch(toml, &[], env)
    }

    /// [`Gateway::start_toml`] under `ulimit {limits}` (e.g. `-Sn 256`).
    pub fn start_toml_ulimit(toml: &str, limits: &str) -> Gateway {
        let (proc, path) =
            Proc::anp_proxy_toml_via("gateway", "gateway", toml, &[], &[], Some(limits));
        Gateway::ready(proc, path, false).0
    }

    fn launch(toml: &str, flags: &[&str], env: &[(String, String)]) -> Gateway {
        let (proc, path) = Proc::anp_proxy_toml("gateway", "gateway", toml, flags, env);
        Gateway::ready(proc, path, false).0
    }

    /// Starts a gateway from a config file the test wrote (paths in it
    /// are relative to that file), waiting for its ready line.
    pub fn start_file(config: &Path) -> Gateway {
        let proc = Proc::anp_proxy("gateway", "gateway", config, &[], &[]);
        Gateway::ready(proc, config.to_path_buf(), false).0
    }

    /// [`Gateway::start_file`] for a config whose `[gateway]` has
    /// `admin_port = 0`: also returns the admin listener's address.
    pub fn start_file_with_admin(config: &Path) -> (Gateway, SocketAddr) {
        let proc = Proc::anp_proxy("gateway", "gateway", config, &[], &[]);
        let (gw, admin) = Gateway::ready(proc, config.to_path_buf(), true);
        (gw, admin.unwrap())
    }

    /// Waits for the ready line (and, with `admin`, the admin listener's;
    /// the two may come in either order).
    fn ready(mut proc: Proc, config_path: PathBuf, admin: bool) -> (Gateway, Option<SocketAddr>) {
        let (mut listening, mut admin_addr) = (None::<String>, None);
        while listening.is_none() || (admin && admin_addr.is_none()) {
            let line = proc.wait_line(
                "`anp-proxy gateway listening on …` (and `anp-proxy admin listening on http://…` if asked)",
                |l| l.starts_with("anp-proxy gateway listening on ") || l.starts_with("anp-proxy admin listening on "),
            );
            if line.starts_with("anp-proxy admin") {
                admin_addr = Some(addr_in(&line));
            } else {
                listening = Some(line);
            }
        }
        let listening = listening.unwrap();
        let addr = addr_in(&listening);
        assert_ne!(
            addr.port(),
            0,
            "gateway: expected the real bound port in {listening:?}, not 0"
        );
        let gw = Gateway {
            addr,
            listening,
            config_path,
            proc,
        };
        (gw, admin_addr)
    }

    /// Sends `sig` (e.g. `libc::SIGTERM`) to the gateway process.
    pub fn signal(&self, sig: i32) {
        self.proc.signal(sig);
    }

    pub fn start_default() -> Gateway {
        Gateway::start(&GatewayConfig::default())
    }

    pub fn ws_url(&self) -> String {
        format!("ws://{}/ws", self.addr)
    }

    pub fn kill(&mut self) {
        self.proc.kill();
    }
}

pub struct Receiver {
    pub proc: Proc,
    connected: usize,
}

impl Receiver {
    pub fn start(gateway: SocketAddr, app: SocketAddr, token: &str, tunnels: u32) -> Receiver {
        Receiver::start_with(&ReceiverConfig::new(gateway, app, token, tunnels))
    }

    pub fn start_with(cfg: &ReceiverConfig) -> Receiver {
        let (proc, _) = Proc::anp_proxy_toml("receiver", "receiver", &cfg.to_toml(), &[], &cfg.env);
        Receiver { proc, connected: 0 }
    }

    /// [`Receiver::start_with`] under `ulimit {limits}` (e.g. `-Sn 64`).
    pub fn start_with_ulimit(cfg: &ReceiverConfig, limits: &str) -> Receiver {
        let (proc, _) = Proc::anp_proxy_toml_via(
            "receiver",
            "receiver",
            &cfg.to_toml(),
            &[],
            &cfg.env,
            Some(limits),
        );
        Receiver { proc, connected: 0 }
    }

    /// Starts a receiver from a config file the test wrote.
    pub fn start_file(config: &Path) -> Receiver {
        Receiver {
            proc: Proc::anp_proxy("receiver", "receiver", config, &[], &[]),
            connected: 0,
        }
    }

    /// Waits until `n` tunnels in total have reported `connected` since start.
    pub fn wait_connected(&mut self, n: usize) {
        while self.connected < n {
            let want = format!("tunnel connection {} of {n}", self.connected + 1);
            self.proc.wait_line(
                &format!("`anp-proxy receiver tunnel K connected to ws(s)://…` ({want})"),
                |l| l.starts_with("anp-proxy receiver tunnel") && l.contains(" connected to "),
            );
            self.connected += 1;
        }
    }

    /// Tunnels reported connected so far (only counts lines already waited for).
    pub fn connected(&self) -> usize {
        self.connected
    }

    /// SIGKILL.
    pub fn kill(&mut self) {
        self.proc.kill();
    }
}

/// A TCP relay placed between a receiver and the gateway: it forwards bytes
/// both ways and reports the first line the gateway sends on each connection
/// (the upgrade's status line), so a test knows a tunnel attempt was answered
/// without reading logs or sleeping.
pub struct Relay {
    pub addr: SocketAddr,
    status_lines: Rx<String>,
}

impl Relay {
    pub fn start(upstream: SocketAddr) -> Relay {
        use std::io::{Read, Write};
        use std::net::{TcpListener, TcpStream};
        let listener = TcpListener::bind("127.0.0.1:0").expect("relay: bind 127.0.0.1:0");
        let addr = listener.local_addr().unwrap();
        let (tx, status_lines) = mpsc::channel::<String>();
        thread::spawn(move || {
            for down in listener.incoming() {
                let Ok(down) = down else { continue };
                let Ok(up) = TcpStream::connect(upstream) else {
                    continue;
                };
                let (mut d_r, mut u_w) = (down.try_clone().unwrap(), up.try_clone().unwrap());
                thread::spawn(move || {
                    let _ = std::io::copy(&mut d_r, &mut u_w);
                    let _ = u_w.shutdown(std::net::Shutdown::Write);
                });
                let tx = tx.clone();
                let (mut u_r, mut d_w) = (up, down);
                thread::spawn(move || {
                    let mut first = Vec::new();
                    let mut reported = false;
                    let mut buf = [0u8; 16 * 1024];
                    loop {
                        let n = match u_r.read(&mut buf) {
                            Ok(0) | Err(_) => break,
                            Ok(n) => n,
                        };
                        if !reported {
                            first.extend_from_slice(&buf[..n]);
                            if let Some(p) = first.iter().position(|b| *b == b'\n') {
                                let _ = tx.send(
                                    String::from_utf8_lossy(&first[..p]).trim_end().to_string(),
                                );
                                reported = true;
                            }
                        }
                        if d_w.write_all(&buf[..n]).is_err() {
                            break;
                        }
                    }
                    let _ = d_w.shutdown(std::net::Shutdown::Write);
                });
            }
        });
        Relay { addr, status_lines }
    }

    /// Waits for the gateway's first line on the next relayed connection.
    pub fn next_status_line(&self) -> String {
        self.status_lines
            .recv_timeout(START_WAIT)
            .unwrap_or_else(|_| {
                panic!(
                    "relay: expected the gateway to answer a tunnel attempt within {START_WAIT:?}"
                )
            })
    }
}

/// What a command that runs to its end printed.
pub struct Finished {
    pub status: std::process::ExitStatus,
    pub stdout: String,
    pub stderr: String,
}

/// Runs `anp-proxy SUBCOMMAND --config CONFIG FLAGS…` (in CONFIG's
/// directory) to its end: a command that should stop by itself (`check`,
/// or a start that must fail). Panics if it is still running after
/// [`START_WAIT`] (it is killed): e.g. a start that should have failed and
/// serves instead.
pub fn run_to_end(subcommand: &str, flags: &[&str], config: &std::path::Path) -> Finished {
    use std::io::Read;
    let mut child = Command::new(binary())
        .arg(subcommand)
        .arg("--config")
        .arg(config)
        .args(flags)
        .current_dir(config.parent().unwrap())
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap_or_else(|e| panic!("expected to spawn {} {subcommand}: {e}", binary()));
    let (tx, rx) = mpsc::channel::<(bool, String)>();
    for (is_out, mut pipe) in [
        (
            true,
            Box::new(child.stdout.take().unwrap()) as Box<dyn Read + Send>,
        ),
        (false, Box::new(child.stderr.take().unwrap())),
    ] {
        let tx = tx.clone();
        thread::spawn(move || {
            let mut text = String::new();
            let _ = pipe.read_to_string(&mut text);
            let _ = tx.send((is_out, text));
        });
    }
    let (mut stdout, mut stderr) = (None, None);
    let deadline = Instant::now() + START_WAIT;
    while stdout.is_none() || stderr.is_none() {
        let left = deadline.saturating_duration_since(Instant::now());
        match rx.recv_timeout(left) {
            Ok((true, t)) => stdout = Some(t),
            Ok((false, t)) => stderr = Some(t),
            Err(_) => {
                let _ = child.kill();
                let _ = child.wait();
                panic!("`anp-proxy {subcommand} {flags:?}` still running after {START_WAIT:?}; expected it to stop by itself");
            }
        }
    }
    let status = child.wait().expect("wait for the child");
    let (stdout, stderr) = (stdout.unwrap(), stderr.unwrap());
    eprintln!("anp-proxy {subcommand} {flags:?}: {status}\nstdout:\n{stdout}\nstderr:\n{stderr}");
    Finished {
        status,
        stdout,
        stderr,
    }
}
