//! The access log: one JSON line per HTTP request the gateway answers
//! (proxied or answered by the gateway itself), `[logging] access_log`.
//!
//! A core formats its lines into its own reused buffer ([`AccessLog`]) and
//! hands the buffer's contents to a background writer thread
//! (tracing-appender's lossy non-blocking writer) every 100 ms or every
//! 32 KiB, whichever comes first: one channel send per batch, not per
//! request, and never a wait. If the writer thread falls behind, whole
//! batches are dropped and counted (`anp_access_log_dropped_batches_total`)
//! rather than slowing a core. With `log_dir` set the lines go to
//! `access.log` there, rotated like the main log (`crate::logging`);
//! otherwise to stdout (the main log has stderr).
//!
//! Never: a lock, an allocation or a syscall per request on a core; a line
//! written when `access_log = false` (no sink exists then).

use std::cell::{Cell, RefCell};
use std::io::Write;
use std::net::SocketAddr;
use std::path::Path;
use std::rc::Rc;
use std::time::{Duration, SystemTime};

use tracing_appender::non_blocking::{ErrorCounter, NonBlocking, NonBlockingBuilder, WorkerGuard};

use crate::config::LoggingConfig;

/// The access log's file name in `log_dir`.
pub const ACCESS_LOG: &str = "access.log";

/// A core flushes its buffer at least this often while it holds lines...
const FLUSH_AFTER: Duration = Duration::from_millis(100);
/// ... and as soon as it holds this much.
const FLUSH_AT: usize = 32 * 1024;

/// The process's access log destination (one writer thread).
pub struct AccessSink {
    writer: NonBlocking,
    dropped: ErrorCounter,
    /// Taken by [`AccessSink::close`] (a drain ending the process).
    guard: std::sync::Mutex<Option<WorkerGuard>>,
}

impl AccessSink {
    /// `None` when `access_log = false`. The file (or stdout) is opened
    /// here, at start, so a bad `log_dir` is reported before serving.
    pub fn open(cfg: &LoggingConfig, base: &Path) -> std::io::Result<Option<AccessSink>> {
        if !cfg.access_log {
            return Ok(None);
        }
        let builder = NonBlockingBuilder::default()
            .lossy(true)
            .thread_name("anp-access-log");
        let (writer, guard) = if cfg.log_dir.is_empty() {
            builder.finish(std::io::stdout())
        } else {
            let dir = base.join(&cfg.log_dir);
            builder.finish(crate::logging::rotating_writer(cfg, &dir, ACCESS_LOG)?)
        };
        Ok(Some(AccessSink {
            dropped: writer.error_counter(),
            writer,
            guard: std::sync::Mutex::new(Some(guard)),
        }))
    }

    /// Writes out every line handed over so far and stops the writer
    /// thread (the process is about to exit; cores flushed first).
    pub fn close(&self) {
        let guard = self.guard.lock().unwrap_or_else(|e| e.into_inner()).take();
        drop(guard);
    }

    /// Batches dropped because the writer thread fell behind.
    pub fn dropped_batches(&self) -> u64 {
        self.dropped.dropped_lines() as u64
    }

    /// A core's own handle (cloned once per core).
    pub fn for_core(&self) -> Rc<AccessLog> {
        Rc::new(AccessLog {
            out: RefCell::new(self.writer.clone()),
            buf: RefCell::new(Vec::with_capacity(FLUSH_AT + 1024)),
            flush_pending: Cell::new(false),
            clock: RefCell::new(Clock::default()),
        })
    }
}

/// What one line says. `None` fields are written as `null`.
#[derive(Debug, Clone, Copy)]
pub struct Entry<'a> {
    pub time: SystemTime,
    pub client: SocketAddr,
    pub method: Option<&'a str>,
    /// The request-target's path as received (percent-encoding kept, the
    /// query left out: it may carry secrets).
    pub path: Option<&'a [u8]>,
    /// The matched route prefix.
    pub route: Option<&'a str>,
    pub identity: Option<&'a str>,
    /// The ANPX `request_id` the request travelled under.
    pub request_id: Option<u64>,
    pub status: u16,
    pub bytes_in: u64,
    pub bytes_out: u64,
    pub duration: Duration,
    /// Why the gateway failed the request, in full, when its reply to the
    /// client says only the kind (a 5xx: `gateway::error::public_message`).
    pub error: Option<&'a str>,
}

/// One core's writer: lines go into `buf`, batches to the writer thread.
pub struct AccessLog {
    out: RefCell<NonBlocking>,
    buf: RefCell<Vec<u8>>,
    flush_pending: Cell<bool>,
    clock: RefCell<Clock>,
}

impl AccessLog {
    /// Appends one line; schedules or performs the batch hand-off. Must
    /// run on a monoio runtime with timers (a core).
    pub fn log(self: &Rc<Self>, e: &Entry<'_>) {
        let full = {
            let mut buf = self.buf.borrow_mut();
            write_line(&mut buf, e, &mut self.clock.borrow_mut());
            buf.len() >= FLUSH_AT
        };
        if full {
            self.flush();
        } else if !self.flush_pending.replace(true) {
            // One timer per batch (not per request).
            let me = self.clone();
            monoio::spawn(async move {
                monoio::time::sleep(FLUSH_AFTER).await;
                me.flush_pending.set(false);
                me.flush();
            });
        }
    }

