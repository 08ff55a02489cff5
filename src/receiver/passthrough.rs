//! WebSocket pass-through, the receiver's side (PROTOCOL.md §7.6): a
//! request whose meta carries an `Upgrade` field, from a gateway that
//! negotiated `upgrade`, goes to the app on a connection of its own (never
//! the keep-alive pool) with `Connection: upgrade` and its `Upgrade` field
//! restored. A 101 goes back as chunk 0 of the response and the connection
//! then relays bytes both ways as that request's streamed bodies, under
//! the same credit as any streamed body; any other answer is relayed as
//! an ordinary response and the connection is closed.
//!
//! The request's permit (`max_concurrent`) is held only until the app's
//! answer: a stream that lasts hours must not starve ordinary requests.
//! A half-close travels both ways (the gateway's last chunk shuts the app
//! connection's write side; the app's EOF is the response's last chunk).
//!
//! Never: parsing what follows the 101 (bytes are relayed as read);
//! pooling the app connection afterwards.

use bytes::{Buf, Bytes, BytesMut};
use monoio::io::{AsyncReadRent, AsyncWriteRent, AsyncWriteRentExt, Splitable};

use crate::http::headers::HopByHop;
use crate::http::{self, ChunkedDecoder, ChunkedStep, ResponseBody};
use crate::protocol::anpx::binmeta;
use crate::protocol::stream;
use crate::receiver::sink::ResponseSink;
use crate::receiver::tunnel::CoreRx;
use crate::receiver::upstream::{write_request_head, BodyLen, ReqEvent, UpstreamError};
use crate::ws::conn::{OutTx, Outgoing};

type Rx = crate::pool::queue::Rx<ReqEvent>;

/// Limits on the app's response head (as for pooled calls).
const LIMITS: http::Limits = http::Limits {
    max_request_line: 64 * 1024,
    max_head: 256 * 1024,
    max_headers: 1000,
};

/// Is this request an upgrade (its meta names the protocol to switch to)?
/// Our gateway sends `Upgrade` only for pass-through: it is hop-by-hop
/// and stripped from every other request.
pub fn is_upgrade(meta: &binmeta::Request) -> bool {
    meta.fields()
        .any(|(n, _)| n.eq_ignore_ascii_case(b"upgrade"))
}

/// Serves one upgrade request until both directions have closed, either
/// fails, or the gateway cancels it (`cancel`: the client went away, the
/// stream idled out). A failure before the head goes back as an error
/// frame (502 at the gateway).
pub async fn serve(
    ctx: std::rc::Rc<CoreRx>,
    out: OutTx,
    meta: binmeta::Request,
    rx: Rx,
    mut sink: ResponseSink,
    cancel: crate::protocol::stream::SharedWindow,
) {
    let request_id = sink.request_id().to_owned();
    let _counted = super::InFlight::start(&ctx.counters);
    let work = async {
        let permit = ctx.permits.acquire().await;
        let conn = ctx.upstream.dedicated().await?;
        exchange(&ctx, &out, conn, permit, &meta, rx, &mut sink).await
    };
    let result = monoio::select! {
        r = work => Some(r),
        _ = cancel.cancelled() => None,
    };
    // One reading of how it ended for calls and streams alike: the
    // gateway's cancel (its client vanished) may reach the stream's
    // upload before its cancel latch, and that `Aborted` is no failure
    // either (it was warned about for about half of such clients).
    use super::{call_end, CallEnd};
    match call_end(result) {
        CallEnd::Done => {}
        CallEnd::Abandoned => {
            tracing::debug!(%request_id, "upgraded stream ended by the gateway");
        }
        CallEnd::Failed(e) => {
            let target = String::from_utf8_lossy(meta.target());
            let path = target.split('?').next().unwrap_or_default();
            tracing::warn!(%request_id, %path, error = %e, "upgraded stream failed");
            super::report_failure(&ctx, &out, &request_id, &e);
        }
    }
}

