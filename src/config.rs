//! Configuration: the TOML schema, its defaults (one place), strict parsing
//! and a validation pass. Unknown keys are refused with the key's name and
//! the file; secrets never print (see `Debug` of [`TokenEntry`]).
//!
//! A `config.toml` written for the Python reference deployment must load:
//! `[gateway.tls] tls_verify_mode` is a synonym of `verify_mode`, and
//! `[logging] format` is accepted.

use std::fmt;
use std::path::{Path, PathBuf};
use std::time::Duration;

use serde::Deserialize;

/// Errors of loading or validating a configuration file.
#[derive(Debug, thiserror::Error)]
pub enum ConfigError {
    #[error("cannot read config file {path}: {source}")]
    Read {
        path: PathBuf,
        source: std::io::Error,
    },
    #[error("invalid config file {path}: {message}")]
    Parse { path: PathBuf, message: String },
    #[error("invalid config file {path}: key `{key}`: {message}")]
    Invalid {
        path: PathBuf,
        key: &'static str,
        message: String,
    },
}

/// Which side this process runs when no subcommand names it.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize, Default)]
#[serde(rename_all = "lowercase")]
pub enum Mode {
    #[default]
    Gateway,
    Receiver,
}

#[derive(Debug, Clone, Deserialize, Default)]
#[serde(deny_unknown_fields, default)]
pub struct Config {
    pub mode: Mode,
    pub debug: bool,
    pub logging: LoggingConfig,
    pub gateway: GatewayConfig,
    pub receiver: ReceiverConfig,
    /// Directory of the config file; relative paths in it resolve from here.
    #[serde(skip)]
    pub base_dir: PathBuf,
}

#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct LoggingConfig {
    /// `trace`, `debug`, `info`, `warn`, `error`, or an env-filter directive.
    pub level: String,
    /// Empty: log to stderr. Otherwise a directory for `anp-proxy.log`.
    pub log_dir: String,
    /// Accepted for compatibility with the reference's config; only `text`
    /// and `json` are meaningful.
    pub format: String,
}

impl Default for LoggingConfig {
    fn default() -> Self {
        Self {
            level: "info".into(),
            log_dir: String::new(),
            format: "text".into(),
        }
    }
}

#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct GatewayConfig {
    pub host: String,
    pub port: u16,
    /// Runtimes (one per core); 0 = one per CPU.
    pub workers: usize,
    pub tunnel_path: String,
    /// Seconds to wait for a response before answering 504.
    pub timeout: f64,
    /// Seconds an idle client keep-alive connection is kept.
    pub keepalive_timeout: f64,
    /// Seconds allowed to receive a whole request head (408 after).
    pub header_timeout: f64,
    /// Client connections per process (excess are closed at accept).
    pub max_connections: usize,
    /// Largest request or response body, bytes (413 / 502 beyond).
    pub max_body_size: usize,
    /// Largest ANPX frame, bytes; longer messages are chunked.
    pub chunk_size: usize,
    /// Seconds between WebSocket pings on a tunnel; a tunnel silent for
    /// three intervals is closed.
    pub ping_interval: f64,
    /// Longest request line, bytes (414 beyond).
    pub max_request_line: usize,
    /// Largest request head, bytes (431 beyond).
    pub max_head_size: usize,
    /// Most header fields in a request head (431 beyond).
    pub max_headers: usize,
    /// Requests in flight on one tunnel (503 + Retry-After beyond).
    pub max_inflight_per_tunnel: usize,
    /// Keep client-supplied X-Forwarded-* / Forwarded and append to them.
    pub trust_forwarded: bool,
    pub auth: AuthConfig,
}

impl Default for GatewayConfig {
    fn default() -> Self {
        Self {
            host: "127.0.0.1".into(),
            port: 8089,
            workers: 0,
            tunnel_path: "/ws".into(),
            timeout: 30.0,
            keepalive_timeout: 60.0,
            header_timeout: 10.0,
            max_connections: 10_000,
            max_body_size: 64 * 1024 * 1024,
            chunk_size: 64 * 1024,
            ping_interval: 20.0,
            max_request_line: 8 * 1024,
            max_head_size: 64 * 1024,
            max_headers: 100,
            max_inflight_per_tunnel: 4096,
            trust_forwarded: false,
            auth: AuthConfig::default(),
        }
    }
}

