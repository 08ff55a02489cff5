//! The route registry (DESIGN.md, "Identity and routes"): the
//! `did_proxy_path` table mapping an identity to the path prefixes it
//! serves, in an embedded SQLite file (default) or a MySQL / MariaDB server
//! shared by several gateways (`[gateway.database] backend`).
//!
//! A row's `did` is an identity name: a DID, or the `name` of a
//! `[[gateway.auth.tokens]]` entry, so token identities can take routes from
//! the registry too. A `proxy_path` ending in `/ad.json` serves its parent
//! prefix (`routes::normalize_prefix`).
//!
//! Change detection (issue 17): every write through [`Registry`] bumps
//! `registry_meta.version` and appends to `registry_changes` in the same
//! transaction, so the poller ([`reload`]) reads one row to learn nothing
//! changed, and only the logged changes when something did. The tables are
//! created on open, so a database made by an earlier version upgrades in
//! place; writers that bypass this code (another tool writing
//! `did_proxy_path`) are caught by the poller's full re-read every
//! `resync_interval`.
//!
//! Spent DID-WBA nonces (issue 13): `did_nonces`, one row per proof a
//! gateway accepted (a SHA-256 of DID and nonce, and when the row may go),
//! so gateways sharing the database refuse a proof replayed from one to
//! another (`auth::didwba::shared`). Expired rows are deleted as it goes.
//!
//! Every call here blocks on a database: never call it on a monoio
//! runtime's thread. The gateway reads the table on its own thread
//! ([`reload`]) and hands cores finished route tables.

pub mod error;
pub mod mysql;
pub mod reload;
pub mod routes;
pub mod sqlite;

pub use error::RegistryError;

use self::routes::normalize_prefix;
use crate::config::{Config, DbBackend};

/// One row: `(did, proxy_path)`.
pub type Row = (String, String);

/// How many changes the change log keeps (`registry_changes`): a poller
/// further behind than this reads the table in full once.
pub const CHANGE_LOG_KEEP: u64 = 10_000;

/// The registry's change counter (`registry_meta`, one row read by primary
/// key): `version` goes up by one in every transaction that changes a row;
/// `pruned_through` is the highest change sequence no longer in the log.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub struct Version {
    pub version: u64,
    pub pruned_through: u64,
}

/// One logged change: a row added or removed, in commit order (`seq`).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Change {
    pub seq: u64,
    pub did: String,
    pub proxy_path: String,
    pub added: bool,
}

/// What one database must do; [`Registry`] adds the rules on top.
pub trait Backend: Send {
    /// For logs: which database, without secrets.
    fn describe(&self) -> String;
    /// Every row, ordered by `did`, then `proxy_path`.
    fn list_all(&mut self) -> Result<Vec<Row>, RegistryError>;
    fn routes_of(&mut self, did: &str) -> Result<Vec<Row>, RegistryError>;
    /// Rows whose `proxy_path` is `prefix` or starts with `prefix/`
    /// (an index range, not a scan).
    fn with_prefix(&mut self, prefix: &str) -> Result<Vec<Row>, RegistryError>;
    /// The `did` of the row holding exactly `path`.
    fn owner_of(&mut self, path: &str) -> Result<Option<String>, RegistryError>;
    /// Inserts unless `path` exists; true when a row was added. A row
    /// added is logged (`registry_changes`) and the version bumped in the
    /// same transaction.
    fn insert(&mut self, did: &str, path: &str) -> Result<bool, RegistryError>;
    /// Deletes the exact row; how many went (logged like `insert`).
    fn delete(&mut self, did: &str, path: &str) -> Result<u64, RegistryError>;
    /// The change counter: one row, read by primary key.
    fn version(&mut self) -> Result<Version, RegistryError>;
    /// The highest change sequence logged so far (0: none).
    fn last_seq(&mut self) -> Result<u64, RegistryError>;
    /// Changes with a sequence above `after`, in order.
    fn changes_since(&mut self, after: u64) -> Result<Vec<Change>, RegistryError>;
    /// Records a spent nonce under `key` until `expires` (Unix seconds):
    /// true when it was not recorded yet (or only by a row expired by
    /// `now`), false when a live row holds it (a replay). Atomic across
    /// every process sharing the database (the key is unique).
    fn spend_nonce(
        &mut self,
        key: &NonceKey,
        expires: i64,
        now: i64,
    ) -> Result<bool, RegistryError>;
    /// Deletes the nonce rows expired by `now`; how many went.
    fn prune_nonces(&mut self, now: i64) -> Result<u64, RegistryError>;
}

/// A spent nonce's row key: SHA-256 of `did`, a newline, `nonce` (fixed
/// width whatever the DID's length; the DID and nonce are not stored).
pub type NonceKey = [u8; 32];

/// The [`NonceKey`] of `did`'s `nonce`.
pub fn nonce_key(did: &str, nonce: &str) -> NonceKey {
    use sha2::{Digest, Sha256};
    let mut h = Sha256::new();
    h.update(did.as_bytes());
    h.update(b"\n");
    h.update(nonce.as_bytes());
    h.finalize().into()
}

