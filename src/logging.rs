//! Log setup: `[logging] level` (or `RUST_LOG`), to stderr or to a file
//! in `log_dir`, rotated daily or by size (`rotation`, `max_size`,
//! `backup_count`). [`rotating_writer`] is shared with the access log
//! (`crate::access_log`), so both files rotate by the same rules.
//!
//! Files are written by a background thread (tracing-appender's
//! non-blocking writer): a core never waits on the disk.

use std::io::Write;
use std::path::Path;

use tracing_subscriber::EnvFilter;

use crate::config::{LoggingConfig, Rotation};

/// The main log's file name in `log_dir` (daily files get a date suffix).
pub const MAIN_LOG: &str = "anp-proxy.log";

/// Keeps the file writer alive; drop flushes.
pub struct LogGuard(Option<tracing_appender::non_blocking::WorkerGuard>);

impl LogGuard {
    /// The log goes to a file in `log_dir` (not to stderr).
    pub fn to_file(&self) -> bool {
        self.0.is_some()
    }
}

/// A writer for `dir/name` that rotates by the config's rules:
///
/// - `daily` (tracing-appender): `name.YYYY-MM-DD` (UTC), a new file each
///   day, the newest `backup_count + 1` kept;
/// - `size` (file-rotate): `name` is written until it passes `max_size`
///   bytes (a line is never split), then renamed `name.1` (older backups
///   shift to `.2`, …); at most `backup_count` backups are kept.
///
/// Blocking: wrap it in a non-blocking writer before a core uses it.
pub fn rotating_writer(
    cfg: &LoggingConfig,
    dir: &Path,
    name: &str,
) -> std::io::Result<Box<dyn Write + Send>> {
    std::fs::create_dir_all(dir)?;
    match cfg.rotation {
        Rotation::Daily => {
            let appender = tracing_appender::rolling::RollingFileAppender::builder()
                .rotation(tracing_appender::rolling::Rotation::DAILY)
                .filename_prefix(name)
                .max_log_files(cfg.backup_count.saturating_add(1))
                .build(dir)
                .map_err(std::io::Error::other)?;
            Ok(Box::new(appender))
        }
        Rotation::Size => {
            use file_rotate::{compression::Compression, suffix::AppendCount, ContentLimit};
            let path = dir.join(name);
            let max = usize::try_from(cfg.max_size).unwrap_or(usize::MAX).max(1);
            let w = file_rotate::FileRotate::new(
                &path,
                AppendCount::new(cfg.backup_count),
                ContentLimit::BytesSurpassed(max),
                Compression::None,
                None,
            );
            // file-rotate swallows an open failure (it then writes nowhere):
            // check, so a bad log_dir is an error at start, not silence.
            if !path.exists() {
                return Err(std::io::Error::new(
                    std::io::ErrorKind::PermissionDenied,
                    format!("cannot open {}", path.display()),
                ));
            }
            Ok(Box::new(w))
        }
    }
}

