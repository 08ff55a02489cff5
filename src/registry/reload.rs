//! From registry rows to the cores' route tables.
//!
//! [`route_table`] is the pure part: the union of the config's identities
//! and the registry's rows. [`spawn_poller`] runs on its own thread (the
//! database calls block): every `poll_interval` it re-reads the table and,
//! only when the rows changed, builds a new table and hands it to
//! `publish` (the gateway sends it to every core's inbox). A failed read
//! keeps the table in force and is logged.

use std::sync::Arc;
use std::time::Duration;

use super::{Registry, Row};
use crate::config::{secs, Config};
use crate::gateway::routes::{IdentityName, RouteTable};

/// The route table of `cfg`'s identities plus `rows`. A row's `did` is an
/// identity name (a DID or a token's `name`). Where a registry row and the
/// config give one prefix to two identities, the config wins (logged).
pub fn route_table(cfg: &Config, rows: &[Row]) -> RouteTable {
    let mut t = crate::gateway::build_routes(cfg);
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

/// Starts the poller thread. `rows` is what the table held when the
/// gateway built its first route table. The thread ends when `publish`
/// returns false (no core is listening any more).
pub fn spawn_poller(
    mut registry: Registry,
    cfg: Arc<Config>,
    mut rows: Vec<Row>,
    publish: impl Fn(Arc<RouteTable>) -> bool + Send + 'static,
) -> std::io::Result<std::thread::JoinHandle<()>> {
    let every = secs(cfg.gateway.database.poll_interval).unwrap_or(Duration::from_secs(2));
    std::thread::Builder::new()
        .name("anp-registry".into())
        .spawn(move || {
            let mut failing = false;
            loop {
                std::thread::sleep(every);
                let now = match registry.list_all() {
                    Ok(r) => r,
                    Err(e) => {
                        // Once per outage, not once per poll.
                        if !failing {
                            tracing::warn!(error = %e, "route registry unreadable; routes kept");
                        }
                        failing = true;
                        continue;
                    }
                };
                if failing {
                    tracing::info!("route registry readable again");
                    failing = false;
                }
                if now == rows {
                    continue;
                }
                let table = Arc::new(route_table(&cfg, &now));
                tracing::info!(
                    rows = now.len(),
                    routes = table.len(),
                    "route registry changed"
                );
                rows = now;
                if !publish(table) {
                    return;
                }
            }
        })
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
