//! Starting the real `anp-proxy` binary as a gateway or a receiver, each with
//! its own temporary config file, and waiting on what it prints to stdout
//! (never on sleeps). stderr (the logs) is forwarded line by line through
//! `eprintln!`, so libtest shows it only for failing tests. Children are
//! SIGKILLed on drop.

use std::io::{BufRead, BufReader};
use std::net::SocketAddr;
use std::path::PathBuf;
use std::process::{Child, Command, Stdio};
use std::sync::mpsc::{self, Receiver as Rx, RecvTimeoutError};
use std::sync::{Arc, Condvar, Mutex};
use std::thread;
use std::time::{Duration, Instant};
use tempfile::TempDir;

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

/// A child process with its stdout lines on a channel.
pub struct Proc {
    pub name: String,
    pub child: Child,
    pub dir: TempDir,
    pub config_path: PathBuf,
    lines: Rx<String>,
    /// Every stderr (log) line so far, for tests that count log lines;
    /// the condvar is notified on each new line and at EOF.
    stderr: Arc<(Mutex<Log>, Condvar)>,
}

/// The stderr lines of a process, and whether it closed stderr.
#[derive(Default)]
pub struct Log {
    pub lines: Vec<String>,
    pub closed: bool,
}

/// The binary under test; `ANP_PROXY_BIN` may point at another build.
pub fn binary() -> String {
    std::env::var("ANP_PROXY_BIN").unwrap_or_else(|_| env!("CARGO_BIN_EXE_anp-proxy").to_string())
}

impl Proc {
    /// Runs `anp-proxy SUBCOMMAND --config FILE FLAGS…` with `config`
    /// written to FILE in a fresh temporary directory.
    pub fn spawn(name: &str, subcommand: &str, flags: &[&str], config: &str) -> Proc {
        Proc::spawn_env(name, subcommand, flags, config, &[])
    }

    /// As [`Proc::spawn`], with extra environment variables.
    pub fn spawn_env(
        name: &str,
        subcommand: &str,
        flags: &[&str],
        config: &str,
        env: &[(String, String)],
    ) -> Proc {
        let dir = tempfile::Builder::new()
            .prefix(&format!("anp-e2e-{name}-"))
            .tempdir()
            .expect("tempdir");
        let config_path = dir.path().join("config.toml");
        std::fs::write(&config_path, config).expect("write config");
        let mut child = Command::new(binary())
            .arg(subcommand)
            .arg("--config")
            .arg(&config_path)
            .args(flags)
            .current_dir(dir.path())
            .envs(env.iter().map(|(k, v)| (k.as_str(), v.as_str())))
            .stdin(Stdio::null())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .spawn()
            .unwrap_or_else(|e| panic!("expected to spawn {} {subcommand}: {e}", binary()));
        let (tx, lines) = mpsc::channel();
        let stdout = child.stdout.take().unwrap();
        let tag = format!("{name}[{}]", child.id());
        let t = tag.clone();
        thread::spawn(move || {
            for line in BufReader::new(stdout).lines() {
                let Ok(line) = line else { break };
                eprintln!("{t} stdout: {line}");
                if tx.send(line).is_err() {
                    // nobody listens any more; keep draining so the child never blocks
                }
            }
        });
        let stderr = child.stderr.take().unwrap();
        let kept = Arc::new((Mutex::new(Log::default()), Condvar::new()));
        let k = kept.clone();
        thread::spawn(move || {
            for line in BufReader::new(stderr).lines() {
                let Ok(line) = line else { break };
                eprintln!("{tag}: {line}");
                k.0.lock()
                    .unwrap_or_else(|e| e.into_inner())
                    .lines
                    .push(line);
                k.1.notify_all();
            }
            k.0.lock().unwrap_or_else(|e| e.into_inner()).closed = true;
            k.1.notify_all();
        });
        Proc {
            name: name.into(),
            child,
            dir,
            config_path,
            lines,
            stderr: kept,
        }
    }

    pub fn pid(&self) -> u32 {
        self.child.id()
    }

