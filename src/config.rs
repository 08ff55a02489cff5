//! Configuration: the TOML schema, its defaults (one place), strict parsing
//! and a validation pass. Unknown keys are refused with the key's name and
//! the file; secrets never print (see `Debug` of [`TokenEntry`]).
//!
//! A `config.toml` written for the Python reference deployment must load:
//! `[gateway.tls] tls_verify_mode` is a synonym of `verify_mode`,
//! `[logging] format` is accepted, and a `[gateway.database]` holding MySQL
//! keys but no `backend` means MySQL.

use std::fmt;
use std::path::{Path, PathBuf};
use std::time::Duration;

use serde::{Deserialize, Serialize};

mod overlay;
pub use overlay::{Origin, Overrides, Source, ENV_PREFIX};

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
    /// A value refused: `origin` names where it was set ("config file
    /// x.toml", "environment variable ANP_PROXY_GATEWAY__PORT", "flag
    /// --port").
    #[error("invalid {origin}: key `{key}`: {message}")]
    Invalid {
        origin: String,
        key: String,
        message: String,
    },
    /// A variable or flag that is not a key and value at all.
    #[error("invalid {origin}: {message}")]
    Override { origin: String, message: String },
}

/// A duration key, in seconds: a finite number from 0 to [`Seconds::MAX`]
/// (NaN, infinities, negative and absurd values are refused when the file
/// is parsed, with the key and the file named). 0 means "off" where a key
/// says so.
#[derive(Debug, Clone, Copy, PartialEq, PartialOrd, Default)]
pub struct Seconds(f64);

impl Seconds {
    /// 100 days: longer than any timeout here can mean.
    pub const MAX: f64 = 8_640_000.0;

    pub fn new(v: f64) -> Result<Self, String> {
        if !v.is_finite() {
            return Err(format!("{v} is not a number of seconds"));
        }
        if v < 0.0 {
            return Err(format!("{v} seconds is negative"));
        }
        if v > Self::MAX {
            return Err(format!("{v} seconds is more than {} (100 days)", Self::MAX));
        }
        Ok(Seconds(v))
    }

    pub fn get(self) -> f64 {
        self.0
    }

    /// The duration; None for 0 ("off").
    pub fn duration(self) -> Option<Duration> {
        secs(self.0)
    }

    /// The duration, 0 included.
    pub fn or_zero(self) -> Duration {
        Duration::from_secs_f64(self.0)
    }
}

impl From<f64> for Seconds {
    /// For defaults and tests; panics on a value [`Seconds::new`] refuses.
    fn from(v: f64) -> Self {
        Seconds::new(v).expect("a valid number of seconds")
    }
}

impl From<Seconds> for f64 {
    fn from(s: Seconds) -> f64 {
        s.0
    }
}

impl std::ops::Deref for Seconds {
    type Target = f64;
    fn deref(&self) -> &f64 {
        &self.0
    }
}

impl Serialize for Seconds {
    fn serialize<S: serde::Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        s.serialize_f64(self.0)
    }
}

impl<'de> Deserialize<'de> for Seconds {
    fn deserialize<D: serde::Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        let v = f64::deserialize(d)?;
        Seconds::new(v).map_err(serde::de::Error::custom)
    }
}

/// A key and why its value is refused (before the file is named).
type Invalid = (&'static str, String);

fn bad(key: &'static str, message: String) -> Invalid {
    (key, message)
}

/// Which side this process runs when no subcommand names it.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize, Serialize, Default)]
#[serde(rename_all = "lowercase")]
pub enum Mode {
    #[default]
    Gateway,
    Receiver,
}

#[derive(Debug, Clone, Deserialize, Serialize, Default)]
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
    /// Where the values came from: the file, environment, flags
    /// (`config/overlay.rs`).
    #[serde(skip)]
    pub origin: Origin,
}

#[derive(Debug, Clone, Deserialize, Serialize)]
#[serde(deny_unknown_fields, default)]
pub struct LoggingConfig {
    /// `trace`, `debug`, `info`, `warn`, `error`, or an env-filter directive.
    pub level: String,
    /// Empty: log to stderr. Otherwise a directory for `anp-proxy.log`.
    pub log_dir: String,
    /// Accepted for compatibility with the reference's config; only `text`
    /// and `json` are meaningful.
    pub format: String,
    /// One JSON line per HTTP request (`access.log` in `log_dir`, else
    /// stdout); `false` costs nothing on the request path.
    pub access_log: bool,
    /// When files in `log_dir` are rotated: daily or past `max_size`.
    pub rotation: Rotation,
    /// Bytes a log file may reach before it is rotated (`rotation = "size"`).
    pub max_size: u64,
    /// Rotated files kept per log, beside the one being written.
    pub backup_count: usize,
}

/// `[logging] rotation`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize, Serialize, Default)]
#[serde(rename_all = "lowercase")]
pub enum Rotation {
    #[default]
    Daily,
    Size,
}

impl Default for LoggingConfig {
    fn default() -> Self {
        Self {
            level: "info".into(),
            log_dir: String::new(),
            format: "text".into(),
            access_log: true,
            rotation: Rotation::Daily,
            max_size: 100 * 1024 * 1024,
            backup_count: 7,
        }
    }
}

