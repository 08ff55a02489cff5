//! The shared registry: a MySQL or MariaDB server, the seed deployment's
//! database, for several gateways reading one table. The `mysql` crate
//! (synchronous) with a small pool sized by `min_connections` /
//! `max_connections`; connections speak `[gateway.database] charset`.

use std::time::Duration;

use mysql::prelude::Queryable;
use mysql::{Opts, OptsBuilder, Pool, PoolConstraints, PoolOpts, PooledConn, TxOpts};

use super::error::RegistryError;
use super::{Backend, Change, NonceKey, Row, Version};
use crate::config::{secs, DatabaseConfig};

/// `utf8mb4_bin`: paths and DIDs compare byte for byte, as in SQLite, so
/// `/Alice` and `/alice` are two prefixes on both backends.
const SCHEMA: &str = "
CREATE TABLE IF NOT EXISTS did_proxy_path (
    id BIGINT UNSIGNED NOT NULL AUTO_INCREMENT PRIMARY KEY,
    did VARCHAR(255) NOT NULL,
    proxy_path VARCHAR(255) NOT NULL,
    created_at TIMESTAMP NOT NULL DEFAULT CURRENT_TIMESTAMP,
    updated_at TIMESTAMP NOT NULL DEFAULT CURRENT_TIMESTAMP ON UPDATE CURRENT_TIMESTAMP,
    UNIQUE KEY uq_did_proxy_path_path (proxy_path),
    KEY idx_did_proxy_path_did (did)
) ENGINE=InnoDB DEFAULT CHARSET=utf8mb4 COLLATE=utf8mb4_bin";

/// The change counter and log (`super::Version`), created when missing so a
/// database made by an earlier version upgrades in place. Writers take the
/// `registry_meta` row lock first, so changes commit in `seq` order (InnoDB
/// hands out auto-increment values before commit).
const CHANGE_SCHEMA: [&str; 4] = [
    "CREATE TABLE IF NOT EXISTS registry_meta (
    id TINYINT UNSIGNED NOT NULL PRIMARY KEY,
    version BIGINT UNSIGNED NOT NULL DEFAULT 0,
    pruned_through BIGINT UNSIGNED NOT NULL DEFAULT 0
) ENGINE=InnoDB",
    "INSERT IGNORE INTO registry_meta (id, version, pruned_through) VALUES (1, 0, 0)",
    "CREATE TABLE IF NOT EXISTS registry_changes (
    seq BIGINT UNSIGNED NOT NULL AUTO_INCREMENT PRIMARY KEY,
    did VARCHAR(255) NOT NULL,
    proxy_path VARCHAR(255) NOT NULL,
    added TINYINT NOT NULL
) ENGINE=InnoDB DEFAULT CHARSET=utf8mb4 COLLATE=utf8mb4_bin",
    // Spent DID-WBA nonces shared by the gateways (`super::nonce_key`).
    "CREATE TABLE IF NOT EXISTS did_nonces (
    nonce_key BINARY(32) NOT NULL PRIMARY KEY,
    expires BIGINT NOT NULL,
    KEY idx_did_nonces_expires (expires)
) ENGINE=InnoDB",
];

pub struct MysqlRegistry {
    pool: Pool,
    addr: String,
}

impl MysqlRegistry {
    /// Connects (at least `min_connections`) and creates the table if missing.
    pub fn open(cfg: &DatabaseConfig) -> Result<Self, RegistryError> {
        let addr = format!("{}@{}:{}/{}", cfg.user, cfg.host, cfg.port, cfg.database);
        let err = |source| RegistryError::Mysql {
            addr: addr.clone(),
            source,
        };
        let constraints =
            PoolConstraints::new(cfg.min_connections, cfg.max_connections).unwrap_or_default();
        let timeout = secs(cfg.connect_timeout).unwrap_or(Duration::from_secs(10));
        let opts = OptsBuilder::new()
            .ip_or_hostname(Some(cfg.host.clone()))
            .tcp_port(cfg.port)
            .user(Some(cfg.user.clone()))
            .pass(Some(cfg.effective_password()))
            .db_name(Some(cfg.database.clone()))
            .tcp_connect_timeout(Some(timeout))
            .read_timeout(Some(timeout.max(Duration::from_secs(5))))
            .write_timeout(Some(timeout.max(Duration::from_secs(5))))
            // The charset was checked to be a bare name (config validation).
            .init(vec![format!("SET NAMES {}", cfg.charset)])
            .pool_opts(PoolOpts::default().with_constraints(constraints));
        let pool = Pool::new(Opts::from(opts)).map_err(err)?;
        let mut conn = pool.get_conn().map_err(err)?;
        conn.query_drop(SCHEMA).map_err(err)?;
        for sql in CHANGE_SCHEMA {
            conn.query_drop(sql).map_err(err)?;
        }
        Ok(Self { pool, addr })
    }

    fn err(&self, source: mysql::Error) -> RegistryError {
        RegistryError::Mysql {
            addr: self.addr.clone(),
            source,
        }
    }

    fn conn(&self) -> Result<PooledConn, RegistryError> {
        self.pool.get_conn().map_err(|e| self.err(e))
    }

