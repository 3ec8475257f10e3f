//! xlb's data plane: everything a packet touches on its way through the load balancer.
//!
//! Layer: the bottom of the workspace. `control`, `pktgen` and `bench` depend on this crate; it
//! depends on none of them and never on Kubernetes, YAML or an async runtime.
//!
//! Modules:
//! * [`lb`]: the policy layer — Maglev tables and the versioned hashes behind them. Pure
//!   code, no kernel, no unsafe.
//! * [`packet`]: the wire layer — checked views over frame bytes, the flow key, and in-place NAT
//!   rewrite primitives with RFC 1624 incremental checksums. No unsafe, no allocation, no
//!   sockets, threads or time.
//!
//! Unsafe: denied crate-wide; the only exception is `prefetch`, one target-feature
//! intrinsic with its safety boundary documented there. `packet` and `lb` forbid it.
//!
//! Panic contract: no bytes received from the network can make this crate panic; property
//! tests and the fuzz target in `fuzz/` hold it to that.

// Unsafe code is denied everywhere but in `prefetch` (one intrinsic, reviewed).
#![deny(unsafe_code)]

pub mod lb;
pub mod packet;
mod prefetch;
mod sync;
