//! The PROXY protocol (HAProxy's `proxy-protocol.txt`, versions 1 and 2)
//! on a listener with `proxy_protocol = true`: a load balancer in front
//! sends one header before the client's bytes, naming the client's
//! address; that address, not the balancer's, is the connection's peer from
//! then on (`X-Forwarded-For`, `Forwarded`, the access log, the per-IP
//! limits). A connection that does not start with a valid header is
//! refused.
//!
//! [`parse`] is sans-IO and strict: it says `Incomplete` only while the
//! bytes are a valid prefix of a header, and refuses anything longer than
//! [`V1_MAX`] (v1) or [`V2_MAX`] (v2). [`read_header`] is the IO around it:
//! it looks at the socket without reading (`MSG_PEEK`) and then reads
//! exactly the header's bytes, so nothing of the client's own stream is
//! consumed here (TLS and HTTP read it next, untouched).
//!
//! Never: read past the header, or believe a header on a listener that did
//! not ask for one (the balancer's port must be the only way in: the
//! header is not authenticated).

use std::net::{IpAddr, Ipv4Addr, Ipv6Addr, SocketAddr};
use std::time::Duration;

/// v1's longest header, CRLF included (spec §2.1: 107 bytes).
pub const V1_MAX: usize = 107;

/// The longest v2 header accepted, the 16-byte preamble included: the
/// addresses (at most 216 bytes, AF_UNIX) plus room for the TLVs a
/// balancer adds (unique id, TLS facts); beyond it the connection is
/// refused rather than buffered.
pub const V2_MAX: usize = 16 + 2048;

/// Bytes looked at per round while reading a header.
const PEEK: usize = 256;

/// v2's 12-byte signature (spec §2.2).
const V2_SIG: [u8; 12] = *b"\r\n\r\n\0\r\nQUIT\n";

/// What a complete header says.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Header {
    /// The client's address (and the address it connected to).
    Proxied {
        source: SocketAddr,
        destination: SocketAddr,
    },
    /// v2 `LOCAL` (the balancer's own health check), v1 `UNKNOWN`, or a
    /// family without IP addresses: the connection's own peer stands.
    Local,
}

/// The outcome of [`parse`] over the bytes so far.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Parsed {
    /// The header and how many bytes it took.
    Complete(Header, usize),
    /// A valid prefix: more bytes are needed.
    Incomplete,
}

