//! Which request each incoming `stream` frame belongs to, and whether it
//! may be delivered (sans-IO). Both roles keep their requests in flight in
//! a [`Demux`]: the gateway's are the requests it issued (a response must
//! name one of them), the receiver's are the requests the gateway opened.
//! It takes what a frame says (`protocol::stream::Incoming`) and returns a
//! [`Decision`]: deliver a head or a body piece, end a request with the
//! peer's error, refuse the frame (and maybe fail the request it names),
//! or ignore a late frame. It never touches a channel or a socket; the
//! role acts on the decision with the value `V` it keeps per request.
//!
//! Chunk order (PROTOCOL.md §5): chunk 0 carries the meta, then indexes
//! 1, 2, … without gaps or repeats, until `last`. A second chunk 0, a
//! chunk before chunk 0, a gap or a repeat fails the request; a frame for
//! a request that is not in this table is unknown (this includes one sent
//! on another tunnel: tables are per tunnel) or late (it crossed a cancel,
//! a timeout or the end of its request).

use std::borrow::Borrow;
use std::hash::Hash;

use crate::protocol::stream::{Incoming, RequestId};

/// How a role names its requests in the table.
pub trait RequestKey: Clone + Eq + Hash + Ord {
    /// The key for a wire `request_id`; None when it cannot be one of ours.
    /// A key that is the id itself takes the frame's string (no copy per
    /// frame); [`give_back`](Self::give_back) returns it when no decision
    /// keeps it.
    fn take(request_id: &mut RequestId) -> Option<Self>;

    fn give_back(self, _request_id: &mut RequestId) {}
}

/// The gateway's ids: 16 lowercase hex digits of a u64 it issued.
impl RequestKey for u64 {
    fn take(s: &mut RequestId) -> Option<Self> {
        crate::protocol::request_id::parse_request_id(s)
    }
}

/// The receiver's: any id the gateway chose.
impl RequestKey for RequestId {
    fn take(s: &mut RequestId) -> Option<Self> {
        Some(std::mem::take(s))
    }

    fn give_back(self, s: &mut RequestId) {
        *s = self;
    }
}

/// Where a request's incoming message stands.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Phase {
    /// Issued; its head (chunk 0 or a whole message) has not come.
    AwaitingHead,
    /// Chunk 0 came; `next` is the index expected next. `unacked`: bytes
    /// delivered and not credited back yet.
    Body { next: u32, unacked: usize },
    /// The incoming message is complete; the request may still be working
    /// (the receiver answers it), but no frame for it is expected.
    Complete,
}

/// Why a frame is refused (counted by the gateway, logged by both).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Refusal {
    /// Names no request in this table.
    UnknownRequest,
    /// A chunk repeated, skipped, before chunk 0, or a second head.
    ChunkOrder,
    /// The peer overran its flow-control window.
    Window,
    /// A request id already in flight opened again (receiver).
    Duplicate,
}

/// What to do with one incoming frame.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Decision<K> {
    /// Deliver the head (meta and first body bytes). `complete`: the
    /// message ends with it.
    Head { key: K, complete: bool },
    /// A new request from the peer (receiver): the role inserts it with
    /// [`Demux::insert`]. `complete`: its body is all here.
    Open { key: K, complete: bool },
    /// Deliver a body piece; `last`: the message ends with it.
    Data { key: K, last: bool },
    /// The peer's error frame ends request `key`.
    PeerError { key: K },
    /// Refuse the frame (log and count it, `what` says why); `fail`: the
    /// request it names can no longer complete and must fail.
    Refuse {
        why: Refusal,
        fail: Option<K>,
        what: &'static str,
    },
    /// A frame for a request that is over or unknown in a way that happens
    /// normally (a late chunk after a cancel): drop it, count nothing.
    Late { what: &'static str },
}

/// Who opens the requests in the table.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Opener {
    /// This side (the gateway): a frame must answer a request we issued.
    Us,
    /// The peer (the receiver): chunk 0 or a whole message opens one.
    Peer,
}

/// `key` lies within the issued range (`Demux::issued`).
fn issued_between<K: Ord>(issued: &Option<(K, K)>, key: &K) -> bool {
    issued
        .as_ref()
        .is_some_and(|(lo, hi)| lo <= key && key <= hi)
}

/// The requests in flight on one tunnel, with the role's value for each.
#[derive(Debug)]
pub struct Demux<K, V> {
    opener: Opener,
    /// Most bytes a peer may send beyond the credit it got (`Window`).
    max_unacked: usize,
    streams: crate::FastMap<K, (Phase, V)>,
    /// The lowest and highest key issued here (`Opener::Us`). An issuer's
    /// keys grow, so a response naming one between them that is no longer
    /// in the table answers a request that ended here first (its client
    /// left, a timeout): late, not unknown. Another tunnel's key inside
    /// the range is taken for late too; the frame is dropped either way.
    issued: Option<(K, K)>,
}

