//! `xlb check` and `xlb explain`: what a configuration defines, and which backend a flow gets
//! and why, computed by the workers' own `decide()` over a real frame, with no kernel.

use std::fmt::Write as _;
use std::net::SocketAddr;
use std::path::Path;

use xlb_dataplane::lb::decide::{decide, Counters, Env, Mode, Verdict};
use xlb_dataplane::lb::flow::{tick_of, FlowTable, Timeouts};
use xlb_dataplane::lb::fragments::Fragments;
use xlb_dataplane::lb::hash::flow_hash;
use xlb_dataplane::lb::snapshot::{ServiceKey, Snapshot};
use xlb_dataplane::packet::{
    key_addr, ChecksumState, Class, Family, FlowKey, IpProto, Parsed, TcpFlags,
};

use crate::config::{Config, ConfigError, ProtocolConfig};
use crate::error::Error;
use crate::inspect::InputError;
use crate::translate::snapshot_of;

/// In dsr mode, the file's backends that are on no directly connected prefix of xlb's
/// interfaces (read from this machine with `ip`): L2 DSR only reaches a backend on the same
/// segment. Empty in other modes.
#[must_use]
pub fn dsr_warnings(config: &Config) -> Vec<String> {
    // Encapsulated packets reach routed backends too.
    if config.mode != crate::config::ModeConfig::Dsr || config.dsr.is_some() {
        return Vec::new();
    }
    let mut connected = Vec::new();
    for interface in &config.interfaces {
        let shown = std::process::Command::new("ip")
            .args(["-o", "addr", "show", "dev", interface])
            .output();
        match shown {
            Ok(out) if out.status.success() => connected.extend(
                String::from_utf8_lossy(&out.stdout)
                    .split_whitespace()
                    .collect::<Vec<_>>()
                    .windows(2)
                    .filter(|w| w[0] == "inet" || w[0] == "inet6")
                    .filter_map(|w| w[1].parse::<crate::desired::Cidr>().ok()),
            ),
            _ => {
                return vec![format!(
                    "dsr: cannot read {interface}'s addresses here, so backends are not checked"
                )]
            }
        }
    }
    config
        .services
        .iter()
        .flat_map(|s| s.backends.iter().map(move |b| (s, b)))
        .filter(|(_, b)| !connected.iter().any(|c| c.contains(b.address)))
        .map(|(s, b)| {
            format!(
                "dsr: backend {} of {} is on no directly connected prefix of {}: frames for \
                 it cannot reach it unchanged",
                b.address,
                s.name,
                config.interfaces.join(", ")
            )
        })
        .collect()
}

/// Checks the file and summarises it.
///
/// # Errors
/// The configuration error, naming where.
pub fn check(path: &Path) -> Result<String, Error> {
    let config = Config::load(path)?;
    let snapshot = snapshot_of(&config)?;
    let backends: usize = snapshot.services().map(|s| s.spec().backends.len()).sum();
    let hash = std::fs::read(path)
        .map(|b| crate::file_source::content_hash(&b))
        .map_err(|e| ConfigError::Unreadable {
            path: path.to_owned(),
            reason: e.to_string(),
        })?;
    let mut out = format!(
        "{}: ok — {:?} mode on {}, {} Service ports, {} backends\n  content hash {hash} (xlb_config_hash once live)\n",
        path.display(),
        config.mode,
        config.interfaces.join(", "),
        snapshot.len(),
        backends
    );
    for s in &config.services {
        let _ = writeln!(
            out,
            "  {} {} ports {:?} backends {}",
            s.name,
            s.vip,
            s.ports.iter().map(|p| p.port).collect::<Vec<_>>(),
            s.backends.len()
        );
    }
    for warning in dsr_warnings(&config) {
        let _ = writeln!(out, "  warning: {warning}");
    }
    if let Some(k) = &config.kubernetes {
        let _ = writeln!(
            out,
            "  and Services from Kubernetes ({}; node {}; published at most every {} ms)",
            k.kubeconfig.as_ref().map_or_else(
                || "in-cluster or $KUBECONFIG".to_owned(),
                |p| p.display().to_string()
            ),
            k.node_name
                .as_deref()
                .unwrap_or("from --node-name or $NODE_NAME"),
            k.min_sync_period_ms
        );
    }
    Ok(out)
}

/// The answer of `xlb explain`.
#[derive(Debug)]
pub struct Explanation {
    /// The backend picked, if any.
    pub backend: Option<SocketAddr>,
    /// What happened, for people.
    pub text: String,
    /// The verdict's name.
    pub verdict: String,
    /// The flow hash.
    pub hash: u64,
}

impl Explanation {
    /// As JSON: at least `{"backend": "ADDR:PORT"}` (null when none).
    #[must_use]
    pub fn to_json(&self) -> String {
        serde_json::json!({
            "backend": self.backend.map(|b| b.to_string()),
            "verdict": self.verdict,
            "hash": format!("{:016x}", self.hash),
            "explanation": self.text,
        })
        .to_string()
    }
}

/// Which backend a new flow `source` → `destination` over `protocol` gets.
///
/// # Errors
/// A bad file, protocol or address mix.
pub fn explain(
    path: &Path,
    protocol: ProtocolConfig,
    source: SocketAddr,
    destination: SocketAddr,
) -> Result<Explanation, Error> {
    Ok(Explainer::load(path)?.flow(protocol, source, destination)?)
}