#[derive(Debug, Clone, Deserialize, Default)]
#[serde(deny_unknown_fields, default)]
pub struct AuthConfig {
    pub tokens: Vec<TokenEntry>,
}

/// A shared-secret identity: `Authorization: Bearer <token>` on the upgrade.
#[derive(Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct TokenEntry {
    pub name: String,
    pub token: String,
    #[serde(default)]
    pub paths: Vec<String>,
}

impl fmt::Debug for TokenEntry {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("TokenEntry")
            .field("name", &self.name)
            .field("token", &"<redacted>")
            .field("paths", &self.paths)
            .finish()
    }
}

#[derive(Clone, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct ReceiverConfig {
    /// `ws://host:port/ws` or `wss://…`.
    pub gateway_url: String,
    /// Base URL of the local app, `http://host:port`.
    pub upstream: String,
    pub token: String,
    /// Tunnels to keep open; 0 = as many as the gateway reports.
    pub tunnels: usize,
    /// Most upstream calls at once (excess waits).
    pub max_concurrent: usize,
    /// Seconds to wait for the local app's response (0 = no limit; the
    /// gateway's `timeout` still applies).
    pub upstream_timeout: f64,
    /// Seconds between WebSocket pings to the gateway.
    pub ping_interval: f64,
    /// Largest ANPX frame this receiver sends, bytes.
    pub chunk_size: usize,
    /// Largest response body accepted from the app, bytes.
    pub max_body_size: usize,
    /// Ceiling of the reconnect backoff, seconds.
    pub reconnect_max_delay: f64,
}

impl Default for ReceiverConfig {
    fn default() -> Self {
        Self {
            gateway_url: "ws://127.0.0.1:8089/ws".into(),
            upstream: "http://127.0.0.1:8000".into(),
            token: String::new(),
            tunnels: 0,
            max_concurrent: 256,
            upstream_timeout: 0.0,
            ping_interval: 20.0,
            chunk_size: 64 * 1024,
            max_body_size: 64 * 1024 * 1024,
            reconnect_max_delay: 30.0,
        }
    }
}

impl fmt::Debug for ReceiverConfig {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("ReceiverConfig")
            .field("gateway_url", &self.gateway_url)
            .field("upstream", &self.upstream)
            .field("token", &"<redacted>")
            .field("tunnels", &self.tunnels)
            .field("max_concurrent", &self.max_concurrent)
            .finish_non_exhaustive()
    }
}

/// Seconds (as written in the file) to a `Duration`; 0 or less = none.
pub fn secs(v: f64) -> Option<Duration> {
    (v > 0.0).then(|| Duration::from_secs_f64(v))
}

impl Config {
    /// Reads, parses and validates `path`.
    pub fn load(path: &Path) -> Result<Config, ConfigError> {
        let text = std::fs::read_to_string(path).map_err(|source| ConfigError::Read {
            path: path.to_owned(),
            source,
        })?;
        let mut cfg = Self::parse(&text, path)?;
        cfg.base_dir = path
            .parent()
            .filter(|p| !p.as_os_str().is_empty())
            .map(Path::to_owned)
            .unwrap_or_else(|| PathBuf::from("."));
        Ok(cfg)
    }

    /// Parses and validates TOML text; `path` only names the file in errors.
    pub fn parse(text: &str, path: &Path) -> Result<Config, ConfigError> {
        let cfg: Config = toml::from_str(text).map_err(|e| ConfigError::Parse {
            path: path.to_owned(),
            message: e.to_string().trim_end().replace('\n', " | "),
        })?;
        cfg.validate(path)?;
        Ok(cfg)
    }