    /// The stderr (log) lines received so far, from line `from` on.
    pub fn stderr_lines(&self, from: usize) -> Vec<String> {
        let v = self.stderr.0.lock().unwrap_or_else(|e| e.into_inner());
        v.lines
            .get(from..)
            .map(<[String]>::to_vec)
            .unwrap_or_default()
    }

    /// How many stderr lines have been received so far.
    pub fn stderr_len(&self) -> usize {
        self.stderr
            .0
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .lines
            .len()
    }

    /// Waits for a stderr (log) line from line `from` on that satisfies
    /// `pred` (woken by each new line, no polling); panics with `what` and
    /// the log after [`START_WAIT`] or when the process closes stderr
    /// without one.
    pub fn wait_log_from(
        &self,
        from: usize,
        what: &str,
        mut pred: impl FnMut(&str) -> bool,
    ) -> String {
        let deadline = Instant::now() + START_WAIT;
        let (lock, cv) = &*self.stderr;
        let mut log = lock.lock().unwrap_or_else(|e| e.into_inner());
        let mut next = from;
        loop {
            while next < log.lines.len() {
                if pred(&log.lines[next]) {
                    return log.lines[next].clone();
                }
                next += 1;
            }
            let left = deadline.saturating_duration_since(Instant::now());
            if log.closed || left.is_zero() {
                panic!(
                    "{}: expected {what} in the log{}; it says:\n{}",
                    self.name,
                    if log.closed { " before it closed" } else { "" },
                    log.lines.join("\n")
                );
            }
            log = cv
                .wait_timeout(log, left)
                .unwrap_or_else(|e| e.into_inner())
                .0;
        }
    }

    /// [`Proc::wait_log_from`] from the first line.
    pub fn wait_log(&self, what: &str, pred: impl FnMut(&str) -> bool) -> String {
        self.wait_log_from(0, what, pred)
    }

    /// Waits for a stdout line satisfying `pred`; panics with `what` on
    /// timeout or if the process exits first.
    pub fn wait_line(&mut self, what: &str, mut pred: impl FnMut(&str) -> bool) -> String {
        let deadline = Instant::now() + START_WAIT;
        loop {
            let left = deadline.saturating_duration_since(Instant::now());
            match self.lines.recv_timeout(left) {
                Ok(line) if pred(&line) => return line,
                Ok(_) => continue,
                Err(RecvTimeoutError::Timeout) => {
                    panic!(
                        "{}: expected {what} on stdout within {START_WAIT:?}, got nothing",
                        self.name
                    )
                }
                Err(RecvTimeoutError::Disconnected) => {
                    let status = self
                        .child
                        .wait()
                        .map(|s| s.to_string())
                        .unwrap_or_else(|e| e.to_string());
                    panic!("{}: expected {what} on stdout, but the process closed stdout (exit: {status})", self.name)
                }
            }
        }
    }

    /// Waits for a stdout line satisfying `pred` or for the process to
    /// close its stdout (it exited): `Ok(line)`, or `Err(exit status)`.
    /// Panics with `what` after [`START_WAIT`].
    pub fn wait_line_or_exit(
        &mut self,
        what: &str,
        mut pred: impl FnMut(&str) -> bool,
    ) -> Result<String, std::process::ExitStatus> {
        let deadline = Instant::now() + START_WAIT;
        loop {
            let left = deadline.saturating_duration_since(Instant::now());
            match self.lines.recv_timeout(left) {
                Ok(line) if pred(&line) => return Ok(line),
                Ok(_) => continue,
                Err(RecvTimeoutError::Timeout) => panic!(
                    "{}: expected {what} on stdout or an exit within {START_WAIT:?}, got neither",
                    self.name
                ),
                Err(RecvTimeoutError::Disconnected) => {
                    return Err(self.child.wait().expect("wait for the child"))
                }
            }
        }
    }

    pub fn kill(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }

    /// Non-blocking: has it exited?
    pub fn exited(&mut self) -> Option<std::process::ExitStatus> {
        self.child.try_wait().ok().flatten()
    }
}

