//! The embedded registry: one SQLite file (rusqlite, bundled), created with
//! its directory on first open. WAL mode, so `anp-proxy routes …` can write
//! while a gateway's poller reads. `registry_meta` and `registry_changes`
//! (the change counter and log, `super::Version`) and `did_nonces` (spent
//! DID-WBA nonces) are created when missing,
//! so a file made by an earlier version keeps working.

use std::path::{Path, PathBuf};
use std::time::Duration;

use rusqlite::{params, Connection, OptionalExtension};

use super::error::RegistryError;
use super::{Backend, Change, NonceKey, Row, Version};

const SCHEMA: &str = "
CREATE TABLE IF NOT EXISTS did_proxy_path (
    id INTEGER PRIMARY KEY AUTOINCREMENT,
    did VARCHAR(255) NOT NULL,
    proxy_path VARCHAR(255) NOT NULL,
    created_at TIMESTAMP NOT NULL DEFAULT CURRENT_TIMESTAMP,
    updated_at TIMESTAMP NOT NULL DEFAULT CURRENT_TIMESTAMP,
    UNIQUE(proxy_path)
);
CREATE INDEX IF NOT EXISTS idx_did_proxy_path_did ON did_proxy_path(did);
CREATE TABLE IF NOT EXISTS registry_meta (
    id INTEGER PRIMARY KEY CHECK (id = 1),
    version INTEGER NOT NULL DEFAULT 0,
    pruned_through INTEGER NOT NULL DEFAULT 0
);
INSERT OR IGNORE INTO registry_meta (id, version, pruned_through) VALUES (1, 0, 0);
CREATE TABLE IF NOT EXISTS registry_changes (
    seq INTEGER PRIMARY KEY AUTOINCREMENT,
    did VARCHAR(255) NOT NULL,
    proxy_path VARCHAR(255) NOT NULL,
    added INTEGER NOT NULL
);
CREATE TABLE IF NOT EXISTS did_nonces (
    nonce_key BLOB PRIMARY KEY,
    expires INTEGER NOT NULL
) WITHOUT ROWID;
CREATE INDEX IF NOT EXISTS idx_did_nonces_expires ON did_nonces(expires);
";

pub struct SqliteRegistry {
    conn: Connection,
    path: PathBuf,
}

impl SqliteRegistry {
    /// Opens (creating if needed) the file at `path` and its table.
    pub fn open(path: &Path) -> Result<Self, RegistryError> {
        if let Some(dir) = path.parent().filter(|d| !d.as_os_str().is_empty()) {
            std::fs::create_dir_all(dir).map_err(|source| RegistryError::CreateDir {
                path: path.to_owned(),
                source,
            })?;
        }
        let err = |source| RegistryError::Sqlite {
            path: path.to_owned(),
            source,
        };
        let conn = Connection::open(path).map_err(err)?;
        conn.busy_timeout(Duration::from_secs(5)).map_err(err)?;
        conn.pragma_update(None, "journal_mode", "WAL")
            .map_err(err)?;
        conn.execute_batch(SCHEMA).map_err(err)?;
        Ok(Self {
            conn,
            path: path.to_owned(),
        })
    }

    fn err(&self, source: rusqlite::Error) -> RegistryError {
        RegistryError::Sqlite {
            path: self.path.clone(),
            source,
        }
    }

    /// Runs `change` (one row written, or none) in an immediate
    /// transaction; when it wrote, logs it, bumps the version and prunes the
    /// log, in the same transaction.
    fn logged(
        &mut self,
        did: &str,
        path: &str,
        added: bool,
        change: &str,
    ) -> rusqlite::Result<u64> {
        let tx = self
            .conn
            .transaction_with_behavior(rusqlite::TransactionBehavior::Immediate)?;
        let n = tx.execute(change, params![did, path])? as u64;
        if n > 0 {
            tx.execute(
                "INSERT INTO registry_changes (did, proxy_path, added) VALUES (?1, ?2, ?3)",
                params![did, path, added],
            )?;
            let seq = tx.last_insert_rowid();
            tx.execute(
                "UPDATE registry_meta SET version = version + 1 WHERE id = 1",
                [],
            )?;
            let floor = seq - super::CHANGE_LOG_KEEP as i64;
            if floor > 0 {
                tx.execute("DELETE FROM registry_changes WHERE seq <= ?1", [floor])?;
                tx.execute(
                    "UPDATE registry_meta SET pruned_through = MAX(pruned_through, ?1) WHERE id = 1",
                    [floor],
                )?;
            }
        }
        tx.commit()?;
        Ok(n)
    }

    fn rows(&self, sql: &str, args: &[&dyn rusqlite::ToSql]) -> rusqlite::Result<Vec<Row>> {
        let mut st = self.conn.prepare_cached(sql)?;
        let rows = st.query_map(args, |r| Ok((r.get(0)?, r.get(1)?)))?;
        rows.collect()
    }
}

