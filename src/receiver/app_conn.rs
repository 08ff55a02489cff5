//! The receiver's connection to the local app, whichever way `upstream`
//! names it: `http://host:port` (TCP), `https://host:port` (TLS over TCP,
//! the app's certificate verified) or `unix:/path/app.sock` (a unix-domain
//! socket: no TCP stack between the receiver and an app on the same host).

use std::cell::RefCell;
use std::fmt;
use std::io;
use std::net::SocketAddr;
use std::os::fd::{AsRawFd, RawFd};
use std::path::PathBuf;
use std::sync::Arc;

use monoio::net::{TcpStream, UnixStream};
use monoio_rustls::{ClientTlsStream, TlsConnector};
use rustls::pki_types::ServerName;

use super::upstream::UpstreamError;
use super::url::{self, Url, UrlError};

/// One connection to the app.
pub enum AppStream {
    Tcp(TcpStream),
    // Boxed: the TLS state is large and the enum is pooled. The socket's
    // descriptor is kept beside it: the quiet-connection check peeks at it
    // without going through TLS.
    Tls(Box<ClientTlsStream<TcpStream>>, RawFd),
    Unix(UnixStream),
}

crate::net::delegate_rent_io!(AppStream { Tcp, Tls, Unix });

// SAFETY: every variant is `Split` (TcpStream and UnixStream are;
// monoio-rustls's stream is when its IO is), and the enum adds no state
// shared between the halves (an upgraded stream is split: pass-through).
unsafe impl monoio::io::Split for AppStream {}

impl AsRawFd for AppStream {
    /// The socket's descriptor, owned by the stream (valid while it lives).
    fn as_raw_fd(&self) -> RawFd {
        match self {
            AppStream::Tcp(s) => s.as_raw_fd(),
            AppStream::Tls(_, fd) => *fd,
            AppStream::Unix(s) => s.as_raw_fd(),
        }
    }
}

impl AppStream {
    /// Bytes on the socket of a TLS connection are records, not the app's
    /// stray bytes: a `close_notify`, a session ticket.
    pub fn is_tls(&self) -> bool {
        matches!(self, AppStream::Tls(..))
    }
}

/// Where the app listens, ready to dial (one per core; clones share the
/// TLS configuration).
#[derive(Clone)]
pub enum AppAddr {
    /// `host:port`.
    Tcp(TcpTarget),
    Tls {
        authority: TcpTarget,
        connector: TlsConnector,
        /// The name the certificate must carry (SNI).
        name: ServerName<'static>,
    },
    Unix(PathBuf),
}

impl fmt::Display for AppAddr {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            AppAddr::Tcp(a) => f.write_str(&a.authority),
            AppAddr::Tls { authority, .. } => write!(f, "https://{}", authority.authority),
            AppAddr::Unix(p) => write!(f, "unix:{}", p.display()),
        }
    }
}

impl AppAddr {
    pub async fn connect(&self) -> Result<AppStream, UpstreamError> {
        let failed = |source| UpstreamError::Connect {
            addr: self.to_string(),
            source,
        };
        match self {
            AppAddr::Tcp(authority) => {
                let s = authority.dial().await.map_err(failed)?;
                let _ = s.set_nodelay(true);
                Ok(AppStream::Tcp(s))
            }
            AppAddr::Tls {
                authority,
                connector,
                name,
            } => {
                let s = authority.dial().await.map_err(failed)?;
                let _ = s.set_nodelay(true);
                let fd = s.as_raw_fd();
                match connector.connect(name.clone(), s).await {
                    Ok(tls) => Ok(AppStream::Tls(Box::new(tls), fd)),
                    Err(e) => Err(UpstreamError::Tls {
                        addr: self.to_string(),
                        why: crate::tls::describe(&e),
                    }),
                }
            }
            AppAddr::Unix(path) => Ok(AppStream::Unix(
                UnixStream::connect(path).await.map_err(failed)?,
            )),
        }
    }
}

/// A TCP app's `host:port` and its addresses, resolved when the
/// configuration loads, so that a dial resolves nothing: `getaddrinfo`
/// blocks the core that calls it (13 µs for `localhost` from /etc/hosts, a
/// network round trip for a DNS name, every request of the core waiting).
/// When no address answers, the name is resolved again, once, in case the
/// app moved; a name that did not resolve at start is resolved at the
/// first dial. One per core (each clone keeps its own).
#[derive(Clone, Debug)]
pub struct TcpTarget {
    authority: String,
    addrs: RefCell<Vec<SocketAddr>>,
}

