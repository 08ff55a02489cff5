//! `anp-loadgen`: the HTTP/1.1 load generator of `make bench` (issue #4).
//!
//! A few threads, each one monoio runtime driving its share of the
//! connections as tasks (no thread per connection), each with its own
//! hdrhistogram; merged after the run. Modes:
//!
//! * closed loop (default): `-c` keep-alive connections, each sending its
//!   next request when the last answer is complete, for `-d` seconds;
//! * fixed rate (`--rate R`): R requests/s in total, spread evenly over the
//!   connections; latency is measured from each request's *intended* send
//!   time (coordinated-omission correction, as wrk2 does);
//! * open loop (`--open --rate R`): R requests/s in total sent at their
//!   intended times whatever the server does, each on an idle pooled
//!   connection or a new one (at most `--max-conns`); the overload runs
//!   (issue 12) offer 2x and 5x a target's closed-loop maximum with it;
//! * idle (`--idle N --hold S`): open N keep-alive connections, one request
//!   each, print `IDLE_READY ok=… failed=…`, hold them silent S seconds
//!   (used to measure the server's memory per idle connection).
//!
//! Results: a human summary on stderr; with `--json` one JSON object on
//! stdout (rps, p50/p90/p99/p99.9/max in µs, errors by kind).
//!
//! Example: `anp-loadgen --url http://127.0.0.1:8080/bytes/1024 -c 64 -d 10 --json`

mod conn;
mod http;
mod open;
mod stats;

use std::cell::RefCell;
use std::io::Write as _;
use std::net::{SocketAddr, ToSocketAddrs};
use std::rc::Rc;
use std::time::{Duration, Instant};

use bytes::Bytes;
use clap::Parser;

use stats::Stats;

#[derive(Parser, Debug, Clone)]
#[command(
    name = "anp-loadgen",
    about = "HTTP/1.1 load generator with hdrhistogram latencies"
)]
struct Args {
    /// Target, e.g. http://127.0.0.1:8080/bytes/1024
    #[arg(long)]
    url: String,
    /// Connections (closed and fixed-rate modes).
    #[arg(short = 'c', long, default_value_t = 64)]
    connections: usize,
    /// Measured seconds (after the warm-up).
    #[arg(short = 'd', long, default_value_t = 10.0)]
    duration: f64,
    /// Seconds of load before measuring starts.
    #[arg(long, default_value_t = 1.0)]
    warmup: f64,
    /// Fixed-rate mode: total requests per second.
    #[arg(long)]
    rate: Option<f64>,
    /// Open loop (needs `--rate`): send at the intended times whatever
    /// the server does, on as many connections as that takes.
    #[arg(long, requires = "rate")]
    open: bool,
    /// Open loop: most connections open at once, all threads together; a
    /// request due when all are busy is counted as `unsent`.
    #[arg(long, default_value_t = 4096)]
    max_conns: usize,
    /// Threads (one monoio runtime each); default: the number of cores.
    #[arg(short = 't', long)]
    threads: Option<usize>,
    /// Request body bytes (0 = GET, otherwise POST with Content-Length).
    #[arg(long, default_value_t = 0)]
    req_body: usize,
    /// Seconds before a request counts as a timeout.
    #[arg(long, default_value_t = 10.0)]
    timeout: f64,
    /// Print one JSON object on stdout.
    #[arg(long)]
    json: bool,
    /// Idle mode: connections to open and hold.
    #[arg(long)]
    idle: Option<usize>,
    /// Idle mode: seconds to hold them.
    #[arg(long, default_value_t = 10.0)]
    hold: f64,
    /// Print `WINDOW_START` and `WINDOW_END` lines on stderr when the
    /// measured window opens and closes (bench.py reads the proxies' CPU
    /// time, allocation and syscall counters at those two moments).
    #[arg(long)]
    mark_window: bool,
}

