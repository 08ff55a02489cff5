//! Fault injection for the end-to-end tests of the panic policy
//! (`docs/ARCHITECTURE.md`, "When a worker panics"). Compiled into debug
//! builds only, and inert unless `ANP_PROXY_FAULT_PANIC_PATH` is set in the
//! environment: a request whose path is exactly that value panics the
//! worker thread that handles it. Release builds have no such path.

/// Should handling `path` panic? Always false in release builds.
#[cfg(debug_assertions)]
pub fn panic_requested(path: &str) -> bool {
    static WANT: std::sync::OnceLock<Option<String>> = std::sync::OnceLock::new();
    WANT.get_or_init(|| std::env::var("ANP_PROXY_FAULT_PANIC_PATH").ok())
        .as_deref()
        .is_some_and(|p| p == path)
}

#[cfg(not(debug_assertions))]
#[inline(always)]
pub fn panic_requested(_path: &str) -> bool {
    false
}

/// Panics when [`panic_requested`] says so: the injected fault.
#[inline]
pub fn maybe_panic(path: &str) {
    if panic_requested(path) {
        panic!("injected fault: ANP_PROXY_FAULT_PANIC_PATH = {path}");
    }
}
