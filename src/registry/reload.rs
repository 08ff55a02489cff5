//! From registry rows to the cores' route tables.
//!
//! [`route_table`] is the pure part: the union of the config's identities
//! and the registry's rows. [`spawn_poller`] runs on its own thread (the
//! database calls block): every `poll_interval` it reads the registry's
//! change counter (one row, `super::Version`); only when it moved does it
//! read the logged changes since the last one applied, apply them to its
//! copy of the rows, build a new table and hand it to `publish` (the
//! gateway sends it to every core's inbox), numbered (a [`RoutesUpdate`]).
//! The whole table is read at start, every `resync_interval` (writers that
//! bypass the change log), and when the log was pruned past the poller. A
//! failed read keeps the table in force and is logged.
//!
//! A core whose table gives a new tunnel's identity no route asks for a
//! read at once ([`RefreshRequest`]), so a change applies to new tunnels
//! without waiting for the next poll. Such reads are coalesced and at most
//! one per [`MIN_REFRESH_GAP`], so unauthenticated upgrades cannot turn
//! into a database load.

use std::collections::{BTreeSet, HashMap};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::mpsc::{Receiver, RecvTimeoutError};
use std::sync::Arc;
use std::time::{Duration, Instant};

use super::routes::{IdentityName, RouteTable};
use super::{Registry, Row, Version};
use crate::config::{secs, Config};

/// A route table and its number: cores keep the highest number they have
/// seen, so a late message never brings an older table back.
#[derive(Debug, Clone)]
pub struct RoutesUpdate {
    pub generation: u64,
    pub table: Arc<RouteTable>,
}

/// A core's "read the registry now"; answered with the table in force
/// after that read.
pub type RefreshRequest = futures_channel::oneshot::Sender<RoutesUpdate>;

/// What the poller thread is asked: a read now, or (SIGHUP) a new config
/// whose own identities' paths are merged with the rows from now on.
pub enum PollerMsg {
    Refresh(RefreshRequest),
    Reload(Arc<Config>),
}

/// Least time between two reads asked for by cores.
pub const MIN_REFRESH_GAP: Duration = Duration::from_millis(250);

/// The route table of `cfg`'s identities plus `rows`. A row's `did` is an
/// identity name (a DID or a token's `name`). Where a registry row and the
/// config give one prefix to two identities, the config wins (logged).
pub fn route_table<'a>(cfg: &Config, rows: impl IntoIterator<Item = &'a Row>) -> RouteTable {
    let mut t = super::routes::build_routes(cfg);
    let mut last: Option<IdentityName> = None;
    for (did, path) in rows {
        // Rows come ordered by did: share one Arc per identity.
        let id = match &last {
            Some(id) if **id == **did => id.clone(),
            _ => {
                let id: IdentityName = did.as_str().into();
                last = Some(id.clone());
                id
            }
        };
        if let Some(owner) = t.owner(path) {
            if *owner != id {
                tracing::warn!(path = %path, registry = %id, config = %owner,
                    "registry row ignored: the config gives this prefix to another identity");
                continue;
            }
        }
        t.insert(path, id);
    }
    t
}

/// What the gateway read at start: the rows, and where the change log
/// stood just before (so the poller re-applies, idempotently, any change
/// that raced with the read).
pub struct Snapshot {
    pub rows: Vec<Row>,
    pub version: Version,
    pub last_seq: u64,
}

/// Reads the change counter, then every row (the start's one full read).
pub fn snapshot(registry: &mut Registry) -> Result<Snapshot, super::RegistryError> {
    let version = registry.version()?;
    let last_seq = registry.last_seq()?;
    let rows = registry.list_all()?;
    Ok(Snapshot {
        rows,
        version,
        last_seq,
    })
}

/// What the poller did, for `/metrics`: polls that found the version
/// unchanged (one row read), polls that applied logged changes, full
/// reads (start, `resync_interval`, a log pruned past us), and how many
/// rows all of them read (table rows plus change rows).
#[derive(Debug, Default)]
pub struct PollStats {
    pub unchanged: AtomicU64,
    pub changes: AtomicU64,
    pub full: AtomicU64,
    pub rows_read: AtomicU64,
}

