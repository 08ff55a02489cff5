//! Errors of the route registry: a refused change (the operator's mistake,
//! shown as is) or a database failure (which backend, where).

use std::path::PathBuf;

#[derive(Debug, thiserror::Error)]
pub enum RegistryError {
    #[error("{0}")]
    BadRoute(String),
    #[error("{what} is empty or longer than 255 characters")]
    TooLong { what: &'static str },
    #[error("path `{path}` is already owned by `{owner}`")]
    Owned { path: String, owner: String },
    #[error("cannot create the directory of {path}: {source}")]
    CreateDir {
        path: PathBuf,
        source: std::io::Error,
    },
    #[error("SQLite registry {path}: {source}")]
    Sqlite {
        path: PathBuf,
        source: rusqlite::Error,
    },
    #[error("MySQL registry {addr}: {source}")]
    Mysql { addr: String, source: mysql::Error },
}

impl RegistryError {
    /// A refused change (bad input or a conflict), not a database failure.
    pub fn is_refusal(&self) -> bool {
        matches!(
            self,
            RegistryError::BadRoute(_)
                | RegistryError::TooLong { .. }
                | RegistryError::Owned { .. }
        )
    }
}