#[derive(Debug, Clone, Deserialize, Serialize)]
#[serde(deny_unknown_fields, default)]
pub struct GatewayConfig {
    pub host: String,
    pub port: u16,
    /// Runtimes (one per core); 0 = one per CPU.
    pub workers: usize,
    pub tunnel_path: String,
    /// A second port (same host) that accepts only tunnel upgrades, with
    /// its own TLS settings (`[gateway.tunnel_tls]`); absent = tunnels use
    /// the public port; 0 = any free port (printed at start). When set, the
    /// public port refuses tunnel upgrades.
    pub tunnel_port: Option<u16>,
    /// Every connection on the public port starts with a PROXY protocol
    /// header (v1 or v2, from a load balancer in front); its client address
    /// is the one logged, forwarded and limited. A connection without a
    /// valid header is refused. Only for a port only the balancer reaches.
    pub proxy_protocol: bool,
    /// The same for `tunnel_port`.
    pub tunnel_proxy_protocol: bool,
    /// HTTPS and WSS on the public port (and on the tunnel port unless
    /// `[gateway.tunnel_tls]` is written).
    pub tls: TlsConfig,
    /// TLS of the tunnel port, a whole table of its own (nothing is
    /// inherited from `[gateway.tls]`); absent = `[gateway.tls]`.
    pub tunnel_tls: Option<TlsConfig>,
    /// Seconds to wait for a response before answering 504.
    pub timeout: Seconds,
    /// Seconds an idle client keep-alive connection is kept.
    pub keepalive_timeout: Seconds,
    /// Longest pause, in seconds, between pieces of a streamed response
    /// body (SSE, long downloads) before the client connection is closed.
    pub stream_idle_timeout: Seconds,
    /// Seconds a client may leave what the gateway sent it unread (its
    /// receive window closed) or unacknowledged before the connection is
    /// aborted (`TCP_USER_TIMEOUT`); 0 = the kernel's default (no limit
    /// on a closed window).
    pub send_timeout: Seconds,
    /// Seconds an upgraded (WebSocket pass-through) stream may carry no
    /// byte in either direction before both ends are closed; 0 = no limit.
    pub upgrade_idle_timeout: Seconds,
    /// Upgraded streams open at once for one identity, all cores together;
    /// one more is answered 503 + Retry-After (logged). 0 = no limit.
    pub max_upgraded_per_identity: usize,
    /// Seconds allowed to receive a whole request head (408 after); also
    /// how long a new connection that has sent nothing yet is held.
    pub header_timeout: Seconds,
    /// Longest pause, in seconds, between two reads of a request body
    /// (408 after); also the grace before `request_body_min_rate` applies.
    pub request_body_timeout: Seconds,
    /// Slowest average upload, bytes per second, once an upload has run
    /// `request_body_timeout` seconds (408 below it); 0 = no rate rule.
    pub request_body_min_rate: u64,
    /// Request bodies up to this many bytes are read whole at the gateway
    /// before the request goes to the receiver; a larger one starts
    /// streaming once this many bytes have come. 0 = stream at once.
    pub request_buffer_size: usize,
    /// Client connections per process (excess are closed at accept).
    pub max_connections: usize,
    /// Largest request or response body, bytes (413 / 502 beyond).
    pub max_body_size: usize,
    /// Largest ANPX frame, bytes; longer messages are chunked.
    pub chunk_size: usize,
    /// Seconds between WebSocket pings on a tunnel; a tunnel silent for
    /// three intervals is closed.
    pub ping_interval: Seconds,
    /// Longest request line, bytes (414 beyond).
    pub max_request_line: usize,
    /// Largest request head, bytes (431 beyond).
    pub max_head_size: usize,
    /// Most header fields in a request head (431 beyond).
    pub max_headers: usize,
    /// Requests in flight on one tunnel (503 + Retry-After beyond).
    pub max_inflight_per_tunnel: usize,
    /// Tunnel upgrades not yet answered (head still arriving, or being
    /// authenticated) from one client IP; beyond it: 429 + Retry-After.
    pub max_pending_upgrades_per_ip: usize,
    /// Tunnel upgrades not yet answered, all clients together; beyond it:
    /// 503 + Retry-After.
    pub max_pending_upgrades: usize,
    /// Tunnel handshakes each core starts per second once its burst is
    /// spent; an upgrade beyond waits its turn (at most half of
    /// `handshake_timeout`, else 503 + Retry-After). 0: unpaced.
    pub handshake_rate: u32,
    /// Handshakes a core starts at once before `handshake_rate` applies.
    pub handshake_burst: u32,
    /// Tunnels scale with load (`scale`, PROTOCOL.md §7.8): a receiver
    /// that offers it starts with one tunnel, and a core that handed this
    /// many requests of an identity per second to another core (it has
    /// none of its tunnels) asks the receiver for one more, up to
    /// `workers`. 0: every receiver is asked for `workers` tunnels at once.
    pub tunnel_scale_up: u32,
    /// Seconds a scaled-up tunnel may carry fewer than half of
    /// `tunnel_scale_up` requests a second, every second, before the
    /// gateway lets it go (close 4002 once idle); never the identity's last.
    pub tunnel_scale_idle: Seconds,
    /// Insist on ANPX body CRCs on every tunnel: refuse the `nocrc`
    /// extension (docs/PROTOCOL.md §7.9). Default false: between our own
    /// peers large bodies go without a CRC, TCP's checksum (and TLS's
    /// integrity, on wss) guarding them as they guard any HTTP proxy's.
    pub tunnel_body_crc: bool,
    /// Seconds an upgrade may take from its first byte to the 101: reading
    /// the head, authentication (DID document fetch included); 408 after.
    pub handshake_timeout: Seconds,
    /// WebSocket pings a receiver may send in one second; beyond it the
    /// tunnel is failed with close code 1008.
    pub max_pings_per_second: usize,
    /// Largest WebSocket frame, and message, a receiver may send on a
    /// tunnel, bytes (close 1009 beyond); never below `chunk_size` + 1024.
    pub tunnel_max_message_size: usize,
    /// Most frames one WebSocket message from a receiver may span (close
    /// 1008 beyond).
    pub tunnel_max_fragments: usize,
    /// Seconds a tunnel that ended may take to send its last frames (the
    /// Close) before its socket and queue are dropped.
    pub tunnel_close_grace: Seconds,
    /// A second receiver instance (another `instance_id`) for an identity
    /// that has tunnels: "share", "refuse" or "replace".
    pub duplicate_tunnels: DuplicateTunnels,
    /// Keep client-supplied X-Forwarded-* / Forwarded and append to them.
    pub trust_forwarded: bool,
    /// Seconds a SIGTERM/SIGINT drain waits for in-flight requests before
    /// the process exits anyway.
    pub shutdown_grace: Seconds,
    /// Seconds a request for an identity with no tunnel connected waits for
    /// one (a receiver reconnecting, a gateway just started) before 503;
    /// 0 = answer 503 at once.
    pub no_tunnel_wait: Seconds,
    /// Client connections from one address (IPv4, or IPv6 /64) at once,
    /// all cores together; one more is closed at accept (counted in
    /// `anp_connections_refused_total{reason="per_ip"}`, logged at most
    /// once a second per core). 0 = no per-address limit.
    pub max_connections_per_ip: usize,
    /// Requests of one identity (the owner of the matched route) waiting
    /// for an answer on one core at once; more wait in that identity's
    /// queue (`max_queue_per_identity`). A request counts from admission
    /// until its response head arrives or it fails.
    pub max_inflight_per_identity: usize,
    /// Requests of one identity that may wait on one core for a place
    /// in flight; one more is answered 503 + Retry-After at once. 0 = no
    /// queue (shed as soon as `max_inflight_per_identity` is reached).
    pub max_queue_per_identity: usize,
    /// Seconds a queued request waits for a place before 503 +
    /// Retry-After.
    pub queue_timeout: Seconds,
    /// Seconds a client connection that was just answered 503 by
    /// admission (`queue_full`, `queue_timeout`) is not read again: its
    /// next request waits in the socket, costing nothing, instead of being
    /// read, parsed and refused again at once. Bounds what a flood that
    /// resends at once (an open loop, a retry loop) costs the core, so the
    /// requests in flight keep their pace. A 429 of a rate limit pauses
    /// its connection for its `Retry-After`, at most this long. A drain
    /// ends every pause. 0 = read on at once (after a 503 or a 429).
    pub shed_pause: Seconds,
    /// Requests in flight on one core, all identities together; waiting
    /// requests are then admitted round-robin across identities (fair
    /// shares). 0 = no core-wide limit.
    pub max_inflight_per_core: usize,
    /// Token-bucket buckets one core keeps for `rate_limits`; past it,
    /// idle (full) buckets are dropped first, then the least recently
    /// used.
    pub rate_limit_table_size: usize,
    /// `[[gateway.rate_limits]]`: token buckets by client address, route
    /// or identity (429 + Retry-After beyond). None by default.
    pub rate_limits: Vec<RateLimitRule>,
    /// Serve `/stats` and `/metrics` on `admin_host:admin_port`.
    pub admin_enabled: bool,
    /// Address of the admin listener (keep it on loopback).
    pub admin_host: String,
    /// Port of the admin listener; 0 picks a free one (printed at start).
    /// Bound with `SO_REUSEPORT` like the public port, so a successor
    /// (`--takeover`) can listen before this process drains.
    pub admin_port: u16,
    /// Seconds an admin connection may take to send its request head, and
    /// to take the response; past it the connection is closed.
    pub admin_header_timeout: Seconds,
    /// Admin connections served at once; one more is answered 503 and
    /// closed.
    pub admin_max_connections: usize,
    pub auth: AuthConfig,
    pub database: DatabaseConfig,
}

impl Default for GatewayConfig {
    fn default() -> Self {
        Self {
            host: "127.0.0.1".into(),
            port: 8089,
            workers: 0,
            tunnel_path: "/ws".into(),
            tunnel_port: None,
            proxy_protocol: false,
            tunnel_proxy_protocol: false,
            tls: TlsConfig::default(),
            tunnel_tls: None,
            timeout: Seconds(30.0),
            keepalive_timeout: Seconds(60.0),
            stream_idle_timeout: Seconds(300.0),
            send_timeout: Seconds(60.0),
            upgrade_idle_timeout: Seconds(300.0),
            max_upgraded_per_identity: 1024,
            header_timeout: Seconds(10.0),
            request_body_timeout: Seconds(10.0),
            request_body_min_rate: 1024,
            request_buffer_size: 64 * 1024,
            max_connections: 10_000,
            max_body_size: 64 * 1024 * 1024,
            chunk_size: 64 * 1024,
            ping_interval: Seconds(20.0),
            max_request_line: 8 * 1024,
            max_head_size: 64 * 1024,
            max_headers: 100,
            max_inflight_per_tunnel: 4096,
            max_pending_upgrades_per_ip: 16,
            max_pending_upgrades: 1024,
            handshake_rate: 2000,
            tunnel_scale_up: 50,
            tunnel_scale_idle: Seconds(60.0),
            tunnel_body_crc: false,
            handshake_burst: 200,
            handshake_timeout: Seconds(10.0),
            max_pings_per_second: 10,
            // Receivers may use a chunk size of their own up to 1 MiB.
            tunnel_max_message_size: (1 << 20) + 1024,
            tunnel_max_fragments: 1024,
            tunnel_close_grace: Seconds(2.0),
            duplicate_tunnels: DuplicateTunnels::Share,
            trust_forwarded: false,
            shutdown_grace: Seconds(30.0),
            no_tunnel_wait: Seconds(2.0),
            max_connections_per_ip: 0,
            max_inflight_per_identity: 1024,
            max_queue_per_identity: 1024,
            queue_timeout: Seconds(5.0),
            shed_pause: Seconds(1.0),
            max_inflight_per_core: 0,
            rate_limit_table_size: 65_536,
            rate_limits: Vec::new(),
            admin_enabled: true,
            admin_host: "127.0.0.1".into(),
            // Absent key: a free port, printed at start (so several gateways
            // on one machine never collide); the shipped file says 8090.
            admin_port: 0,
            admin_header_timeout: Seconds(2.0),
            admin_max_connections: 16,
            auth: AuthConfig::default(),
            database: DatabaseConfig::default(),
        }
    }
}