impl Drop for Proc {
    fn drop(&mut self) {
        self.kill();
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

pub struct Gateway {
    pub addr: SocketAddr,
    pub proc: Proc,
}

impl Gateway {
    pub fn start(cfg: &GatewayConfig) -> Gateway {
        Gateway::start_toml_with(&cfg.to_toml(), cfg.flags())
    }

    /// Starts a gateway with its admin listener on an ephemeral port
    /// (`admin_port = 0` appended to `[gateway]`); returns it with the
    /// admin address from `anp-proxy admin listening on http://…`. The two
    /// start-up lines may come in either order.
    pub fn start_with_admin(cfg: &GatewayConfig) -> (Gateway, SocketAddr) {
        let mut cfg = cfg.clone();
        cfg.extra_gateway_toml += "admin_port = 0\n";
        let mut proc = Proc::spawn("gateway", "gateway", cfg.flags(), &cfg.to_toml());
        let (mut public, mut admin) = (None, None);
        while public.is_none() || admin.is_none() {
            let line = proc.wait_line(
                "`anp-proxy gateway listening on http://…` and `anp-proxy admin listening on http://…`",
                |l| l.contains(" listening on http://"),
            );
            let addr_txt = line
                .split("listening on http://")
                .nth(1)
                .and_then(|r| r.split_whitespace().next())
                .unwrap_or("");
            let addr: SocketAddr = addr_txt
                .parse()
                .unwrap_or_else(|e| panic!("gateway: expected a socket address in {line:?}: {e}"));
            if line.contains("anp-proxy admin listening") {
                admin = Some(addr);
            } else if line.contains("anp-proxy gateway listening") {
                public = Some(addr);
            }
        }
        (
            Gateway {
                addr: public.unwrap(),
                proc,
            },
            admin.unwrap(),
        )
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

    fn launch(toml: &str, flags: &[&str], env: &[(String, String)]) -> Gateway {
        let mut proc = Proc::spawn_env("gateway", "gateway", flags, toml, env);
        let line = proc.wait_line(
            "the line `anp-proxy gateway listening on http://…`",
            |l| l.contains("anp-proxy gateway listening on http://"),
        );
        let addr_txt = line
            .split("listening on http://")
            .nth(1)
            .and_then(|r| r.split_whitespace().next())
            .unwrap_or("");
        let addr: SocketAddr = addr_txt
            .parse()
            .unwrap_or_else(|e| panic!("gateway: expected a socket address in {line:?}: {e}"));
        assert_ne!(
            addr.port(),
            0,
            "gateway: expected the real bound port in {line:?}, not 0"
        );
        Gateway { addr, proc }
    }

    /// Sends `sig` (e.g. `libc::SIGTERM`) to the gateway process.
    pub fn signal(&self, sig: i32) {
        // SAFETY: kill(2) on our own child's pid.
        let rc = unsafe { libc::kill(self.proc.child.id() as i32, sig) };
        assert_eq!(rc, 0, "kill({sig}) on the gateway failed");
    }

    /// Waits (up to `within`) for the process to exit; its status.
    pub fn wait_exit(&mut self, within: Duration) -> Option<std::process::ExitStatus> {
        let until = Instant::now() + within;
        loop {
            if let Some(s) = self.proc.exited() {
                return Some(s);
            }
            if Instant::now() >= until {
                return None;
            }
            thread::sleep(Duration::from_millis(20));
        }
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
        Receiver {
            proc: Proc::spawn_env("receiver", "receiver", &[], &cfg.to_toml(), &cfg.env),
            connected: 0,
        }
    }

    /// Waits until `n` tunnels in total have reported `connected` since start.
    pub fn wait_connected(&mut self, n: usize) {
        while self.connected < n {
            let want = format!("tunnel connection {} of {n}", self.connected + 1);
            self.proc.wait_line(
                &format!("`anp-proxy receiver tunnel K connected to ws://…` ({want})"),
                |l| l.contains("anp-proxy receiver tunnel") && l.contains("connected to ws://"),
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
