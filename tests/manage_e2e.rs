//! `./manage.sh` against a temporary run directory (issue #16, item 7,
//! and "restart receiver"):
//!
//! - `start` with a configuration `check` refuses launches nothing: exit
//!   2, the reason on stderr, no pid file, and no lines of an earlier
//!   run's log repeated;
//! - `restart receiver` starts the new receiver first and then drains the
//!   old one: a client loop through the gateway sees no failure, and the
//!   old process is gone afterwards.
//!
//! The real binary and script; ports 0; the loop's progress is waited on
//! with `wait_until`, never slept on.

mod common;

use std::path::{Path, PathBuf};
use std::process::{Command, Output};
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::thread;
use std::time::Duration;

use common::procs::binary;
use common::{client, wait_until, App, Gateway, GatewayConfig, ALICE_TOKEN};

const WAIT: Duration = Duration::from_secs(60);

/// A run directory and config for `manage.sh ROLE`; on drop, any process
/// it started (still running our binary on that config) is SIGKILLed.
struct Managed {
    dir: tempfile::TempDir,
    role: &'static str,
    pids: Mutex<Vec<u32>>,
}

impl Managed {
    fn new(role: &'static str, config: &str) -> Managed {
        let dir = tempfile::Builder::new()
            .prefix("anp-e2e-manage-")
            .tempdir()
            .unwrap();
        std::fs::write(dir.path().join("config.toml"), config).unwrap();
        Managed {
            dir,
            role,
            pids: Mutex::new(Vec::new()),
        }
    }

    fn config(&self) -> PathBuf {
        self.dir.path().join("config.toml")
    }

    fn run_dir(&self) -> PathBuf {
        self.dir.path().join("run")
    }

    fn log_path(&self) -> PathBuf {
        self.run_dir().join(format!("anp-proxy-{}.log", self.role))
    }

    fn pid_path(&self) -> PathBuf {
        self.run_dir().join(format!("anp-proxy-{}.pid", self.role))
    }

    /// `./manage.sh CMD ROLE`, whatever its exit.
    fn run(&self, cmd: &str) -> Output {
        let script = Path::new(env!("CARGO_MANIFEST_DIR")).join("manage.sh");
        let out = Command::new(&script)
            .args([cmd, self.role])
            .env("ANP_RUN_DIR", self.run_dir())
            .env("ANP_CONFIG", self.config())
            .env("ANP_BIN", binary())
            .env("ANP_STOP_WAIT", "30")
            .output()
            .expect("run manage.sh");
        self.pid();
        out
    }

    /// [`Self::run`], which must exit 0.
    fn ok(&self, cmd: &str) -> Output {
        let out = self.run(cmd);
        assert!(
            out.status.success(),
            "manage.sh {cmd} {}: {}\nstdout: {}\nstderr: {}\nlog:\n{}",
            self.role,
            out.status,
            String::from_utf8_lossy(&out.stdout),
            String::from_utf8_lossy(&out.stderr),
            std::fs::read_to_string(self.log_path()).unwrap_or_default()
        );
        out
    }

    /// The pid in the pid file (remembered for the cleanup), 0 if none.
    fn pid(&self) -> u32 {
        let pid = std::fs::read_to_string(self.pid_path())
            .unwrap_or_default()
            .trim()
            .parse()
            .unwrap_or(0);
        if pid != 0 {
            self.pids.lock().unwrap().push(pid);
        }
        pid
    }
}

impl Drop for Managed {
    fn drop(&mut self) {
        let config = self.config();
        let config = config.to_string_lossy();
        for &pid in self.pids.lock().unwrap_or_else(|e| e.into_inner()).iter() {
            let cmdline = std::fs::read(format!("/proc/{pid}/cmdline")).unwrap_or_default();
            if String::from_utf8_lossy(&cmdline).contains(&*config) {
                // SAFETY: kill(2) on a pid we checked runs our config.
                unsafe { libc::kill(pid as i32, libc::SIGKILL) };
            }
        }
    }
}

/// Whether `pid` has exited (gone, or a zombie nobody reaped yet).
fn gone(pid: u32) -> bool {
    match std::fs::read_to_string(format!("/proc/{pid}/stat")) {
        Err(_) => true,
        Ok(stat) => stat
            .rsplit_once(") ")
            .is_some_and(|(_, rest)| rest.starts_with('Z')),
    }
}

