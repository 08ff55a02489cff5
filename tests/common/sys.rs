//! What the fault tests read from the kernel about a child process: its
//! resident memory and open descriptors (`/proc/<pid>`), signals to stop,
//! continue or kill it, and the test process's own descriptor limit
//! (children inherit it).

/// `VmRSS` (resident memory now) of `pid` in KiB.
pub fn rss_kib(pid: u32) -> u64 {
    status_kib(pid, "VmRSS")
}

/// `VmHWM` (peak resident memory so far) of `pid` in KiB.
pub fn hwm_kib(pid: u32) -> u64 {
    status_kib(pid, "VmHWM")
}

/// A `kB` field of `/proc/<pid>/status`.
pub fn status_kib(pid: u32, key: &str) -> u64 {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status"))
        .unwrap_or_else(|e| panic!("expected to read /proc/{pid}/status: {e}"));
    status
        .lines()
        .find_map(|l| l.strip_prefix(key)?.strip_prefix(':'))
        .and_then(|v| v.trim().trim_end_matches("kB").trim().parse().ok())
        .unwrap_or_else(|| panic!("expected a {key} line in /proc/{pid}/status"))
}

pub fn mib(kib: u64) -> f64 {
    kib as f64 / 1024.0
}

/// Open descriptors of `pid` (entries of `/proc/<pid>/fd`). Tests compare
/// with `<=` a count taken earlier: a leak only ever adds, while a
/// descriptor the process held briefly when the baseline was read (a
/// start-up probe, a database read) may be gone later.
pub fn fd_count(pid: u32) -> usize {
    std::fs::read_dir(format!("/proc/{pid}/fd"))
        .unwrap_or_else(|e| panic!("expected to list /proc/{pid}/fd: {e}"))
        .count()
}

/// Sends `sig` (e.g. `libc::SIGSTOP`) to `pid`.
pub fn signal(pid: u32, sig: i32) {
    // SAFETY: kill(2) with a pid this test spawned and still owns.
    let r = unsafe { libc::kill(pid as libc::pid_t, sig) };
    assert_eq!(
        r,
        0,
        "expected kill({pid}, {sig}) to succeed: {}",
        std::io::Error::last_os_error()
    );
}

/// SIGSTOPs `pid` and returns once every one of its threads is stopped:
/// kill(2) returns when the signal is queued, and a thread that was
/// running goes on (serving what just arrived) until it next enters the
/// kernel.
pub fn stop(pid: u32) {
    signal(pid, libc::SIGSTOP);
    super::wait_until(
        &format!("every thread of {pid} to be stopped"),
        std::time::Duration::from_secs(10),
        || {
            let Ok(tasks) = std::fs::read_dir(format!("/proc/{pid}/task")) else {
                return false;
            };
            tasks.flatten().all(|t| {
                let Ok(st) = std::fs::read_to_string(t.path().join("stat")) else {
                    return true; // exited meanwhile
                };
                // "tid (name) S …": io_uring's kernel workers (iou-wrk-…,
                // iou-sqp-…) are not stopped by signals; the rest must be.
                match st.split_once(" (").and_then(|(_, r)| r.rsplit_once(") ")) {
                    Some((name, _)) if name.starts_with("iou-") => true,
                    Some((_, rest)) => rest.starts_with(['T', 't']),
                    None => false,
                }
            })
        },
    );
}

/// Raises this process's `RLIMIT_NOFILE` soft limit to the hard limit
/// (processes spawned afterwards inherit it); returns the new soft limit.
pub fn raise_nofile_limit() -> u64 {
    let mut lim = libc::rlimit {
        rlim_cur: 0,
        rlim_max: 0,
    };
    // SAFETY: getrlimit/setrlimit with a valid, owned struct.
    unsafe {
        assert_eq!(libc::getrlimit(libc::RLIMIT_NOFILE, &mut lim), 0);
        if lim.rlim_cur < lim.rlim_max {
            lim.rlim_cur = lim.rlim_max;
            assert_eq!(
                libc::setrlimit(libc::RLIMIT_NOFILE, &lim),
                0,
                "expected setrlimit(RLIMIT_NOFILE) to the hard limit to succeed: {}",
                std::io::Error::last_os_error()
            );
        }
    }
    #[allow(clippy::unnecessary_cast)] // rlim_t is not u64 everywhere
    let soft = lim.rlim_cur as u64;
    soft
}
