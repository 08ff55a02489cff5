//! What a core records about each request it answers: metrics
//! ([`super::metrics`]) and, when enabled, an access-log line
//! ([`crate::access_log`]). `gateway/conn.rs` opens an [`Exchange`] once a
//! request head is parsed, fills in what it learns (route, request id,
//! bytes) and closes it with [`CoreObs::finish`] after the response (or
//! the gateway's own error reply) is written.
//!
//! Never: an atomic or a lock per request (all `Cell`s on this core);
//! anything of the access log when it is off.

use std::net::SocketAddr;
use std::rc::Rc;
use std::sync::OnceLock;
use std::time::{Instant, SystemTime};

use super::metrics::{AuthFailures, CoreMetrics};
use super::routes::Route;
use crate::access_log::{AccessLog, AccessSink, Entry};

/// The process-wide part, in `Shared` (cold paths only).
#[derive(Default)]
pub struct SharedObs {
    /// Set once by `gateway::start` before the cores start.
    access: OnceLock<AccessSink>,
    pub auth_failures: AuthFailures,
}

impl SharedObs {
    pub fn set_access_log(&self, sink: AccessSink) {
        let _ = self.access.set(sink);
    }

    pub fn access_log(&self) -> Option<&AccessSink> {
        self.access.get()
    }
}

/// One core's recorder.
pub struct CoreObs {
    pub metrics: CoreMetrics,
    access: Option<Rc<AccessLog>>,
}

/// One request being answered. Dropping it without [`CoreObs::finish`]
/// still ends its in-flight count.
pub struct Exchange<'a> {
    obs: &'a CoreObs,
    started: Instant,
    /// The route slot ([`CoreMetrics::slot`]) once a route matched.
    pub route: Option<u32>,
    /// The ANPX request id once a tunnel took the request.
    pub request_id: Option<u64>,
    /// Request bytes received: head, plus the body once read.
    pub bytes_in: u64,
    /// Response bytes written.
    pub bytes_out: u64,
    /// The full reason of a failure whose reply to the client is generic
    /// (5xx), for the access log's `error`.
    pub error: Option<String>,
}

impl Exchange<'_> {
    pub fn set_route(&mut self, route: &Route) {
        self.route = Some(self.obs.metrics.slot(route));
    }

    /// When the request's first byte arrived.
    pub fn started(&self) -> Instant {
        self.started
    }

    /// The request failed with `err`, answered `status`: keeps the detail
    /// for the access log when the client's reply does not carry it (a
    /// 5xx; a 4xx body says it already), and for a 429 (which limit).
    /// Allocates, on the failure path only, and only when the access log
    /// is on.
    pub fn failed(&mut self, err: &super::error::ProxyError, status: u16) {
        if self.obs.access.is_some() && (status >= 500 || status == 429) {
            self.error = Some(err.to_string());
        }
    }

    /// The response was cut (`respond::Cut`): the access log's `error`
    /// says why; its status stays the one the client was sent. Allocates
    /// on that path only, and only when the access log is on.
    pub fn cut(&mut self, why: &dyn std::fmt::Display) {
        if self.obs.access.is_some() {
            self.error = Some(why.to_string());
        }
    }
}

impl Drop for Exchange<'_> {
    fn drop(&mut self) {
        self.obs.metrics.request_ended();
    }
}

impl CoreObs {
    /// Hands this core's buffered access lines to the writer (drain).
    pub fn flush_access_log(&self) {
        if let Some(a) = &self.access {
            a.flush();
        }
    }

    pub fn new(shared: &SharedObs) -> Self {
        Self {
            metrics: CoreMetrics::default(),
            access: shared.access_log().map(AccessSink::for_core),
        }
    }

    /// A request whose head was parsed; `started` is when its first byte
    /// was read. Counts it in flight.
    pub fn begin(&self, started: Instant, head_len: usize) -> Exchange<'_> {
        self.metrics.request_started();
        Exchange {
            obs: self,
            started,
            route: None,
            request_id: None,
            bytes_in: head_len as u64,
            bytes_out: 0,
            error: None,
        }
    }

    /// Records a finished request: metrics, then the access-log line.
    /// Returns the instant it was done (read once here; the connection's
    /// next wait starts from it, `Client::hot_wait`).
    pub fn finish(
        &self,
        ex: Exchange<'_>,
        peer: SocketAddr,
        method: &str,
        path: &[u8],
        status: u16,
    ) -> Instant {
        self.record(
            ex.started,
            peer,
            Some((method, path)),
            ex.route,
            ex.request_id,
            status,
            (ex.bytes_in, ex.bytes_out),
            ex.error.as_deref(),
        )
    }

    /// A request refused before its head could be parsed (400, 408, 414,
    /// 431): no method, path or route.
    pub fn refused(
        &self,
        started: Instant,
        peer: SocketAddr,
        status: u16,
        bytes_in: u64,
        bytes_out: u64,
    ) {
        self.record(
            started,
            peer,
            None,
            None,
            None,
            status,
            (bytes_in, bytes_out),
            None,
        );
    }

    #[allow(clippy::too_many_arguments)]
    fn record(
        &self,
        started: Instant,
        peer: SocketAddr,
        request: Option<(&str, &[u8])>,
        route: Option<u32>,
        request_id: Option<u64>,
        status: u16,
        (bytes_in, bytes_out): (u64, u64),
        error: Option<&str>,
    ) -> Instant {
        let now = Instant::now();
        let took = now.saturating_duration_since(started);
        self.metrics
            .record(route, status, bytes_in, bytes_out, took);
        let Some(log) = &self.access else {
            return now;
        };
        let e = Entry {
            time: SystemTime::now(),
            client: peer,
            method: request.map(|r| r.0),
            path: request.map(|r| r.1),
            route: None,
            identity: None,
            request_id,
            status,
            bytes_in,
            bytes_out,
            duration: took,
            error,
        };
        match route {
            Some(slot) => self.metrics.with_slot(slot, |p, id| {
                log.log(&Entry {
                    route: Some(p),
                    identity: Some(id),
                    ..e
                })
            }),
            None => log.log(&e),
        }
        now
    }
}
