//! xlb's control plane and the `xlb` command.
//!
//! Layer: above `xlb-dataplane`, which it drives; it never touches packet bytes on the
//! forwarding path. Modules, from the sources to the dataplane:
//! * [`config`]: the file source (YAML schema, validation with lines and fields);
//!   [`kube_source`]: the Kubernetes source (watches, a store of compact views, coalesced
//!   batches of changes); [`kubernetes`]: Services and EndpointSlices translated with
//!   kube-proxy's semantics; `fake_api` (feature `fake-api`): an in-process API server for
//!   tests and benchmarks;
//! * [`desired`]: the desired state both produce; [`translate`]: changes to the desired
//!   state -> snapshots, incrementally; [`steering`]: the keys the XDP filter steers, and the
//!   grace period of a removed backend's replies; [`claims`]: who owns a Service key (the
//!   first claimant; the others wait); [`publish`]: the sources' changes made live, one swap
//!   each, the filter in step;
//! * [`netlink`]: next hops from the kernel's routes and neighbours;
//! * [`chores`]: whole-flow-table chores (least-connections recounts, the live-entry gauge);
//! * [`daemon`]: `xlb run` - filter, sockets, pinned workers, the control loop; [`error`]:
//!   what commands and the daemon's start stop with;
//! * [`admin`], [`admin_client`]: the admin HTTP API (metrics in a prometheus-client registry)
//!   and its client;
//!   [`status`]: `xlb status`'s tables read from it;
//! * [`explain`], [`inspect`], [`maglev_report`]: the offline tools behind `xlb check`,
//!   `explain`, `decode`, `rewrite` and `maglev`.
//!
//! Panic contract: bad input of any kind (a malformed frame, a bad argument, a bad file, a
//! malformed object) is an error value or a warning, never a panic. No unsafe code.

#![forbid(unsafe_code)]

pub mod admin;
pub mod admin_client;
pub mod chores;
pub mod claims;
pub mod config;
pub mod daemon;
pub mod desired;
pub mod error;
pub mod explain;
#[cfg(feature = "fake-api")]
pub mod fake_api;
pub mod file_source;
pub mod health;
pub mod inspect;
pub mod kube_source;
pub mod kubernetes;
pub mod maglev_report;
pub mod netlink;
pub mod node_link;
pub mod publish;
pub mod server_thread;
pub mod status;
pub mod steering;
pub mod translate;
