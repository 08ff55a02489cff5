//! The nonce cache a fleet shares (issue 13): every nonce a gateway spends
//! is also recorded in the registry database (`did_nonces`), so a proof
//! accepted by one gateway and replayed to another sharing the database is
//! refused there (401 `nonce_replayed`). The in-process cache
//! (`nonce.rs`) stays the first filter: a replay to the same gateway never
//! reaches the database.
//!
//! The database calls block, so they run on a thread of their own that
//! owns a registry handle; an upgrade sends it the nonce's key and awaits
//! the answer on a oneshot. The thread deletes expired rows at most once a
//! minute. A database that fails refuses the proof (503
//! `nonce_store_unavailable`): letting it through would reopen the replay.
//!
//! Never: a core's thread (every call blocks), the request path (tunnel
//! upgrades only).

use std::sync::mpsc;
use std::time::{Duration, Instant};

use super::error::DidAuthError;
use super::time;
use crate::registry::{nonce_key, NonceKey, Registry};

/// How often expired rows are deleted (by the thread, before a spend).
const PRUNE_EVERY: Duration = Duration::from_secs(60);

struct Spend {
    key: NonceKey,
    expires: i64,
    reply: futures_channel::oneshot::Sender<Result<bool, String>>,
}

/// A handle on the nonce thread; cheap to share (its sender is `Sync`).
pub struct SharedNonces {
    tx: mpsc::Sender<Spend>,
    describe: String,
}

impl std::fmt::Debug for SharedNonces {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("SharedNonces")
            .field("database", &self.describe)
            .finish()
    }
}

impl SharedNonces {
    /// Starts the thread over `registry` (its own connection: the route
    /// poller keeps its own). The thread ends when the handle is dropped.
    pub fn start(registry: Registry) -> std::io::Result<Self> {
        let describe = registry.describe();
        let (tx, rx) = mpsc::channel::<Spend>();
        std::thread::Builder::new()
            .name("anp-nonces".into())
            .spawn(move || serve(registry, rx))?;
        Ok(Self { tx, describe })
    }

    /// Which database (for the start's log line).
    pub fn describe(&self) -> &str {
        &self.describe
    }

    /// Records `did`'s `nonce` as spent until `expires` in the shared
    /// database: `NonceReplayed` when another gateway (or this one) already
    /// holds it, `NonceStore` when the database cannot say.
    pub async fn spend(&self, did: &str, nonce: &str, expires: i64) -> Result<(), DidAuthError> {
        let (reply, answer) = futures_channel::oneshot::channel();
        let job = Spend {
            key: nonce_key(did, nonce),
            expires,
            reply,
        };
        if self.tx.send(job).is_err() {
            return Err(DidAuthError::NonceStore("the nonce thread is gone".into()));
        }
        match answer.await {
            Ok(Ok(true)) => Ok(()),
            Ok(Ok(false)) => Err(DidAuthError::NonceReplayed),
            Ok(Err(e)) => Err(DidAuthError::NonceStore(e)),
            Err(_) => Err(DidAuthError::NonceStore("the nonce thread is gone".into())),
        }
    }
}

/// The thread: one spend at a time, expired rows pruned once a minute.
fn serve(mut registry: Registry, rx: mpsc::Receiver<Spend>) {
    let mut pruned = Instant::now();
    for job in rx {
        let now = time::now_unix();
        if pruned.elapsed() >= PRUNE_EVERY {
            pruned = Instant::now();
            match registry.prune_nonces(now) {
                Ok(n) => tracing::debug!(deleted = n, "expired DID nonces deleted"),
                Err(e) => tracing::warn!(error = %e, "cannot delete expired DID nonces"),
            }
        }
        let result = registry.spend_nonce(&job.key, job.expires, now).map_err(|e| {
            tracing::error!(error = %e, "shared DID nonce cache: database error; proof refused");
            e.to_string()
        });
        let _ = job.reply.send(result);
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::path::Path;

    fn gateway_on(dir: &Path) -> SharedNonces {
        let text = "[gateway.database]\nbackend = \"sqlite\"\npath = \"fleet.db\"\n";
        let mut cfg = Config::parse(text, Path::new("x.toml")).unwrap();
        cfg.base_dir = dir.to_owned();
        SharedNonces::start(Registry::open(&cfg).unwrap()).unwrap()
    }

    use crate::config::Config;

    #[monoio::test]
    async fn a_nonce_spent_by_one_gateway_is_a_replay_at_another() {
        let dir = tempfile::tempdir().unwrap();
        let (a, b) = (gateway_on(dir.path()), gateway_on(dir.path()));
        let later = time::now_unix() + 300;
        a.spend("did:wba:x.example:a", "n1", later).await.unwrap();
        assert_eq!(
            b.spend("did:wba:x.example:a", "n1", later).await,
            Err(DidAuthError::NonceReplayed)
        );
        assert_eq!(
            a.spend("did:wba:x.example:a", "n1", later).await,
            Err(DidAuthError::NonceReplayed),
            "the gateway that spent it too"
        );
        // Nonces are per DID; another nonce is fresh.
        b.spend("did:wba:x.example:b", "n1", later).await.unwrap();
        b.spend("did:wba:x.example:a", "n2", later).await.unwrap();
    }

    #[test]
    fn an_expired_row_is_replaced_and_pruned() {
        let dir = tempfile::tempdir().unwrap();
        let text = "[gateway.database]\nbackend = \"sqlite\"\npath = \"fleet.db\"\n";
        let mut cfg = Config::parse(text, Path::new("x.toml")).unwrap();
        cfg.base_dir = dir.path().to_owned();
        let mut r = Registry::open(&cfg).unwrap();
        let k = nonce_key("did:wba:x.example:a", "n");
        assert!(r.spend_nonce(&k, 100, 50).unwrap());
        assert!(!r.spend_nonce(&k, 200, 99).unwrap(), "live until 100");
        assert!(r.spend_nonce(&k, 200, 100).unwrap(), "expired at 100");
        let other = nonce_key("did:wba:x.example:a", "m");
        assert!(r.spend_nonce(&other, 150, 100).unwrap());
        assert_eq!(r.prune_nonces(150).unwrap(), 1);
        assert_eq!(r.prune_nonces(150).unwrap(), 0);
        assert!(!r.spend_nonce(&k, 300, 150).unwrap(), "the live one kept");
    }
}
