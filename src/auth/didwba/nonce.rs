//! One-time nonces: a bounded cache of `(did, nonce)` pairs, each kept
//! until its proof's timestamp leaves the acceptance window (after that the
//! window itself refuses a replay). A full cache refuses new proofs rather
//! than evicting live entries: evicting would reopen a replay window.
//! Only proofs that verified are recorded, so junk cannot fill it.

use std::collections::{BTreeSet, HashMap};

use super::error::DidAuthError;

#[derive(Debug)]
pub struct NonceCache {
    cap: usize,
    live: HashMap<String, i64>,
    by_expiry: BTreeSet<(i64, String)>,
}

fn key(did: &str, nonce: &str) -> String {
    let mut k = String::with_capacity(did.len() + 1 + nonce.len());
    k.push_str(did);
    k.push('\n');
    k.push_str(nonce);
    k
}

impl NonceCache {
    pub fn new(cap: usize) -> Self {
        Self {
            cap: cap.max(1),
            live: HashMap::new(),
            by_expiry: BTreeSet::new(),
        }
    }

    fn prune(&mut self, now: i64) {
        while let Some(first) = self.by_expiry.first() {
            if first.0 > now {
                break;
            }
            if let Some((_, k)) = self.by_expiry.pop_first() {
                self.live.remove(&k);
            }
        }
    }

    /// Whether the pair was recorded and is still live (the cheap check).
    pub fn seen(&self, did: &str, nonce: &str, now: i64) -> bool {
        self.live
            .get(&key(did, nonce))
            .is_some_and(|exp| *exp > now)
    }

    /// Records the pair until `expires` (Unix seconds).
    pub fn insert(
        &mut self,
        did: &str,
        nonce: &str,
        expires: i64,
        now: i64,
    ) -> Result<(), DidAuthError> {
        self.prune(now);
        let k = key(did, nonce);
        if self.live.contains_key(&k) {
            return Err(DidAuthError::NonceReplayed);
        }
        if self.live.len() >= self.cap {
            return Err(DidAuthError::NonceCacheFull);
        }
        self.by_expiry.insert((expires, k.clone()));
        self.live.insert(k, expires);
        Ok(())
    }

    pub fn len(&self) -> usize {
        self.live.len()
    }

    pub fn is_empty(&self) -> bool {
        self.live.is_empty()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn replay_refused_until_expiry() {
        let mut c = NonceCache::new(10);
        c.insert("d", "n", 100, 0).unwrap();
        assert!(c.seen("d", "n", 50));
        assert!(!c.seen("e", "n", 50), "nonces are per DID");
        assert_eq!(
            c.insert("d", "n", 100, 50),
            Err(DidAuthError::NonceReplayed)
        );
        assert!(!c.seen("d", "n", 100));
        c.insert("d", "n", 200, 100).unwrap();
    }

    #[test]
    fn full_cache_refuses_instead_of_evicting() {
        let mut c = NonceCache::new(2);
        c.insert("d", "a", 100, 0).unwrap();
        c.insert("d", "b", 100, 0).unwrap();
        assert_eq!(
            c.insert("d", "c", 100, 1),
            Err(DidAuthError::NonceCacheFull)
        );
        assert!(
            c.seen("d", "a", 1) && c.seen("d", "b", 1),
            "live entries kept"
        );
        // Once entries expire, room comes back.
        c.insert("d", "c", 300, 100).unwrap();
        assert_eq!(c.len(), 1);
    }
}