impl PollStats {
    /// Prometheus text for `/metrics`.
    pub fn write_metrics(&self, s: &mut String) {
        use std::fmt::Write as _;
        let _ = writeln!(
            s,
            "# HELP anp_proxy_registry_polls_total Registry polls, by what they read.\n\
             # TYPE anp_proxy_registry_polls_total counter"
        );
        for (read, c) in [
            ("version", &self.unchanged),
            ("changes", &self.changes),
            ("full", &self.full),
        ] {
            let _ = writeln!(
                s,
                "anp_proxy_registry_polls_total{{read=\"{read}\"}} {}",
                c.load(Ordering::Relaxed)
            );
        }
        let _ = writeln!(
            s,
            "# HELP anp_proxy_registry_rows_read_total Route and change rows the poller read.\n\
             # TYPE anp_proxy_registry_rows_read_total counter\n\
             anp_proxy_registry_rows_read_total {}",
            self.rows_read.load(Ordering::Relaxed)
        );
    }
}

/// Starts the poller thread. `first` is the table the gateway started
/// with (generation 0), built from `start.rows`. The thread ends when every
/// sender of `refresh` is gone (the gateway's `Shared` dropped) or
/// `publish` returns false (no core is listening any more).
pub fn spawn_poller(
    registry: Registry,
    cfg: Arc<Config>,
    start: Snapshot,
    first: Arc<RouteTable>,
    stats: Arc<PollStats>,
    refresh: Receiver<PollerMsg>,
    publish: impl Fn(RoutesUpdate) -> bool + Send + 'static,
) -> std::io::Result<std::thread::JoinHandle<()>> {
    let every = secs(cfg.gateway.database.poll_interval).unwrap_or(Duration::from_secs(2));
    stats.full.fetch_add(1, Ordering::Relaxed);
    stats
        .rows_read
        .fetch_add(start.rows.len() as u64, Ordering::Relaxed);
    let mut p = Poller {
        registry,
        cfg,
        rows: start.rows.into_iter().collect(),
        seen: start.version,
        last_seq: start.last_seq,
        last_full: Instant::now(),
        current: RoutesUpdate {
            generation: 0,
            table: first,
        },
        failing: false,
        stats,
    };
    std::thread::Builder::new()
        .name("anp-registry".into())
        .spawn(move || {
            let mut next_poll = Instant::now() + every;
            let mut last_read = Instant::now();
            loop {
                let wait = next_poll.saturating_duration_since(Instant::now());
                let mut msgs = match refresh.recv_timeout(wait) {
                    Ok(m) => vec![m],
                    Err(RecvTimeoutError::Timeout) => Vec::new(),
                    Err(RecvTimeoutError::Disconnected) => return,
                };
                if msgs.is_empty() {
                    next_poll = Instant::now() + every;
                } else {
                    let since = last_read.elapsed();
                    if since < MIN_REFRESH_GAP {
                        std::thread::sleep(MIN_REFRESH_GAP - since);
                    }
                    msgs.extend(refresh.try_iter());
                }
                let mut waiters = Vec::new();
                let mut reconfigured = false;
                for m in msgs {
                    match m {
                        PollerMsg::Refresh(w) => waiters.push(w),
                        PollerMsg::Reload(cfg) => {
                            p.cfg = cfg;
                            reconfigured = true;
                        }
                    }
                }
                last_read = Instant::now();
                let changed = p.read() || (reconfigured && p.rebuild());
                if changed && !publish(p.current.clone()) {
                    return;
                }
                for w in waiters {
                    let _ = w.send(p.current.clone());
                }
            }
        })
}

/// Why a poll read the whole table.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum FullRead {
    /// `resync_interval` passed: catches writers that bypass the log.
    Resync,
    /// The log was pruned past the last change we applied.
    Pruned,
}