/// What a `[[gateway.rate_limits]]` entry counts requests by.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Deserialize, Serialize)]
#[serde(rename_all = "snake_case")]
pub enum RateScope {
    /// The client's address, cut to `ip_prefix_v4` / `ip_prefix_v6` bits.
    ClientIp,
    /// The matched route prefix.
    Route,
    /// The identity owning the matched route.
    Identity,
}

impl RateScope {
    pub fn as_str(self) -> &'static str {
        match self {
            RateScope::ClientIp => "client_ip",
            RateScope::Route => "route",
            RateScope::Identity => "identity",
        }
    }
}

/// One `[[gateway.rate_limits]]` entry: a token bucket per client
/// address (prefix), route or identity, refilled at `rate` per second up
/// to `burst`. Each core keeps its own buckets (docs/OPERATIONS.md, "Rate
/// limits": at most `workers` times the limit in all).
#[derive(Debug, Clone, PartialEq, Deserialize, Serialize)]
#[serde(deny_unknown_fields)]
pub struct RateLimitRule {
    /// The policy's name in the `RateLimit-Policy` / `RateLimit` headers
    /// (1 to 32 of A-Z a-z 0-9 _ . -); absent = the scope's name.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub name: Option<String>,
    pub scope: RateScope,
    /// A path prefix (scopes `client_ip` and `route`) or an identity name
    /// (scope `identity`) the entry applies to; absent = all requests.
    #[serde(default, rename = "match", skip_serializing_if = "Option::is_none")]
    pub matches: Option<String>,
    /// Requests per second (tokens added), > 0.
    pub rate: f64,
    /// Requests that may come at once (bucket size), >= 1.
    pub burst: u32,
    /// Scope `client_ip`: IPv4 addresses sharing this many leading bits
    /// share a bucket.
    #[serde(default = "default_prefix_v4")]
    pub ip_prefix_v4: u8,
    /// Scope `client_ip`: the same for IPv6.
    #[serde(default = "default_prefix_v6")]
    pub ip_prefix_v6: u8,
}

fn default_prefix_v4() -> u8 {
    32
}

fn default_prefix_v6() -> u8 {
    64
}

impl RateLimitRule {
    /// The policy name: `name`, else the scope's.
    pub fn policy_name(&self) -> &str {
        self.name.as_deref().unwrap_or(self.scope.as_str())
    }
}

#[derive(Debug, Clone, Deserialize, Serialize)]
#[serde(deny_unknown_fields, default)]
pub struct AuthConfig {
    pub tokens: Vec<TokenEntry>,
    /// Accept ANP DID-WBA proofs (`DIDWba` header, RFC 9421 signatures).
    pub did_wba_enabled: bool,
    /// Offline DID documents: `DIR/example.com/user/alice/did.json`
    /// (relative to the config file). Empty: not used.
    pub did_documents_dir: String,
    /// Fetch documents from here instead of `https://{domain}`. Empty: not used.
    pub resolver_base_url: String,
    /// Public domain names a DID-WBA proof may be made for; empty = the
    /// upgrade request's Host without port.
    pub service_domains: Vec<String>,
    /// Oldest accepted proof timestamp, seconds in the past.
    pub timestamp_window_past: u64,
    /// Furthest accepted proof timestamp, seconds in the future.
    pub timestamp_window_future: u64,
    /// Live one-time nonces remembered; when full, new proofs are refused.
    pub nonce_cache_size: usize,
    /// Also record every spent nonce in the registry database
    /// (`did_nonces`), so a proof accepted by one gateway of a fleet
    /// sharing the database is refused as a replay by the others.
    pub shared_nonces: bool,
    /// Let document fetches reach private, loopback or link-local addresses.
    pub allow_private_resolver_targets: bool,
    /// Seconds a fetched document is reused.
    pub document_cache_ttl: Seconds,
    /// Seconds a failed fetch is remembered.
    pub document_negative_cache_ttl: Seconds,
    /// Most documents (and failures) cached.
    pub document_cache_size: usize,
    /// Largest DID document, bytes.
    pub document_max_size: usize,
    /// Seconds a document fetch may take in all.
    pub resolver_timeout: Seconds,
    /// Routes of DID identities (until the registry owns them).
    pub dids: Vec<DidEntry>,
}

impl Default for AuthConfig {
    fn default() -> Self {
        Self {
            tokens: Vec::new(),
            did_wba_enabled: true,
            did_documents_dir: String::new(),
            resolver_base_url: String::new(),
            service_domains: Vec::new(),
            timestamp_window_past: 300,
            timestamp_window_future: 60,
            nonce_cache_size: 100_000,
            shared_nonces: true,
            allow_private_resolver_targets: false,
            document_cache_ttl: Seconds(300.0),
            document_negative_cache_ttl: Seconds(30.0),
            document_cache_size: 10_000,
            document_max_size: 64 * 1024,
            resolver_timeout: Seconds(5.0),
            dids: Vec::new(),
        }
    }
}

/// Path prefixes a DID identity serves: `[[gateway.auth.dids]]`.
#[derive(Debug, Clone, Deserialize, Serialize)]
#[serde(deny_unknown_fields)]
pub struct DidEntry {
    pub did: String,
    #[serde(default)]
    pub paths: Vec<String>,
}

/// Where the route registry (the `did_proxy_path` table) lives.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize, Serialize)]
#[serde(rename_all = "lowercase")]
pub enum DbBackend {
    /// An embedded SQLite file at `path`.
    Sqlite,
    /// A MySQL / MariaDB server (`host`, `port`, `user`, …).
    Mysql,
}

/// `[gateway.database]`: the route registry.
#[derive(Clone, Deserialize, Serialize)]
#[serde(deny_unknown_fields, default)]
pub struct DatabaseConfig {
    /// Absent: `mysql` when any MySQL key is written (the reference's
    /// config), else `sqlite`. Read it through [`DatabaseConfig::backend`].
    pub backend: Option<DbBackend>,
    /// SQLite file, relative to the config file; created on first start.
    pub path: String,
    pub host: String,
    pub port: u16,
    pub user: String,
    /// Secret: never printed. `ANP_DB_PASSWORD` overrides it.
    #[serde(serialize_with = "masked")]
    pub password: String,
    pub database: String,
    pub charset: String,
    /// Seconds to wait for a TCP connection to the server.
    pub connect_timeout: Seconds,
    pub min_connections: usize,
    pub max_connections: usize,
    /// Seconds between the gateway's looks at the registry's change
    /// counter (one row); logged changes are read when it moved.
    pub poll_interval: Seconds,
    /// Seconds between full re-reads of the table, for writers that bypass
    /// the change log (0: never).
    pub resync_interval: Seconds,
}

/// Keys that only mean something to MySQL: their presence without
/// `backend` selects MySQL.
const MYSQL_KEYS: &[&str] = &[
    "host",
    "port",
    "user",
    "password",
    "database",
    "charset",
    "connect_timeout",
    "min_connections",
    "max_connections",
];

impl Default for DatabaseConfig {
    fn default() -> Self {
        Self {
            backend: None,
            path: "data/anp-proxy.db".into(),
            host: "127.0.0.1".into(),
            port: 3306,
            user: "root".into(),
            password: String::new(),
            database: "anp_proxy".into(),
            charset: "utf8mb4".into(),
            connect_timeout: Seconds(10.0),
            min_connections: 1,
            max_connections: 10,
            poll_interval: Seconds(2.0),
            resync_interval: Seconds(300.0),
        }
    }
}

impl DatabaseConfig {
    pub fn backend(&self) -> DbBackend {
        self.backend.unwrap_or(DbBackend::Sqlite)
    }

    /// The MySQL password: `ANP_DB_PASSWORD` when set, else `password`.
    pub fn effective_password(&self) -> String {
        std::env::var("ANP_DB_PASSWORD").unwrap_or_else(|_| self.password.clone())
    }
}

impl fmt::Debug for DatabaseConfig {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("DatabaseConfig")
            .field("backend", &self.backend())
            .field("path", &self.path)
            .field("host", &self.host)
            .field("port", &self.port)
            .field("user", &self.user)
            .field("password", &MASK)
            .field("database", &self.database)
            .field("poll_interval", &self.poll_interval)
            .field("resync_interval", &self.resync_interval)
            .finish_non_exhaustive()
    }
}

