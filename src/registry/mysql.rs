//! The shared registry: a MySQL or MariaDB server, the seed deployment's
//! database, for several gateways reading one table. The `mysql` crate
//! (synchronous) with a small pool sized by `min_connections` /
//! `max_connections`; connections speak `[gateway.database] charset`.

use std::time::Duration;

use mysql::prelude::Queryable;
use mysql::{Opts, OptsBuilder, Pool, PoolConstraints, PoolOpts, PooledConn};

use super::error::RegistryError;
use super::{Backend, Row};
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

    fn insert(&mut self, did: &str, path: &str) -> Result<bool, RegistryError> {
        let mut c = self.conn()?;
        c.exec_drop(
            "INSERT IGNORE INTO did_proxy_path (did, proxy_path) VALUES (?, ?)",
            (did, path),
        )
        .map_err(|e| self.err(e))?;
        Ok(c.affected_rows() == 1)
    }

    fn delete(&mut self, did: &str, path: &str) -> Result<u64, RegistryError> {
        let mut c = self.conn()?;
        c.exec_drop(
            "DELETE FROM did_proxy_path WHERE did = ? AND proxy_path = ?",
            (did, path),
        )
        .map_err(|e| self.err(e))?;
        Ok(c.affected_rows())
    }
}