impl Backend for SqliteRegistry {
    fn describe(&self) -> String {
        format!("sqlite {}", self.path.display())
    }

    fn list_all(&mut self) -> Result<Vec<Row>, RegistryError> {
        self.rows(
            "SELECT did, proxy_path FROM did_proxy_path ORDER BY did, proxy_path",
            &[],
        )
        .map_err(|e| self.err(e))
    }

    fn routes_of(&mut self, did: &str) -> Result<Vec<Row>, RegistryError> {
        self.rows(
            "SELECT did, proxy_path FROM did_proxy_path WHERE did = ?1 ORDER BY proxy_path",
            &[&did],
        )
        .map_err(|e| self.err(e))
    }

    fn owner_of(&mut self, path: &str) -> Result<Option<String>, RegistryError> {
        self.conn
            .query_row(
                "SELECT did FROM did_proxy_path WHERE proxy_path = ?1",
                [path],
                |r| r.get(0),
            )
            .optional()
            .map_err(|e| self.err(e))
    }

    fn with_prefix(&mut self, prefix: &str) -> Result<Vec<Row>, RegistryError> {
        // `prefix`, or `prefix/…`: a range of the unique index ('0' follows '/').
        self.rows(
            "SELECT did, proxy_path FROM did_proxy_path WHERE proxy_path = ?1 \
             OR (proxy_path >= ?1 || '/' AND proxy_path < ?1 || '0') ORDER BY did, proxy_path",
            &[&prefix],
        )
        .map_err(|e| self.err(e))
    }

    fn insert(&mut self, did: &str, path: &str) -> Result<bool, RegistryError> {
        self.logged(
            did,
            path,
            true,
            "INSERT OR IGNORE INTO did_proxy_path (did, proxy_path) VALUES (?1, ?2)",
        )
        .map(|n| n == 1)
        .map_err(|e| self.err(e))
    }

    fn delete(&mut self, did: &str, path: &str) -> Result<u64, RegistryError> {
        self.logged(
            did,
            path,
            false,
            "DELETE FROM did_proxy_path WHERE did = ?1 AND proxy_path = ?2",
        )
        .map_err(|e| self.err(e))
    }

    fn version(&mut self) -> Result<Version, RegistryError> {
        self.conn
            .query_row(
                "SELECT version, pruned_through FROM registry_meta WHERE id = 1",
                [],
                |r| {
                    Ok(Version {
                        version: r.get::<_, i64>(0)? as u64,
                        pruned_through: r.get::<_, i64>(1)? as u64,
                    })
                },
            )
            .map_err(|e| self.err(e))
    }

    fn last_seq(&mut self) -> Result<u64, RegistryError> {
        self.conn
            .query_row(
                "SELECT COALESCE(MAX(seq), 0) FROM registry_changes",
                [],
                |r| r.get::<_, i64>(0).map(|n| n as u64),
            )
            .map_err(|e| self.err(e))
    }

    fn changes_since(&mut self, after: u64) -> Result<Vec<Change>, RegistryError> {
        let run = || -> rusqlite::Result<Vec<Change>> {
            let mut st = self.conn.prepare_cached(
                "SELECT seq, did, proxy_path, added FROM registry_changes WHERE seq > ?1 ORDER BY seq",
            )?;
            let rows = st.query_map([after as i64], |r| {
                Ok(Change {
                    seq: r.get::<_, i64>(0)? as u64,
                    did: r.get(1)?,
                    proxy_path: r.get(2)?,
                    added: r.get(3)?,
                })
            })?;
            rows.collect()
        };
        run().map_err(|e| self.err(e))
    }

    fn spend_nonce(
        &mut self,
        key: &NonceKey,
        expires: i64,
        now: i64,
    ) -> Result<bool, RegistryError> {
        let run = || -> rusqlite::Result<bool> {
            // Two statements, no transaction needed: the key is unique, so
            // of two gateways racing with one proof only one insert lands.
            self.conn
                .prepare_cached("DELETE FROM did_nonces WHERE nonce_key = ?1 AND expires <= ?2")?
                .execute(params![&key[..], now])?;
            let n = self
                .conn
                .prepare_cached(
                    "INSERT OR IGNORE INTO did_nonces (nonce_key, expires) VALUES (?1, ?2)",
                )?
                .execute(params![&key[..], expires])?;
            Ok(n == 1)
        };
        run().map_err(|e| self.err(e))
    }

    fn prune_nonces(&mut self, now: i64) -> Result<u64, RegistryError> {
        self.conn
            .execute("DELETE FROM did_nonces WHERE expires <= ?1", [now])
            .map(|n| n as u64)
            .map_err(|e| self.err(e))
    }
}