/// A configuration's snapshot, to explain many flows against (`xlb explain --batch`).
pub struct Explainer {
    snapshot: Snapshot,
    flows: FlowTable,
    /// `decide()` reads it; first packets never need it.
    fragments: Fragments,
}

impl std::fmt::Debug for Explainer {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Explainer")
            .field("services", &self.snapshot.len())
            .finish_non_exhaustive()
    }
}

impl Explainer {
    /// The snapshot of the configuration at `path`, as the daemon would build it.
    ///
    /// # Errors
    /// A bad file.
    pub fn load(path: &Path) -> Result<Self, ConfigError> {
        let config = Config::load(path)?;
        let snapshot = snapshot_of(&config)?;
        Ok(Self {
            snapshot,
            flows: FlowTable::new(1024, Timeouts::default()),
            fragments: Fragments::new(1),
        })
    }

    /// Explains flows read from `input`, one `PROTOCOL SOURCE DESTINATION` a line (`tcp
    /// 198.18.0.1:40000 198.18.64.1:80`; blank lines and `#` comments skipped), writing each
    /// line back with the backend picked, or `-`. Returns how many flows it explained.
    ///
    /// # Errors
    /// A line that is not a flow (with its number), or a failed read or write.
    pub fn batch(
        &self,
        input: impl std::io::BufRead,
        mut out: impl std::io::Write,
    ) -> Result<usize, InputError> {
        let mut n = 0;
        for (i, line) in input.lines().enumerate() {
            let line = line.map_err(|e| InputError(format!("reading flows: {e}")))?;
            let text = line.trim();
            if text.is_empty() || text.starts_with('#') {
                continue;
            }
            let bad = |why: &str| InputError(format!("line {}: {why}: {text:?}", i + 1));
            let [protocol, source, destination] = text.split_whitespace().collect::<Vec<_>>()[..]
            else {
                return Err(bad("expected PROTOCOL SOURCE DESTINATION"));
            };
            let protocol = <ProtocolConfig as clap::ValueEnum>::from_str(protocol, true)
                .map_err(|_| bad("the protocol is tcp, udp or sctp"))?;
            let source: SocketAddr = source.parse().map_err(|_| bad("a bad source"))?;
            let destination: SocketAddr =
                destination.parse().map_err(|_| bad("a bad destination"))?;
            let e = self
                .flow(protocol, source, destination)
                .map_err(|e| bad(&e.0))?;
            let backend = e.backend.map_or_else(|| "-".to_owned(), |b| b.to_string());
            writeln!(out, "{text} {backend}").map_err(|e| InputError(format!("writing: {e}")))?;
            n += 1;
        }
        Ok(n)
    }

    /// Which backend a new flow `source` → `destination` over `protocol` gets.
    ///
    /// # Errors
    /// An address mix.
    pub fn flow(
        &self,
        protocol: ProtocolConfig,
        source: SocketAddr,
        destination: SocketAddr,
    ) -> Result<Explanation, InputError> {
        let snapshot = &self.snapshot;
        let flows = &self.flows;
        if source.is_ipv4() != destination.is_ipv4() {
            return Err(InputError(
                "source and destination must be of one address family".into(),
            ));
        }
        let protocol = crate::translate::proto(protocol.into());
        // What the parser gives for a flow's first packet (a SYN for TCP); `decide` reads no
        // more than this, so no frame is built.
        let family = if source.is_ipv4() {
            Family::Ipv4
        } else {
            Family::Ipv6
        };
        let parsed = Parsed {
            key: FlowKey::new(
                family,
                protocol,
                (key_addr(source.ip()), source.port()),
                (key_addr(destination.ip()), destination.port()),
            ),
            class: Class::Ordinary,
            l3_offset: 14,
            l4_offset: if source.is_ipv4() { 34 } else { 54 },
            l3_end: if source.is_ipv4() { 54 } else { 74 },
            tcp_flags: if protocol == IpProto::TCP {
                TcpFlags::SYN
            } else {
                TcpFlags::default()
            },
            checksum: ChecksumState::Complete,
        };
        let hash = flow_hash(&parsed.key);
        let env = Env {
            snapshot,
            flows,
            now: 0,
            tick: tick_of(0),
            mode: Mode::Dnat,
            fragments: &self.fragments,
        };
        let verdict = decide(&env, &parsed, hash, 0, &mut Counters::default());
        let service = snapshot.service(&ServiceKey::of_destination(&parsed.key));
        let (backend, text) = match (verdict, service) {
            (Verdict::Forward(to), Some(s)) => {
                let spec = s.spec();
                let ready = spec.backends.iter().filter(|b| s.takes_new_flows(b.id)).count();
                (
                    Some(SocketAddr::new(to.ip(), to.port())),
                    format!(
                        "{destination}/{protocol} is a Service with {} backends ({ready} taking new flows); \
                         scheduler {:?}; flow hash {hash:016x} picks {}:{}",
                        spec.backends.len(),
                        spec.scheduler,
                        to.ip(),
                        to.port()
                    ),
                )
            }
            (Verdict::Reject(_), _) => (None, format!("{destination}/{protocol} has no usable backend: the flow is refused (TCP reset or ICMP unreachable)")),
            (Verdict::Drop(reason), _) => (None, format!("{destination}/{protocol}: dropped ({reason:?})")),
            _ => (None, format!("{destination}/{protocol} is not a Service: the kernel handles it")),
        };
        Ok(Explanation {
            backend,
            text,
            verdict: format!("{verdict:?}"),
            hash,
        })
    }
}
