//! Log setup: `[logging] level` (or `RUST_LOG`), to stderr or to a daily
//! rotated file in `log_dir`.

use tracing_subscriber::EnvFilter;

use crate::config::LoggingConfig;

/// Keeps the file writer alive; drop flushes.
pub struct LogGuard(#[allow(dead_code)] Option<tracing_appender::non_blocking::WorkerGuard>);

pub fn init(cfg: &LoggingConfig, base: &std::path::Path, debug: bool) -> LogGuard {
    let level = if debug { "debug" } else { cfg.level.as_str() };
    let filter = EnvFilter::try_from_default_env()
        .or_else(|_| EnvFilter::try_new(level))
        .unwrap_or_else(|_| EnvFilter::new("info"));
    let json = cfg.format.eq_ignore_ascii_case("json");
    if cfg.log_dir.is_empty() {
        let b = tracing_subscriber::fmt()
            .with_env_filter(filter)
            .with_writer(std::io::stderr)
            .with_ansi(false);
        let _ = if json {
            b.json().try_init()
        } else {
            b.try_init()
        };
        return LogGuard(None);
    }
    let dir = base.join(&cfg.log_dir);
    let _ = std::fs::create_dir_all(&dir);
    let appender = tracing_appender::rolling::daily(dir, "anp-proxy.log");
    let (w, guard) = tracing_appender::non_blocking(appender);
    let b = tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_writer(w)
        .with_ansi(false);
    let _ = if json {
        b.json().try_init()
    } else {
        b.try_init()
    };
    LogGuard(Some(guard))
}
