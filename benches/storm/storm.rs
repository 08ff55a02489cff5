//! `anp-storm`: many tunnels of distinct identities in one process, for the
//! reconnect-storm bench (`benches/storm.py`) and its end-to-end test
//! (`tests/reconnect_storm_e2e.rs`).
//!
//! A real receiver is one process per identity (a runtime per core, an
//! upstream pool, a signal thread): 10,000 of them do not fit on a test
//! machine. This tool opens `--tunnels N` tunnels, tunnel `i` authenticated
//! with the bearer token `{token_prefix}{i}` (so N identities), answers
//! every ANPX request itself (`200`, body `storm:{i}:{path}`: no app behind
//! it), and reconnects exactly as a receiver slot does: the same
//! `anp_proxy::receiver::backoff` policy (a draining gateway's spread, a
//! refusal's Retry-After, exponential backoff with jitter). What it does
//! not do that a receiver does: call an app, stream, or drain on SIGTERM.
//!
//! Every 100 ms it prints a line when something changed:
//! `storm t_ms=… up=… handshakes=… refused=… going_away=… down=…`
//! (`up`: tunnels open now; the counters count since start).
//!
//! Example: `anp-storm --gateway 127.0.0.1:8089 --tunnels 10000 --token-prefix storm-token-`

use std::io::Write as _;
use std::net::SocketAddr;
use std::rc::Rc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use bytes::BytesMut;
use clap::Parser;
use monoio::io::AsyncWriteRentExt;
use monoio::net::TcpStream;

use anp_proxy::protocol::anpx::{self, FrameType, MetaRef};
use anp_proxy::receiver::backoff::{self, Backoff, Ended};
use anp_proxy::ws::{self, Decoder, Event, Limits, OpCodeKind, Role};

#[derive(Parser, Debug, Clone)]
#[command(
    name = "anp-storm",
    about = "Many token-authenticated tunnels in one process"
)]
struct Args {
    /// The gateway's tunnel address, host:port (plain ws).
    #[arg(long)]
    gateway: SocketAddr,
    /// Tunnels to keep open, one identity each.
    #[arg(long, default_value_t = 1000)]
    tunnels: usize,
    /// Tunnel i authenticates with the token `{prefix}{i}`.
    #[arg(long, default_value = "storm-token-")]
    token_prefix: String,
    /// Runtimes (threads).
    #[arg(long, default_value_t = 2)]
    threads: usize,
    /// Ceiling of the reconnect backoff, seconds (`reconnect_max_delay`).
    #[arg(long, default_value_t = 30.0)]
    reconnect_max: f64,
    /// Tunnels dialled per millisecond at start (a first start is not the
    /// storm being measured; this keeps it from being one).
    #[arg(long, default_value_t = 5)]
    start_rate: usize,
    /// Reconnect like receivers before issue 17 did: within 100 ms of a
    /// 1001 whatever the gateway asks, and ignoring Retry-After (the
    /// bench's "before").
    #[arg(long)]
    legacy: bool,
}

#[derive(Default)]
struct Counters {
    up: AtomicU64,
    handshakes: AtomicU64,
    refused: AtomicU64,
    going_away: AtomicU64,
    down: AtomicU64,
}

fn main() {
    let args = Args::parse();
    raise_fd_limit();
    let counters = Arc::new(Counters::default());
    let t0 = Instant::now();
    for t in 0..args.threads.max(1) {
        let args = args.clone();
        let c = counters.clone();
        std::thread::Builder::new()
            .name(format!("storm-{t}"))
            .spawn(move || {
                let mut rt = monoio::RuntimeBuilder::<monoio::FusionDriver>::new()
                    .enable_timer()
                    .build()
                    .expect("runtime");
                rt.block_on(async move {
                    let args = Rc::new(args);
                    let mut tasks = Vec::new();
                    let threads = args.threads.max(1);
                    let mut i = t;
                    while i < args.tunnels {
                        let (args, c) = (args.clone(), c.clone());
                        // Staggered first dial: start_rate per ms in all.
                        let at = Duration::from_micros(
                            (i as u64 * 1000) / args.start_rate.max(1) as u64,
                        );
                        tasks.push(monoio::spawn(async move {
                            monoio::time::sleep(at).await;
                            slot(&args, i, &c).await
                        }));
                        i += threads;
                    }
                    for task in tasks {
                        task.await;
                    }
                });
            })
            .expect("thread");
    }
    let mut last = String::new();
    loop {
        std::thread::sleep(Duration::from_millis(100));
        let g = |a: &AtomicU64| a.load(Ordering::Relaxed);
        let now = format!(
            "up={} handshakes={} refused={} going_away={} down={}",
            g(&counters.up),
            g(&counters.handshakes),
            g(&counters.refused),
            g(&counters.going_away),
            g(&counters.down)
        );
        if now != last {
            let mut out = std::io::stdout().lock();
            let _ = writeln!(out, "storm t_ms={} {now}", t0.elapsed().as_millis());
            let _ = out.flush();
            last = now;
        }
    }
}

/// Keeps tunnel `i` up forever, as a receiver slot does.
async fn slot(args: &Args, i: usize, c: &Counters) {
    let mut b = Backoff::new(Duration::from_secs_f64(args.reconnect_max));
    let token = format!("{}{i}", args.token_prefix);
    loop {
        let started = Instant::now();
        let ended = tunnel(args.gateway, &token, i, c).await;
        if started.elapsed() > Duration::from_secs(10) {
            b.reset();
        }
        match ended {
            Ended::GoingAway { .. } => c.going_away.fetch_add(1, Ordering::Relaxed),
            Ended::Refused { .. } => c.refused.fetch_add(1, Ordering::Relaxed),
            Ended::Down => c.down.fetch_add(1, Ordering::Relaxed),
        };
        let ended = match ended {
            Ended::GoingAway { .. } if args.legacy => Ended::GoingAway {
                spread: anp_proxy::protocol::reconnect::MIN_SPREAD,
            },
            Ended::Refused { .. } if args.legacy => Ended::Refused { retry_after: None },
            e => e,
        };
        monoio::time::sleep(b.next(ended, rand::random::<f64>())).await;
    }
}