impl TcpTarget {
    pub fn new(authority: String) -> TcpTarget {
        let addrs = RefCell::new(resolve(&authority).unwrap_or_default());
        TcpTarget { authority, addrs }
    }

    async fn dial(&self) -> io::Result<TcpStream> {
        let known = self.addrs.borrow().clone();
        let err = match connect_any(&known).await {
            Ok(s) => return Ok(s),
            Err(e) => e,
        };
        match resolve(&self.authority) {
            Ok(fresh) if fresh != known => {
                tracing::info!(upstream = %self.authority, addrs = ?fresh, "upstream resolved again");
                *self.addrs.borrow_mut() = fresh.clone();
                connect_any(&fresh).await
            }
            _ => Err(err),
        }
    }
}

fn resolve(authority: &str) -> io::Result<Vec<SocketAddr>> {
    use std::net::ToSocketAddrs;
    Ok(authority.to_socket_addrs()?.collect())
}

/// The first of `addrs` that accepts, in order.
async fn connect_any(addrs: &[SocketAddr]) -> io::Result<TcpStream> {
    let mut err = io::Error::new(io::ErrorKind::NotFound, "the name resolved to no address");
    for a in addrs {
        match TcpStream::connect_addr(*a).await {
            Ok(s) => return Ok(s),
            Err(e) => err = e,
        }
    }
    Err(err)
}

/// `upstream` as written, before any TLS configuration is loaded.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum UpstreamUrl {
    /// `http://` or `https://` (`Url::tls`).
    Net(Url),
    Unix(PathBuf),
}

/// Parses `http://host:port`, `https://host:port` or `unix:/abs/path`
/// (a path without the scheme is refused: `upstream` is a URL). The URL
/// names only where the app is: a path or query after it is refused.
pub fn parse(s: &str) -> Result<UpstreamUrl, UrlError> {
    let err = |why: &str| UrlError {
        url: s.to_owned(),
        why: why.to_owned(),
    };
    if let Some(path) = s.strip_prefix("unix:") {
        let path = path.strip_prefix("//").unwrap_or(path);
        if !path.starts_with('/') {
            return Err(err(
                "unix: takes an absolute socket path (unix:/run/app.sock)",
            ));
        }
        return Ok(UpstreamUrl::Unix(PathBuf::from(path)));
    }
    let u = url::parse(s, ("http", "https")).map_err(|mut e| {
        e.why = format!("{} (or unix:/path/app.sock)", e.why);
        e
    })?;
    if u.path != "/" {
        return Err(err(
            "names a path: upstream is where the app listens; the request's path is kept as the client sent it",
        ));
    }
    Ok(UpstreamUrl::Net(u))
}

/// The app as the receiver calls it: where, and which `Host` it is sent.
#[derive(Clone)]
pub struct AppTarget {
    pub addr: AppAddr,
    /// Sent when the client's request has none; always, when `rewrite_host`.
    pub host: String,
    /// `upstream_host` is set: the client's `Host` is replaced.
    pub rewrite_host: bool,
}

