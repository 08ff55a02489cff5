//! Shared pieces of the end-to-end tests: the local test [`app`], a raw
//! HTTP/1.1 [`client`], [`procs`] to run the real binary (and any other
//! process a test needs), [`sys`] to look at (and signal) the processes it
//! runs, a raw tunnel peer ([`rawpeer`]) that sends crafted frames, an app
//! whose bytes each test scripts ([`scripted_app`]), a stand-in gateway
//! that shows what a receiver sends at the wire ([`standin`]), and [`wait_until`],
//! the one polling wait.
#![allow(dead_code)]

pub mod app;
pub mod client;
pub mod load;
pub mod managed;
pub mod procs;
pub mod rawpeer;
pub mod scripted_app;
pub mod standin;
pub mod sys;
pub mod wait;

#[allow(unused_imports)]
pub use app::App;
#[allow(unused_imports)]
pub use client::{Conn, Response};
#[allow(unused_imports)]
pub use procs::{Gateway, GatewayConfig, Receiver, ALICE_TOKEN, BOB_TOKEN};
#[allow(unused_imports)]
pub use wait::wait_until;

/// The usual arrangement: one app, one gateway, one alice receiver with
/// `tunnels` tunnels, all connected.
pub struct Setup {
    pub app: App,
    pub gw: Gateway,
    pub rx: Receiver,
}

impl Setup {
    pub fn new() -> Setup {
        Setup::with(&GatewayConfig::default(), 1)
    }

    pub fn with(cfg: &GatewayConfig, tunnels: u32) -> Setup {
        let app = App::start();
        let gw = Gateway::start(cfg);
        let mut rx = Receiver::start(gw.addr, app.addr, ALICE_TOKEN, tunnels);
        rx.wait_connected(tunnels.max(1) as usize);
        Setup { app, gw, rx }
    }

    /// 3 MiB up and back (echo) and 2 MiB down: many frames each way,
    /// compared byte for byte with what was sent or what the app makes.
    pub fn large_bodies_cross_whole(&self) {
        let body = app::pattern_body(3 << 20);
        let r = client::request(self.gw.addr, "POST", "/alice/echo", &[], &body);
        assert_eq!(r.status, 200, "{}", r.summary());
        assert!(r.body == body, "the echoed body differs");
        let r = client::request(
            self.gw.addr,
            "GET",
            "/alice/big",
            &[("X-Test-Body-Len", "2097152")],
            b"",
        );
        assert_eq!(r.status, 200);
        assert!(
            r.body == app::pattern_body(2 << 20),
            "the app's body differs"
        );
    }
}
