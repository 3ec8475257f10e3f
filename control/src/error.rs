//! The errors an `xlb` command stops with, the daemon's start included: one type, so that the
//! same mistake reads the same whether `xlb check`, `xlb run` or a reload meets it (a
//! configuration error is always [`ConfigError`]'s words, with the file and line).
//!
//! Must not know: how the errors are shown (the command prints `xlb: {error}`; the daemon logs
//! what it survives).

use std::net::SocketAddr;

use crate::config::ConfigError;
use crate::inspect::InputError;

/// Why a command, or the daemon's start, failed.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    /// The configuration, or a Service in it, is refused.
    #[error(transparent)]
    Config(#[from] ConfigError),
    /// An argument or an input (a frame, a flow line) is not what the command takes.
    #[error(transparent)]
    Input(#[from] InputError),
    /// Nothing answers at the admin API's address.
    #[error("cannot reach xlb's admin API at {admin}: {reason} (is `xlb run` running?)")]
    AdminUnreachable {
        /// The address asked.
        admin: SocketAddr,
        /// The system's reason.
        reason: std::io::Error,
    },
    /// The admin API answered with something else than what was asked.
    #[error("admin API: {0}")]
    AdminAnswer(String),
    /// A core the configuration names is not one this process may run on.
    #[error("cores: core {core} is not one this process may run on ({available} cores here)")]
    Core {
        /// The core named.
        core: usize,
        /// How many this process may run on.
        available: usize,
    },
    /// An interface is missing, or the kernel refused something on it (the XDP filter, a
    /// queue's socket).
    #[error("{interface}: {reason}")]
    Interface {
        /// The interface.
        interface: String,
        /// The kernel's or the library's reason.
        reason: String,
    },
    /// The XDP filter could not be loaded.
    #[error("{0} (xlb needs root, or CAP_BPF, CAP_PERFMON and CAP_NET_ADMIN)")]
    Filter(String),
    /// An AF_XDP socket could not be opened.
    #[error(
        "{0} (AF_XDP sockets need CAP_NET_RAW, and CAP_IPC_LOCK or a memlock limit that holds \
         the UMEM)"
    )]
    Socket(String),
    /// Routes, neighbours or addresses could not be read or written (netlink), or a node's
    /// link set up.
    #[error("{0}")]
    Kernel(String),
    /// The Kubernetes source could not be set up (kubeconfig, service account, node name).
    #[error("kubernetes: {0}")]
    Kubernetes(String),
    /// A thread, runtime, listener or signal handler the daemon needs.
    #[error("cannot {what}: {reason}")]
    Resource {
        /// What could not be done ("listen on 127.0.0.1:9901 for the admin API").
        what: String,
        /// The system's reason.
        reason: std::io::Error,
    },
}

impl Error {
    /// A [`Error::Resource`]: `what` could not be done, for `reason`.
    pub fn resource(what: impl Into<String>) -> impl FnOnce(std::io::Error) -> Self {
        let what = what.into();
        move |reason| Self::Resource { what, reason }
    }
}