    /// Hands what is buffered to the writer thread.
    pub fn flush(&self) {
        let mut buf = self.buf.borrow_mut();
        if buf.is_empty() {
            return;
        }
        // Lossy and non-blocking: a full queue drops (and counts) the batch.
        let _ = self.out.borrow_mut().write(&buf);
        buf.clear();
    }
}

/// The `time` field's `YYYY-MM-DDTHH:MM:SS` part, formatted once a second.
#[derive(Default)]
struct Clock {
    secs: i64,
    text: [u8; 19],
    valid: bool,
}

impl Clock {
    fn seconds(&mut self, secs: i64) -> &[u8; 19] {
        if !self.valid || secs != self.secs {
            let (y, mo, d) = crate::auth::didwba::time::civil_from_days(secs.div_euclid(86_400));
            let s = secs.rem_euclid(86_400);
            let mut w = &mut self.text[..];
            let _ = write!(
                w,
                "{:04}-{:02}-{:02}T{:02}:{:02}:{:02}",
                y.clamp(0, 9999),
                mo,
                d,
                s / 3600,
                s / 60 % 60,
                s % 60
            );
            self.secs = secs;
            self.valid = true;
        }
        &self.text
    }
}

/// Appends `e` as one JSON object and a newline. Field order is fixed:
/// time, client, method, path, route, identity, request_id, status,
/// bytes_in, bytes_out, duration_ms, error.
fn write_line(out: &mut Vec<u8>, e: &Entry<'_>, clock: &mut Clock) {
    let since = e
        .time
        .duration_since(SystemTime::UNIX_EPOCH)
        .unwrap_or_default();
    out.extend_from_slice(b"{\"time\":\"");
    out.extend_from_slice(clock.seconds(since.as_secs() as i64));
    let _ = write!(
        out,
        ".{:03}Z\",\"client\":\"{}\"",
        since.subsec_millis(),
        e.client
    );
    out.extend_from_slice(b",\"method\":");
    opt_str(out, e.method.map(str::as_bytes));
    out.extend_from_slice(b",\"path\":");
    opt_str(out, e.path);
    out.extend_from_slice(b",\"route\":");
    opt_str(out, e.route.map(str::as_bytes));
    out.extend_from_slice(b",\"identity\":");
    opt_str(out, e.identity.map(str::as_bytes));
    out.extend_from_slice(b",\"request_id\":");
    match e.request_id {
        Some(id) => {
            let mut rid = [0u8; 16];
            out.push(b'"');
            out.extend_from_slice(
                crate::protocol::request_id::format_request_id(id, &mut rid).as_bytes(),
            );
            out.push(b'"');
        }
        None => out.extend_from_slice(b"null"),
    }
    // Milliseconds with three decimals from whole microseconds (rounded):
    // integer formatting, where `{:.3}` of an f64 may take the slow exact
    // path (`flt2dec::dragon`, seen in the gateway's profile).
    let micros = (e.duration.as_nanos() + 500) / 1000;
    let _ = write!(
        out,
        ",\"status\":{},\"bytes_in\":{},\"bytes_out\":{},\"duration_ms\":{}.{:03}",
        e.status,
        e.bytes_in,
        e.bytes_out,
        micros / 1000,
        micros % 1000
    );
    out.extend_from_slice(b",\"error\":");
    opt_str(out, e.error.map(str::as_bytes));
    out.extend_from_slice(b"}\n");
}

fn opt_str(out: &mut Vec<u8>, v: Option<&[u8]>) {
    match v {
        Some(v) => json_str(out, v),
        None => out.extend_from_slice(b"null"),
    }
}

/// A JSON string of `v`. Valid UTF-8 stays as it is; control characters,
/// `"` and `\` are escaped; bytes that are not valid UTF-8 are written as
/// `\u00XX` (their Latin-1 code point, as the `exact` extension does).
fn json_str(out: &mut Vec<u8>, v: &[u8]) {
    const HEX: &[u8; 16] = b"0123456789abcdef";
    out.push(b'"');
    // Nearly every value (a path, a method, a name) is printable ASCII
    // with nothing to escape: copied as it is.
    if v.iter()
        .all(|&b| (0x20..0x7f).contains(&b) && b != b'"' && b != b'\\')
    {
        out.extend_from_slice(v);
        out.push(b'"');
        return;
    }
    for chunk in v.utf8_chunks() {
        for c in chunk.valid().chars() {
            match c {
                '"' => out.extend_from_slice(b"\\\""),
                '\\' => out.extend_from_slice(b"\\\\"),
                c if (c as u32) < 0x20 || c == '\u{7f}' => {
                    let b = c as u8;
                    out.extend_from_slice(b"\\u00");
                    out.push(HEX[(b >> 4) as usize]);
                    out.push(HEX[(b & 0xf) as usize]);
                }
                c => {
                    let mut tmp = [0u8; 4];
                    out.extend_from_slice(c.encode_utf8(&mut tmp).as_bytes());
                }
            }
        }
        for b in chunk.invalid() {
            out.extend_from_slice(b"\\u00");
            out.push(HEX[(b >> 4) as usize]);
            out.push(HEX[(b & 0xf) as usize]);
        }
    }
    out.push(b'"');
}