/// `gateway.duplicate_tunnels`: what a second receiver instance of an
/// identity that already has tunnels gets (docs/OPERATIONS.md).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize, Serialize, Default)]
#[serde(rename_all = "lowercase")]
pub enum DuplicateTunnels {
    /// Both instances serve (requests are spread); a warning is logged.
    #[default]
    Share,
    /// The second is refused (409) while the first holds tunnels.
    Refuse,
    /// The second's tunnels stay; the first's are closed (1008).
    Replace,
}

/// How a receiver proves its DID on the upgrade.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize, Serialize, Default)]
pub enum AuthScheme {
    /// `Authorization: DIDWba …`
    #[default]
    #[serde(rename = "didwba")]
    DidWba,
    /// RFC 9421 `Signature-Input` / `Signature`.
    #[serde(rename = "http-signatures")]
    HttpSignatures,
}

/// A shared-secret identity: `Authorization: Bearer <token>` on the upgrade.
#[derive(Clone, Deserialize, Serialize)]
#[serde(deny_unknown_fields)]
pub struct TokenEntry {
    pub name: String,
    #[serde(serialize_with = "masked")]
    pub token: String,
    #[serde(default)]
    pub paths: Vec<String>,
}

impl fmt::Debug for TokenEntry {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("TokenEntry")
            .field("name", &self.name)
            .field("token", &MASK)
            .field("paths", &self.paths)
            .finish()
    }
}

/// `[receiver] gateway_url`: one URL or several. A TOML string may name
/// several separated by commas (so an environment variable or
/// `--gateway-url` can list them); a TOML array names one per item.
#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub struct GatewayUrls(Vec<String>);

impl GatewayUrls {
    pub fn one(url: &str) -> Self {
        Self(vec![url.to_owned()])
    }

    pub fn new(urls: Vec<String>) -> Self {
        Self(urls)
    }

    pub fn iter(&self) -> impl Iterator<Item = &str> {
        self.0.iter().map(String::as_str)
    }

    pub fn len(&self) -> usize {
        self.0.len()
    }

    pub fn is_empty(&self) -> bool {
        self.0.is_empty()
    }

    fn split(s: &str) -> Vec<String> {
        s.split(',')
            .map(str::trim)
            .filter(|u| !u.is_empty())
            .map(str::to_owned)
            .collect()
    }
}

impl fmt::Display for GatewayUrls {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.0.join(","))
    }
}

impl PartialEq<&str> for GatewayUrls {
    fn eq(&self, other: &&str) -> bool {
        self.0.len() == 1 && self.0[0] == *other
    }
}

impl Serialize for GatewayUrls {
    fn serialize<S: serde::Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        match self.0.as_slice() {
            [one] => s.serialize_str(one),
            many => many.serialize(s),
        }
    }
}

impl<'de> Deserialize<'de> for GatewayUrls {
    fn deserialize<D: serde::Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        #[derive(Deserialize)]
        #[serde(untagged)]
        enum OneOrMany {
            One(String),
            Many(Vec<String>),
        }
        let urls = match OneOrMany::deserialize(d).map_err(|_| {
            serde::de::Error::custom("expected a URL string or a list of URL strings")
        })? {
            OneOrMany::One(s) => Self::split(&s),
            OneOrMany::Many(v) => v.iter().flat_map(|s| Self::split(s)).collect(),
        };
        Ok(Self(urls))
    }
}

#[derive(Clone, Deserialize, Serialize)]
#[serde(deny_unknown_fields, default)]
pub struct ReceiverConfig {
    /// The gateways' tunnel URLs, `ws://host:port/ws` or `wss://…`: one
    /// string (commas separate several) or a list. The receiver keeps a
    /// tunnel set to every one, and to every address a host name resolves to.
    pub gateway_url: GatewayUrls,
    /// Seconds between DNS lookups of the gateways' host names (addresses
    /// that appear get a tunnel set, ones that vanish are left); 0 = look
    /// up once at start.
    pub gateway_resolve_interval: Seconds,
    /// The local app: `http://host:port`, `https://host:port` (verified
    /// against `upstream_ca_file`, else `ca_file`, else the system's trust
    /// store) or `unix:/path/to/app.sock`.
    pub upstream: String,
    /// PEM CA certificate(s) an `https://` upstream's certificate must
    /// chain to; empty = `ca_file` when set, else the system's trust store.
    pub upstream_ca_file: String,
    /// The `Host` the app is sent instead of the client's (and the TLS
    /// name an `https://` upstream is verified against); empty = the
    /// client's `Host`, unchanged.
    pub upstream_host: String,
    /// Secret: never printed.
    #[serde(serialize_with = "masked")]
    pub token: String,
    /// Tunnels to keep open to each gateway; 0 = as many as the gateway
    /// asks for (one to start with, more as load needs them, PROTOCOL.md
    /// §7.8; a gateway without `scale`: its workers).
    pub tunnels: usize,
    /// Most upstream calls at once (excess waits).
    pub max_concurrent: usize,
    /// Seconds to wait for the local app's response (0 = no limit; the
    /// gateway's `timeout` still applies).
    pub upstream_timeout: Seconds,
    /// Seconds between WebSocket pings to the gateway.
    pub ping_interval: Seconds,
    /// Largest ANPX frame this receiver sends, bytes.
    pub chunk_size: usize,
    /// Largest response body accepted from the app, bytes.
    pub max_body_size: usize,
    /// Largest response head accepted from the app (status line and
    /// fields), bytes; a larger one is answered 502 and logged.
    pub max_response_head_size: usize,
    /// Most field lines in one response head from the app (502 beyond).
    pub max_response_headers: usize,
    /// Ceiling of the reconnect backoff, seconds.
    pub reconnect_max_delay: Seconds,
    /// DID document of this receiver's DID (relative to the config file);
    /// with `private_key`, the tunnel proves the DID instead of `token`.
    pub did_document: String,
    /// PKCS#8 PEM private key of one of the document's `authentication` keys.
    pub private_key: String,
    /// `didwba` (Authorization: DIDWba) or `http-signatures` (RFC 9421).
    pub auth_scheme: AuthScheme,
    /// PEM CA certificate(s) the gateway's certificate must chain to
    /// (`wss://`); empty = the system's trust store.
    pub ca_file: String,
    /// PEM client certificate chain presented to the gateway (mTLS); with
    /// `key_file`. Empty = none.
    pub cert_file: String,
    /// PEM private key of `cert_file`.
    pub key_file: String,
    /// Largest WebSocket frame, and message, the gateway may send on a
    /// tunnel, bytes (close 1009 beyond); the gateway's `chunk_size` may
    /// be up to 16 MiB.
    pub tunnel_max_message_size: usize,
    /// Most frames one WebSocket message from the gateway may span (close
    /// 1008 beyond).
    pub tunnel_max_fragments: usize,
    /// Requests from a plain v1 gateway being reassembled at once on one
    /// tunnel (the excess is refused).
    pub max_inflight_per_tunnel: usize,
    /// WebSocket pings the gateway may send in one second (close 1008
    /// beyond).
    pub max_pings_per_second: usize,
    /// Seconds a tunnel that ended may take to send its last frames.
    pub tunnel_close_grace: Seconds,
    /// Seconds a SIGTERM/SIGINT shutdown waits for requests in flight
    /// before it closes the tunnels anyway (0 = don't wait).
    pub shutdown_grace: Seconds,
    /// Seconds to connect to the gateway (TCP, and TLS for `wss://`).
    pub connect_timeout: Seconds,
    /// Seconds from connected to the gateway's 101.
    pub handshake_timeout: Seconds,
    /// This receiver's name towards the gateway (`X-ANPX-Instance`: 1 to
    /// 64 of A-Z a-z 0-9 . _ -); empty = a random one generated once and
    /// kept in `.anp-proxy-instance` next to the config file.
    pub instance_id: String,
    /// Serve `/health` and `/metrics` on `admin_host:admin_port` (never
    /// the tunnel; a bind failure is logged and the receiver runs on).
    pub admin_enabled: bool,
    pub admin_host: String,
    /// 0 = any free port (printed at start).
    pub admin_port: u16,
}

