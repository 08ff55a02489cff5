//! From registry rows to the cores' route tables.
//!
//! [`route_table`] is the pure part: the union of the config's identities
//! and the registry's rows. [`spawn_poller`] runs on its own thread (the
//! database calls block): every `poll_interval` it re-reads the table and,
//! only when the rows changed, builds a new table and hands it to
//! `publish` (the gateway sends it to every core's inbox), numbered (a
//! [`RoutesUpdate`]). A failed read keeps the table in force and is logged.
//!
//! A core whose table gives a new tunnel's identity no route asks for a
//! read at once ([`RefreshRequest`]), so a change applies to new tunnels
//! without waiting for the next poll. Such reads are coalesced and at most
//! one per [`MIN_REFRESH_GAP`], so unauthenticated upgrades cannot turn
//! into a database load.

use std::sync::mpsc::{Receiver, RecvTimeoutError};
use std::sync::Arc;
use std::time::{Duration, Instant};

use super::routes::{IdentityName, RouteTable};
use super::{Registry, Row};
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
pub fn route_table(cfg: &Config, rows: &[Row]) -> RouteTable {
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

/// Starts the poller thread. `first` is the table the gateway started
/// with (generation 0), built from `rows`. The thread ends when every
/// sender of `refresh` is gone (the gateway's `Shared` dropped) or
/// `publish` returns false (no core is listening any more).
pub fn spawn_poller(
    registry: Registry,
    cfg: Arc<Config>,
    rows: Vec<Row>,
    first: Arc<RouteTable>,
    refresh: Receiver<PollerMsg>,
    publish: impl Fn(RoutesUpdate) -> bool + Send + 'static,
) -> std::io::Result<std::thread::JoinHandle<()>> {
    let every = secs(cfg.gateway.database.poll_interval).unwrap_or(Duration::from_secs(2));
    let mut p = Poller {
        registry,
        cfg,
        rows,
        current: RoutesUpdate {
            generation: 0,
            table: first,
        },
        failing: false,
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

struct Poller {
    registry: Registry,
    cfg: Arc<Config>,
    rows: Vec<Row>,
    current: RoutesUpdate,
    failing: bool,
}

impl Poller {
    /// Reads the rows; true when they changed (`current` is then new).
    fn read(&mut self) -> bool {
        let now = match self.registry.list_all() {
            Ok(r) => r,
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
        if now == self.rows {
            return false;
        }
        tracing::info!(rows = now.len(), "route registry changed");
        self.rows = now;
        self.rebuild()
    }

    /// A new table from the rows in hand and the config (after a reload).
    fn rebuild(&mut self) -> bool {
        let table = Arc::new(route_table(&self.cfg, &self.rows));
        tracing::info!(
            rows = self.rows.len(),
            routes = table.len(),
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
    use std::path::Path;

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
