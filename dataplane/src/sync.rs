//! The atomics of the concurrent structures: std's, or loom's when built with
//! `RUSTFLAGS="--cfg loom"` so that `tests/flow_loom.rs` can explore their interleavings.
//! Nothing else in the crate synchronises; locks are not used at all (clippy.toml).

#[cfg(loom)]
pub(crate) use loom::sync::atomic::{fence, AtomicU64, Ordering};
#[cfg(not(loom))]
pub(crate) use std::sync::atomic::{fence, AtomicU64, Ordering};