const MASK: Option<[u8; 4]> = Some([0x5a, 0x17, 0xc3, 0x9e]);

/// One tunnel's life: dial, upgrade, serve until it ends; how it ended.
async fn tunnel(gw: SocketAddr, token: &str, i: usize, c: &Counters) -> Ended {
    let Ok(mut io) = TcpStream::connect(gw).await else {
        return Ended::Down;
    };
    let _ = io.set_nodelay(true);
    let key = ws::client_key();
    let auth = format!("Bearer {token}");
    let mut req = Vec::with_capacity(256);
    ws::write_client_request(
        &mut req,
        &gw.to_string(),
        "/ws",
        &key,
        &[("Authorization", auth.as_str())],
    );
    let (r, _) = io.write_all(req).await;
    if r.is_err() {
        return Ended::Down;
    }
    let mut buf = BytesMut::with_capacity(4096);
    let resp = loop {
        match ws::parse_server_response(&buf, &key) {
            Ok(Some(r)) => break r,
            Ok(None) => {}
            Err(_) => return Ended::Down,
        }
        if !read_more(&mut io, &mut buf).await {
            return Ended::Down;
        }
    };
    if !resp.is_upgrade() {
        let retry_after = resp
            .header("retry-after")
            .and_then(backoff::parse_retry_after);
        return Ended::Refused { retry_after };
    }
    let _ = buf.split_to(resp.head_len);
    c.handshakes.fetch_add(1, Ordering::Relaxed);
    c.up.fetch_add(1, Ordering::Relaxed);
    let ended = serve(&mut io, buf, i).await;
    c.up.fetch_sub(1, Ordering::Relaxed);
    ended
}

/// Answers requests until the tunnel closes.
async fn serve(io: &mut TcpStream, mut buf: BytesMut, i: usize) -> Ended {
    let limits = Limits {
        max_frame_payload: 2 << 20,
        max_message: 2 << 20,
        max_fragments: 1024,
    };
    let mut dec = Decoder::new(Role::Client, limits);
    loop {
        let mut out = BytesMut::new();
        loop {
            match dec.decode(&mut buf) {
                Ok(Some(Event::Binary(msg))) => answer(&msg, i, &mut out),
                Ok(Some(Event::Ping(p))) => {
                    ws::encode_raw_frame(&mut out, OpCodeKind::Pong, true, &p, MASK)
                }
                Ok(Some(Event::Close { code, reason })) => {
                    let mut bye = BytesMut::new();
                    ws::encode_raw_frame(&mut bye, OpCodeKind::Close, true, &[], MASK);
                    let _ = io.write_all(bye.to_vec()).await;
                    return match code {
                        Some(1001) => Ended::GoingAway {
                            spread: anp_proxy::protocol::reconnect::spread_of(&reason),
                        },
                        _ => Ended::Down,
                    };
                }
                Ok(Some(_)) => {}
                Ok(None) => break,
                Err(_) => return Ended::Down,
            }
        }
        if !out.is_empty() {
            let (r, _) = io.write_all(out.to_vec()).await;
            if r.is_err() {
                return Ended::Down;
            }
        }
        if !read_more(io, &mut buf).await {
            return Ended::Down;
        }
    }
}

/// A request frame gets `200 storm:{i}:{path}`, masked.
fn answer(msg: &[u8], i: usize, out: &mut BytesMut) {
    let Ok(f) = anpx::decode_frame(msg) else {
        return;
    };
    if f.ty != FrameType::Request {
        return;
    }
    let Some(id) = f.request_id else { return };
    let path = f
        .http_meta
        .and_then(|m| serde_json::from_slice::<serde_json::Value>(m).ok())
        .and_then(|m| m.get("path").and_then(|p| p.as_str()).map(str::to_owned))
        .unwrap_or_default();
    let body = format!("storm:{i}:{path}");
    let meta = br#"{"status":200,"reason":"OK","headers":{"content-type":"text/plain"}}"#;
    let mut frame = BytesMut::new();
    anpx::encode_frame(
        FrameType::Response,
        id,
        Some(MetaRef::Response(meta)),
        body.as_bytes(),
        None,
        &mut frame,
    );
    ws::encode_raw_frame(out, OpCodeKind::Binary, true, &frame, MASK);
}

async fn read_more(io: &mut TcpStream, buf: &mut BytesMut) -> bool {
    buf.reserve(4096);
    let b = std::mem::take(buf);
    let (r, b) = anp_proxy::net::read_append(io, b).await;
    *buf = b;
    matches!(r, Ok(n) if n > 0)
}

fn raise_fd_limit() {
    let mut lim = libc::rlimit {
        rlim_cur: 0,
        rlim_max: 0,
    };
    // SAFETY: getrlimit/setrlimit only read/write the struct we pass.
    unsafe {
        if libc::getrlimit(libc::RLIMIT_NOFILE, &mut lim) == 0 && lim.rlim_cur < lim.rlim_max {
            lim.rlim_cur = lim.rlim_max;
            libc::setrlimit(libc::RLIMIT_NOFILE, &lim);
        }
    }
}