impl Default for ReceiverConfig {
    fn default() -> Self {
        Self {
            gateway_url: GatewayUrls::one("ws://127.0.0.1:8089/ws"),
            gateway_resolve_interval: Seconds(30.0),
            upstream: "http://127.0.0.1:8000".into(),
            upstream_ca_file: String::new(),
            upstream_host: String::new(),
            token: String::new(),
            tunnels: 0,
            max_concurrent: 1024,
            upstream_timeout: Seconds(0.0),
            ping_interval: Seconds(20.0),
            chunk_size: 64 * 1024,
            max_body_size: 64 * 1024 * 1024,
            max_response_head_size: 256 * 1024,
            max_response_headers: 1000,
            reconnect_max_delay: Seconds(30.0),
            did_document: String::new(),
            private_key: String::new(),
            auth_scheme: AuthScheme::DidWba,
            ca_file: String::new(),
            cert_file: String::new(),
            key_file: String::new(),
            tunnel_max_message_size: 16 * 1024 * 1024 + 1024,
            tunnel_max_fragments: 1024,
            max_inflight_per_tunnel: 4096,
            max_pings_per_second: 10,
            tunnel_close_grace: Seconds(2.0),
            shutdown_grace: Seconds(30.0),
            connect_timeout: Seconds(10.0),
            handshake_timeout: Seconds(30.0),
            instance_id: String::new(),
            admin_enabled: true,
            admin_host: "127.0.0.1".into(),
            admin_port: 8091,
        }
    }
}

impl fmt::Debug for ReceiverConfig {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("ReceiverConfig")
            .field("gateway_url", &self.gateway_url)
            .field("upstream", &self.upstream)
            .field("upstream_host", &self.upstream_host)
            .field("token", &MASK)
            .field("tunnels", &self.tunnels)
            .field("max_concurrent", &self.max_concurrent)
            .field("did_document", &self.did_document)
            .field("auth_scheme", &self.auth_scheme)
            .field("ca_file", &self.ca_file)
            .field("cert_file", &self.cert_file)
            .field("instance_id", &self.instance_id)
            .finish_non_exhaustive()
    }
}

/// Client certificates a TLS listener asks for.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize, Serialize, Default)]
#[serde(rename_all = "lowercase")]
pub enum VerifyMode {
    /// None asked for.
    #[default]
    None,
    /// Asked for; a client without one is let in, a bad one is refused.
    Optional,
    /// A certificate chaining to `ca_file` is required.
    Required,
}

/// `[gateway.tls]` / `[gateway.tunnel_tls]`: a TLS listener (rustls).
#[derive(Debug, Clone, Deserialize, Serialize, Default)]
#[serde(deny_unknown_fields, default)]
pub struct TlsConfig {
    pub enabled: bool,
    /// PEM certificate chain, leaf first (relative to the config file).
    pub cert_file: String,
    /// PEM private key (PKCS#8, PKCS#1 or SEC1) of `cert_file`.
    pub key_file: String,
    /// PEM CA certificate(s) client certificates must chain to.
    pub ca_file: String,
    /// `none`, `optional` or `required`; the reference's `tls_verify_mode`
    /// is the same key.
    #[serde(alias = "tls_verify_mode")]
    pub verify_mode: VerifyMode,
}

impl TlsConfig {
    /// What is missing for this table to be usable: (key suffix, why).
    fn check(&self) -> Option<(usize, &'static str)> {
        if !self.enabled {
            return None;
        }
        if self.cert_file.is_empty() {
            return Some((0, "is required when TLS is enabled"));
        }
        if self.key_file.is_empty() {
            return Some((1, "is required when TLS is enabled"));
        }
        if self.verify_mode != VerifyMode::None && self.ca_file.is_empty() {
            return Some((2, "is required when verify_mode is optional or required"));
        }
        None
    }
}

/// What a secret serializes as (`check --print`): [`MASK`] when set, so
/// the reader sees that one is configured but never its value.
fn masked<S: serde::Serializer>(v: &str, s: S) -> Result<S::Ok, S::Error> {
    s.serialize_str(if v.is_empty() { "" } else { MASK })
}

/// The stand-in for a secret's value in printed configurations.
pub const MASK: &str = "<redacted>";

/// Seconds (as written in the file) to a `Duration`; 0 or less = none.
pub fn secs(v: impl Into<f64>) -> Option<Duration> {
    let v: f64 = v.into();
    (v > 0.0).then(|| Duration::from_secs_f64(v))
}

/// The dotted key whose value starts at byte `offset` of `text`
/// (`gateway.timeout`), read from the `key = value` line and the table
/// header above it; None when the line is not a key.
fn key_at(text: &str, offset: usize) -> Option<String> {
    let offset = offset.min(text.len());
    let line_start = text[..offset].rfind('\n').map_or(0, |i| i + 1);
    let line = text[line_start..].lines().next()?;
    let key = line.split_once('=')?.0.trim();
    if key.is_empty() || key.starts_with('[') || key.starts_with('#') {
        return None;
    }
    let table = text[..line_start]
        .lines()
        .rev()
        .map(str::trim)
        .find(|l| l.starts_with('['))
        .map(|l| l.trim_matches(|c| c == '[' || c == ']').trim());
    Some(match table {
        Some(t) if !t.is_empty() => format!("{t}.{key}"),
        _ => key.to_owned(),
    })
}

impl Config {
    /// Reads, parses and validates `path`, without environment or flags.
    pub fn load(path: &Path) -> Result<Config, ConfigError> {
        Self::load_with(Some(path), Overrides::default())
    }

    /// Parses and validates TOML text; `path` only names the file in errors.
    pub fn parse(text: &str, path: &Path) -> Result<Config, ConfigError> {
        Self::build(Some((text, path)), Overrides::default())
    }

    /// The file's text alone through serde, not yet validated: a refusal
    /// keeps toml's layout (line, caret) and names the key first; an
    /// unknown key gets the nearest known one, not the list.
    fn from_text(text: &str, path: &Path) -> Result<Config, ConfigError> {
        toml::from_str(text).map_err(|e| {
            let mut detail = e.to_string().trim_end().to_owned();
            if let Some(better) = unknown_key_message(e.message()) {
                detail = detail.replace(e.message().trim_end(), &better);
            }
            let message = match e.span().and_then(|s| key_at(text, s.start)) {
                Some(key) => format!("key `{key}`: {detail}"),
                None => detail,
            };
            ConfigError::Parse {
                path: path.to_owned(),
                message,
            }
        })
    }

    /// The configuration in force as TOML, every default filled in, for
    /// `anp-proxy check --print`, each value that is not a default noted
    /// with where it came from (`# file`, `# env …`, `# flag …`). Secrets
    /// (tokens, the database password) are [`MASK`]; file paths are shown
    /// as written.
    pub fn effective_toml(&self) -> String {
        let mut c = self.clone();
        // The backend in force, not "absent" (see DatabaseConfig::backend).
        c.gateway.database.backend = Some(c.gateway.database.backend());
        match toml::to_string(&c) {
            Ok(printed) => self.origin.annotate(&printed),
            Err(e) => format!("# cannot print the configuration: {e}\n"),
        }
    }

    /// Values the types allow but the program does not, naming the key
    /// (the caller names where it was set).
    fn validate(&self) -> Result<(), Invalid> {
        let g = &self.gateway;
        if self.logging.max_size < 4096 {
            return Err(bad(
                "logging.max_size",
                "must be at least 4096 bytes".into(),
            ));
        }
        Self::check_gateway(g)
            .and_then(|()| Self::check_tokens(&g.auth))
            .and_then(|()| Self::check_auth(&g.auth))
            .and_then(|()| Self::check_database(&g.database))
            .and_then(|()| Self::check_receiver(&self.receiver))
            .and_then(|()| Self::check_tls(g))
    }

    /// `[gateway]`: paths, sizes, timeouts and caps.
    fn check_gateway(g: &GatewayConfig) -> Result<(), Invalid> {
        if !g.tunnel_path.starts_with('/') {
            return Err(bad("gateway.tunnel_path", "must start with `/`".into()));
        }
        if g.chunk_size < 1024 || g.chunk_size > 16 * 1024 * 1024 {
            return Err(bad(
                "gateway.chunk_size",
                format!("{} is outside 1024..=16777216", g.chunk_size),
            ));
        }
        if g.timeout.get() <= 0.0 {
            return Err(bad("gateway.timeout", "must be > 0".into()));
        }
        if g.handshake_timeout.get() <= 0.0 {
            return Err(bad("gateway.handshake_timeout", "must be > 0".into()));
        }
        if g.handshake_rate > 0 && g.handshake_burst == 0 {
            return Err(bad(
                "gateway.handshake_burst",
                "must be > 0 when handshake_rate is set".into(),
            ));
        }
        if g.admin_header_timeout.get() <= 0.0 {
            return Err(bad("gateway.admin_header_timeout", "must be > 0".into()));
        }
        Self::check_limits(g)?;
        for (key, v) in [
            ("gateway.max_connections", g.max_connections),
            ("gateway.max_request_line", g.max_request_line),
            ("gateway.max_head_size", g.max_head_size),
            ("gateway.max_headers", g.max_headers),
            ("gateway.max_inflight_per_tunnel", g.max_inflight_per_tunnel),
            (
                "gateway.max_pending_upgrades_per_ip",
                g.max_pending_upgrades_per_ip,
            ),
            ("gateway.max_pending_upgrades", g.max_pending_upgrades),
            ("gateway.max_pings_per_second", g.max_pings_per_second),
            ("gateway.tunnel_max_fragments", g.tunnel_max_fragments),
            ("gateway.admin_max_connections", g.admin_max_connections),
        ] {
            if v == 0 {
                return Err(bad(key, "must be > 0".into()));
            }
        }
        Ok(())
    }