/// The head both ways, then the byte stream (or an ordinary response).
async fn exchange<S>(
    ctx: &CoreRx,
    out: &OutTx,
    mut conn: S,
    permit: crate::sync::Permit,
    meta: &binmeta::Request,
    rx: Rx,
    sink: &mut ResponseSink,
) -> Result<(), UpstreamError>
where
    S: AsyncReadRent + AsyncWriteRent + Splitable,
    S::OwnedRead: AsyncReadRent,
    S::OwnedWrite: AsyncWriteRent,
{
    let mut head = Vec::with_capacity(1024);
    write_upgrade_request(&mut head, meta, ctx.upstream.target())?;
    let mut buf = BytesMut::with_capacity(16 * 1024);
    let answer = async {
        let (r, _) = conn.write_all(head).await;
        r?;
        read_head(&mut conn, &mut buf).await
    };
    let resp = match ctx.upstream_timeout {
        Some(d) => monoio::time::timeout(d, answer)
            .await
            .map_err(|_| UpstreamError::Timeout(d))??,
        None => answer.await?,
    };
    drop(permit);
    if resp.status != 101 {
        let meta = crate::receiver::upstream::response_meta(&resp, &buf[..resp.head_len]);
        buf.advance(resp.head_len);
        return relay_response(&mut conn, &mut buf, resp.body, meta, sink, ctx.max_body).await;
    }
    let meta = upgrade_meta(&resp, &buf[..resp.head_len]);
    buf.advance(resp.head_len);
    // Bytes the app wrote right after its 101 go with it.
    sink.head(meta, buf.split().freeze(), false).await?;
    let (rd, wr) = conn.into_split();
    let request_id = sink.request_id().to_owned();
    let credit = |n: usize| {
        let _ = out.send(Outgoing::Text(stream::credit_message(&request_id, n)));
    };
    crate::sync::both(to_app(wr, rx, credit), to_gateway(rd, buf, sink)).await
}

/// The app's request head: the one an ordinary call gets (hop-by-hop
/// fields dropped), plus `Connection: upgrade` and the `Upgrade` field(s).
fn write_upgrade_request(
    out: &mut Vec<u8>,
    meta: &binmeta::Request,
    app: &crate::receiver::app_conn::AppTarget,
) -> Result<(), UpstreamError> {
    write_request_head(out, meta, BodyLen::Known(0), app)?;
    out.truncate(out.len() - 2); // the head's empty line, written again below
    out.extend_from_slice(b"connection: upgrade\r\n");
    for (name, value) in meta.fields() {
        if name.eq_ignore_ascii_case(b"upgrade")
            && !value.iter().any(|b| matches!(b, b'\r' | b'\n' | 0))
        {
            out.extend_from_slice(b"upgrade: ");
            out.extend_from_slice(value);
            out.extend_from_slice(b"\r\n");
        }
    }
    out.extend_from_slice(b"\r\n");
    Ok(())
}

/// Reads up to the app's final head: a 101, or any other final status
/// (interim 1xx before it are dropped, as for every call).
async fn read_head<S: AsyncReadRent>(
    conn: &mut S,
    buf: &mut BytesMut,
) -> Result<http::ResponseHead, UpstreamError> {
    loop {
        match http::parse_response_head(buf, &LIMITS, false) {
            Ok(Some(h)) if h.status == 101 => return Ok(h),
            Ok(Some(h)) if h.is_interim() => {
                let _ = buf.split_to(h.head_len);
                continue;
            }
            Ok(Some(h)) => return Ok(h),
            Ok(None) => {}
            Err(e) => return Err(UpstreamError::BadResponse(e.to_string())),
        }
        if !read_more(conn, buf).await? {
            return Err(UpstreamError::Closed);
        }
    }
}

/// One more read after what `buf` holds; false at EOF.
async fn read_more<S: AsyncReadRent>(
    conn: &mut S,
    buf: &mut BytesMut,
) -> Result<bool, UpstreamError> {
    crate::net::room_for_read(buf, 8 * 1024, 64 * 1024);
    let (r, b) = crate::net::read_append(conn, std::mem::take(buf)).await;
    *buf = b;
    Ok(r? > 0)
}

/// The 101's meta: the app's fields minus framing and hop-by-hop ones,
/// except `Upgrade` (the protocol switched to), which the client needs.
fn upgrade_meta(resp: &http::ResponseHead, buf: &[u8]) -> binmeta::Response {
    let fields = || {
        resp.headers
            .iter()
            .map(|h| (&buf[h.name.clone()], &buf[h.value.clone()]))
    };
    let hop = HopByHop::of(fields());
    let mut b = binmeta::Builder::response(101, &buf[resp.reason.clone()], buf.len() + 64);
    for (name, value) in fields() {
        let keep = name.eq_ignore_ascii_case(b"upgrade") || !hop.drops(name);
        if keep && !name.eq_ignore_ascii_case(b"content-length") {
            b.field(name, value);
        }
    }
    b.finish_response()
}