struct Poller {
    registry: Registry,
    cfg: Arc<Config>,
    /// `(did, proxy_path)`, ordered by did like `list_all`.
    rows: BTreeSet<Row>,
    /// The change counter at the last read.
    seen: Version,
    /// The last change applied.
    last_seq: u64,
    last_full: Instant,
    current: RoutesUpdate,
    failing: bool,
    stats: Arc<PollStats>,
}

impl Poller {
    /// One poll; true when the rows changed (`current` is then new).
    fn read(&mut self) -> bool {
        let resync = secs(self.cfg.gateway.database.resync_interval)
            .is_some_and(|d| self.last_full.elapsed() >= d);
        let res = if resync {
            self.full(FullRead::Resync)
        } else {
            self.incremental()
        };
        let changed = match res {
            Ok(c) => c,
            Err(e) => {
                // Once per outage, not once per poll.
                if !self.failing {
                    tracing::warn!(error = %e, "route registry unreadable; routes kept");
                }
                self.failing = true;
                return false;
            }
        };
        if self.failing {
            tracing::info!("route registry readable again");
            self.failing = false;
        }
        changed && self.rebuild()
    }

    /// Reads the change counter; when it moved, applies the logged changes
    /// since the last one applied.
    fn incremental(&mut self) -> Result<bool, super::RegistryError> {
        let v = self.registry.version()?;
        if v == self.seen {
            self.stats.unchanged.fetch_add(1, Ordering::Relaxed);
            return Ok(false);
        }
        if v.pruned_through > self.last_seq {
            return self.full(FullRead::Pruned);
        }
        let changes = self.registry.changes_since(self.last_seq)?;
        // A writer may have pruned past us between the two reads.
        if self.registry.version()?.pruned_through > self.last_seq {
            return self.full(FullRead::Pruned);
        }
        self.stats.changes.fetch_add(1, Ordering::Relaxed);
        self.stats
            .rows_read
            .fetch_add(changes.len() as u64, Ordering::Relaxed);
        // Whether each row touched was there before: an add and a remove
        // of one row in one batch change nothing worth publishing.
        let mut before: HashMap<Row, bool> = HashMap::new();
        for c in &changes {
            let row = (c.did.clone(), c.proxy_path.clone());
            let had = self.rows.contains(&row);
            before.entry(row.clone()).or_insert(had);
            if c.added {
                self.rows.insert(row);
            } else {
                self.rows.remove(&row);
            }
            self.last_seq = self.last_seq.max(c.seq);
        }
        let changed = before
            .iter()
            .any(|(row, had)| self.rows.contains(row) != *had);
        self.seen = v;
        if changed {
            tracing::info!(
                changes = changes.len(),
                rows = self.rows.len(),
                version = v.version,
                "route registry changed"
            );
        }
        Ok(changed)
    }

    /// Reads every row (and where the log stands, first).
    fn full(&mut self, why: FullRead) -> Result<bool, super::RegistryError> {
        let start = snapshot(&mut self.registry)?;
        self.stats.full.fetch_add(1, Ordering::Relaxed);
        self.stats
            .rows_read
            .fetch_add(start.rows.len() as u64, Ordering::Relaxed);
        self.last_full = Instant::now();
        self.seen = start.version;
        self.last_seq = start.last_seq;
        let now: BTreeSet<Row> = start.rows.into_iter().collect();
        if now == self.rows {
            return Ok(false);
        }
        if why == FullRead::Resync {
            tracing::warn!(rows = now.len(),
                "route registry changed without a logged change (a writer other than `anp-proxy routes`?); applied at resync_interval");
        } else {
            tracing::info!(rows = now.len(), "route registry changed (read in full)");
        }
        self.rows = now;
        Ok(true)
    }