    fn validate(&self, path: &Path) -> Result<(), ConfigError> {
        let bad = |key: &'static str, message: String| ConfigError::Invalid {
            path: path.to_owned(),
            key,
            message,
        };
        let g = &self.gateway;
        if !g.tunnel_path.starts_with('/') {
            return Err(bad("gateway.tunnel_path", "must start with `/`".into()));
        }
        if g.chunk_size < 1024 || g.chunk_size > 16 * 1024 * 1024 {
            return Err(bad(
                "gateway.chunk_size",
                format!("{} is outside 1024..=16777216", g.chunk_size),
            ));
        }
        if g.timeout.is_nan() || g.timeout <= 0.0 {
            return Err(bad("gateway.timeout", "must be > 0".into()));
        }
        for (key, v) in [
            ("gateway.max_connections", g.max_connections),
            ("gateway.max_request_line", g.max_request_line),
            ("gateway.max_head_size", g.max_head_size),
            ("gateway.max_headers", g.max_headers),
            ("gateway.max_inflight_per_tunnel", g.max_inflight_per_tunnel),
        ] {
            if v == 0 {
                return Err(bad(key, "must be > 0".into()));
            }
        }
        let mut names = std::collections::HashSet::new();
        for t in &g.auth.tokens {
            if t.name.is_empty() {
                return Err(bad("gateway.auth.tokens.name", "must not be empty".into()));
            }
            if t.token.len() < 8 {
                return Err(bad(
                    "gateway.auth.tokens.token",
                    format!("token of `{}` is shorter than 8 characters", t.name),
                ));
            }
            if !names.insert(t.name.as_str()) {
                return Err(bad(
                    "gateway.auth.tokens.name",
                    format!("`{}` appears twice", t.name),
                ));
            }
            for p in &t.paths {
                if !p.starts_with('/') {
                    return Err(bad(
                        "gateway.auth.tokens.paths",
                        format!("`{p}` of `{}` must start with `/`", t.name),
                    ));
                }
            }
        }
        let r = &self.receiver;
        if r.max_concurrent == 0 {
            return Err(bad("receiver.max_concurrent", "must be > 0".into()));
        }
        if r.chunk_size < 1024 || r.chunk_size > 16 * 1024 * 1024 {
            return Err(bad(
                "receiver.chunk_size",
                format!("{} is outside 1024..=16777216", r.chunk_size),
            ));
        }
        Ok(())
    }

    /// Worker runtimes to start: `workers`, or one per CPU when 0.
    pub fn gateway_workers(&self) -> usize {
        match self.gateway.workers {
            0 => std::thread::available_parallelism()
                .map(|n| n.get())
                .unwrap_or(1),
            n => n,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn shipped_config_parses() {
        let path = Path::new(concat!(env!("CARGO_MANIFEST_DIR"), "/config.toml"));
        Config::load(path).expect("shipped config.toml must load");
    }

    #[test]
    fn unknown_key_is_named() {
        let err = Config::parse("[gateway]\nprot = 1\n", Path::new("x.toml")).unwrap_err();
        let msg = err.to_string();
        assert!(msg.contains("prot") && msg.contains("x.toml"), "{msg}");
    }

    #[test]
    fn token_secret_never_prints() {
        let cfg = Config::parse(
            "[[gateway.auth.tokens]]\nname='a'\ntoken='supersecret1'\npaths=['/a']\n",
            Path::new("x.toml"),
        )
        .unwrap();
        assert!(!format!("{cfg:?}").contains("supersecret1"));
    }

    #[test]
    fn bad_values_name_their_key() {
        for (text, key) in [
            ("[gateway]\nchunk_size = 10\n", "gateway.chunk_size"),
            ("[gateway]\ntunnel_path = 'ws'\n", "gateway.tunnel_path"),
            ("[gateway]\ntimeout = 0\n", "gateway.timeout"),
            (
                "[[gateway.auth.tokens]]\nname='a'\ntoken='short'\n",
                "gateway.auth.tokens.token",
            ),
        ] {
            let msg = Config::parse(text, Path::new("x.toml"))
                .unwrap_err()
                .to_string();
            assert!(msg.contains(key), "{text}: {msg}");
        }
    }

    #[test]
    fn integer_and_float_seconds_both_parse() {
        let c = Config::parse("[gateway]\ntimeout = 2\n", Path::new("x")).unwrap();
        assert_eq!(c.gateway.timeout, 2.0);
        let c = Config::parse("[gateway]\ntimeout = 0.5\n", Path::new("x")).unwrap();
        assert_eq!(c.gateway.timeout, 0.5);
    }
}