/// Why a connection's first bytes are not a header we accept.
#[derive(Debug, Clone, Copy, PartialEq, Eq, thiserror::Error)]
pub enum ProxyHeaderError {
    #[error("no PROXY protocol header (the connection does not start with one)")]
    Missing,
    #[error("PROXY v1 header longer than {V1_MAX} bytes")]
    V1TooLong,
    #[error("invalid PROXY v1 header: {0}")]
    V1(&'static str),
    #[error("PROXY v2 header longer than {V2_MAX} bytes")]
    V2TooLong,
    #[error("invalid PROXY v2 header: {0}")]
    V2(&'static str),
    #[error("connection closed before the PROXY header was complete")]
    Closed,
    #[error("no complete PROXY header within header_timeout")]
    Timeout,
    #[error("reading the PROXY header: {0:?}")]
    Io(std::io::ErrorKind),
}

impl ProxyHeaderError {
    /// A stable name for the log.
    pub fn reason(&self) -> &'static str {
        match self {
            Self::Missing => "proxy_header_missing",
            Self::V1TooLong | Self::V2TooLong => "proxy_header_too_long",
            Self::V1(_) | Self::V2(_) => "proxy_header_invalid",
            Self::Closed => "proxy_header_incomplete",
            Self::Timeout => "proxy_header_timeout",
            Self::Io(_) => "proxy_header_io",
        }
    }
}

/// Parses the start of a connection (spec §2.1 and §2.2).
pub fn parse(buf: &[u8]) -> Result<Parsed, ProxyHeaderError> {
    match buf.first() {
        None => Ok(Parsed::Incomplete),
        Some(b'P') => parse_v1(buf),
        Some(b'\r') => parse_v2(buf),
        Some(_) => Err(ProxyHeaderError::Missing),
    }
}

fn parse_v1(buf: &[u8]) -> Result<Parsed, ProxyHeaderError> {
    const PREFIX: &[u8] = b"PROXY ";
    let n = buf.len().min(PREFIX.len());
    if buf[..n] != PREFIX[..n] {
        return Err(ProxyHeaderError::Missing);
    }
    let Some(lf) = buf.iter().position(|&b| b == b'\n') else {
        if buf.len() >= V1_MAX {
            return Err(ProxyHeaderError::V1TooLong);
        }
        if buf.contains(&b'\r') && buf.last() != Some(&b'\r') {
            return Err(ProxyHeaderError::V1("CR not followed by LF"));
        }
        return Ok(Parsed::Incomplete);
    };
    let len = lf + 1;
    if len > V1_MAX {
        return Err(ProxyHeaderError::V1TooLong);
    }
    if lf == 0 || buf[lf - 1] != b'\r' {
        return Err(ProxyHeaderError::V1("line does not end with CRLF"));
    }
    if buf[..lf - 1].contains(&b'\r') {
        return Err(ProxyHeaderError::V1("CR not followed by LF"));
    }
    let line = std::str::from_utf8(&buf[PREFIX.len()..lf - 1])
        .map_err(|_| ProxyHeaderError::V1("not ASCII"))?;
    if line.starts_with("UNKNOWN") {
        // "the receiver must ignore anything presented before the CRLF".
        return Ok(Parsed::Complete(Header::Local, len));
    }
    let mut fields = line.split(' ');
    let family = fields.next().unwrap_or("");
    let (src, dst, sport, dport) = match (
        fields.next(),
        fields.next(),
        fields.next(),
        fields.next(),
        fields.next(),
    ) {
        (Some(a), Some(b), Some(c), Some(d), None) => (a, b, c, d),
        _ => return Err(ProxyHeaderError::V1("expected 5 fields")),
    };
    let ip = |s: &str| -> Result<IpAddr, ProxyHeaderError> {
        match family {
            "TCP4" => s
                .parse::<Ipv4Addr>()
                .map(IpAddr::V4)
                .map_err(|_| ProxyHeaderError::V1("bad IPv4 address")),
            "TCP6" => s
                .parse::<Ipv6Addr>()
                .map(IpAddr::V6)
                .map_err(|_| ProxyHeaderError::V1("bad IPv6 address")),
            _ => Err(ProxyHeaderError::V1(
                "protocol is not TCP4, TCP6 or UNKNOWN",
            )),
        }
    };
    let source = SocketAddr::new(ip(src)?, port(sport)?);
    let destination = SocketAddr::new(ip(dst)?, port(dport)?);
    Ok(Parsed::Complete(
        Header::Proxied {
            source,
            destination,
        },
        len,
    ))
}

/// A v1 port: 1 to 5 decimal digits, no leading zero, at most 65535.
fn port(s: &str) -> Result<u16, ProxyHeaderError> {
    let ok = !s.is_empty()
        && s.len() <= 5
        && s.bytes().all(|b| b.is_ascii_digit())
        && (s == "0" || !s.starts_with('0'));
    if !ok {
        return Err(ProxyHeaderError::V1("bad port"));
    }
    s.parse::<u16>()
        .map_err(|_| ProxyHeaderError::V1("port above 65535"))
}

fn parse_v2(buf: &[u8]) -> Result<Parsed, ProxyHeaderError> {
    let n = buf.len().min(V2_SIG.len());
    if buf[..n] != V2_SIG[..n] {
        return Err(ProxyHeaderError::Missing);
    }
    if buf.len() >= 13 && buf[12] >> 4 != 2 {
        return Err(ProxyHeaderError::V2("version is not 2"));
    }
    if buf.len() < 16 {
        return Ok(Parsed::Incomplete);
    }
    let command = buf[12] & 0x0f;
    let (family, transport) = (buf[13] >> 4, buf[13] & 0x0f);
    let body = u16::from_be_bytes([buf[14], buf[15]]) as usize;
    let len = 16 + body;
    if len > V2_MAX {
        return Err(ProxyHeaderError::V2TooLong);
    }
    if command > 1 {
        return Err(ProxyHeaderError::V2("command is neither LOCAL nor PROXY"));
    }
    if family > 3 || transport > 2 {
        return Err(ProxyHeaderError::V2("unknown address family or transport"));
    }
    let need = match family {
        1 => 12,
        2 => 36,
        3 => 216,
        _ => 0,
    };
    if body < need {
        return Err(ProxyHeaderError::V2("length shorter than its addresses"));
    }
    if buf.len() < len {
        return Ok(Parsed::Incomplete);
    }
    // LOCAL: "the receiver must accept this connection as valid and must
    // use the real connection endpoints and discard the protocol block".
    if command == 0 {
        return Ok(Parsed::Complete(Header::Local, len));
    }
    if transport == 2 {
        return Err(ProxyHeaderError::V2(
            "a datagram transport on a TCP listener",
        ));
    }
    let a = &buf[16..];
    let header = match family {
        1 => {
            let ip = |o: usize| IpAddr::from([a[o], a[o + 1], a[o + 2], a[o + 3]]);
            let p = |o: usize| u16::from_be_bytes([a[o], a[o + 1]]);
            Header::Proxied {
                source: SocketAddr::new(ip(0), p(8)),
                destination: SocketAddr::new(ip(4), p(10)),
            }
        }
        2 => {
            let ip = |o: usize| {
                let mut b = [0u8; 16];
                b.copy_from_slice(&a[o..o + 16]);
                IpAddr::from(b)
            };
            let p = |o: usize| u16::from_be_bytes([a[o], a[o + 1]]);
            Header::Proxied {
                source: SocketAddr::new(ip(0), p(32)),
                destination: SocketAddr::new(ip(16), p(34)),
            }
        }
        // UNSPEC or UNIX: no IP address to use; the real endpoints stand.
        _ => Header::Local,
    };
    Ok(Parsed::Complete(header, len))
}

/// How long the header may take when `header_timeout` is off: it is
/// always bounded (a balancer sends it at once).
pub const UNSET_LIMIT: Duration = Duration::from_secs(10);

/// Reads the header at the start of `stream` within `limit`
/// (`header_timeout`; [`UNSET_LIMIT`] when off), consuming exactly its
/// bytes: the client's address it names (or `peer`, for a
/// `LOCAL`/`UNKNOWN` header).
pub async fn read_header(
    stream: &mut monoio::net::TcpStream,
    peer: SocketAddr,
    limit: Option<Duration>,
) -> Result<SocketAddr, ProxyHeaderError> {
    let limit = limit.unwrap_or(UNSET_LIMIT);
    match monoio::time::timeout(limit, read_header_bytes(stream)).await {
        Ok(Ok(Header::Proxied { source, .. })) => Ok(source),
        Ok(Ok(Header::Local)) => Ok(peer),
        Ok(Err(e)) => Err(e),
        Err(_) => Err(ProxyHeaderError::Timeout),
    }
}

async fn read_header_bytes(
    stream: &mut monoio::net::TcpStream,
) -> Result<Header, ProxyHeaderError> {
    use monoio::io::AsyncReadRentExt as _;
    // The header's bytes read so far, and a view of what waits behind them
    // (a connection on a proxied listener costs these two small buffers
    // while its header is read; the accept path, not the request path).
    let mut taken: Vec<u8> = Vec::with_capacity(PEEK);
    let mut seen: Vec<u8> = Vec::with_capacity(PEEK);
    loop {
        stream
            .readable(false)
            .await
            .map_err(|e| ProxyHeaderError::Io(e.kind()))?;
        // A window at a time: all of v1 and the usual v2 (addresses and a
        // few TLVs) in one look; a longer v2 header takes more rounds.
        let room = (V2_MAX - taken.len()).min(PEEK);
        seen.clear();
        seen.extend_from_slice(&taken);
        seen.resize(taken.len() + room, 0);
        let n = match peek(stream, &mut seen[taken.len()..]) {
            Ok(0) => return Err(ProxyHeaderError::Closed),
            Ok(n) => n,
            Err(e) if e.kind() == std::io::ErrorKind::WouldBlock => continue,
            Err(e) if e.kind() == std::io::ErrorKind::Interrupted => continue,
            Err(e) => return Err(ProxyHeaderError::Io(e.kind())),
        };
        seen.truncate(taken.len() + n);
        // Consume exactly what belongs to the header: all of what waits
        // when the header is not complete yet (a valid prefix is all
        // header), else up to its end. The bytes are already queued, so
        // the read returns at once.
        let (parsed, upto) = match parse(&seen)? {
            Parsed::Complete(h, len) => (Some(h), len),
            Parsed::Incomplete => (None, seen.len()),
        };
        let want = upto - taken.len();
        let (r, got) = stream.read_exact(vec![0u8; want]).await;
        r.map_err(|e| match e.kind() {
            std::io::ErrorKind::UnexpectedEof => ProxyHeaderError::Closed,
            k => ProxyHeaderError::Io(k),
        })?;
        taken.extend_from_slice(&got);
        if let Some(h) = parsed {
            return Ok(h);
        }
    }
}

/// `recv(MSG_PEEK | MSG_DONTWAIT)` into `buf`: what waits, left queued.
fn peek(sock: &impl std::os::fd::AsRawFd, buf: &mut [u8]) -> std::io::Result<usize> {
    // SAFETY: recv(2) on the descriptor `sock` owns (borrowed for the
    // call) into `buf`, valid for `buf.len()` bytes; MSG_PEEK leaves the
    // bytes queued, MSG_DONTWAIT keeps the core from blocking.
    let n = unsafe {
        libc::recv(
            sock.as_raw_fd(),
            buf.as_mut_ptr().cast(),
            buf.len(),
            libc::MSG_PEEK | libc::MSG_DONTWAIT,
        )
    };
    if n < 0 {
        Err(std::io::Error::last_os_error())
    } else {
        Ok(n as usize)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    fn sa(s: &str) -> SocketAddr {
        s.parse().unwrap()
    }

    fn v2(command: u8, fam: u8, body: &[u8]) -> Vec<u8> {
        let mut b = V2_SIG.to_vec();
        b.push(0x20 | command);
        b.push(fam);
        b.extend_from_slice(&(body.len() as u16).to_be_bytes());
        b.extend_from_slice(body);
        b
    }

    #[test]
    fn v1_tcp4_tcp6_and_unknown() {
        let h = b"PROXY TCP4 192.0.2.7 10.0.0.1 56324 443\r\nGET / HTTP/1.1\r\n";
        assert_eq!(
            parse(h),
            Ok(Parsed::Complete(
                Header::Proxied {
                    source: sa("192.0.2.7:56324"),
                    destination: sa("10.0.0.1:443")
                },
                41
            ))
        );
        let h = b"PROXY TCP6 2001:db8::1 ::1 65535 80\r\n";
        assert_eq!(
            parse(h),
            Ok(Parsed::Complete(
                Header::Proxied {
                    source: sa("[2001:db8::1]:65535"),
                    destination: sa("[::1]:80")
                },
                h.len()
            ))
        );
        assert_eq!(
            parse(b"PROXY UNKNOWN\r\n"),
            Ok(Parsed::Complete(Header::Local, 15))
        );
        assert_eq!(
            parse(b"PROXY UNKNOWN ffff::1 ::1 1 2\r\nx"),
            Ok(Parsed::Complete(Header::Local, 31))
        );
    }

    #[test]
    fn v1_prefixes_are_incomplete_and_junk_is_refused_at_once() {
        let h = b"PROXY TCP4 192.0.2.7 10.0.0.1 56324 443\r\n";
        for i in 0..h.len() {
            assert_eq!(parse(&h[..i]), Ok(Parsed::Incomplete), "{i}");
        }
        for bad in [
            &b"GET / HTTP/1.1\r\n"[..],
            b"PROXX",
            b"\x16\x03\x01",
            b"PROXY TCP4 1.2.3.4 5.6.7.8 1 2\n",
            b"PROXY TCP4 1.2.3.4 5.6.7.8 1 2 3\r\n",
            b"PROXY TCP4 1.2.3.4  5.6.7.8 1 2\r\n",
            b"PROXY TCP4 ::1 ::1 1 2\r\n",
            b"PROXY TCP6 1.2.3.4 5.6.7.8 1 2\r\n",
            b"PROXY UDP4 1.2.3.4 5.6.7.8 1 2\r\n",
            b"PROXY TCP4 1.2.3.4 5.6.7.8 01 2\r\n",
            b"PROXY TCP4 1.2.3.4 5.6.7.8 65536 2\r\n",
            b"PROXY TCP4 1.2.3.4 5.6.7.8 -1 2\r\n",
            b"PROXY TCP4 1.2.3.4\rX",
        ] {
            assert!(parse(bad).is_err(), "{:?}", String::from_utf8_lossy(bad));
        }
        let long = [&b"PROXY UNKNOWN "[..], &[b'a'; 100][..]].concat();
        assert_eq!(parse(&long), Err(ProxyHeaderError::V1TooLong));
    }

    #[test]
    fn v2_inet_inet6_local_and_tlvs() {
        let mut body = vec![192, 0, 2, 7, 10, 0, 0, 1];
        body.extend_from_slice(&56324u16.to_be_bytes());
        body.extend_from_slice(&443u16.to_be_bytes());
        let h = v2(1, 0x11, &body);
        assert_eq!(
            parse(&h),
            Ok(Parsed::Complete(
                Header::Proxied {
                    source: sa("192.0.2.7:56324"),
                    destination: sa("10.0.0.1:443")
                },
                28
            ))
        );
        // TLVs after the addresses are skipped with the length.
        let mut with_tlv = body.clone();
        with_tlv.extend_from_slice(&[0x05, 0x00, 0x02, b'i', b'd']);
        let h2 = v2(1, 0x11, &with_tlv);
        assert!(matches!(parse(&h2), Ok(Parsed::Complete(_, 33))));
        let mut six = [0u8; 36];
        six[15] = 1; // ::1
        six[31] = 2; // ::2
        six[32..34].copy_from_slice(&8080u16.to_be_bytes());
        six[34..36].copy_from_slice(&80u16.to_be_bytes());
        assert_eq!(
            parse(&v2(1, 0x21, &six)),
            Ok(Parsed::Complete(
                Header::Proxied {
                    source: sa("[::1]:8080"),
                    destination: sa("[::2]:80")
                },
                52
            ))
        );
        // LOCAL (a health check): the real endpoints stand.
        assert_eq!(
            parse(&v2(0, 0x00, &[])),
            Ok(Parsed::Complete(Header::Local, 16))
        );
        assert_eq!(
            parse(&v2(1, 0x00, &[])),
            Ok(Parsed::Complete(Header::Local, 16))
        );
        for i in 0..h.len() {
            assert_eq!(parse(&h[..i]), Ok(Parsed::Incomplete), "{i}");
        }
    }

    #[test]
    fn v2_refusals() {
        let body = [0u8; 12];
        let mut bad_version = v2(1, 0x11, &body);
        bad_version[12] = 0x11;
        assert!(parse(&bad_version).is_err());
        assert!(parse(&v2(2, 0x11, &body)).is_err(), "command 2");
        assert!(parse(&v2(1, 0x41, &body)).is_err(), "family 4");
        assert!(parse(&v2(1, 0x12, &body)).is_err(), "UDP");
        assert!(parse(&v2(1, 0x11, &body[..8])).is_err(), "short");
        let mut huge = V2_SIG.to_vec();
        huge.extend_from_slice(&[0x21, 0x11, 0xff, 0xff]);
        assert_eq!(parse(&huge), Err(ProxyHeaderError::V2TooLong));
        assert_eq!(parse(b"\r\n\r\n\0\r\nQUIX"), Err(ProxyHeaderError::Missing));
    }

    proptest! {
        /// Whatever the bytes: no panic; a complete header's length is
        /// within the bounds and what it claims; any prefix of a complete
        /// header is incomplete or the same verdict (never a different
        /// header); a refusal stays a refusal as more bytes come.
        #[test]
        fn parse_is_total_bounded_and_prefix_stable(
            bytes in prop_oneof![
                proptest::collection::vec(any::<u8>(), 0..300),
                (any::<[u8; 4]>(), any::<[u8; 4]>(), any::<u16>(), any::<u16>(),
                 proptest::collection::vec(any::<u8>(), 0..40))
                    .prop_map(|(s, d, sp, dp, tail)| {
                        let mut b = format!(
                            "PROXY TCP4 {} {} {sp} {dp}\r\n",
                            std::net::Ipv4Addr::from(s), std::net::Ipv4Addr::from(d)
                        ).into_bytes();
                        b.extend(tail);
                        b
                    }),
                (any::<u8>(), any::<u8>(), proptest::collection::vec(any::<u8>(), 0..80),
                 proptest::collection::vec(any::<u8>(), 0..20))
                    .prop_map(|(c, f, body, tail)| {
                        let mut b = v2(c & 0x0f, f, &body);
                        b.extend(tail);
                        b
                    }),
            ]
        ) {
            let full = parse(&bytes);
            if let Ok(Parsed::Complete(h, len)) = full {
                prop_assert!(len <= bytes.len() && len <= V2_MAX);
                prop_assert!(bytes[0] != b'P' || len <= V1_MAX);
                prop_assert_eq!(parse(&bytes[..len]), Ok(Parsed::Complete(h, len)));
                for i in 0..len {
                    prop_assert_eq!(parse(&bytes[..i]), Ok(Parsed::Incomplete));
                }
            }
            if full.is_err() {
                let mut more = bytes.clone();
                more.extend_from_slice(b"\r\n\r\n more bytes");
                prop_assert!(parse(&more).is_err());
            }
        }
    }
}

#[cfg(test)]
mod io_tests {
    use super::*;
    use monoio::io::{AsyncReadRent, AsyncReadRentExt, AsyncWriteRentExt};

    /// A client that writes `parts` one by one; returns what the server
    /// side read after the header, and the header's verdict.
    async fn exchange(
        parts: Vec<&'static [u8]>,
        after: usize,
    ) -> (Result<SocketAddr, ProxyHeaderError>, Vec<u8>) {
        let l = monoio::net::TcpListener::bind("127.0.0.1:0").unwrap();
        let addr = l.local_addr().unwrap();
        monoio::spawn(async move {
            let mut c = monoio::net::TcpStream::connect(addr).await.unwrap();
            let _ = c.set_nodelay(true);
            for p in parts {
                let (r, _) = c.write_all(p.to_vec()).await;
                r.unwrap();
            }
            // Held open until the server is done (its read ends it).
            let _ = c.read(vec![0u8; 1]).await;
        });
        let (mut s, peer) = l.accept().await.unwrap();
        let got = read_header(&mut s, peer, Some(Duration::from_secs(5))).await;
        let mut rest = vec![0u8; after];
        if after > 0 {
            let (r, b) = s.read_exact(rest).await;
            r.unwrap();
            rest = b;
        }
        (got, rest)
    }

    #[monoio::test_all(timer_enabled = true)]
    async fn the_header_is_consumed_exactly_and_the_stream_follows() {
        let (got, rest) = exchange(
            vec![
                b"PROXY TCP4 203.0.113.9 ",
                b"127.0.0.1 5000 80\r\nGET / HTTP/1.1\r\n",
            ],
            16,
        )
        .await;
        assert_eq!(got, Ok("203.0.113.9:5000".parse().unwrap()));
        assert_eq!(rest, b"GET / HTTP/1.1\r\n");
        let v2: &'static [u8] = b"\r\n\r\n\0\r\nQUIT\n\x21\x11\x00\x0c\xc6\x33\x64\x07\x7f\x00\x00\x01\x04\xd2\x00\x50\x16\x03";
        let (got, rest) = exchange(vec![&v2[..10], &v2[10..]], 2).await;
        assert_eq!(got, Ok("198.51.100.7:1234".parse().unwrap()));
        assert_eq!(
            rest, b"\x16\x03",
            "a TLS ClientHello's first bytes untouched"
        );
    }

    #[monoio::test_all(timer_enabled = true)]
    async fn a_v2_header_longer_than_one_look_is_read_whole() {
        // 12 address bytes and a 588-byte TLV: 616 bytes, three looks.
        let mut body = vec![203, 0, 113, 9, 127, 0, 0, 1, 0x9c, 0x41, 0x00, 0x50];
        body.extend_from_slice(&[0x05, 0x02, 0x49]);
        body.extend(std::iter::repeat_n(b'u', 585));
        let mut h = b"\r\n\r\n\0\r\nQUIT\n\x21\x11".to_vec();
        h.extend_from_slice(&(body.len() as u16).to_be_bytes());
        h.extend_from_slice(&body);
        h.extend_from_slice(b"GET");
        let h: &'static [u8] = Box::leak(h.into_boxed_slice());
        let (got, rest) = exchange(vec![h], 3).await;
        assert_eq!(got, Ok("203.0.113.9:40001".parse().unwrap()));
        assert_eq!(rest, b"GET");
    }

    #[monoio::test_all(timer_enabled = true)]
    async fn no_header_or_a_short_one_is_refused() {
        let (got, _) = exchange(vec![b"GET / HTTP/1.1\r\n\r\n"], 0).await;
        assert_eq!(got, Err(ProxyHeaderError::Missing));
        let l = monoio::net::TcpListener::bind("127.0.0.1:0").unwrap();
        let addr = l.local_addr().unwrap();
        monoio::spawn(async move {
            let mut c = monoio::net::TcpStream::connect(addr).await.unwrap();
            let (r, _) = c.write_all(b"PROXY TCP4".to_vec()).await;
            r.unwrap();
            // Closes with the header half sent.
        });
        let (mut s, peer) = l.accept().await.unwrap();
        let got = read_header(&mut s, peer, Some(Duration::from_secs(5))).await;
        assert_eq!(got, Err(ProxyHeaderError::Closed));
    }

    #[monoio::test_all(timer_enabled = true)]
    async fn a_silent_connection_times_out() {
        let l = monoio::net::TcpListener::bind("127.0.0.1:0").unwrap();
        let addr = l.local_addr().unwrap();
        let (tx, rx) = local_sync::oneshot::channel::<()>();
        monoio::spawn(async move {
            let _c = monoio::net::TcpStream::connect(addr).await.unwrap();
            let _ = rx.await; // silent until the server gave up
        });
        let (mut s, peer) = l.accept().await.unwrap();
        let got = read_header(&mut s, peer, Some(Duration::from_millis(50))).await;
        assert_eq!(got, Err(ProxyHeaderError::Timeout));
        drop(tx);
    }
}
