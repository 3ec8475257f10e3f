//! The policy layer: which backend a flow goes to.
//!
//! Owns: Maglev lookup tables ([`maglev`]), the hashes that every xlb instance must compute
//! alike ([`hash`]), and the immutable service table the workers read ([`snapshot`]). Must not know: sockets, threads, time sources, Kubernetes. No unsafe.

pub mod hash;
pub mod maglev;
pub mod snapshot;