pub fn init(cfg: &LoggingConfig, base: &Path, debug: bool) -> LogGuard {
    let level = if debug { "debug" } else { cfg.level.as_str() };
    let filter = EnvFilter::try_from_default_env()
        .or_else(|_| EnvFilter::try_new(level))
        .unwrap_or_else(|_| EnvFilter::new("info"));
    let json = cfg.format.eq_ignore_ascii_case("json");
    let dir = base.join(&cfg.log_dir);
    let file = if cfg.log_dir.is_empty() {
        None
    } else {
        match rotating_writer(cfg, &dir, MAIN_LOG) {
            Ok(w) => Some(w),
            Err(e) => {
                eprintln!(
                    "anp-proxy: cannot log to {} ({e}); logging to stderr",
                    dir.display()
                );
                None
            }
        }
    };
    let Some(file) = file else {
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
    };
    let (w, guard) = tracing_appender::non_blocking(file);
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

#[cfg(test)]
mod tests {
    use super::*;
    use crate::config::Config;

    fn files(dir: &Path) -> Vec<String> {
        let mut v: Vec<String> = std::fs::read_dir(dir)
            .unwrap()
            .map(|e| e.unwrap().file_name().to_string_lossy().into_owned())
            .collect();
        v.sort();
        v
    }

    #[test]
    fn logging_keys_parse_with_their_defaults() {
        let d = Config::default().logging;
        assert!(d.access_log);
        assert_eq!(d.rotation, Rotation::Daily);
        assert_eq!(d.max_size, 100 * 1024 * 1024);
        assert_eq!(d.backup_count, 7);
        let c = Config::parse(
            "[logging]\naccess_log = false\nrotation = \"size\"\nmax_size = 65536\nbackup_count = 2\n",
            Path::new("x.toml"),
        )
        .unwrap();
        assert!(!c.logging.access_log);
        assert_eq!(c.logging.rotation, Rotation::Size);
        assert_eq!(c.logging.max_size, 65536);
        assert_eq!(c.logging.backup_count, 2);
        let e = Config::parse("[logging]\nrotation = \"hourly\"\n", Path::new("x.toml"))
            .unwrap_err()
            .to_string();
        assert!(e.contains("hourly") && e.contains("x.toml"), "{e}");
        let e = Config::parse("[logging]\nmax_size = 10\n", Path::new("x.toml"))
            .unwrap_err()
            .to_string();
        assert!(e.contains("logging.max_size"), "{e}");
    }

    /// Writes about ten times `max_size` through the size-rotating writer:
    /// backups appear, never more than `backup_count`, none (nor the live
    /// file) much larger than `max_size`, and no line is split or lost
    /// beyond what the cap discards.
    #[test]
    fn size_rotation_keeps_backup_count_files() {
        let tmp = tempfile::tempdir().unwrap();
        let cfg = LoggingConfig {
            rotation: Rotation::Size,
            max_size: 4096,
            backup_count: 3,
            ..LoggingConfig::default()
        };
        let mut w = rotating_writer(&cfg, tmp.path(), "access.log").unwrap();
        let line_len = 100;
        let lines = 10 * 4096 / line_len;
        for i in 0..lines {
            let mut l = format!("{{\"n\":{i:08}}}");
            while l.len() < line_len - 1 {
                l.push(' ');
            }
            l.push('\n');
            w.write_all(l.as_bytes()).unwrap();
        }
        w.flush().unwrap();
        drop(w);
        let names = files(tmp.path());
        assert_eq!(
            names,
            ["access.log", "access.log.1", "access.log.2", "access.log.3"],
            "expected the live file and exactly backup_count = 3 backups"
        );
        let mut last = None;
        // Oldest backup first: the kept lines are the newest ones, in order.
        for name in ["access.log.3", "access.log.2", "access.log.1", "access.log"] {
            let text = std::fs::read_to_string(tmp.path().join(name)).unwrap();
            assert!(
                text.len() <= 4096 + line_len,
                "{name} is {} bytes, over max_size plus one line",
                text.len()
            );
            for l in text.lines() {
                assert_eq!(l.len(), line_len - 1, "a line was split: {l:?}");
                let n: usize = l[5..13].parse().unwrap();
                if let Some(p) = last {
                    assert_eq!(n, p + 1, "lines out of order or lost inside the kept files");
                }
                last = Some(n);
            }
        }
        assert_eq!(last, Some(lines - 1), "the newest line is in the live file");
    }

    #[test]
    fn daily_writer_creates_a_dated_file() {
        let tmp = tempfile::tempdir().unwrap();
        let cfg = LoggingConfig::default();
        let mut w = rotating_writer(&cfg, &tmp.path().join("logs"), MAIN_LOG).unwrap();
        w.write_all(b"x\n").unwrap();
        w.flush().unwrap();
        let names = files(&tmp.path().join("logs"));
        assert_eq!(names.len(), 1, "{names:?}");
        assert!(names[0].starts_with("anp-proxy.log."), "{names:?}");
    }
}
