//! The tunnel engine both sides run: one WebSocket connection carrying
//! ANPX frames (`engine.rs`). The gateway and the receiver keep only what
//! differs by role: who dials, who sends request heads and who answers
//! them, and what a frame means to them (a [`engine::FrameSink`]).
//!
//! Owns: the socket split, the writer task with its stop and close grace
//! (vectored, copying or masking: `ws/conn.rs`), ping/pong with the ping
//! budget, the idle cut, close codes, and every limit from config. Never:
//! routing, identity, HTTP, or which requests exist (the role's sink).

pub mod demux;
pub mod engine;

pub use engine::EngineConfig;