    /// Overload keys: admission and `[[gateway.rate_limits]]`.
    fn check_limits(g: &GatewayConfig) -> Result<(), Invalid> {
        for (key, v) in [
            (
                "gateway.max_inflight_per_identity",
                g.max_inflight_per_identity,
            ),
            ("gateway.rate_limit_table_size", g.rate_limit_table_size),
        ] {
            if v == 0 {
                return Err(bad(key, "must be > 0".into()));
            }
        }
        if g.queue_timeout.get() <= 0.0 {
            return Err(bad("gateway.queue_timeout", "must be > 0".into()));
        }
        let mut names = std::collections::HashSet::new();
        for r in &g.rate_limits {
            let name = r.policy_name();
            let name_ok = (1..=32).contains(&name.len())
                && name
                    .bytes()
                    .all(|b| b.is_ascii_alphanumeric() || matches!(b, b'_' | b'.' | b'-'));
            if !name_ok {
                return Err(bad(
                    "gateway.rate_limits.name",
                    format!("`{name}` must be 1 to 32 of A-Z a-z 0-9 _ . -"),
                ));
            }
            if !names.insert(name) {
                return Err(bad(
                    "gateway.rate_limits.name",
                    format!("`{name}` names two entries: give each its own `name`"),
                ));
            }
            if !(r.rate.is_finite() && r.rate > 0.0) {
                return Err(bad(
                    "gateway.rate_limits.rate",
                    format!("{} (entry `{name}`) must be a number > 0", r.rate),
                ));
            }
            if r.burst == 0 {
                return Err(bad(
                    "gateway.rate_limits.burst",
                    format!("entry `{name}`: must be >= 1"),
                ));
            }
            if r.ip_prefix_v4 > 32 || r.ip_prefix_v6 > 128 {
                return Err(bad(
                    "gateway.rate_limits.ip_prefix_v4",
                    format!("entry `{name}`: at most 32 (IPv4) and 128 (IPv6) bits"),
                ));
            }
            if let Some(m) = &r.matches {
                if r.scope != RateScope::Identity && !m.starts_with('/') {
                    return Err(bad(
                        "gateway.rate_limits.match",
                        format!("entry `{name}`: a path prefix must start with `/`"),
                    ));
                }
            }
        }
        Ok(())
    }