#[cfg(test)]
mod tests {
    use super::*;

    fn entry<'a>() -> Entry<'a> {
        Entry {
            // 2024-02-29T23:59:58.123Z
            time: SystemTime::UNIX_EPOCH + Duration::from_millis(1_709_251_198_123),
            client: "127.0.0.1:5000".parse().unwrap(),
            method: Some("GET"),
            path: Some(b"/a/\"b\"\\c\x01\xff\xc3\xa9"),
            route: Some("/a"),
            identity: Some("did:wba:example.com:alice"),
            request_id: Some(0x0001_0000_0000_002a),
            status: 200,
            bytes_in: 12,
            bytes_out: 345,
            duration: Duration::from_micros(1500),
            error: Some("receiver reported an error: cannot connect to upstream 10.0.0.5:1"),
        }
    }

    #[test]
    fn a_line_is_json_with_every_field() {
        let mut out = Vec::new();
        let mut clock = Clock::default();
        write_line(&mut out, &entry(), &mut clock);
        assert_eq!(out.last(), Some(&b'\n'));
        assert_eq!(out.iter().filter(|b| **b == b'\n').count(), 1);
        let v: serde_json::Value = serde_json::from_slice(&out).unwrap();
        assert_eq!(v["time"], "2024-02-29T23:59:58.123Z");
        assert_eq!(v["client"], "127.0.0.1:5000");
        assert_eq!(v["method"], "GET");
        assert_eq!(v["path"], "/a/\"b\"\\c\u{1}\u{ff}é");
        assert_eq!(v["route"], "/a");
        assert_eq!(v["identity"], "did:wba:example.com:alice");
        assert_eq!(v["request_id"], "000100000000002a");
        assert_eq!(v["status"], 200);
        assert_eq!(v["bytes_in"], 12);
        assert_eq!(v["bytes_out"], 345);
        assert_eq!(v["duration_ms"], 1.5);
        assert_eq!(
            v["error"],
            "receiver reported an error: cannot connect to upstream 10.0.0.5:1"
        );
        let keys: Vec<&str> = v.as_object().unwrap().keys().map(|k| k.as_str()).collect();
        assert_eq!(keys.len(), 12, "{keys:?}");
    }

    #[test]
    fn durations_have_three_decimals_rounded_and_plain_values_are_copied() {
        let line = |d: Duration, path: &'static [u8]| {
            let mut e = entry();
            e.duration = d;
            e.path = Some(path);
            let mut out = Vec::new();
            write_line(&mut out, &e, &mut Clock::default());
            String::from_utf8(out).unwrap()
        };
        let cases = [
            (Duration::from_micros(1500), "1.500"),
            (Duration::from_nanos(2_000_499), "2.000"),
            (Duration::from_nanos(2_000_500), "2.001"),
            (Duration::from_nanos(999), "0.001"),
            (Duration::ZERO, "0.000"),
            (Duration::from_nanos(999_999_500), "1000.000"),
            (Duration::from_secs(3600), "3600000.000"),
        ];
        for (d, want) in cases {
            let l = line(d, b"/p");
            assert!(
                l.contains(&format!("\"duration_ms\":{want},")),
                "{d:?}: {l}"
            );
        }
        // Printable ASCII goes as it is; anything else is escaped.
        let l = line(Duration::ZERO, b"/agents/a-1/x?y=z&w=%20");
        assert!(l.contains(r#""path":"/agents/a-1/x?y=z&w=%20","#), "{l}");
        let l = line(Duration::ZERO, b"/a\tb");
        assert!(l.contains(r#""path":"/a\u0009b","#), "{l}");
    }

    #[test]
    fn missing_fields_are_null_and_the_clock_follows_time() {
        let mut e = entry();
        e.method = None;
        e.path = None;
        e.route = None;
        e.identity = None;
        e.request_id = None;
        e.error = None;
        let mut out = Vec::new();
        let mut clock = Clock::default();
        write_line(&mut out, &e, &mut clock);
        e.time += Duration::from_secs(2);
        write_line(&mut out, &e, &mut clock);
        let lines: Vec<serde_json::Value> = out
            .split(|b| *b == b'\n')
            .filter(|l| !l.is_empty())
            .map(|l| serde_json::from_slice(l).unwrap())
            .collect();
        for k in ["method", "path", "route", "identity", "request_id", "error"] {
            assert!(lines[0][k].is_null(), "{k}: {}", lines[0]);
        }
        assert_eq!(lines[0]["time"], "2024-02-29T23:59:58.123Z");
        assert_eq!(lines[1]["time"], "2024-03-01T00:00:00.123Z");
    }
}