impl AppTarget {
    /// `tls`: the configuration for an `https://` upstream, built by the
    /// caller (preflight) when the URL asks for it.
    pub fn new(
        url: UpstreamUrl,
        upstream_host: &str,
        tls: Option<Arc<rustls::ClientConfig>>,
    ) -> Result<AppTarget, String> {
        let rewrite_host = !upstream_host.is_empty();
        if rewrite_host
            && upstream_host
                .bytes()
                .any(|b| b <= b' ' || b == 0x7f || matches!(b, b'/' | b'@' | b','))
        {
            return Err(format!(
                "receiver.upstream_host `{upstream_host}` is not a host[:port]"
            ));
        }
        let (addr, default_host) = match url {
            UpstreamUrl::Unix(p) => (AppAddr::Unix(p), "localhost".to_owned()),
            UpstreamUrl::Net(u) if u.tls => {
                let cfg = tls.ok_or("https upstream without a TLS configuration")?;
                // The name checked is the one the app is asked for.
                let host = match upstream_host.rsplit_once(':') {
                    _ if upstream_host.is_empty() => u.host_name().to_owned(),
                    Some((h, p)) if !h.ends_with(']') && p.parse::<u16>().is_ok() => h.into(),
                    _ => upstream_host.to_owned(),
                };
                let host = host
                    .trim_start_matches('[')
                    .trim_end_matches(']')
                    .to_owned();
                let name = ServerName::try_from(host.clone()).map_err(|_| {
                    format!("receiver.upstream: `{host}` is not a valid TLS server name")
                })?;
                let addr = AppAddr::Tls {
                    authority: TcpTarget::new(u.authority()),
                    connector: TlsConnector::from(cfg),
                    name,
                };
                (addr, u.host_header())
            }
            UpstreamUrl::Net(u) => (AppAddr::Tcp(TcpTarget::new(u.authority())), u.host_header()),
        };
        Ok(AppTarget {
            addr,
            host: if rewrite_host {
                upstream_host.to_owned()
            } else {
                default_host
            },
            rewrite_host,
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Resolved once, dialled without resolving; an address that stops
    /// answering sends the dial back to the name, and the new address is
    /// kept.
    #[monoio::test_all]
    async fn a_tcp_target_dials_what_its_name_resolved_to_and_follows_a_move() {
        let live = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
        let port = live.local_addr().unwrap().port();
        let t = TcpTarget::new(format!("localhost:{port}"));
        assert!(!t.addrs.borrow().is_empty(), "resolved when built");
        t.dial().await.expect("dials the resolved address");
        // A dial does not look the name up: this one cannot resolve
        // (`.invalid`, RFC 6761), yet its known address answers.
        let cached = TcpTarget {
            authority: "app.invalid:1".into(),
            addrs: RefCell::new(vec![live.local_addr().unwrap()]),
        };
        cached.dial().await.expect("the known address, no lookup");

        let gone = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
        let stale = gone.local_addr().unwrap();
        drop(gone);
        let moved = TcpTarget {
            authority: format!("127.0.0.1:{port}"),
            addrs: RefCell::new(vec![stale]),
        };
        moved
            .dial()
            .await
            .expect("the name, resolved again, answers");
        assert_eq!(
            *moved.addrs.borrow(),
            vec![live.local_addr().unwrap()],
            "the new address is kept"
        );
    }

    #[test]
    fn upstream_forms() {
        assert_eq!(
            parse("unix:/run/app.sock").unwrap(),
            UpstreamUrl::Unix("/run/app.sock".into())
        );
        assert_eq!(
            parse("unix:///run/app.sock").unwrap(),
            UpstreamUrl::Unix("/run/app.sock".into())
        );
        assert!(parse("unix:app.sock").is_err());
        let UpstreamUrl::Net(u) = parse("https://app.internal:8443").unwrap() else {
            panic!()
        };
        assert!(u.tls);
        assert_eq!(u.authority(), "app.internal:8443");
        assert!(parse("http://127.0.0.1:8000/").is_ok());
        let e = parse("http://127.0.0.1:8000/api").unwrap_err();
        assert!(e.why.contains("names a path"), "{e}");
        let e = parse("ftp://x").unwrap_err();
        assert!(e.why.contains("unix:"), "{e}");
    }

    #[test]
    fn host_rules() {
        let t = AppTarget::new(parse("http://127.0.0.1:8000").unwrap(), "", None).unwrap();
        assert_eq!((t.host.as_str(), t.rewrite_host), ("127.0.0.1:8000", false));
        let t = AppTarget::new(parse("unix:/a.sock").unwrap(), "", None).unwrap();
        assert_eq!(t.host, "localhost");
        assert_eq!(t.addr.to_string(), "unix:/a.sock");
        let t = AppTarget::new(parse("unix:/a.sock").unwrap(), "app.local:81", None).unwrap();
        assert_eq!((t.host.as_str(), t.rewrite_host), ("app.local:81", true));
        for bad in ["a b", "a\r\nx: y", "a/b", "a,b"] {
            assert!(AppTarget::new(parse("unix:/a.sock").unwrap(), bad, None).is_err());
        }
        assert!(AppTarget::new(parse("https://a:1").unwrap(), "", None).is_err());
    }
}