#[test]
fn start_with_a_config_check_refuses_launches_nothing() {
    // A receiver whose gateway_url is not ws(s)://: `check` refuses it.
    let m = Managed::new(
        "receiver",
        "[receiver]\ngateway_url = \"http://127.0.0.1:9/ws\"\ntoken = \"t-12345678\"\n",
    );
    // An earlier run's log: none of it may be shown again.
    std::fs::create_dir_all(m.run_dir()).unwrap();
    std::fs::write(m.log_path(), "OLD LINE from an earlier run\n").unwrap();
    let out = m.run("start");
    let (stdout, stderr) = (
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr),
    );
    assert_eq!(out.status.code(), Some(2), "{stdout}\n{stderr}");
    assert!(stderr.contains("receiver.gateway_url"), "{stderr}");
    assert!(stderr.contains("not started"), "{stderr}");
    assert!(!stderr.contains("OLD LINE") && !stdout.contains("OLD LINE"));
    assert!(!m.pid_path().exists(), "a pid file was written");
    assert_eq!(
        std::fs::read_to_string(m.log_path()).unwrap(),
        "OLD LINE from an earlier run\n",
        "the log was touched: something was launched"
    );
    // An unknown key too, named with its "did you mean".
    let m = Managed::new("gateway", "[gateway]\nprot = 1\n");
    let out = m.run("start");
    assert_eq!(out.status.code(), Some(2));
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(stderr.contains("did you mean `port`?"), "{stderr}");
    assert!(!m.pid_path().exists());
}

/// Clients asking the gateway for `/alice/…` in a loop, counting what
/// came back.
struct Load {
    stop: Arc<AtomicBool>,
    ok: Arc<AtomicUsize>,
    failures: Arc<Mutex<Vec<String>>>,
    threads: Vec<thread::JoinHandle<()>>,
}

impl Load {
    fn start(addr: std::net::SocketAddr, clients: usize) -> Load {
        let stop = Arc::new(AtomicBool::new(false));
        let ok = Arc::new(AtomicUsize::new(0));
        let failures = Arc::new(Mutex::new(Vec::new()));
        let threads = (0..clients)
            .map(|c| {
                let (stop, ok, failures) = (stop.clone(), ok.clone(), failures.clone());
                thread::spawn(move || {
                    let mut i = 0;
                    while !stop.load(Ordering::Relaxed) {
                        let r = client::request(addr, "GET", &format!("/alice/{c}/{i}"), &[], b"");
                        if r.status == 200 {
                            ok.fetch_add(1, Ordering::Relaxed);
                        } else {
                            failures.lock().unwrap().push(r.summary());
                        }
                        i += 1;
                    }
                })
            })
            .collect();
        Load {
            stop,
            ok,
            failures,
            threads,
        }
    }

    fn wait_more(&self, n: usize, what: &str) {
        let from = self.ok.load(Ordering::Relaxed);
        wait_until(what, WAIT, || self.ok.load(Ordering::Relaxed) >= from + n);
    }

    fn finish(self) -> (usize, Vec<String>) {
        self.stop.store(true, Ordering::Relaxed);
        for t in self.threads {
            t.join().unwrap();
        }
        let failures = self.failures.lock().unwrap().clone();
        (self.ok.load(Ordering::Relaxed), failures)
    }
}

#[test]
fn restart_receiver_replaces_it_without_a_failed_request() {
    let app = App::start();
    // No grace for a missing tunnel: a gap between the old receiver and
    // the new one would be a 503 at once, not hidden by a wait.
    let gw = Gateway::start(&GatewayConfig {
        workers: 1,
        extra_gateway_toml: "no_tunnel_wait = 0\n".into(),
        ..GatewayConfig::default()
    });
    let m = Managed::new(
        "receiver",
        &format!(
            "[receiver]\ngateway_url = \"{}\"\ntoken = \"{ALICE_TOKEN}\"\nupstream = \"http://{}\"\n\
             tunnels = 1\nshutdown_grace = 10\n",
            gw.ws_url(),
            app.addr
        ),
    );
    m.ok("start");
    let old = m.pid();
    assert_ne!(old, 0);
    let load = Load::start(gw.addr, 4);
    load.wait_more(50, "requests through the first receiver");
    let out = m.ok("restart");
    let new = m.pid();
    assert_ne!(new, old, "{}", String::from_utf8_lossy(&out.stdout));
    assert!(
        gone(old),
        "restart returned with the old receiver ({old}) running"
    );
    load.wait_more(50, "requests through the new receiver");
    let (ok, failures) = load.finish();
    assert!(
        failures.is_empty(),
        "manage.sh restart receiver: {ok} ok, {} failed: {:?}",
        failures.len(),
        &failures[..failures.len().min(5)]
    );
    m.ok("stop");
    assert!(gone(new));
}
