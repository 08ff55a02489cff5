//! ANPX frames a receiver sent that the gateway refused, counted by reason
//! (`anp_proxy_anpx_frames_refused_total{reason=…}` on `/metrics`).
//!
//! A refused frame is never delivered to any client; what happens to the
//! request it names is decided in [`super::tunnel`] and documented in
//! docs/ARCHITECTURE.md ("Refused ANPX frames"). Counting is an error path,
//! so one relaxed atomic per refusal is fine.

use std::fmt::Write as _;
use std::sync::atomic::{AtomicU64, Ordering};

use crate::protocol::anpx::{DecodeError, ReassemblyError};
use crate::protocol::stream::StreamError;

/// Why a frame from a receiver was refused.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum FrameRefusal {
    /// Header or body CRC-32 mismatch (PROTOCOL.md §2).
    Crc,
    /// Any other frame or meta that does not decode (§2–4), or a message
    /// whose frames disagree.
    Malformed,
    /// A response whose `request_id` is not in flight on this tunnel —
    /// including one sent on another tunnel: in-flight tables are per tunnel.
    UnknownRequest,
    /// A chunk index repeated, skipped or out of range, or a second head
    /// for one response (§5).
    ChunkOrder,
    /// Over a size limit: `max_body_size`, the flow-control window, or too
    /// many messages being reassembled.
    Limit,
    /// A request frame from a receiver.
    WrongType,
}

impl FrameRefusal {
    pub const ALL: [FrameRefusal; 6] = [
        FrameRefusal::Crc,
        FrameRefusal::Malformed,
        FrameRefusal::UnknownRequest,
        FrameRefusal::ChunkOrder,
        FrameRefusal::Limit,
        FrameRefusal::WrongType,
    ];

    /// The `reason` label.
    pub fn label(self) -> &'static str {
        match self {
            FrameRefusal::Crc => "crc",
            FrameRefusal::Malformed => "malformed",
            FrameRefusal::UnknownRequest => "unknown_request",
            FrameRefusal::ChunkOrder => "chunk_order",
            FrameRefusal::Limit => "limit",
            FrameRefusal::WrongType => "wrong_type",
        }
    }

    /// The demultiplexer's reason (`crate::tunnel::demux`).
    pub fn of_demux(r: crate::tunnel::demux::Refusal) -> Self {
        use crate::tunnel::demux::Refusal;
        match r {
            Refusal::UnknownRequest => FrameRefusal::UnknownRequest,
            Refusal::ChunkOrder | Refusal::Duplicate => FrameRefusal::ChunkOrder,
            Refusal::Window => FrameRefusal::Limit,
        }
    }

    pub fn of_decode(e: &DecodeError) -> Self {
        match e {
            DecodeError::HeaderCrc { .. } | DecodeError::BodyCrc { .. } => FrameRefusal::Crc,
            _ => FrameRefusal::Malformed,
        }
    }

    pub fn of_reassembly(e: &ReassemblyError) -> Self {
        match e {
            ReassemblyError::Decode(d) => Self::of_decode(d),
            ReassemblyError::DuplicateChunk { .. } | ReassemblyError::ChunkOutOfRange { .. } => {
                FrameRefusal::ChunkOrder
            }
            ReassemblyError::TooLarge { .. } | ReassemblyError::TooManyAssemblies { .. } => {
                FrameRefusal::Limit
            }
            ReassemblyError::MissingRequestId
            | ReassemblyError::MissingMeta { .. }
            | ReassemblyError::BadMeta { .. }
            | ReassemblyError::Inconsistent { .. } => FrameRefusal::Malformed,
        }
    }

    pub fn of_stream(e: &StreamError) -> Self {
        match e {
            StreamError::Decode(d) => Self::of_decode(d),
            StreamError::WrongType(..) => FrameRefusal::WrongType,
            StreamError::MissingRequestId | StreamError::MissingMeta(_) => FrameRefusal::Malformed,
        }
    }
}

/// Process-wide counts, one per [`FrameRefusal`].
#[derive(Debug, Default)]
pub struct FrameRefusals {
    counts: [AtomicU64; FrameRefusal::ALL.len()],
}

impl FrameRefusals {
    pub fn count(&self, why: FrameRefusal) {
        self.counts[why as usize].fetch_add(1, Ordering::Relaxed);
    }

    pub fn get(&self, why: FrameRefusal) -> u64 {
        self.counts[why as usize].load(Ordering::Relaxed)
    }

    /// Prometheus text for `/metrics`.
    pub fn write_metrics(&self, s: &mut String) {
        let name = "anp_proxy_anpx_frames_refused_total";
        let _ = writeln!(
            s,
            "# HELP {name} ANPX frames from receivers refused, by reason.\n# TYPE {name} counter"
        );
        for why in FrameRefusal::ALL {
            let _ = writeln!(s, "{name}{{reason=\"{}\"}} {}", why.label(), self.get(why));
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn labels_are_distinct_and_indexed_in_order() {
        for (i, why) in FrameRefusal::ALL.iter().enumerate() {
            assert_eq!(*why as usize, i);
        }
        let c = FrameRefusals::default();
        c.count(FrameRefusal::Crc);
        c.count(FrameRefusal::Crc);
        c.count(FrameRefusal::WrongType);
        let mut s = String::new();
        c.write_metrics(&mut s);
        assert!(s.contains("anp_proxy_anpx_frames_refused_total{reason=\"crc\"} 2\n"));
        assert!(s.contains("anp_proxy_anpx_frames_refused_total{reason=\"wrong_type\"} 1\n"));
        assert!(s.contains("anp_proxy_anpx_frames_refused_total{reason=\"unknown_request\"} 0\n"));
    }
}