    /// Runs `change` (one row written, or none) in a transaction that
    /// first locks the `registry_meta` row; when it wrote, logs it, bumps
    /// the version and prunes the log before committing.
    fn logged(
        &self,
        did: &str,
        path: &str,
        added: bool,
        change: &str,
    ) -> Result<u64, RegistryError> {
        let mut c = self.conn()?;
        let run = |c: &mut PooledConn| -> Result<u64, mysql::Error> {
            let mut tx = c.start_transaction(TxOpts::default())?;
            tx.query_drop("SELECT version FROM registry_meta WHERE id = 1 FOR UPDATE")?;
            tx.exec_drop(change, (did, path))?;
            let n = tx.affected_rows();
            if n > 0 {
                tx.exec_drop(
                    "INSERT INTO registry_changes (did, proxy_path, added) VALUES (?, ?, ?)",
                    (did, path, added),
                )?;
                let seq = tx.last_insert_id().unwrap_or(0);
                tx.query_drop("UPDATE registry_meta SET version = version + 1 WHERE id = 1")?;
                if let Some(floor) = seq.checked_sub(super::CHANGE_LOG_KEEP) {
                    tx.exec_drop("DELETE FROM registry_changes WHERE seq <= ?", (floor,))?;
                    tx.exec_drop(
                        "UPDATE registry_meta SET pruned_through = GREATEST(pruned_through, ?) WHERE id = 1",
                        (floor,),
                    )?;
                }
            }
            tx.commit()?;
            Ok(n)
        };
        run(&mut c).map_err(|e| self.err(e))
    }
}

impl Backend for MysqlRegistry {
    fn describe(&self) -> String {
        format!("mysql {}", self.addr)
    }

    fn list_all(&mut self) -> Result<Vec<Row>, RegistryError> {
        self.conn()?
            .query("SELECT did, proxy_path FROM did_proxy_path ORDER BY did, proxy_path")
            .map_err(|e| self.err(e))
    }

    fn routes_of(&mut self, did: &str) -> Result<Vec<Row>, RegistryError> {
        self.conn()?
            .exec(
                "SELECT did, proxy_path FROM did_proxy_path WHERE did = ? ORDER BY proxy_path",
                (did,),
            )
            .map_err(|e| self.err(e))
    }

    fn owner_of(&mut self, path: &str) -> Result<Option<String>, RegistryError> {
        self.conn()?
            .exec_first(
                "SELECT did FROM did_proxy_path WHERE proxy_path = ?",
                (path,),
            )
            .map_err(|e| self.err(e))
    }

    fn with_prefix(&mut self, prefix: &str) -> Result<Vec<Row>, RegistryError> {
        // `prefix`, or `prefix/…`: a range of the unique index ('0' follows '/').
        self.conn()?
            .exec(
                "SELECT did, proxy_path FROM did_proxy_path WHERE proxy_path = ? \
                 OR (proxy_path >= CONCAT(?, '/') AND proxy_path < CONCAT(?, '0')) \
                 ORDER BY did, proxy_path",
                (prefix, prefix, prefix),
            )
            .map_err(|e| self.err(e))
    }

    fn insert(&mut self, did: &str, path: &str) -> Result<bool, RegistryError> {
        self.logged(
            did,
            path,
            true,
            "INSERT IGNORE INTO did_proxy_path (did, proxy_path) VALUES (?, ?)",
        )
        .map(|n| n == 1)
    }

    fn delete(&mut self, did: &str, path: &str) -> Result<u64, RegistryError> {
        self.logged(
            did,
            path,
            false,
            "DELETE FROM did_proxy_path WHERE did = ? AND proxy_path = ?",
        )
    }

    fn version(&mut self) -> Result<Version, RegistryError> {
        let row: Option<(u64, u64)> = self
            .conn()?
            .query_first("SELECT version, pruned_through FROM registry_meta WHERE id = 1")
            .map_err(|e| self.err(e))?;
        let (version, pruned_through) = row.unwrap_or_default();
        Ok(Version {
            version,
            pruned_through,
        })
    }

    fn last_seq(&mut self) -> Result<u64, RegistryError> {
        let n: Option<u64> = self
            .conn()?
            .query_first("SELECT COALESCE(MAX(seq), 0) FROM registry_changes")
            .map_err(|e| self.err(e))?;
        Ok(n.unwrap_or(0))
    }

    fn changes_since(&mut self, after: u64) -> Result<Vec<Change>, RegistryError> {
        let rows: Vec<(u64, String, String, i8)> = self
            .conn()?
            .exec(
                "SELECT seq, did, proxy_path, added FROM registry_changes WHERE seq > ? ORDER BY seq",
                (after,),
            )
            .map_err(|e| self.err(e))?;
        Ok(rows
            .into_iter()
            .map(|(seq, did, proxy_path, added)| Change {
                seq,
                did,
                proxy_path,
                added: added != 0,
            })
            .collect())
    }

    fn spend_nonce(
        &mut self,
        key: &NonceKey,
        expires: i64,
        now: i64,
    ) -> Result<bool, RegistryError> {
        let mut c = self.conn()?;
        let run = |c: &mut PooledConn| -> Result<bool, mysql::Error> {
            // The primary key decides between gateways racing with one
            // proof: one INSERT IGNORE lands, the other affects no row.
            c.exec_drop(
                "DELETE FROM did_nonces WHERE nonce_key = ? AND expires <= ?",
                (&key[..], now),
            )?;
            c.exec_drop(
                "INSERT IGNORE INTO did_nonces (nonce_key, expires) VALUES (?, ?)",
                (&key[..], expires),
            )?;
            Ok(c.affected_rows() == 1)
        };
        run(&mut c).map_err(|e| self.err(e))
    }

    fn prune_nonces(&mut self, now: i64) -> Result<u64, RegistryError> {
        let mut c = self.conn()?;
        c.exec_drop("DELETE FROM did_nonces WHERE expires <= ?", (now,))
            .map_err(|e| self.err(e))?;
        Ok(c.affected_rows())
    }
}
