//! anp-proxy: a thread-per-core gateway that gives HTTP services inside
//! private networks a public address, through WebSocket tunnels that the
//! private side (the receiver) opens. See `docs/ARCHITECTURE.md`.

pub(crate) mod access_log;
pub(crate) mod admin_http;
// Benchmark builds only (`--features count-allocs`, benches/README.md).
#[cfg(feature = "count-allocs")]
pub mod alloc_count;
pub mod auth;
pub mod config;
pub(crate) mod fault;
pub mod gateway;
pub mod http;
pub mod logging;
pub mod net;
pub(crate) mod pool;
pub mod preflight;
pub mod protocol;
pub mod receiver;
pub mod registry;
pub mod runtime;
pub(crate) mod sync;
pub(crate) mod tls;
/// `anp-proxy cert new`: a private CA and a certificate it signed.
pub use tls::create as cert;
pub(crate) mod tunnel;
pub mod ws;

/// A map keyed by what no client inserts at will (request ids, identity
/// names, configured routes), hashed with foldhash instead of SipHash.
/// Maps a client can fill with keys of its choosing (per source address,
/// nonces) stay `std::collections::HashMap`.
pub(crate) type FastMap<K, V> = std::collections::HashMap<K, V, foldhash::fast::RandomState>;
