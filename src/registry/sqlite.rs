//! The embedded registry: one SQLite file (rusqlite, bundled), created with
//! its directory on first open. WAL mode, so `anp-proxy routes …` can write
//! while a gateway's poller reads.

use std::path::{Path, PathBuf};
use std::time::Duration;

use rusqlite::{params, Connection, OptionalExtension};

use super::error::RegistryError;
use super::{Backend, Row};

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

    fn insert(&mut self, did: &str, path: &str) -> Result<bool, RegistryError> {
        self.conn
            .execute(
                "INSERT OR IGNORE INTO did_proxy_path (did, proxy_path) VALUES (?1, ?2)",
                params![did, path],
            )
            .map(|n| n == 1)
            .map_err(|e| self.err(e))
    }

    fn delete(&mut self, did: &str, path: &str) -> Result<u64, RegistryError> {
        self.conn
            .execute(
                "DELETE FROM did_proxy_path WHERE did = ?1 AND proxy_path = ?2",
                params![did, path],
            )
            .map(|n| n as u64)
            .map_err(|e| self.err(e))
    }
}
