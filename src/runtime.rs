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
        let mut rt = match monoio::RuntimeBuilder::<monoio::FusionDriver>::new()
            .enable_timer()
            .build()
        {
            Ok(rt) => rt,
            Err(e) => {
                tracing::error!(error = %e, "cannot build runtime");
                std::process::exit(1);
            }
        };
        rt.block_on(body());
    })
}
