//! The policy layer: which backend a flow goes to.
//!
//! Owns: Maglev lookup tables ([`maglev`]), the hashes that every xlb instance must compute
//! alike ([`hash`]), the immutable service table the workers read ([`snapshot`]), and the
//! lock-free flow table they share ([`flow`]), the translations of fragmented datagrams
//! ([`fragments`]), IP prefix sets ([`prefix`]), and the per-packet
//! decision that joins them ([`decide`]), and the least-connections recount that corrects its
//! counts ([`recount`]). Must not know: sockets, threads, time sources, Kubernetes. No unsafe.

#![forbid(unsafe_code)]

pub mod decide;
pub mod flow;
pub mod fragments;
pub mod hash;
pub mod maglev;
pub mod prefix;
pub mod recount;
pub mod snapshot;