fn main() {
    let args = Args::parse();
    raise_fd_limit();
    let target = match http::Target::parse(&args.url) {
        Ok(t) => t,
        Err(e) => fail(&e),
    };
    let addr: SocketAddr = match target
        .authority
        .to_socket_addrs()
        .ok()
        .and_then(|mut a| a.next())
    {
        Some(a) => a,
        None => fail(&format!("cannot resolve {}", target.authority)),
    };
    let request = Bytes::from(http::build_request(&target, args.req_body));
    let threads = args
        .threads
        .unwrap_or_else(|| std::thread::available_parallelism().map_or(2, |n| n.get()))
        .max(1);
    if let Some(n) = args.idle {
        idle(&args, addr, request, threads, n);
        return;
    }
    let conns = args.connections.max(1);
    let start = Instant::now();
    let measure_from = start + Duration::from_secs_f64(args.warmup);
    let end = measure_from + Duration::from_secs_f64(args.duration);
    let interval = args
        .rate
        .map(|r| Duration::from_secs_f64(conns as f64 / r.max(0.001)));
    // Open loop: each thread sends its share of the rate.
    let open = args.open.then(|| {
        let rate = args.rate.unwrap_or(1.0).max(0.001);
        (
            Duration::from_secs_f64(threads as f64 / rate),
            args.max_conns.div_ceil(threads),
        )
    });
    let handles: Vec<_> = (0..threads)
        .map(|t| {
            let request = request.clone();
            let timeout = Duration::from_secs_f64(args.timeout);
            // Connection i goes to thread i % threads.
            let mine: Vec<usize> = (t..conns).step_by(threads).collect();
            std::thread::Builder::new()
                .name(format!("loadgen-{t}"))
                .spawn(move || {
                    let mut rt = runtime();
                    rt.block_on(async move {
                        let plan = Rc::new(conn::Plan {
                            addr,
                            request,
                            measure_from,
                            end,
                            timeout,
                            // Open loop paces per thread, not per connection.
                            interval: if open.is_some() { None } else { interval },
                        });
                        let stats = Rc::new(RefCell::new(Stats::new()));
                        if let Some((iv, cap)) = open {
                            let pool = Rc::new(open::Pool::new(cap));
                            // Threads start a fraction of an interval apart.
                            let offset = iv.mul_f64(t as f64 / threads as f64);
                            open::run(plan, stats.clone(), pool, iv, offset).await;
                            return Rc::try_unwrap(stats).expect("all tasks done").into_inner();
                        }
                        let tasks: Vec<_> = mine
                            .iter()
                            .map(|&i| {
                                // Stagger fixed-rate connections over one
                                // interval so sends are evenly spread.
                                let offset = interval.map_or(Duration::ZERO, |iv| {
                                    iv.mul_f64(i as f64 / conns as f64)
                                });
                                monoio::spawn(conn::run(plan.clone(), stats.clone(), offset))
                            })
                            .collect();
                        for t in tasks {
                            t.await;
                        }
                        Rc::try_unwrap(stats).expect("all tasks done").into_inner()
                    })
                })
                .expect("spawn loadgen thread")
        })
        .collect();
    if args.mark_window {
        // The workers use these same instants; this thread only waits.
        mark_at(measure_from, "WINDOW_START");
        mark_at(end, "WINDOW_END");
    }
    let mut total = Stats::new();
    for h in handles {
        total.merge(&h.join().expect("loadgen thread panicked"));
    }
    let secs = args.duration;
    let mode = if args.open {
        "open"
    } else if args.rate.is_some() {
        "fixed-rate"
    } else {
        "closed"
    };
    eprintln!(
        "{} {} c={} threads={}{}: {}",
        mode,
        args.url,
        conns,
        threads,
        args.rate.map_or(String::new(), |r| format!(" rate={r}")),
        total.summary(secs)
    );
    if args.json {
        let v = total.to_json(
            secs,
            serde_json::json!({
                "mode": mode,
                "url": args.url,
                "connections": conns,
                "threads": threads,
                "max_conns": args.open.then_some(args.max_conns),
                "target_rate": args.rate,
                "req_body_bytes": args.req_body,
            }),
        );
        println!("{v}");
    }
}

/// Prints `what` on stderr at `when` (at once if that has passed).
fn mark_at(when: Instant, what: &str) {
    std::thread::sleep(when.saturating_duration_since(Instant::now()));
    eprintln!("{what}");
}

fn idle(args: &Args, addr: SocketAddr, request: Bytes, threads: usize, n: usize) {
    let timeout = Duration::from_secs_f64(args.timeout);
    let hold = Duration::from_secs_f64(args.hold);
    let (tx, rx) = std::sync::mpsc::channel::<(usize, Stats)>();
    let handles: Vec<_> = (0..threads)
        .map(|t| {
            let request = request.clone();
            let tx = tx.clone();
            let count = (t..n).step_by(threads).count();
            std::thread::spawn(move || {
                let mut rt = runtime();
                rt.block_on(async move {
                    let mut held = Vec::with_capacity(count);
                    // `ok` = 2xx kept alive; errors by kind; a non-2xx
                    // connection kept alive is held but counted as status.
                    let mut st = Stats::new();
                    // Waves of 128 connects: 10,000 SYNs at once would
                    // overflow the accept queue and measure SYN retries.
                    let mut left = count;
                    while left > 0 {
                        let wave = left.min(128);
                        left -= wave;
                        let tasks: Vec<_> = (0..wave)
                            .map(|_| monoio::spawn(conn::open_idle(addr, request.clone(), timeout)))
                            .collect();
                        for task in tasks {
                            match task.await {
                                Ok((s, status)) => {
                                    if (200..300).contains(&status) {
                                        st.record(1, 0);
                                    } else {
                                        st.bad_status(status);
                                    }
                                    held.push(s);
                                }
                                Err(k) => st.error(k),
                            }
                        }
                    }
                    let _ = tx.send((held.len(), st));
                    monoio::time::sleep(hold).await;
                    drop(held);
                })
            })
        })
        .collect();
    drop(tx);
    let mut held = 0;
    let mut st = Stats::new();
    for (h, s) in rx.iter().take(threads) {
        held += h;
        st.merge(&s);
    }
    let failed = n - held;
    println!(
        "IDLE_READY ok={held} failed={failed} ok2xx={} connect={} status={} timeout={} io={} statuses={:?}",
        st.ok, st.connect, st.status, st.timeout, st.io, st.statuses
    );
    let _ = std::io::stdout().flush();
    eprintln!(
        "idle: holding {held} connections for {:.0}s ({failed} failed)",
        args.hold
    );
    for h in handles {
        let _ = h.join();
    }
}

type Rt = monoio::FusionRuntime<
    monoio::time::TimeDriver<monoio::IoUringDriver>,
    monoio::time::TimeDriver<monoio::LegacyDriver>,
>;

fn runtime() -> Rt {
    monoio::RuntimeBuilder::<monoio::FusionDriver>::new()
        .enable_timer()
        .build()
        .unwrap_or_else(|e| fail(&format!("cannot build runtime: {e}")))
}

/// Soft fd limit up to the hard one: idle mode holds 10,000 sockets.
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

fn fail(msg: &str) -> ! {
    eprintln!("anp-loadgen: {msg}");
    std::process::exit(2)
}
