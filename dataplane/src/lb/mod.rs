//! The policy layer: which backend a flow goes to.
//!
//! Owns: Maglev lookup tables ([`maglev`]) and the hashes that every xlb instance must compute
//! alike ([`hash`]). Must not know: sockets, threads, time sources, Kubernetes. No unsafe.

pub mod hash;
pub mod maglev;
