//! Client threads that repeat one request until stopped, counting what
//! came back (restart and manage tests: "no request failed meanwhile").

use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::thread;
use std::time::Duration;

use super::wait::wait_until;

pub struct Load {
    stop: Arc<AtomicBool>,
    ok: Arc<AtomicUsize>,
    failures: Arc<Mutex<Vec<String>>>,
    threads: Vec<thread::JoinHandle<()>>,
}

impl Load {
    /// `clients` threads, each calling `one(client, i)` for i = 0, 1, …:
    /// `Ok` counts a success, `Err` records a failure (with what it saw).
    pub fn start<F>(clients: usize, one: F) -> Load
    where
        F: Fn(usize, usize) -> Result<(), String> + Send + Sync + 'static,
    {
        let one = Arc::new(one);
        let stop = Arc::new(AtomicBool::new(false));
        let ok = Arc::new(AtomicUsize::new(0));
        let failures = Arc::new(Mutex::new(Vec::new()));
        let threads = (0..clients)
            .map(|c| {
                let (stop, ok, failures, one) =
                    (stop.clone(), ok.clone(), failures.clone(), one.clone());
                thread::spawn(move || {
                    let mut i = 0;
                    while !stop.load(Ordering::Relaxed) {
                        match one(c, i) {
                            Ok(()) => {
                                ok.fetch_add(1, Ordering::Relaxed);
                            }
                            Err(e) => failures.lock().unwrap().push(e),
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

    pub fn ok(&self) -> usize {
        self.ok.load(Ordering::Relaxed)
    }

    /// Waits (at most `within`) until `n` more requests succeeded.
    pub fn wait_more(&self, n: usize, what: &str, within: Duration) {
        let from = self.ok();
        wait_until(what, within, || self.ok() >= from + n);
    }

    /// Stops the clients; (requests ok, failures).
    pub fn finish(self) -> (usize, Vec<String>) {
        self.stop.store(true, Ordering::Relaxed);
        for t in self.threads {
            t.join().unwrap();
        }
        let failures = self.failures.lock().unwrap().clone();
        (self.ok.load(Ordering::Relaxed), failures)
    }
}
