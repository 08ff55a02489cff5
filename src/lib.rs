//! anp-proxy: a thread-per-core gateway that gives HTTP services inside
//! private networks a public address, through WebSocket tunnels that the
//! private side (the receiver) opens. See `docs/ARCHITECTURE.md`.

pub mod access_log;
pub mod auth;
pub mod config;
pub mod fault;
pub mod gateway;
pub mod http;
pub mod logging;
pub mod net;
pub mod pool;
pub mod preflight;
pub mod protocol;
pub mod receiver;
pub mod registry;
pub mod sync;
pub mod tls;
pub mod tunnel;
pub mod ws;