impl<K: RequestKey, V> Demux<K, V> {
    pub fn new(opener: Opener, max_unacked: usize) -> Self {
        Self {
            opener,
            max_unacked,
            streams: crate::FastMap::default(),
            issued: None,
        }
    }

    /// A request we issued; its answer is expected.
    pub fn expect(&mut self, key: K, value: V) {
        self.issued = Some(match self.issued.take() {
            None => (key.clone(), key.clone()),
            Some((lo, hi)) => (lo.min(key.clone()), hi.max(key.clone())),
        });
        self.streams.insert(key, (Phase::AwaitingHead, value));
    }

    /// `key` was issued here and its request has ended (see `issued`).
    pub fn ended(&self, key: &K) -> bool {
        issued_between(&self.issued, key) && !self.streams.contains_key(key)
    }

    /// A request the peer opened (after [`Decision::Open`]).
    pub fn insert(&mut self, key: K, value: V, complete: bool) {
        let phase = if complete {
            Phase::Complete
        } else {
            Phase::Body {
                next: 1,
                unacked: 0,
            }
        };
        self.streams.insert(key, (phase, value));
    }

    pub fn get<Q>(&self, key: &Q) -> Option<&V>
    where
        K: Borrow<Q>,
        Q: Hash + Eq + ?Sized,
    {
        self.streams.get(key).map(|(_, v)| v)
    }

    pub fn get_mut<Q>(&mut self, key: &Q) -> Option<&mut V>
    where
        K: Borrow<Q>,
        Q: Hash + Eq + ?Sized,
    {
        self.streams.get_mut(key).map(|(_, v)| v)
    }

    pub fn remove<Q>(&mut self, key: &Q) -> Option<V>
    where
        K: Borrow<Q>,
        Q: Hash + Eq + ?Sized,
    {
        self.streams.remove(key).map(|(_, v)| v)
    }

    pub fn len(&self) -> usize {
        self.streams.len()
    }

    pub fn is_empty(&self) -> bool {
        self.streams.is_empty()
    }

    /// Takes every request out (the tunnel ended).
    pub fn drain(&mut self) -> Vec<(K, V)> {
        self.streams.drain().map(|(k, (_, v))| (k, v)).collect()
    }

    /// The consumer returned `n` bytes of credit for `key`.
    pub fn credited(&mut self, key: &K, n: usize) {
        if let Some((Phase::Body { unacked, .. }, _)) = self.streams.get_mut(key) {
            *unacked = unacked.saturating_sub(n);
        }
    }

    /// Decides what `frame` means. Updates the phase; never removes an
    /// entry (the role removes it when it is done with the value).
    pub fn decide(&mut self, frame: &mut Incoming) -> Decision<K> {
        match frame {
            Incoming::Whole { request_id, .. } => self.head(request_id, true, 0),
            Incoming::Start {
                request_id,
                body,
                last,
                ..
            } => self.head(request_id, *last, body.len()),
            Incoming::More {
                request_id,
                idx,
                body,
                last,
            } => self.more(request_id, *idx, body.len(), *last),
            Incoming::Error { request_id, .. } => match K::take(request_id) {
                Some(key) if self.streams.contains_key(&key) => Decision::PeerError { key },
                other => {
                    if let Some(k) = other {
                        k.give_back(request_id);
                    }
                    Decision::Late {
                        what: "error frame for a request not in flight",
                    }
                }
            },
        }
    }

    fn head(&mut self, request_id: &mut RequestId, complete: bool, len: usize) -> Decision<K> {
        let unknown = Decision::Refuse {
            why: Refusal::UnknownRequest,
            fail: None,
            what: "message for a request not in flight on this tunnel",
        };
        let Some(key) = K::take(request_id) else {
            return unknown;
        };
        let next = if complete {
            Phase::Complete
        } else {
            Phase::Body {
                next: 1,
                unacked: len,
            }
        };
        match (self.opener, self.streams.get_mut(&key)) {
            (Opener::Peer, None) => Decision::Open { key, complete },
            (Opener::Peer, Some(_)) => {
                key.give_back(request_id);
                Decision::Refuse {
                    why: Refusal::Duplicate,
                    fail: None,
                    what: "request id already in flight",
                }
            }
            // Not in the table: no second lookup, the range alone.
            (Opener::Us, None) if issued_between(&self.issued, &key) => {
                key.give_back(request_id);
                Decision::Late {
                    what: "response for a request that ended",
                }
            }
            (Opener::Us, None) => {
                key.give_back(request_id);
                unknown
            }
            (Opener::Us, Some((phase @ Phase::AwaitingHead, _))) => {
                *phase = next;
                Decision::Head { key, complete }
            }
            (Opener::Us, Some(_)) => Decision::Refuse {
                why: Refusal::ChunkOrder,
                fail: Some(key),
                what: "a second head (chunk 0) for one message",
            },
        }
    }