/// What [`Registry::add`] did.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Added {
    New,
    /// The same identity already had exactly this path.
    Already,
}

/// The route registry over one backend.
pub struct Registry {
    backend: Box<dyn Backend>,
}

impl Registry {
    /// Opens the backend `[gateway.database]` names, creating the table
    /// (and, for SQLite, the file and its directory) when missing.
    pub fn open(cfg: &Config) -> Result<Self, RegistryError> {
        let db = &cfg.gateway.database;
        let backend: Box<dyn Backend> = match db.backend() {
            DbBackend::Sqlite => Box::new(sqlite::SqliteRegistry::open(&cfg.database_path())?),
            DbBackend::Mysql => Box::new(mysql::MysqlRegistry::open(db)?),
        };
        Ok(Self { backend })
    }

    pub fn from_backend(backend: Box<dyn Backend>) -> Self {
        Self { backend }
    }

    pub fn describe(&self) -> String {
        self.backend.describe()
    }

    /// The change counter (cheap: one row by primary key).
    pub fn version(&mut self) -> Result<Version, RegistryError> {
        self.backend.version()
    }

    /// The highest change sequence logged so far.
    pub fn last_seq(&mut self) -> Result<u64, RegistryError> {
        self.backend.last_seq()
    }

    /// The changes after sequence `after`, in commit order.
    pub fn changes_since(&mut self, after: u64) -> Result<Vec<Change>, RegistryError> {
        self.backend.changes_since(after)
    }

    /// Records `key` spent until `expires`: false for a replay
    /// ([`Backend::spend_nonce`]).
    pub fn spend_nonce(
        &mut self,
        key: &NonceKey,
        expires: i64,
        now: i64,
    ) -> Result<bool, RegistryError> {
        self.backend.spend_nonce(key, expires, now)
    }

    /// Deletes expired nonce rows; how many went.
    pub fn prune_nonces(&mut self, now: i64) -> Result<u64, RegistryError> {
        self.backend.prune_nonces(now)
    }

    /// Every `(did, proxy_path)`, ordered by `did`, then `proxy_path`.
    pub fn list_all(&mut self) -> Result<Vec<Row>, RegistryError> {
        self.backend.list_all()
    }

    /// The paths registered for `did`, ordered.
    pub fn routes_of(&mut self, did: &str) -> Result<Vec<String>, RegistryError> {
        Ok(self
            .backend
            .routes_of(did)?
            .into_iter()
            .map(|(_, p)| p)
            .collect())
    }

    /// Registers `path` for `did`. Refuses a path that is not absolute, or
    /// whose prefix (after `normalize_prefix`) another identity holds.
    pub fn add(&mut self, did: &str, path: &str) -> Result<Added, RegistryError> {
        check(did, path)?;
        // A host route is kept with its host in lowercase: one spelling.
        let path = &*routes::lowercase_host(path);
        let prefix = normalize_prefix(path);
        // The table's UNIQUE(proxy_path) only sees exact strings; `/a`,
        // `/a/` and `/a/ad.json` are one prefix. Every spelling of a prefix
        // starts with it, so an index range finds them (the root prefix,
        // `""`, is every row: read them all).
        let same = if prefix.is_empty() {
            self.backend.list_all()?
        } else {
            self.backend.with_prefix(prefix)?
        };
        for (owner, p) in same {
            if owner != did && normalize_prefix(&p) == prefix {
                return Err(RegistryError::Owned { path: p, owner });
            }
        }
        if self.backend.insert(did, path)? {
            return Ok(Added::New);
        }
        match self.backend.owner_of(path)? {
            Some(owner) if owner != did => Err(RegistryError::Owned {
                path: path.to_owned(),
                owner,
            }),
            _ => Ok(Added::Already),
        }
    }

    /// Removes `path` from `did`: the exact row, or else the rows of `did`
    /// serving the same prefix (`/a/` removes `/a/ad.json`). How many went.
    pub fn remove(&mut self, did: &str, path: &str) -> Result<u64, RegistryError> {
        let path = &*routes::lowercase_host(path);
        let n = self.backend.delete(did, path)?;
        if n > 0 {
            return Ok(n);
        }
        let prefix = normalize_prefix(path);
        let mut n = 0;
        for (_, p) in self.backend.routes_of(did)? {
            if normalize_prefix(&p) == prefix {
                n += self.backend.delete(did, &p)?;
            }
        }
        Ok(n)
    }
}

/// What the table can hold: VARCHAR(255) counts characters on MySQL.
fn check(did: &str, path: &str) -> Result<(), RegistryError> {
    let fits = |s: &str| !s.is_empty() && s.chars().count() <= 255;
    if !fits(did) {
        return Err(RegistryError::TooLong { what: "did" });
    }
    routes::check_route(path).map_err(RegistryError::BadRoute)?;
    if !fits(path) {
        return Err(RegistryError::TooLong { what: "path" });
    }
    Ok(())
}
