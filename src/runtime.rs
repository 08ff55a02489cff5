//! One monoio runtime per core, on a thread of its own: the gateway's
//! workers and the receiver's cores start the same way (io_uring, falling
//! back to epoll where the kernel refuses it; timers on).
//!
//! Never shares anything between the runtimes it starts: what a core needs
//! is built inside `body`, on that core's thread.

use std::future::Future;
use std::thread::JoinHandle;

/// Starts a thread named `name` running `body()` to completion on a new
/// runtime. A runtime that cannot be built ends the process (status 1):
/// a gateway or receiver short of a core is not what was configured.
pub fn spawn_core<F, Fut>(name: String, body: F) -> std::io::Result<JoinHandle<()>>
where
    F: FnOnce() -> Fut + Send + 'static,
    Fut: Future<Output = ()> + 'static,
{
    std::thread::Builder::new().name(name).spawn(move || {
        // The ring is set up for one thread that alone submits and reaps
        // (SINGLE_ISSUER), with completions run when this thread asks for
        // them (DEFER_TASKRUN) rather than by interrupting it (COOP_TASKRUN):
        // a socket's completion no longer preempts the core mid-request, and
        // a park reaps them in one batch. Measured with wrk and nginx as the
        // app, 1 KiB, 64 connections, alternated four times: gateway CPU
        // per request 10.2-12.3 µs against 12.9-16.7, receiver 9.6-11.3
        // against 11.7-14.3 (docs/ARCHITECTURE.md, "Runtime"). A kernel that
        // refuses the flags (before 6.1) gets monoio's default ring.
        let plain = || {
            monoio::RuntimeBuilder::<monoio::FusionDriver>::new()
                .enable_timer()
                .build()
        };
        let mut urb = io_uring::IoUring::builder();
        urb.setup_coop_taskrun()
            .setup_single_issuer()
            .setup_defer_taskrun();
        let tuned = monoio::RuntimeBuilder::<monoio::FusionDriver>::new()
            .uring_builder(urb)
            .enable_timer()
            .build()
            .or_else(|_| plain());
        let mut rt = match tuned {
            Ok(rt) => rt,
            Err(e) => {
                tracing::error!(error = %e, "cannot build runtime");
                std::process::exit(1);
            }
        };
        rt.block_on(body());
    })
}

/// Raises this process's soft open-file limit (`RLIMIT_NOFILE`) to its hard
/// limit, as nginx's `worker_rlimit_nofile` and Go's runtime do: shells and
/// service managers commonly start processes at a soft 1,024, which would
/// cap a gateway at about that many connections whatever `max_connections`
/// says. Logs what it did, and warns when even the hard limit is below
/// `need` (the descriptors the configuration can use at once).
pub fn raise_open_files(need: u64, what: &str) -> std::io::Result<()> {
    let mut lim = libc::rlimit {
        rlim_cur: 0,
        rlim_max: 0,
    };
    // SAFETY: getrlimit writes the struct we pass.
    if unsafe { libc::getrlimit(libc::RLIMIT_NOFILE, &mut lim) } != 0 {
        return Err(std::io::Error::last_os_error());
    }
    let was = lim.rlim_cur;
    if lim.rlim_cur < lim.rlim_max {
        let raised = libc::rlimit {
            rlim_cur: lim.rlim_max,
            rlim_max: lim.rlim_max,
        };
        // SAFETY: setrlimit reads the struct we pass; raising the soft
        // limit up to the hard one needs no privilege.
        if unsafe { libc::setrlimit(libc::RLIMIT_NOFILE, &raised) } == 0 {
            lim.rlim_cur = lim.rlim_max;
        }
    }
    let now = lim.rlim_cur;
    if now != was {
        tracing::info!(was, now, "open-file limit raised to the hard limit");
    }
    if now < need {
        tracing::warn!(
            limit = now,
            need,
            "open-file limit is below what {what} can use at once: past it, new connections fail at accept or connect (raise the hard limit: LimitNOFILE= in a systemd unit, ulimit -Hn, /etc/security/limits.conf)"
        );
    }
    Ok(())
}
