//! Starting the real `anp-proxy` binary as a gateway or a receiver, each with
//! its own temporary config file, and waiting on what it prints to stdout
//! (never on sleeps). stderr (the logs) is forwarded line by line through
//! `eprintln!`, so libtest shows it only for failing tests. Children are
//! SIGKILLed on drop.

use std::io::{BufRead, BufReader};
use std::net::SocketAddr;
use std::path::PathBuf;
use std::process::{Child, Command, ExitStatus, Stdio};
use std::sync::mpsc::{self, Receiver as Rx, RecvTimeoutError};
use std::sync::{Arc, Mutex};
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
        }
    }
}

fn toml_str(s: &str) -> String {
    serde_json::to_string(s).unwrap() // a JSON string literal is a valid TOML basic string
}

impl GatewayConfig {
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
    /// Every stderr (log) line so far, for tests that count log lines.
    stderr: Arc<Mutex<Vec<String>>>,
}

/// The binary under test; `ANP_PROXY_BIN` may point at another build.
pub fn binary() -> String {
    std::env::var("ANP_PROXY_BIN").unwrap_or_else(|_| env!("CARGO_BIN_EXE_anp-proxy").to_string())
}

impl Proc {
    fn spawn(name: &str, subcommand: &str, config: &str) -> Proc {
        Proc::spawn_env(name, subcommand, config, &[])
    }

    /// As [`Proc::spawn`], with extra environment variables.
    fn spawn_env(name: &str, subcommand: &str, config: &str, env: &[(String, String)]) -> Proc {
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
        let kept = Arc::new(Mutex::new(Vec::new()));
        let k = kept.clone();
        thread::spawn(move || {
            for line in BufReader::new(stderr).lines() {
                let Ok(line) = line else { break };
                eprintln!("{tag}: {line}");
                k.lock().unwrap_or_else(|e| e.into_inner()).push(line);
            }
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
        let v = self.stderr.lock().unwrap_or_else(|e| e.into_inner());
        v.get(from..).map(<[String]>::to_vec).unwrap_or_default()
    }

    /// How many stderr lines have been received so far.
    pub fn stderr_len(&self) -> usize {
        self.stderr.lock().unwrap_or_else(|e| e.into_inner()).len()
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

    pub fn kill(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
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

pub struct Gateway {
    pub addr: SocketAddr,
    pub proc: Proc,
}

impl Gateway {
    pub fn start(cfg: &GatewayConfig) -> Gateway {
        Gateway::start_toml(&cfg.to_toml())
    }

    /// Starts a gateway with its admin listener on an ephemeral port
    /// (`admin_port = 0` appended to `[gateway]`); returns it with the
    /// admin address from `anp-proxy admin listening on http://…`. The two
    /// start-up lines may come in either order.
    pub fn start_with_admin(cfg: &GatewayConfig) -> (Gateway, SocketAddr) {
        let mut cfg = cfg.clone();
        cfg.extra_gateway_toml += "admin_port = 0\n";
        let mut proc = Proc::spawn("gateway", "gateway", &cfg.to_toml());
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
        Gateway::start_toml_env(toml, &[])
    }

    /// As [`Gateway::start_toml`], with extra environment variables.
    pub fn start_toml_env(toml: &str, env: &[(String, String)]) -> Gateway {
        let mut proc = Proc::spawn_env("gateway", "gateway", toml, env);
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
            proc: Proc::spawn_env("receiver", "receiver", &cfg.to_toml(), &cfg.env),
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
