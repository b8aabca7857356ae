//! tollway's Rust core: the primitives every request passes through.
//!
//! Everything here is plain Rust that `cargo test` runs without Python;
//! time is always passed in (`now`, seconds as f64 on a monotonic clock) so
//! tests are deterministic. The pyo3 bindings live in `py.rs` alone, behind
//! the `python` feature.

// unsafe only in relay.rs (its syscalls), which allows it for itself.
#![deny(unsafe_code)]

pub mod breaker;
pub mod cost;
pub mod deltas;
pub mod jsonscan;
pub mod limiter;
pub mod natsframe;
pub mod relay;
pub mod sse;
pub mod tokenizer;

#[cfg(feature = "python")]
mod py;
