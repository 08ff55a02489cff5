//! The receiver's `GET /metrics` (`[receiver] metrics_listen`): each
//! gateway of its fleet with its tunnels up, connects and failures, in
//! Prometheus text. One thread accepts and answers connections one at a
//! time, each with [`TIMEOUT`] to send its head and take the answer: a
//! scrape is rare and small, and a slow client delays the next scrape,
//! never a tunnel.
//!
//! Never: a core's thread or state (it reads the resolver's list of
//! gateways and their atomic counters).

use std::io::{Read, Write};
use std::net::{SocketAddr, TcpListener, TcpStream};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use super::fleet::Gateway;

/// Longest a scrape may take to send its head and read the answer.
const TIMEOUT: Duration = Duration::from_secs(2);

/// Largest request head read, bytes.
const MAX_HEAD: usize = 8 * 1024;

/// The gateways the resolver knows now (replaced at each of its rounds).
#[derive(Default)]
pub struct FleetView {
    gateways: Mutex<Vec<Arc<Gateway>>>,
}

impl FleetView {
    pub fn set(&self, mut gateways: Vec<Arc<Gateway>>) {
        gateways.sort_by(|a, b| a.label.cmp(&b.label));
        *self.gateways.lock().unwrap_or_else(|e| e.into_inner()) = gateways;
    }

    fn snapshot(&self) -> Vec<Arc<Gateway>> {
        self.gateways
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .clone()
    }
}

/// Binds `addr` and serves `/metrics` from `view` on a thread of its own;
/// the bound address (port 0 picks one).
pub fn start(addr: SocketAddr, view: Arc<FleetView>) -> std::io::Result<SocketAddr> {
    let listener = TcpListener::bind(addr)?;
    let local = listener.local_addr()?;
    std::thread::Builder::new()
        .name("anp-rx-metrics".into())
        .spawn(move || {
            for conn in listener.incoming() {
                match conn {
                    Ok(c) => {
                        if let Err(e) = serve(c, &view) {
                            tracing::debug!(error = %e, "metrics connection failed");
                        }
                    }
                    Err(e) => {
                        tracing::warn!(error = %e, "metrics accept failed");
                        // EMFILE and friends: back off instead of spinning.
                        std::thread::sleep(Duration::from_millis(50));
                    }
                }
            }
        })?;
    Ok(local)
}

fn serve(mut conn: TcpStream, view: &FleetView) -> std::io::Result<()> {
    conn.set_read_timeout(Some(TIMEOUT))?;
    conn.set_write_timeout(Some(TIMEOUT))?;
    let mut buf = Vec::with_capacity(1024);
    let mut chunk = [0u8; 1024];
    while !buf.windows(4).any(|w| w == b"\r\n\r\n") {
        let n = conn.read(&mut chunk)?;
        if n == 0 || buf.len() + n > MAX_HEAD {
            return Ok(());
        }
        buf.extend_from_slice(&chunk[..n]);
    }
    let line = buf.split(|&b| b == b'\r').next().unwrap_or_default();
    let mut parts = line.split(|&b| b == b' ');
    let (method, target) = (parts.next(), parts.next());
    let path = target.map(|t| t.split(|&b| b == b'?').next().unwrap_or_default());
    let (status, ctype, body) = match (method, path) {
        (Some(b"GET"), Some(b"/metrics")) => (
            "200 OK",
            "text/plain; version=0.0.4",
            render(&view.snapshot()),
        ),
        _ => ("404 Not Found", "text/plain", "not found\n".to_owned()),
    };
    let head = format!(
        "HTTP/1.1 {status}\r\ncontent-type: {ctype}\r\ncontent-length: {}\r\n\
         cache-control: no-store\r\nconnection: close\r\n\r\n",
        body.len()
    );
    conn.write_all(head.as_bytes())?;
    conn.write_all(body.as_bytes())
}

/// A label value, escaped as the text format asks (`\`, `"`, newline).
fn label(v: &str) -> String {
    v.replace('\\', "\\\\")
        .replace('"', "\\\"")
        .replace('\n', "\\n")
}

/// The metrics text for `gateways`.
pub fn render(gateways: &[Arc<Gateway>]) -> String {
    use std::fmt::Write as _;
    let mut s = String::new();
    let _ = writeln!(
        s,
        "# HELP anp_receiver_gateways Gateway addresses this receiver keeps tunnels to.\n\
         # TYPE anp_receiver_gateways gauge\nanp_receiver_gateways {}",
        gateways.len()
    );
    type Pick = fn(&super::fleet::StatusSnapshot) -> u64;
    let series: [(&str, &str, &str, Pick); 3] = [
        (
            "anp_receiver_gateway_tunnels",
            "gauge",
            "Tunnels connected to the gateway now.",
            |s| s.up as u64,
        ),
        (
            "anp_receiver_gateway_connects_total",
            "counter",
            "Tunnels that connected to the gateway.",
            |s| s.connects,
        ),
        (
            "anp_receiver_gateway_connect_failures_total",
            "counter",
            "Attempts that failed before the tunnel was up (connect, TLS, refused upgrade).",
            |s| s.failures,
        ),
    ];
    for (name, kind, help, pick) in series {
        let _ = writeln!(s, "# HELP {name} {help}\n# TYPE {name} {kind}");
        for gw in gateways {
            let scheme = if gw.url.tls { "wss" } else { "ws" };
            let url = format!("{scheme}://{}{}", gw.url.authority(), gw.url.path);
            let _ = writeln!(
                s,
                "{name}{{gateway=\"{}\",address=\"{}\"}} {}",
                label(&url),
                gw.addr,
                pick(&gw.status.snapshot())
            );
        }
    }
    s
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn every_gateway_has_its_series() {
        let url = |u: &str| super::super::url::parse(u, ("ws", "wss")).unwrap();
        let a = Arc::new(Gateway::new(
            url("ws://127.0.0.1:1/ws"),
            "127.0.0.1:1".parse().unwrap(),
            None,
            0,
        ));
        let b = Arc::new(Gateway::new(
            url("wss://gw.example:2/t"),
            "10.0.0.2:2".parse().unwrap(),
            None,
            0,
        ));
        a.status.connected();
        a.status.connected();
        b.status.failed();
        let text = render(&[a, b]);
        for line in [
            "anp_receiver_gateways 2",
            "anp_receiver_gateway_tunnels{gateway=\"ws://127.0.0.1:1/ws\",address=\"127.0.0.1:1\"} 2",
            "anp_receiver_gateway_connects_total{gateway=\"ws://127.0.0.1:1/ws\",address=\"127.0.0.1:1\"} 2",
            "anp_receiver_gateway_tunnels{gateway=\"wss://gw.example:2/t\",address=\"10.0.0.2:2\"} 0",
            "anp_receiver_gateway_connect_failures_total{gateway=\"wss://gw.example:2/t\",address=\"10.0.0.2:2\"} 1",
        ] {
            assert!(text.lines().any(|l| l == line), "{line} missing in:\n{text}");
        }
    }

    #[test]
    fn label_values_are_escaped() {
        assert_eq!(label("a\"b\\c\nd"), "a\\\"b\\\\c\\nd");
    }
}
