//! A gateway or receiver run by `./manage.sh` in a temporary run
//! directory with a config of its own (manage, restart and fleet tests);
//! on drop, any process it left running on that config is SIGKILLed.

use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::process::{Command, Output};
use std::sync::Mutex;

use super::procs::{addr_in, binary};
use super::wait::wait_until;

/// How long a test waits for a line in the gateway's log.
const WAIT: std::time::Duration = std::time::Duration::from_secs(60);

pub struct Managed {
    dir: tempfile::TempDir,
    /// `gateway` or `receiver`: whose log and pid file are read.
    role: &'static str,
    pids: Mutex<Vec<u32>>,
}

impl Managed {
    /// A gateway's run directory and config.
    pub fn new(config: &str) -> Managed {
        Managed::with_role("gateway", config)
    }

    pub fn with_role(role: &'static str, config: &str) -> Managed {
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

    pub fn config(&self) -> PathBuf {
        self.dir.path().join("config.toml")
    }

    pub fn run_dir(&self) -> PathBuf {
        self.dir.path().join("run")
    }

    pub fn log_path(&self) -> PathBuf {
        self.run_dir().join(format!("anp-proxy-{}.log", self.role))
    }

    pub fn pid_path(&self) -> PathBuf {
        self.run_dir().join(format!("anp-proxy-{}.pid", self.role))
    }

    pub fn log(&self) -> String {
        std::fs::read_to_string(self.log_path()).unwrap_or_default()
    }

    /// `./manage.sh ARGS…`, whatever its exit.
    pub fn try_run(&self, args: &[&str]) -> Output {
        let script = Path::new(env!("CARGO_MANIFEST_DIR")).join("manage.sh");
        let out = Command::new(&script)
            .args(args)
            .env("ANP_RUN_DIR", self.run_dir())
            .env("ANP_CONFIG", self.config())
            .env("ANP_BIN", binary())
            .output()
            .expect("run manage.sh");
        self.pid();
        out
    }

    /// [`Self::try_run`]; panics with its output and the log unless it
    /// exits 0.
    pub fn run(&self, args: &[&str]) -> Output {
        let out = self.try_run(args);
        assert!(
            out.status.success(),
            "manage.sh {args:?}: expected exit 0, got {}\nstdout: {}\nstderr: {}\nlog:\n{}",
            out.status,
            String::from_utf8_lossy(&out.stdout),
            String::from_utf8_lossy(&out.stderr),
            self.log()
        );
        out
    }

    /// The pid in the pid file (remembered for the cleanup), 0 if none.
    pub fn pid(&self) -> u32 {
        let text = std::fs::read_to_string(self.pid_path()).unwrap_or_default();
        let pid = text.trim().parse().unwrap_or(0);
        if pid != 0 {
            self.pids.lock().unwrap().push(pid);
        }
        pid
    }

    /// The address in the first log line starting with `prefix`.
    pub fn addr_after(&self, prefix: &str) -> SocketAddr {
        let mut line = None;
        wait_until(&format!("`{prefix}` in the log"), WAIT, || {
            line = self
                .log()
                .lines()
                .find(|l| l.starts_with(prefix))
                .map(str::to_owned);
            line.is_some()
        });
        addr_in(&line.unwrap())
    }
}

impl Drop for Managed {
    fn drop(&mut self) {
        let config = self.config();
        let config = config.to_string_lossy();
        for &pid in self.pids.lock().unwrap_or_else(|e| e.into_inner()).iter() {
            // Only a process still running our binary on this config.
            let cmdline = std::fs::read(format!("/proc/{pid}/cmdline")).unwrap_or_default();
            if String::from_utf8_lossy(&cmdline).contains(&*config) {
                // SAFETY: kill(2) on a pid we checked runs our config.
                unsafe { libc::kill(pid as i32, libc::SIGKILL) };
            }
        }
    }
}