    fn more(
        &mut self,
        request_id: &mut RequestId,
        idx: u32,
        len: usize,
        last: bool,
    ) -> Decision<K> {
        let Some(key) = K::take(request_id) else {
            return Decision::Refuse {
                why: Refusal::UnknownRequest,
                fail: None,
                what: "chunk for a request id this side never issues",
            };
        };
        let max_unacked = self.max_unacked;
        let Some((phase, _)) = self.streams.get_mut(&key) else {
            key.give_back(request_id);
            return Decision::Late {
                what: "chunk for a finished request",
            };
        };
        let fault = |what| Decision::Refuse {
            why: Refusal::ChunkOrder,
            fail: Some(key.clone()),
            what,
        };
        match phase {
            Phase::AwaitingHead => fault("chunk before chunk 0"),
            Phase::Complete => Decision::Late {
                what: "chunk for a complete message",
            },
            Phase::Body { next, unacked } => {
                if idx != *next {
                    return fault("chunk out of order or repeated");
                }
                *unacked += len;
                if *unacked > max_unacked {
                    return Decision::Refuse {
                        why: Refusal::Window,
                        fail: Some(key),
                        what: "peer exceeded its flow-control window",
                    };
                }
                *next += 1;
                if last {
                    *phase = Phase::Complete;
                }
                Decision::Data { key, last }
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use bytes::Bytes;
    use proptest::prelude::*;

    fn start(id: u64, last: bool) -> Incoming {
        Incoming::Start {
            request_id: format!("{id:016x}").into(),
            meta: Bytes::new(),
            body: Bytes::from_static(b"ab"),
            last,
        }
    }

    fn more(id: u64, idx: u32, last: bool) -> Incoming {
        Incoming::More {
            request_id: format!("{id:016x}").into(),
            idx,
            body: Bytes::from_static(b"cd"),
            last,
        }
    }

    #[test]
    fn a_streamed_response_in_order() {
        let mut d: Demux<u64, ()> = Demux::new(Opener::Us, 100);
        d.expect(7, ());
        assert_eq!(
            d.decide(&mut start(7, false)),
            Decision::Head {
                key: 7,
                complete: false
            }
        );
        assert_eq!(
            d.decide(&mut more(7, 1, false)),
            Decision::Data {
                key: 7,
                last: false
            }
        );
        assert_eq!(
            d.decide(&mut more(7, 2, true)),
            Decision::Data { key: 7, last: true }
        );
        assert!(matches!(
            d.decide(&mut more(7, 3, true)),
            Decision::Late { .. }
        ));
    }

    #[test]
    fn faults_fail_the_request_they_name() {
        let mut d: Demux<u64, ()> = Demux::new(Opener::Us, 100);
        d.expect(1, ());
        let order = |what| Decision::Refuse {
            why: Refusal::ChunkOrder,
            fail: Some(1),
            what,
        };
        assert_eq!(
            d.decide(&mut more(1, 1, false)),
            order("chunk before chunk 0")
        );
        d.decide(&mut start(1, false));
        assert_eq!(
            d.decide(&mut start(1, false)),
            order("a second head (chunk 0) for one message")
        );
        assert_eq!(
            d.decide(&mut more(1, 2, false)),
            order("chunk out of order or repeated")
        );
        // Unknown ids are refused without failing anything.
        assert!(matches!(
            d.decide(&mut start(9, true)),
            Decision::Refuse {
                why: Refusal::UnknownRequest,
                fail: None,
                ..
            }
        ));
    }

    #[test]
    fn window_overrun() {
        let mut d: Demux<u64, ()> = Demux::new(Opener::Us, 5);
        d.expect(1, ());
        d.decide(&mut start(1, false)); // 2 unacked
        d.decide(&mut more(1, 1, false)); // 4
        assert!(matches!(
            d.decide(&mut more(1, 2, false)),
            Decision::Refuse {
                why: Refusal::Window,
                ..
            }
        ));
        let mut d: Demux<u64, ()> = Demux::new(Opener::Us, 5);
        d.expect(1, ());
        d.decide(&mut start(1, false));
        d.credited(&1, 2);
        d.decide(&mut more(1, 1, false));
        assert_eq!(
            d.decide(&mut more(1, 2, false)),
            Decision::Data {
                key: 1,
                last: false
            }
        );
    }

    #[test]
    fn a_head_for_an_issued_request_that_ended_is_late_not_unknown() {
        let mut d: Demux<u64, ()> = Demux::new(Opener::Us, usize::MAX);
        let unknown = |d: &mut Demux<u64, ()>, k| {
            matches!(
                d.decide(&mut start(k, true)),
                Decision::Refuse {
                    why: Refusal::UnknownRequest,
                    ..
                }
            )
        };
        assert!(unknown(&mut d, 5), "nothing issued yet");
        for k in [5, 6, 7] {
            d.expect(k, ());
        }
        d.remove(&6); // its client left
        assert!(d.ended(&6) && !d.ended(&5) && !d.ended(&8));
        assert!(matches!(
            d.decide(&mut start(6, true)),
            Decision::Late { .. }
        ));
        assert!(unknown(&mut d, 4), "below what was issued");
        assert!(unknown(&mut d, 8), "above what was issued");
        assert_eq!(
            d.decide(&mut start(7, true)),
            Decision::Head {
                key: 7,
                complete: true
            }
        );
    }

    #[test]
    fn the_peer_opens_requests_on_the_receiver() {
        let mut d: Demux<RequestId, ()> = Demux::new(Opener::Peer, usize::MAX);
        let key = RequestId::from(format!("{:016x}", 3));
        assert_eq!(
            d.decide(&mut start(3, false)),
            Decision::Open {
                key: key.clone(),
                complete: false
            }
        );
        d.insert(key.clone(), (), false);
        assert!(matches!(
            d.decide(&mut start(3, true)),
            Decision::Refuse {
                why: Refusal::Duplicate,
                ..
            }
        ));
        assert_eq!(
            d.decide(&mut more(3, 1, true)),
            Decision::Data { key, last: true }
        );
    }

    #[derive(Debug, Clone)]
    enum Frame {
        Whole(u8),
        Start(u8, bool),
        More(u8, u32, bool),
        Error(u8),
    }

    fn frame() -> impl Strategy<Value = Frame> {
        prop_oneof![
            (0u8..6).prop_map(Frame::Whole),
            (0u8..6, any::<bool>()).prop_map(|(k, l)| Frame::Start(k, l)),
            (0u8..6, 0u32..5, any::<bool>()).prop_map(|(k, i, l)| Frame::More(k, i, l)),
            (0u8..6).prop_map(Frame::Error),
        ]
    }

    fn incoming(f: &Frame) -> Incoming {
        let rid = |k: u8| format!("{:016x}", k);
        match *f {
            Frame::Whole(k) => Incoming::Whole {
                request_id: rid(k).into(),
                meta: Bytes::new(),
                body: Bytes::new(),
            },
            Frame::Start(k, last) => start(k as u64, last),
            Frame::More(k, idx, last) => more(k as u64, idx, last),
            Frame::Error(k) => Incoming::Error {
                request_id: rid(k).into(),
                message: "x".into(),
            },
        }
    }

    proptest! {
        /// Any frame sequence, either role, the role acting on decisions as
        /// ours do: what is delivered for a request is exactly one head,
        /// then pieces 1, 2, … in order, nothing after the last; refusals
        /// fail only requests in the table; nothing panics.
        #[test]
        fn deliveries_are_in_order_whatever_the_peer_sends(
            peer_opens in any::<bool>(),
            issued in proptest::collection::vec(0u8..6, 0..6),
            frames in proptest::collection::vec(frame(), 0..200),
        ) {
            let opener = if peer_opens { Opener::Peer } else { Opener::Us };
            // The value: pieces delivered so far, and whether it ended.
            let mut d: Demux<u64, (u32, bool)> = Demux::new(opener, 64);
            if !peer_opens {
                for k in issued { d.expect(k as u64, (0, false)); }
            }
            for f in &frames {
                let mut inc = incoming(f);
                match d.decide(&mut inc) {
                    Decision::Head { key, complete } => {
                        prop_assert!(!peer_opens);
                        let v = d.get_mut(&key).unwrap();
                        prop_assert_eq!(*v, (0, false), "a second head delivered");
                        *v = (1, complete);
                        if complete { d.remove(&key); }
                    }
                    Decision::Open { key, complete } => {
                        prop_assert!(peer_opens);
                        prop_assert!(d.get(&key).is_none());
                        d.insert(key, (1, complete), complete);
                    }
                    Decision::Data { key, last } => {
                        let v = d.get_mut(&key).unwrap();
                        prop_assert!(!v.1, "data after the last piece");
                        let Frame::More(_, idx, _) = f else { unreachable!() };
                        prop_assert_eq!(*idx, v.0, "pieces out of order");
                        *v = (v.0 + 1, last);
                        d.credited(&key, 2);
                        if last && !peer_opens { d.remove(&key); }
                    }
                    Decision::PeerError { key } | Decision::Refuse { fail: Some(key), .. } => {
                        prop_assert!(d.remove(&key).is_some());
                    }
                    Decision::Refuse { fail: None, .. } | Decision::Late { .. } => {}
                }
            }
        }
    }
}