/// Gateway to app: each piece is written, then credited; the gateway's
/// last chunk (the client's EOF) shuts the app connection's write side.
async fn to_app<W: AsyncWriteRent>(
    mut wr: W,
    mut rx: Rx,
    credit: impl Fn(usize),
) -> Result<(), UpstreamError> {
    loop {
        match rx.recv().await {
            Some(ReqEvent::Data(d)) => {
                let n = d.len();
                if n == 0 {
                    continue;
                }
                let (r, _) = wr.write_all(d).await;
                r?;
                credit(n);
            }
            Some(ReqEvent::End) => {
                let _ = wr.shutdown().await;
                return Ok(());
            }
            // Cancelled or the tunnel is gone: the connection is dropped.
            None => return Err(UpstreamError::Aborted),
        }
    }
}

/// App to gateway: what the app writes goes as body pieces within the
/// window; its EOF is the response's last chunk.
async fn to_gateway<R: AsyncReadRent>(
    mut rd: R,
    mut buf: BytesMut,
    sink: &mut ResponseSink,
) -> Result<(), UpstreamError> {
    loop {
        if !read_more(&mut rd, &mut buf).await? {
            return sink.end().await;
        }
        sink.data(buf.split().freeze()).await?;
    }
}

/// The app declined the upgrade: its response is relayed like any other
/// (the connection is not reused afterwards).
async fn relay_response<S: AsyncReadRent>(
    conn: &mut S,
    buf: &mut BytesMut,
    body: ResponseBody,
    meta: binmeta::Response,
    sink: &mut ResponseSink,
    max: usize,
) -> Result<(), UpstreamError> {
    let too_large = |n: usize| {
        if n > max {
            Err(UpstreamError::TooLarge(max))
        } else {
            Ok(())
        }
    };
    match body {
        ResponseBody::None => sink.head(meta, Bytes::new(), true).await,
        ResponseBody::ContentLength(n) => {
            let n = usize::try_from(n).unwrap_or(usize::MAX);
            too_large(n)?;
            while buf.len() < n {
                if !read_more(conn, buf).await? {
                    return Err(UpstreamError::Closed);
                }
            }
            sink.head(meta, buf.split_to(n).freeze(), true).await
        }
        ResponseBody::Chunked => {
            let bad = |e: http::ChunkedError| UpstreamError::BadResponse(e.to_string());
            let mut dec = ChunkedDecoder::new(64 * 1024);
            let mut whole = BytesMut::new();
            loop {
                match dec.decode(buf).map_err(bad)? {
                    ChunkedStep::Data(d) => {
                        whole.extend_from_slice(&d);
                        too_large(whole.len())?;
                    }
                    ChunkedStep::Done => break,
                    ChunkedStep::NeedMore => {
                        if !read_more(conn, buf).await? {
                            return Err(UpstreamError::Closed);
                        }
                    }
                }
            }
            sink.head(meta, whole.freeze(), true).await
        }
        ResponseBody::UntilClose => {
            while read_more(conn, buf).await? {
                too_large(buf.len())?;
            }
            sink.head(meta, buf.split().freeze(), true).await
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_app_gets_connection_upgrade_and_the_101_keeps_its_upgrade() {
        let mut b = binmeta::Builder::request(b"GET", b"/chat", 256);
        b.field(b"Host", b"h");
        b.field(b"Sec-WebSocket-Key", b"k==");
        b.field(b"upgrade", b"websocket");
        let meta = b.finish_request();
        assert!(is_upgrade(&meta));
        let mut out = Vec::new();
        let url = crate::receiver::app_conn::parse("http://app").unwrap();
        let app = crate::receiver::app_conn::AppTarget::new(url, "", None).unwrap();
        write_upgrade_request(&mut out, &meta, &app).unwrap();
        assert_eq!(
            String::from_utf8(out).unwrap(),
            "GET /chat HTTP/1.1\r\nHost: h\r\nSec-WebSocket-Key: k==\r\n\
             connection: upgrade\r\nupgrade: websocket\r\n\r\n"
        );
        let plain = binmeta::Builder::request(b"GET", b"/", 64).finish_request();
        assert!(!is_upgrade(&plain));

        let raw: &[u8] = b"HTTP/1.1 101 Switching Protocols\r\nUpgrade: websocket\r\n\
            Connection: Upgrade, X-Hop\r\nX-Hop: 1\r\nSec-WebSocket-Accept: abc=\r\n\r\n";
        let resp = http::parse_response_head(raw, &LIMITS, false)
            .unwrap()
            .unwrap();
        let m = upgrade_meta(&resp, raw);
        assert_eq!(m.status(), 101);
        let fields: Vec<(&[u8], &[u8])> = m.fields().collect();
        assert_eq!(
            fields,
            [
                (&b"Upgrade"[..], &b"websocket"[..]),
                (&b"Sec-WebSocket-Accept"[..], &b"abc="[..])
            ]
        );
    }
}
