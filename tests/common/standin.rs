//! A stand-in gateway: a few lines that accept one real receiver's tunnel
//! and answer its upgrade with the features a test chooses, so a test can
//! send the receiver crafted request frames and read exactly what it sends
//! back (frame headers included) — what a plain v1 gateway, or one that
//! negotiates an extension, sees at the wire.

use std::io::{Read, Write};
use std::net::{SocketAddr, TcpListener, TcpStream};
use std::sync::mpsc;
use std::thread;

use anp_proxy::protocol::anpx::{self, FrameType, MetaRef, RequestMeta};
use anp_proxy::ws::{self, OpCodeKind, Role};
use bytes::BytesMut;

use super::procs::{Receiver, ALICE_TOKEN, START_WAIT};
use super::scripted_app::ScriptedApp;

/// Accepts one alice receiver (calling `app`) and answers its upgrade
/// with `features` in `X-ANPX-Features` (`""`: no header, plain v1).
/// Returns the tunnel socket and the receiver, connected.
pub fn accept_receiver(features: &str, app: SocketAddr) -> (TcpStream, Receiver) {
    let listener = TcpListener::bind("127.0.0.1:0").unwrap();
    let addr = listener.local_addr().unwrap();
    let (tx, accepted) = mpsc::channel();
    thread::spawn(move || {
        let _ = tx.send(listener.accept().map(|(s, _)| s));
    });
    let mut rx = Receiver::start(addr, app, ALICE_TOKEN, 1);
    let mut s = accepted
        .recv_timeout(START_WAIT)
        .expect("the receiver dials the stand-in gateway")
        .unwrap();
    s.set_read_timeout(Some(START_WAIT)).unwrap();
    let mut head = Vec::new();
    let mut byte = [0u8; 1];
    while !head.ends_with(b"\r\n\r\n") {
        assert_eq!(s.read(&mut byte).unwrap(), 1, "upgrade request cut short");
        head.push(byte[0]);
    }
    let text = String::from_utf8(head).unwrap();
    let fields: Vec<(&str, &[u8])> = text
        .split("\r\n")
        .skip(1)
        .filter_map(|l| l.split_once(':'))
        .map(|(n, v)| (n, v.trim().as_bytes()))
        .collect();
    let accept = ws::server_accept_key(&fields, "GET").expect("a valid upgrade");
    let mut out = Vec::new();
    let extra: &[(&str, &str)] = if features.is_empty() {
        &[]
    } else {
        &[("X-ANPX-Features", features)]
    };
    ws::write_101(&mut out, &accept, extra);
    s.write_all(&out).unwrap();
    rx.wait_connected(1);
    (s, rx)
}

/// A v1 `GET path` meta.
pub fn get_meta(path: &str) -> RequestMeta {
    RequestMeta {
        method: "GET".into(),
        path: path.into(),
        headers: vec![("host".into(), "t".into())],
        query: vec![],
        raw_target: None,
        header_list: None,
    }
}

/// The receiver's first binary frame (its ANPX response; pings skipped)
/// to a `GET /alice/first` from this stand-in, whose 101 answered
/// `features`; the app answers `response` (a whole HTTP response).
pub fn first_response_frame(features: &str, response: &'static [u8]) -> WireFrame {
    let app = ScriptedApp::start(move |x| {
        x.write(response);
    });
    let (mut s, _rx) = accept_receiver(features, app.addr);
    send_v1_request(&mut s, "first-1", &get_meta("/alice/first"), b"");
    loop {
        let f = read_frame(&mut s);
        if f.opcode == 2 {
            return f;
        }
    }
}

/// Sends `meta` (JSON) as one whole request frame with `request_id`.
pub fn send_v1_request(s: &mut TcpStream, request_id: &str, meta: &RequestMeta, body: &[u8]) {
    let mut json = Vec::new();
    meta.to_json(&mut json);
    let mut msg = BytesMut::new();
    anpx::encode_frame(
        FrameType::Request,
        request_id,
        Some(MetaRef::Request(&json)),
        body,
        None,
        &mut msg,
    );
    let mut frame = BytesMut::new();
    ws::encode_frame(&mut frame, Role::Server, OpCodeKind::Binary, &msg);
    s.write_all(&frame).unwrap();
}

/// One WebSocket frame as it was on the wire.
pub struct WireFrame {
    pub opcode: u8,
    /// The masking key, if the MASK bit was set.
    pub key: Option<[u8; 4]>,
    /// The payload, unmasked.
    pub payload: Vec<u8>,
    /// The payload bytes as sent (masked, if they were).
    pub sent: Vec<u8>,
}

/// Reads the next frame off the socket.
pub fn read_frame(s: &mut TcpStream) -> WireFrame {
    let mut h = [0u8; 2];
    s.read_exact(&mut h).unwrap();
    let len = match h[1] & 0x7f {
        126 => {
            let mut b = [0u8; 2];
            s.read_exact(&mut b).unwrap();
            u16::from_be_bytes(b) as usize
        }
        127 => {
            let mut b = [0u8; 8];
            s.read_exact(&mut b).unwrap();
            u64::from_be_bytes(b) as usize
        }
        n => n as usize,
    };
    let key = (h[1] & 0x80 != 0).then(|| {
        let mut k = [0u8; 4];
        s.read_exact(&mut k).unwrap();
        k
    });
    let mut sent = vec![0u8; len];
    s.read_exact(&mut sent).unwrap();
    let mut payload = sent.clone();
    if let Some(k) = key {
        for (i, b) in payload.iter_mut().enumerate() {
            *b ^= k[i & 3];
        }
    }
    WireFrame {
        opcode: h[0] & 0x0f,
        key,
        payload,
        sent,
    }
}
