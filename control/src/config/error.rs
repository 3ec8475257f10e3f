//! Why a configuration, or a Service in it, is refused: one type every source and command
//! reports through.

use std::net::IpAddr;
use std::path::PathBuf;

use xlb_dataplane::lb::snapshot::SnapshotError;

/// Why a configuration, or a Service in it, is refused. Each says where: the file, the field
/// path and line, or the Service. `xlb check`, `xlb run` at start and the daemon's reloads
/// report it through this one `Display`, so an operator sees the same words for the same
/// mistake everywhere.
#[derive(Clone, Debug, PartialEq, Eq, thiserror::Error)]
pub enum ConfigError {
    /// The file could not be read.
    #[error("{}: {reason}", path.display())]
    Unreadable {
        /// The file.
        path: PathBuf,
        /// The system's reason.
        reason: String,
    },
    /// The file is not UTF-8.
    #[error("{}: the file is not UTF-8", path.display())]
    NotUtf8 {
        /// The file.
        path: PathBuf,
    },
    /// YAML that does not parse, or does not fit the schema (with field path, line and
    /// column, as serde says them).
    #[error("{0}")]
    Schema(String),
    /// A value the semantic checks refuse.
    #[error("{message}{}", line.map(|l| format!(" (line {l})")).unwrap_or_default())]
    Invalid {
        /// The field path and what is wrong with it.
        message: String,
        /// Its line in the file, when it can be found.
        line: Option<usize>,
    },
    /// An error in the file at `path`.
    #[error("{}: {error}", path.display())]
    InFile {
        /// The file.
        path: PathBuf,
        /// What is wrong in it.
        error: Box<ConfigError>,
    },
    /// A Service the dataplane refused (a Maglev table size that is not a prime, say).
    #[error("{service}: {error}")]
    Refused {
        /// The Service's name, as its source gives it.
        service: String,
        /// Why.
        error: SnapshotError,
    },
    /// A change the snapshot refused as a whole (two Services at one key).
    #[error(transparent)]
    Snapshot(#[from] SnapshotError),
    /// A dsr Service whose backend serves another port than the Service's.
    #[error(
        "{service}: backend {backend} serves port {backend_port}, not the Service's {port}: \
         dsr mode cannot change ports"
    )]
    DsrPortChange {
        /// The Service's name.
        service: String,
        /// The backend.
        backend: IpAddr,
        /// The port it serves.
        backend_port: u16,
        /// The Service's port.
        port: u16,
    },
}

impl ConfigError {
    /// A value the semantic checks refuse; its line is found later, from the text.
    #[must_use]
    pub fn invalid(message: impl Into<String>) -> Self {
        Self::Invalid {
            message: message.into(),
            line: None,
        }
    }
}
