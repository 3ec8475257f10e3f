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
//! * [`worker`]: the batch poll loop, generic over a packet I/O trait; per-worker counters;
//!   next hops.
//! * [`xsk`]: AF_XDP sockets and UMEM over xsk-rs, the XDP filter (`bpf/filter.c`, built
//!   by build.rs), and `MemRing`, the in-memory I/O tests run the worker over.
//!
//! Unsafe: denied crate-wide; the exceptions are `prefetch` (one target-feature intrinsic),
//! `memory` (one `madvise` asking huge pages for the flow table) and `xsk` (libbpf/libxdp
//! calls and AF_XDP rings), each with its safety boundary documented there. `packet` and `lb`
//! forbid it.
//!
//! Panic contract: no bytes received from the network can make this crate panic; property
//! tests and the fuzz target in `fuzz/` hold it to that.

// Unsafe code is denied everywhere but in `prefetch`, `memory` and `xsk` (reviewed).
#![deny(unsafe_code)]

mod counted;
pub mod lb;
mod memory;
pub mod packet;
mod prefetch;
mod sync;
pub mod worker;
pub mod xsk;
