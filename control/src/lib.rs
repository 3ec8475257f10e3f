//! xlb's control plane and the `xlb` command.
//!
//! Layer: above `xlb-dataplane`, which it drives; it never touches packet bytes on the
//! forwarding path. Today it holds the offline frame tools behind `xlb decode` and
//! `xlb rewrite` ([`inspect`]) and the Maglev capacity report behind `xlb maglev`
//! ([`maglev_report`]); the sources (Kubernetes, file), the translation to snapshots
//! and the admin API arrive with the end-to-end and Kubernetes issues.
//!
//! Panic contract: bad input of any kind (a malformed frame, a bad argument) is an error
//! value, never a panic. No unsafe code.

#![forbid(unsafe_code)]

pub mod admin;
pub mod admin_client;
pub mod config;
pub mod daemon;
pub mod desired;
pub mod explain;
pub mod histogram;
pub mod inspect;
pub mod kubernetes;
pub mod maglev_report;
pub mod netlink;
pub mod translate;