    /// `[[gateway.auth.tokens]]`: names unique, tokens long enough, absolute paths.
    fn check_tokens(a: &AuthConfig) -> Result<(), Invalid> {
        let mut names = std::collections::HashSet::new();
        for t in &a.tokens {
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
                if let Err(why) = crate::registry::routes::check_route(p) {
                    return Err(bad(
                        "gateway.auth.tokens.paths",
                        format!("{why} (of `{}`)", t.name),
                    ));
                }
            }
        }
        Ok(())
    }

    /// `[gateway.auth]` DIDs and the resolver.
    fn check_auth(a: &AuthConfig) -> Result<(), Invalid> {
        let mut dids = std::collections::HashSet::new();
        for d in &a.dids {
            if let Err(e) = crate::auth::didwba::did::parse(&d.did) {
                return Err(bad("gateway.auth.dids.did", e.to_string()));
            }
            if !dids.insert(d.did.as_str()) {
                return Err(bad(
                    "gateway.auth.dids.did",
                    format!("`{}` appears twice", d.did),
                ));
            }
            for p in &d.paths {
                if let Err(why) = crate::registry::routes::check_route(p) {
                    return Err(bad(
                        "gateway.auth.dids.paths",
                        format!("{why} (of `{}`)", d.did),
                    ));
                }
            }
        }
        let base = &a.resolver_base_url;
        if !base.is_empty() && !base.starts_with("http://") && !base.starts_with("https://") {
            return Err(bad(
                "gateway.auth.resolver_base_url",
                "must start with http:// or https://".into(),
            ));
        }
        for (key, v) in [
            ("gateway.auth.nonce_cache_size", a.nonce_cache_size),
            ("gateway.auth.document_max_size", a.document_max_size),
            ("gateway.auth.document_cache_size", a.document_cache_size),
        ] {
            if v == 0 {
                return Err(bad(key, "must be > 0".into()));
            }
        }
        if a.resolver_timeout.get() <= 0.0 {
            return Err(bad("gateway.auth.resolver_timeout", "must be > 0".into()));
        }
        Ok(())
    }

    /// `[gateway.database]`.
    fn check_database(d: &DatabaseConfig) -> Result<(), Invalid> {
        if d.backend() == DbBackend::Sqlite && d.path.is_empty() {
            return Err(bad("gateway.database.path", "must not be empty".into()));
        }
        if d.charset.is_empty()
            || !d
                .charset
                .bytes()
                .all(|b| b.is_ascii_alphanumeric() || b == b'_')
        {
            return Err(bad(
                "gateway.database.charset",
                format!("`{}` is not a charset name", d.charset),
            ));
        }
        if d.max_connections == 0 || d.min_connections > d.max_connections {
            return Err(bad(
                "gateway.database.max_connections",
                "must be > 0 and >= min_connections".into(),
            ));
        }
        for (key, v) in [
            ("gateway.database.connect_timeout", d.connect_timeout),
            ("gateway.database.poll_interval", d.poll_interval),
        ] {
            if v.get() <= 0.0 {
                return Err(bad(key, "must be > 0".into()));
            }
        }
        Ok(())
    }

    /// `[receiver]`.
    fn check_receiver(r: &ReceiverConfig) -> Result<(), Invalid> {
        if r.gateway_url.is_empty() {
            return Err(bad(
                "receiver.gateway_url",
                "names no gateway (give a URL or a list of them)".into(),
            ));
        }
        if r.did_document.is_empty() != r.private_key.is_empty() {
            return Err(bad(
                "receiver.private_key",
                "`did_document` and `private_key` go together".into(),
            ));
        }
        if r.max_concurrent == 0 {
            return Err(bad("receiver.max_concurrent", "must be > 0".into()));
        }
        if r.max_response_head_size < 1024 {
            return Err(bad(
                "receiver.max_response_head_size",
                format!("{} is below 1024", r.max_response_head_size),
            ));
        }
        if r.max_response_headers == 0 {
            return Err(bad("receiver.max_response_headers", "must be > 0".into()));
        }
        if !r.instance_id.is_empty()
            && !crate::protocol::features::valid_instance(r.instance_id.as_bytes())
        {
            return Err(bad(
                "receiver.instance_id",
                "must be 1 to 64 of A-Z a-z 0-9 . _ -".into(),
            ));
        }
        if r.chunk_size < 1024 || r.chunk_size > 16 * 1024 * 1024 {
            return Err(bad(
                "receiver.chunk_size",
                format!("{} is outside 1024..=16777216", r.chunk_size),
            ));
        }
        if r.cert_file.is_empty() != r.key_file.is_empty() {
            return Err(bad(
                "receiver.key_file",
                "`cert_file` and `key_file` go together".into(),
            ));
        }
        Ok(())
    }

    /// The gateway's TLS tables and the tunnel port.
    fn check_tls(g: &GatewayConfig) -> Result<(), Invalid> {
        const TLS_KEYS: [[&str; 3]; 2] = [
            [
                "gateway.tls.cert_file",
                "gateway.tls.key_file",
                "gateway.tls.ca_file",
            ],
            [
                "gateway.tunnel_tls.cert_file",
                "gateway.tunnel_tls.key_file",
                "gateway.tunnel_tls.ca_file",
            ],
        ];
        for (t, keys) in [Some(&g.tls), g.tunnel_tls.as_ref()].iter().zip(TLS_KEYS) {
            if let Some((i, why)) = t.and_then(TlsConfig::check) {
                return Err(bad(keys[i], why.into()));
            }
        }
        if g.tunnel_tls.is_some() && g.tunnel_port.is_none() {
            return Err(bad(
                "gateway.tunnel_tls",
                "needs `gateway.tunnel_port` (a listener of its own)".into(),
            ));
        }
        if g.tunnel_port.is_some_and(|p| p != 0 && p == g.port) {
            return Err(bad(
                "gateway.tunnel_port",
                "must differ from `gateway.port` (leave it out for tunnels on the public port)"
                    .into(),
            ));
        }
        Ok(())
    }

    /// The SQLite registry file: `[gateway.database] path` from the config
    /// file's directory.
    pub fn database_path(&self) -> PathBuf {
        self.base_dir.join(&self.gateway.database.path)
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

/// serde's message for an unknown key (`unknown field `prot`, expected one
/// of `host`, `port`, …`) as `unknown key `prot`; did you mean `port`?`
/// when a known key is close (a typo), else without the list of every
/// valid key (the shipped config.toml documents them). None for any other
/// message.
fn unknown_key_message(message: &str) -> Option<String> {
    let rest = message.trim_end().strip_prefix("unknown field `")?;
    let (key, expected) = rest.split_once('`')?;
    // The names serde lists are the ones between backticks.
    let known = expected.split('`').skip(1).step_by(2);
    let nearest = known
        .map(|k| (strsim::osa_distance(key, k), k))
        .min_by_key(|(d, _)| *d);
    // "Close": at most a third of the key's length in edits (1 to 3), so
    // `prot` finds `port` and `certfile` finds `cert_file`, while a key
    // that resembles nothing gets no guess.
    let close = (key.chars().count() / 3).clamp(1, 3);
    Some(match nearest {
        Some((d, k)) if d <= close => format!("unknown key `{key}`; did you mean `{k}`?"),
        _ => format!(
            "unknown key `{key}` (config.toml, as shipped, lists every key with its default)"
        ),
    })
}

/// Does `[gateway.database]` (of the file and overrides) hold any
/// MySQL-only key?
fn has_mysql_keys(v: &toml::Table) -> bool {
    v.get("gateway")
        .and_then(|g| g.get("database"))
        .and_then(|d| d.as_table())
        .is_some_and(|d| MYSQL_KEYS.iter().any(|k| d.contains_key(*k)))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn absurd_durations_are_refused_naming_the_key() {
        for (line, key) in [
            ("[gateway]\ntimeout = inf", "gateway.timeout"),
            (
                "[gateway]\nkeepalive_timeout = nan",
                "gateway.keepalive_timeout",
            ),
            ("[gateway]\ntimeout = 1e300", "gateway.timeout"),
            ("[gateway]\nheader_timeout = -1", "gateway.header_timeout"),
            (
                "[receiver]\nconnect_timeout = inf",
                "receiver.connect_timeout",
            ),
            (
                "[gateway.database]\npoll_interval = nan",
                "gateway.database.poll_interval",
            ),
        ] {
            let e = Config::parse(line, Path::new("x.toml"))
                .unwrap_err()
                .to_string();
            assert!(e.contains(&format!("key `{key}`")), "{line}: {e}");
            assert!(e.contains("x.toml"), "{e}");
        }
        let ok = "[receiver]\ntunnel_max_message_size = 2000000\ntunnel_max_fragments = 8\nmax_pings_per_second = 5\ntunnel_close_grace = 1\nconnect_timeout = 3\nhandshake_timeout = 5\nmax_inflight_per_tunnel = 10\nshutdown_grace = 1.5\n";
        let c = Config::parse(ok, Path::new("x.toml")).unwrap();
        assert_eq!(c.receiver.tunnel_max_fragments, 8);
        assert_eq!(c.receiver.connect_timeout.get(), 3.0);
        assert_eq!(c.receiver.shutdown_grace.get(), 1.5);
        assert_eq!(ReceiverConfig::default().shutdown_grace.get(), 30.0);
    }

    #[test]
    fn gateway_url_is_one_url_a_comma_list_or_an_array() {
        let parse = |t: &str| Config::parse(t, Path::new("x.toml"));
        let c = parse("[receiver]\ngateway_url = 'ws://a/ws'\n").unwrap();
        assert_eq!(c.receiver.gateway_url, "ws://a/ws");
        let c = parse("[receiver]\ngateway_url = 'ws://a/ws, ws://b/ws'\n").unwrap();
        assert_eq!(
            c.receiver.gateway_url.iter().collect::<Vec<_>>(),
            ["ws://a/ws", "ws://b/ws"]
        );
        let c =
            parse("[receiver]\ngateway_url = ['ws://a/ws', 'ws://b/ws', 'ws://c/ws']\n").unwrap();
        assert_eq!(c.receiver.gateway_url.len(), 3);
        assert_eq!(
            c.receiver.gateway_url.to_string(),
            "ws://a/ws,ws://b/ws,ws://c/ws"
        );
        assert_eq!(
            ReceiverConfig::default().gateway_resolve_interval.get(),
            30.0
        );
        for bad in ["gateway_url = []", "gateway_url = ' , '", "gateway_url = 3"] {
            let e = parse(&format!("[receiver]\n{bad}\n"))
                .unwrap_err()
                .to_string();
            assert!(e.contains("receiver.gateway_url"), "{bad}: {e}");
        }
    }

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
    fn unknown_key_suggests_the_nearest_known_one_only_when_close() {
        for (text, key, guess) in [
            ("[gateway]\nprot = 1\n", "prot", Some("port")),
            (
                "[gateway.tls]\ncertfile = 'c'\n",
                "certfile",
                Some("cert_file"),
            ),
            ("[receiver]\ntimout = 1\n", "timout", None),
            (
                "[receiver]\nupstream_timout = 1\n",
                "upstream_timout",
                Some("upstream_timeout"),
            ),
            ("[gateway]\nwibble = 1\n", "wibble", None),
            ("mdoe = 'gateway'\n", "mdoe", Some("mode")),
        ] {
            let msg = Config::parse(text, Path::new("x.toml"))
                .unwrap_err()
                .to_string();
            assert!(
                msg.contains(&format!("unknown key `{key}`")),
                "{text}: {msg}"
            );
            match guess {
                Some(g) => assert!(
                    msg.contains(&format!("did you mean `{g}`?")),
                    "{text}: {msg}"
                ),
                None => assert!(!msg.contains("did you mean"), "{text}: {msg}"),
            }
            // Not the list of every key; toml's caret layout kept.
            assert!(!msg.contains("expected one of"), "{msg}");
            assert!(msg.contains("\n  |\n") && msg.contains('^'), "{msg}");
        }
    }

    #[test]
    fn effective_toml_fills_defaults_masks_secrets_and_parses_back() {
        let text = "[[gateway.auth.tokens]]\nname='a'\ntoken='supersecret1'\npaths=['/a']\n\
                    [gateway.database]\nhost='db'\npassword='pw-secret-1'\n\
                    [receiver]\ntoken='rx-secret-1'\nprivate_key='k.pem'\ndid_document='d.json'\n";
        let c = Config::parse(text, Path::new("x.toml")).unwrap();
        let out = c.effective_toml();
        for secret in ["supersecret1", "pw-secret-1", "rx-secret-1"] {
            assert!(!out.contains(secret), "{out}");
        }
        assert!(out.contains(MASK), "{out}");
        assert!(out.contains("private_key = \"k.pem\""), "{out}");
        assert!(out.contains("backend = \"mysql\""), "{out}");
        assert!(out.contains("max_head_size = 65536"), "{out}");
        let back = Config::parse(&out, Path::new("printed.toml")).expect(&out);
        assert_eq!(back.gateway.auth.tokens[0].name, "a");
        assert_eq!(back.gateway.timeout, c.gateway.timeout);
        assert_eq!(back.gateway.database.backend(), DbBackend::Mysql);
    }

    #[test]
    fn tls_keys_parse_and_the_reference_synonym_is_accepted() {
        let c = Config::parse(
            "[gateway]\ntunnel_port = 8443\n[gateway.tls]\nenabled = true\ncert_file = 'c.pem'\nkey_file = 'k.pem'\nca_file = 'ca.pem'\ntls_verify_mode = 'optional'\n[gateway.tunnel_tls]\nenabled = true\ncert_file = 'c.pem'\nkey_file = 'k.pem'\nca_file = 'ca.pem'\nverify_mode = 'required'\n[receiver]\nca_file = 'ca.pem'\ncert_file = 'rc.pem'\nkey_file = 'rk.pem'\n",
            Path::new("x.toml"),
        )
        .unwrap();
        assert_eq!(c.gateway.tls.verify_mode, VerifyMode::Optional);
        assert_eq!(c.gateway.tunnel_port, Some(8443));
        let t = c.gateway.tunnel_tls.as_ref().unwrap();
        assert_eq!(t.verify_mode, VerifyMode::Required);
        assert_eq!(c.receiver.ca_file, "ca.pem");
        let d = Config::default();
        assert!(!d.gateway.tls.enabled && d.gateway.tunnel_port.is_none());
        assert_eq!(d.gateway.tls.verify_mode, VerifyMode::None);
        for (text, key) in [
            ("[gateway.tls]\nenabled = true\n", "gateway.tls.cert_file"),
            (
                "[gateway.tls]\nenabled = true\ncert_file='c'\nkey_file='k'\nverify_mode='required'\n",
                "gateway.tls.ca_file",
            ),
            (
                "[gateway]\ntunnel_port = 1\n[gateway.tunnel_tls]\nenabled = true\ncert_file = 'c'\n",
                "gateway.tunnel_tls.key_file",
            ),
            ("[gateway.tunnel_tls]\n", "gateway.tunnel_tls"),
            ("[gateway]\nport = 9\ntunnel_port = 9\n", "gateway.tunnel_port"),
            ("[receiver]\ncert_file = 'c'\n", "receiver.key_file"),
            ("[gateway.tls]\nverify_mode = 'sometimes'\n", "verify_mode"),
            ("[gateway.tls]\ncertfile = 'c'\n", "certfile"),
            (
                "[gateway.tls]\nverify_mode = 'none'\ntls_verify_mode = 'none'\n",
                "verify_mode",
            ),
        ] {
            let msg = Config::parse(text, Path::new("x.toml"))
                .unwrap_err()
                .to_string();
            assert!(msg.contains(key), "{text}: {msg}");
        }
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
                "[gateway]\nadmin_header_timeout = 0\n",
                "gateway.admin_header_timeout",
            ),
            (
                "[gateway]\nadmin_max_connections = 0\n",
                "gateway.admin_max_connections",
            ),
            (
                "[[gateway.auth.tokens]]\nname='a'\ntoken='short'\n",
                "gateway.auth.tokens.token",
            ),
            (
                "[[gateway.auth.dids]]\ndid='did:web:a.example'\n",
                "gateway.auth.dids.did",
            ),
            (
                "[[gateway.auth.dids]]\ndid='did:wba:a.example'\npaths=['a']\n",
                "gateway.auth.dids.paths",
            ),
            (
                "[gateway.auth]\nresolver_base_url='ftp://x'\n",
                "gateway.auth.resolver_base_url",
            ),
            (
                "[gateway.auth]\nnonce_cache_size=0\n",
                "gateway.auth.nonce_cache_size",
            ),
            (
                "[receiver]\ndid_document='d.json'\n",
                "receiver.private_key",
            ),
        ] {
            let msg = Config::parse(text, Path::new("x.toml"))
                .unwrap_err()
                .to_string();
            assert!(msg.contains(key), "{text}: {msg}");
        }
    }

    #[test]
    fn rate_limits_parse_validate_and_print_back() {
        let text = "[gateway]\nmax_inflight_per_core = 8\n\
                    [[gateway.rate_limits]]\nscope = 'client_ip'\nrate = 16.7\nburst = 1000\n\
                    [[gateway.rate_limits]]\nname = 'alice-route'\nscope = 'route'\n\
                    match = '/alice'\nrate = 5\nburst = 10\nip_prefix_v6 = 48\n";
        let c = Config::parse(text, Path::new("x.toml")).unwrap();
        let r = &c.gateway.rate_limits;
        assert_eq!(
            (r[0].scope, r[0].ip_prefix_v4, r[0].ip_prefix_v6),
            (RateScope::ClientIp, 32, 64)
        );
        assert_eq!(r[0].policy_name(), "client_ip");
        assert_eq!(
            (r[1].policy_name(), r[1].matches.as_deref()),
            ("alice-route", Some("/alice"))
        );
        let back = Config::parse(&c.effective_toml(), Path::new("p.toml")).unwrap();
        assert_eq!(back.gateway.rate_limits, c.gateway.rate_limits);
        assert_eq!(back.gateway.max_inflight_per_core, 8);
        let rule = |body: &str| format!("[[gateway.rate_limits]]\n{body}\n");
        for (text, key) in [
            (
                rule("scope='client_ip'\nrate=0\nburst=1"),
                "gateway.rate_limits.rate",
            ),
            (
                rule("scope='client_ip'\nrate=1\nburst=0"),
                "gateway.rate_limits.burst",
            ),
            (
                rule("scope='route'\nmatch='alice'\nrate=1\nburst=1"),
                "gateway.rate_limits.match",
            ),
            (
                rule("scope='client_ip'\nrate=1\nburst=1\nip_prefix_v4=33"),
                "gateway.rate_limits.ip_prefix_v4",
            ),
            (
                rule("scope='client_ip'\nname='a b'\nrate=1\nburst=1"),
                "gateway.rate_limits.name",
            ),
            (
                rule("scope='identity'\nrate=1\nburst=1")
                    + &rule("scope='identity'\nrate=2\nburst=1"),
                "gateway.rate_limits.name",
            ),
            (rule("scope='ip'\nrate=1\nburst=1"), "scope"),
            (
                rule("scope='client_ip'\nrate=1\nburst=1\nwindow=3"),
                "window",
            ),
            (
                "[gateway]\nqueue_timeout = 0\n".into(),
                "gateway.queue_timeout",
            ),
            (
                "[gateway]\nmax_inflight_per_identity = 0\n".into(),
                "gateway.max_inflight_per_identity",
            ),
        ] {
            let msg = Config::parse(&text, Path::new("x.toml"))
                .unwrap_err()
                .to_string();
            assert!(msg.contains(key), "{text}: {msg}");
        }
    }

    #[test]
    fn did_keys_parse_with_their_defaults() {
        let c = Config::parse(
            "[gateway.auth]\nservice_domains=['gw.example']\n[[gateway.auth.dids]]\ndid='did:wba:a.example:x'\npaths=['/x']\n[receiver]\ndid_document='id/did.json'\nprivate_key='id/key-1_private.pem'\nauth_scheme='http-signatures'\n",
            Path::new("x.toml"),
        )
        .unwrap();
        let a = &c.gateway.auth;
        assert!(a.did_wba_enabled);
        assert_eq!(
            (a.timestamp_window_past, a.timestamp_window_future),
            (300, 60)
        );
        assert_eq!(a.document_max_size, 65536);
        assert!(!a.allow_private_resolver_targets);
        assert_eq!(a.dids[0].paths, ["/x"]);
        assert_eq!(c.receiver.auth_scheme, AuthScheme::HttpSignatures);
        let bad = Config::parse("[receiver]\nauth_scheme='jwt'\n", Path::new("x.toml"));
        assert!(bad.is_err(), "unknown auth_scheme must be refused");
    }

    #[test]
    fn database_backend_follows_its_keys() {
        let c = Config::parse("", Path::new("x")).unwrap();
        assert_eq!(c.gateway.database.backend(), DbBackend::Sqlite);
        assert_eq!(c.gateway.database.path, "data/anp-proxy.db");
        assert_eq!(c.gateway.database.poll_interval.get(), 2.0);
        // The Python reference's section: MySQL keys, no `backend`.
        let text = "[gateway.database]\nhost='db'\nport=3306\nuser='anp'\npassword='pw-secret-1'\ndatabase='anp'\ncharset='utf8mb4'\nconnect_timeout=10\nmin_connections=1\nmax_connections=10\n";
        let c = Config::parse(text, Path::new("x")).unwrap();
        let d = &c.gateway.database;
        assert_eq!(d.backend(), DbBackend::Mysql);
        assert_eq!((d.host.as_str(), d.user.as_str()), ("db", "anp"));
        assert!(!format!("{c:?}").contains("pw-secret-1"));
        let c = Config::parse(
            "[gateway.database]\nbackend='sqlite'\nhost='db'\n",
            Path::new("x"),
        )
        .unwrap();
        assert_eq!(c.gateway.database.backend(), DbBackend::Sqlite);
        for (text, key) in [
            ("[gateway.database]\nbackend='pg'\n", "backend"),
            ("[gateway.database]\nhostname='x'\n", "hostname"),
            (
                "[gateway.database]\npoll_interval=0\n",
                "gateway.database.poll_interval",
            ),
            (
                "[gateway.database]\nmin_connections=5\nmax_connections=2\n",
                "gateway.database.max_connections",
            ),
            (
                "[gateway.database]\ncharset='utf8; DROP'\n",
                "gateway.database.charset",
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
        assert_eq!(c.gateway.timeout.get(), 2.0);
        let c = Config::parse("[gateway]\ntimeout = 0.5\n", Path::new("x")).unwrap();
        assert_eq!(c.gateway.timeout.get(), 0.5);
    }
}
