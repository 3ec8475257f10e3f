//! The desired state: what every source (the file, Kubernetes) produces and `translate` turns
//! into a snapshot. One [`DesiredService`] per Service port and VIP, each backend with its own
//! port (Kubernetes' named target ports resolve per endpoint).
//!
//! Must not know: where it came from, packets, the kernel.

use std::net::IpAddr;

use crate::config::{BackendStateConfig, Config, NoBackendConfig, ProtocolConfig, SchedulerConfig};

/// One Service (VIP, port, protocol) and its backends.
#[derive(Clone, Debug, PartialEq, Eq, Hash)]
pub struct DesiredService {
    /// Where it came from, for logs and errors (`services[2] (web)`, `default/web:http`).
    pub name: String,
    /// The VIP.
    pub vip: IpAddr,
    /// The Service port.
    pub port: u16,
    /// TCP or UDP.
    pub protocol: ProtocolConfig,
    /// The backends.
    pub backends: Vec<DesiredBackend>,
    /// How new flows pick a backend.
    pub scheduler: SchedulerConfig,
    /// Session affinity timeout in seconds, if any.
    pub affinity_timeout: Option<u32>,
    /// What a new flow gets when no backend can take it.
    pub no_backend: NoBackendConfig,
    /// An explicit Maglev table size.
    pub table_size: Option<u32>,
}

/// One backend of a [`DesiredService`].
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub struct DesiredBackend {
    /// Its address.
    pub address: IpAddr,
    /// Its port.
    pub port: u16,
    /// Its share of new flows.
    pub weight: u32,
    /// Its condition.
    pub state: BackendStateConfig,
}

impl Config {
    /// The file's Services as desired state: one per Service port.
    #[must_use]
    pub fn desired(&self) -> Vec<DesiredService> {
        let mut out = Vec::new();
        for (i, s) in self.services.iter().enumerate() {
            for port in &s.ports {
                let target = port.target_port.unwrap_or(port.port);
                out.push(DesiredService {
                    name: format!("services[{i}] ({})", s.name),
                    vip: s.vip,
                    port: port.port,
                    protocol: port.protocol,
                    backends: s
                        .backends
                        .iter()
                        .map(|b| DesiredBackend {
                            address: b.address,
                            port: target,
                            weight: b.weight,
                            state: b.state,
                        })
                        .collect(),
                    scheduler: s.scheduler,
                    affinity_timeout: s.session_affinity.map(|a| a.timeout_seconds),
                    no_backend: s.no_backend,
                    table_size: s.table_size,
                });
            }
        }
        out
    }
}
