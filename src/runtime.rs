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