    /// A new table from the rows in hand and the config (after a reload).
    fn rebuild(&mut self) -> bool {
        let t0 = Instant::now();
        let table = Arc::new(route_table(&self.cfg, &self.rows));
        tracing::info!(
            rows = self.rows.len(),
            routes = table.len(),
            took_ms = t0.elapsed().as_millis() as u64,
            "route table rebuilt"
        );
        self.current = RoutesUpdate {
            generation: self.current.generation + 1,
            table,
        };
        true
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::registry::Change;
    use std::path::Path;
    use std::sync::Mutex;

    /// A registry in memory whose state the test edits behind the poller's
    /// back, counting full reads.
    #[derive(Default)]
    struct FakeDb {
        rows: Vec<Row>,
        version: Version,
        log: Vec<Change>,
        full_reads: u64,
    }

    struct Fake(Arc<Mutex<FakeDb>>);

    impl super::super::Backend for Fake {
        fn describe(&self) -> String {
            "fake".into()
        }
        fn list_all(&mut self) -> Result<Vec<Row>, crate::registry::RegistryError> {
            let mut db = self.0.lock().unwrap();
            db.full_reads += 1;
            Ok(db.rows.clone())
        }
        fn routes_of(&mut self, _: &str) -> Result<Vec<Row>, crate::registry::RegistryError> {
            unreachable!()
        }
        fn with_prefix(&mut self, _: &str) -> Result<Vec<Row>, crate::registry::RegistryError> {
            unreachable!()
        }
        fn owner_of(&mut self, _: &str) -> Result<Option<String>, crate::registry::RegistryError> {
            unreachable!()
        }
        fn insert(&mut self, _: &str, _: &str) -> Result<bool, crate::registry::RegistryError> {
            unreachable!()
        }
        fn delete(&mut self, _: &str, _: &str) -> Result<u64, crate::registry::RegistryError> {
            unreachable!()
        }
        fn version(&mut self) -> Result<Version, crate::registry::RegistryError> {
            Ok(self.0.lock().unwrap().version)
        }
        fn last_seq(&mut self) -> Result<u64, crate::registry::RegistryError> {
            Ok(self.0.lock().unwrap().log.last().map_or(0, |c| c.seq))
        }
        fn changes_since(
            &mut self,
            after: u64,
        ) -> Result<Vec<Change>, crate::registry::RegistryError> {
            let db = self.0.lock().unwrap();
            Ok(db.log.iter().filter(|c| c.seq > after).cloned().collect())
        }
        fn spend_nonce(
            &mut self,
            _: &crate::registry::NonceKey,
            _: i64,
            _: i64,
        ) -> Result<bool, crate::registry::RegistryError> {
            unreachable!()
        }
        fn prune_nonces(&mut self, _: i64) -> Result<u64, crate::registry::RegistryError> {
            unreachable!()
        }
    }

    impl FakeDb {
        /// A logged write, as `Registry` makes it.
        fn write(&mut self, did: &str, path: &str, added: bool) {
            let row = (did.to_owned(), path.to_owned());
            if added {
                self.rows.push(row);
            } else {
                self.rows.retain(|r| *r != row);
            }
            let seq = self.log.last().map_or(0, |c| c.seq) + 1;
            self.log.push(Change {
                seq,
                did: did.into(),
                proxy_path: path.into(),
                added,
            });
            self.version.version += 1;
        }
    }

    fn poller(db: &Arc<Mutex<FakeDb>>, cfg: &str) -> Poller {
        let cfg = Arc::new(Config::parse(cfg, Path::new("x.toml")).unwrap());
        let mut registry = Registry::from_backend(Box::new(Fake(db.clone())));
        let start = snapshot(&mut registry).unwrap();
        let table = Arc::new(route_table(&cfg, &start.rows));
        Poller {
            registry,
            cfg,
            rows: start.rows.into_iter().collect(),
            seen: start.version,
            last_seq: start.last_seq,
            last_full: Instant::now(),
            current: RoutesUpdate {
                generation: 0,
                table,
            },
            failing: false,
            stats: Arc::default(),
        }
    }

    fn owner(p: &Poller, path: &str) -> Option<String> {
        p.current.table.lookup(path).map(|r| r.identity.to_string())
    }

    #[test]
    fn polls_read_the_version_then_only_the_changes() {
        let db = Arc::new(Mutex::new(FakeDb::default()));
        for i in 0..1000 {
            db.lock()
                .unwrap()
                .write(&format!("id{i}"), &format!("/a{i}"), true);
        }
        let mut p = poller(&db, "");
        assert_eq!(db.lock().unwrap().full_reads, 1);
        for _ in 0..5 {
            assert!(!p.read());
        }
        assert_eq!(p.stats.unchanged.load(Ordering::Relaxed), 5);
        assert_eq!(p.stats.rows_read.load(Ordering::Relaxed), 0);
        db.lock().unwrap().write("id1", "/a1", false);
        db.lock().unwrap().write("new", "/new", true);
        assert!(p.read());
        assert_eq!(p.current.generation, 1);
        assert_eq!(owner(&p, "/a1/x"), None);
        assert_eq!(owner(&p, "/new/x").as_deref(), Some("new"));
        assert_eq!(owner(&p, "/a999").as_deref(), Some("id999"));
        assert_eq!(p.stats.rows_read.load(Ordering::Relaxed), 2);
        assert_eq!(db.lock().unwrap().full_reads, 1, "never read whole again");
        // An add then a remove of the same row: nothing to publish.
        db.lock().unwrap().write("tmp", "/tmp", true);
        db.lock().unwrap().write("tmp", "/tmp", false);
        assert!(!p.read());
        assert_eq!(p.current.generation, 1);
    }

    #[test]
    fn a_pruned_log_or_the_resync_interval_reads_the_table_whole() {
        let db = Arc::new(Mutex::new(FakeDb::default()));
        db.lock().unwrap().write("a", "/a", true);
        let mut p = poller(&db, "[gateway.database]\nresync_interval = 60\n");
        {
            let mut d = db.lock().unwrap();
            d.write("b", "/b", true);
            d.write("c", "/c", true);
            // The log lost the change we have not applied yet.
            d.log.retain(|c| c.seq > 2);
            d.version.pruned_through = 2;
        }
        assert!(p.read());
        assert_eq!(db.lock().unwrap().full_reads, 2);
        assert_eq!(owner(&p, "/b").as_deref(), Some("b"));
        // A row written behind the log's back is found at the resync.
        db.lock().unwrap().rows.push(("d".into(), "/d".into()));
        p.last_full = Instant::now();
        assert!(!p.read(), "not logged: not seen by a poll");
        // A minute ago (the monotonic clock counts from boot: a machine that
        // built this test has been up longer than that).
        p.last_full = Instant::now()
            .checked_sub(Duration::from_secs(61))
            .expect("a machine up for more than a minute");
        assert!(p.read());
        assert_eq!(owner(&p, "/d").as_deref(), Some("d"));
        assert_eq!(p.stats.full.load(Ordering::Relaxed), 2);
    }

    #[test]
    fn union_of_config_and_rows_config_wins() {
        let cfg = Config::parse(
            "[[gateway.auth.tokens]]\nname='tok'\ntoken='tok-secret'\npaths=['/t']\n[[gateway.auth.dids]]\ndid='did:wba:a.example:x'\npaths=['/x']\n",
            Path::new("x.toml"),
        )
        .unwrap();
        let rows = vec![
            ("did:wba:a.example:x".to_owned(), "/x2/ad.json".to_owned()),
            ("did:wba:b.example:y".to_owned(), "/t/".to_owned()),
            ("tok".to_owned(), "/t2".to_owned()),
        ];
        let t = route_table(&cfg, &rows);
        let owner = |p: &str| t.lookup(p).map(|r| r.identity.to_string());
        assert_eq!(owner("/t/a").as_deref(), Some("tok"));
        assert_eq!(owner("/t2/a").as_deref(), Some("tok"));
        assert_eq!(owner("/x").as_deref(), Some("did:wba:a.example:x"));
        assert_eq!(owner("/x2/tools").as_deref(), Some("did:wba:a.example:x"));
        assert_eq!(t.len(), 4);
    }
}
