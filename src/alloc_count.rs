//! Allocation counting for benchmarks (cargo feature `count-allocs`, off
//! by default; issue 11): a global allocator that counts the calls it
//! passes on to mimalloc, and a thread that prints the counts when the
//! process gets SIGUSR2. `benches/bench.py --allocs` sends the signal at
//! the start and at the end of its measured window and divides the
//! difference by the requests served in it.
//!
//! The default build never compiles this module: its binary's allocator is
//! plain `mimalloc::MiMalloc` (src/main.rs), so the hot path pays nothing.
//! In a counting build every allocation costs a few relaxed atomic
//! increments on one shared cache line, which the cores contend for: use
//! such a build for counts only, never for throughput or CPU figures.
//! Never allocates while counting; never blocks an allocating thread.

use std::alloc::{GlobalAlloc, Layout};
use std::io::Write as _;
use std::sync::atomic::{AtomicU64, Ordering::Relaxed};

/// The counters, on one cache line: the thread that allocates bumps two
/// of them at once, so one line moves between cores, not two.
#[repr(align(64))]
struct Counters {
    allocations: AtomicU64,
    reallocations: AtomicU64,
    deallocations: AtomicU64,
    allocated_bytes: AtomicU64,
    freed_bytes: AtomicU64,
}

static COUNTERS: Counters = Counters {
    allocations: AtomicU64::new(0),
    reallocations: AtomicU64::new(0),
    deallocations: AtomicU64::new(0),
    allocated_bytes: AtomicU64::new(0),
    freed_bytes: AtomicU64::new(0),
};

/// The counting allocator: mimalloc underneath, every call counted.
pub struct Counting;

// SAFETY: every method forwards to `MiMalloc` with the caller's own
// arguments, so `MiMalloc`'s guarantees are ours; the counters are
// atomics that never allocate.
unsafe impl GlobalAlloc for Counting {
    unsafe fn alloc(&self, layout: Layout) -> *mut u8 {
        COUNTERS.allocations.fetch_add(1, Relaxed);
        COUNTERS
            .allocated_bytes
            .fetch_add(layout.size() as u64, Relaxed);
        // SAFETY: the caller's contract for `alloc`, passed on unchanged.
        unsafe { mimalloc::MiMalloc.alloc(layout) }
    }

    unsafe fn alloc_zeroed(&self, layout: Layout) -> *mut u8 {
        COUNTERS.allocations.fetch_add(1, Relaxed);
        COUNTERS
            .allocated_bytes
            .fetch_add(layout.size() as u64, Relaxed);
        // SAFETY: as in `alloc`.
        unsafe { mimalloc::MiMalloc.alloc_zeroed(layout) }
    }

    unsafe fn dealloc(&self, ptr: *mut u8, layout: Layout) {
        COUNTERS.deallocations.fetch_add(1, Relaxed);
        COUNTERS
            .freed_bytes
            .fetch_add(layout.size() as u64, Relaxed);
        // SAFETY: `ptr` came from this allocator (hence from MiMalloc)
        // with `layout`, as the caller guarantees.
        unsafe { mimalloc::MiMalloc.dealloc(ptr, layout) }
    }

    unsafe fn realloc(&self, ptr: *mut u8, layout: Layout, new_size: usize) -> *mut u8 {
        // A growing `Vec` or `BytesMut` reallocates: a call into the
        // allocator like any other, which may copy; its new size counts
        // as allocated bytes, its old one as freed.
        COUNTERS.reallocations.fetch_add(1, Relaxed);
        COUNTERS.allocated_bytes.fetch_add(new_size as u64, Relaxed);
        COUNTERS
            .freed_bytes
            .fetch_add(layout.size() as u64, Relaxed);
        // SAFETY: as in `dealloc`, and `new_size` is the caller's.
        unsafe { mimalloc::MiMalloc.realloc(ptr, layout, new_size) }
    }
}

/// The counters at one moment (each read on its own: under load the four
/// are not one atomic snapshot, which a difference over a window of
/// thousands of requests does not notice).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Counts {
    /// `alloc` and `alloc_zeroed` calls.
    pub allocations: u64,
    /// `realloc` calls.
    pub reallocations: u64,
    /// `dealloc` calls.
    pub deallocations: u64,
    /// Bytes asked for by `alloc`, `alloc_zeroed` (their sizes) and
    /// `realloc` (its new sizes).
    pub allocated_bytes: u64,
    /// Bytes given back by `dealloc` and `realloc` (its old sizes): what
    /// the heap holds live is `allocated_bytes - freed_bytes`, whatever
    /// the allocator keeps besides (RSS counts both).
    pub freed_bytes: u64,
}

/// The process's counts so far.
pub fn snapshot() -> Counts {
    Counts {
        allocations: COUNTERS.allocations.load(Relaxed),
        reallocations: COUNTERS.reallocations.load(Relaxed),
        deallocations: COUNTERS.deallocations.load(Relaxed),
        allocated_bytes: COUNTERS.allocated_bytes.load(Relaxed),
        freed_bytes: COUNTERS.freed_bytes.load(Relaxed),
    }
}

/// The stdout line SIGUSR2 prints: `seq` is how many such lines this
/// process printed before, so a reader can wait for the one it asked for.
pub fn line(seq: u64, c: &Counts) -> String {
    format!(
        "alloc-counts seq={seq} allocations={} reallocations={} deallocations={} allocated_bytes={} freed_bytes={}",
        c.allocations, c.reallocations, c.deallocations, c.allocated_bytes, c.freed_bytes
    )
}

/// Starts the `anp-alloc-counts` thread: each SIGUSR2 prints [`line`] on
/// stdout (the counts are read before the line is formatted, so the
/// printing's own allocations land in the next reading). Without this
/// thread SIGUSR2 would end the process, as by default.
pub fn report_on_sigusr2() -> std::io::Result<()> {
    let mut signals = signal_hook::iterator::Signals::new([signal_hook::consts::SIGUSR2])?;
    std::thread::Builder::new()
        .name("anp-alloc-counts".into())
        .spawn(move || {
            for (seq, _) in (0u64..).zip(signals.forever()) {
                let counts = snapshot();
                let mut out = std::io::stdout().lock();
                let _ = writeln!(out, "{}", line(seq, &counts));
                let _ = out.flush();
            }
        })?;
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn every_call_is_counted() {
        // Other tests allocate on other threads at the same time through
        // the test binary's own allocator, never through `Counting`: only
        // the calls below move these counters.
        let a = Counting;
        let before = snapshot();
        let layout = Layout::from_size_align(100, 8).unwrap();
        // SAFETY: a non-zero layout; each pointer is freed once with the
        // layout it has.
        unsafe {
            let p = a.alloc(layout);
            assert!(!p.is_null());
            let p = a.realloc(p, layout, 300);
            assert!(!p.is_null());
            a.dealloc(p, Layout::from_size_align(300, 8).unwrap());
            let z = a.alloc_zeroed(layout);
            assert!(std::slice::from_raw_parts(z, 100).iter().all(|&b| b == 0));
            a.dealloc(z, layout);
        }
        let after = snapshot();
        assert_eq!(after.allocations - before.allocations, 2);
        assert_eq!(after.reallocations - before.reallocations, 1);
        assert_eq!(after.deallocations - before.deallocations, 2);
        assert_eq!(after.allocated_bytes - before.allocated_bytes, 500);
        assert_eq!(after.freed_bytes - before.freed_bytes, 500);
        assert_eq!(
            line(3, &after).split_whitespace().next(),
            Some("alloc-counts")
        );
    }
}
