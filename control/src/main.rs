//! The `xlb` command.

use std::io::Read as _;
use std::net::SocketAddr;
use std::path::PathBuf;
use std::process::ExitCode;
use std::time::Duration;

use clap::{Parser, Subcommand, ValueEnum};
use xlb_control::config::ProtocolConfig;
use xlb_control::error::Error;
use xlb_control::inspect::{self, InputError, Rewrites};
use xlb_control::status::Status;
use xlb_control::{admin_client, daemon, explain, maglev_report};

#[derive(Clone, Copy, ValueEnum)]
enum LogFormat {
    Text,
    Json,
}

/// xlb: a packet-level load balancer for Kubernetes Service VIPs.
#[derive(Parser)]
#[command(version, about)]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand)]
enum Command {
    /// Decode an Ethernet frame given as hex, layer by layer, with checksums verified.
    Decode {
        /// The frame in hex; '-' or nothing reads it from standard input.
        hex: Vec<String>,
    },
    /// Apply NAT rewrites to a frame given as hex; print it before and after, and its new hex.
    Rewrite {
        /// New destination address and port (DNAT).
        #[arg(long, value_name = "ADDR:PORT")]
        dst: Option<SocketAddr>,
        /// New source address and port (SNAT, or un-DNAT of a reply).
        #[arg(long, value_name = "ADDR:PORT")]
        src: Option<SocketAddr>,
        /// New Ethernet source address (with --eth-dst).
        #[arg(long, value_name = "MAC", requires = "eth_dst")]
        eth_src: Option<String>,
        /// New Ethernet destination address (with --eth-src).
        #[arg(long, value_name = "MAC", requires = "eth_src")]
        eth_dst: Option<String>,
        /// The frame in hex; '-' or nothing reads it from standard input.
        hex: Vec<String>,
    },
    /// Run the load balancer with a configuration file (as root).
    Run {
        /// The YAML configuration (see deploy/examples/xlb.yaml).
        #[arg(long, value_name = "FILE")]
        config: PathBuf,
        /// Log format.
        #[arg(long, value_enum, default_value_t = LogFormat::Text)]
        log_format: LogFormat,
        /// This node's name, for the Kubernetes source (kubernetes.node_name in the file
        /// takes precedence; a DaemonSet passes it through the downward API).
        #[arg(long, env = "NODE_NAME", value_name = "NAME")]
        node_name: Option<String>,
    },
    /// Check a configuration file and say what it defines.
    Check {
        /// The YAML configuration.
        #[arg(long, value_name = "FILE")]
        config: PathBuf,
    },
    /// Say which backend a flow gets and why, computed by the workers' own code.
    Explain {
        /// The YAML configuration.
        #[arg(long, value_name = "FILE")]
        config: PathBuf,
        /// The flow's protocol.
        #[arg(value_enum, required_unless_present = "batch")]
        protocol: Option<ProtocolConfig>,
        /// The client's address and port.
        #[arg(required_unless_present = "batch")]
        source: Option<SocketAddr>,
        /// The Service's address and port.
        #[arg(required_unless_present = "batch")]
        destination: Option<SocketAddr>,
        /// Print JSON.
        #[arg(long)]
        json: bool,
        /// Explain the flows of this file (- for standard input), one `PROTOCOL SOURCE
        /// DESTINATION` a line, each written back with its backend (or -).
        #[arg(long, value_name = "FILE", conflicts_with_all = ["protocol", "source", "destination", "json"])]
        batch: Option<PathBuf>,
    },
    /// Print a running xlb's state as tables: packets and drops by reason (totals, and rates
    /// over --interval), the flow table's fill, its Services (VIP kind, scheduler, affinity,
    /// traffic policy, source ranges, no-endpoint behaviour) and their backends.
    Status {
        /// The admin API's address.
        #[arg(long, default_value = "127.0.0.1:9901")]
        admin: SocketAddr,
        /// The same as one JSON document (Services, every metric series, drops, rates).
        #[arg(long)]
        json: bool,
        /// Seconds between the two samples rates are taken from; 0: totals only.
        #[arg(long, default_value_t = 1.0, value_name = "SECONDS")]
        interval: f64,
    },
    /// Print a running xlb's metrics (its /metrics, Prometheus text).
    Metrics {
        /// The admin API's address.
        #[arg(long, default_value = "127.0.0.1:9901")]
        admin: SocketAddr,
    },
    /// Print a running xlb's flows (its /flows, as JSON).
    Flows {
        /// The admin API's address.
        #[arg(long, default_value = "127.0.0.1:9901")]
        admin: SocketAddr,
        /// At most this many.
        #[arg(long, default_value_t = 100)]
        limit: usize,
    },
    /// Show each backend's share of a Maglev table and, with --remove, how many flows move.
    Maglev {
        /// The backends, comma-separated ADDR:PORT.
        #[arg(
            long,
            value_delimiter = ',',
            required = true,
            value_name = "ADDR:PORT,..."
        )]
        backends: Vec<SocketAddr>,
        /// Their weights, comma-separated, in the same order (default: all 1).
        #[arg(long, value_delimiter = ',', value_name = "W,...")]
        weights: Vec<u32>,
        /// The table size: a prime from 251 to 131071 (default: chosen from the backend count).
        #[arg(long, value_name = "M")]
        table_size: Option<u32>,
        /// A backend to remove, to see the fraction of flows that would move.
        #[arg(long, value_name = "ADDR:PORT")]
        remove: Option<SocketAddr>,
        /// Print JSON.
        #[arg(long)]
        json: bool,
    },
}

fn main() -> ExitCode {
    match run(Cli::parse()) {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("xlb: {e}");
            ExitCode::FAILURE
        }
    }
}

fn run(cli: Cli) -> Result<(), Error> {
    match cli.command {
        Command::Run {
            config,
            log_format,
            node_name,
        } => {
            let filter = tracing_subscriber::EnvFilter::try_from_default_env()
                .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("info"));
            let builder = tracing_subscriber::fmt()
                .with_env_filter(filter)
                .with_writer(std::io::stderr);
            match log_format {
                LogFormat::Text => builder.init(),
                LogFormat::Json => builder.json().init(),
            }
            daemon::run(&config, node_name)?;
        }
        Command::Check { config } => {
            print!("{}", explain::check(&config)?);
        }
        Command::Explain {
            config,
            batch: Some(flows),
            ..
        } => {
            let explainer = explain::Explainer::load(&config)?;
            let out = std::io::BufWriter::new(std::io::stdout().lock());
            if flows.as_os_str() == "-" {
                explainer.batch(std::io::stdin().lock(), out)
            } else {
                let file = std::fs::File::open(&flows)
                    .map_err(|e| InputError(format!("{}: {e}", flows.display())))?;
                explainer.batch(std::io::BufReader::new(file), out)
            }?;
        }
        Command::Explain {
            config,
            protocol: Some(protocol),
            source: Some(source),
            destination: Some(destination),
            json,
            ..
        } => {
            let e = explain::explain(&config, protocol, source, destination)?;
            if json {
                println!("{}", e.to_json());
            } else {
                println!("{}", e.text);
            }
        }
        Command::Explain { .. } => {
            return Err(
                InputError("explain: PROTOCOL SOURCE DESTINATION, or --batch FILE".into()).into(),
            );
        }
        Command::Status {
            admin,
            json,
            interval,
        } => {
            let interval = Duration::try_from_secs_f64(interval)
                .map_err(|_| InputError(format!("--interval {interval}: not a duration")))?;
            let status = Status::fetch(admin, interval)?;
            if json {
                println!("{:#}", status.json());
            } else {
                print!("{}", status.text());
            }
        }
        Command::Metrics { admin } => {
            print!("{}", admin_client::get(admin, "/metrics")?);
        }
        Command::Flows { admin, limit } => {
            println!(
                "{}",
                admin_client::get(admin, &format!("/flows?limit={limit}"))?
            );
        }
        Command::Decode { hex } => {
            let frame = read_frame(&hex)?;
            println!("{}", inspect::decode(&frame));
        }
        Command::Rewrite {
            dst,
            src,
            eth_src,
            eth_dst,
            hex,
        } => {
            let frame = read_frame(&hex)?;
            let eth = match (eth_src, eth_dst) {
                (Some(s), Some(d)) => Some((inspect::parse_mac(&s)?, inspect::parse_mac(&d)?)),
                _ => None,
            };
            let out = inspect::rewrite(&frame, &Rewrites { dst, src, eth })?;
            println!("before:\n{}\n", indent(&inspect::decode(&frame)));
            println!("after:\n{}\n", indent(&inspect::decode(&out)));
            println!("{}", inspect::to_hex(&out));
        }
        Command::Maglev {
            backends,
            weights,
            table_size,
            remove,
            json,
        } => {
            let request = maglev_report::Request {
                backends,
                weights,
                table_size,
                remove,
            };
            let report = maglev_report::report(&request)?;
            if json {
                println!("{}", report.to_json());
            } else {
                print!("{}", report.to_text());
            }
        }
    }
    Ok(())
}

fn read_frame(args: &[String]) -> Result<Vec<u8>, InputError> {
    if args.is_empty() || args == ["-"] {
        let mut text = String::new();
        std::io::stdin()
            .read_to_string(&mut text)
            .map_err(|e| InputError(format!("reading standard input: {e}")))?;
        inspect::frame_from_hex(&text)
    } else {
        inspect::frame_from_hex(&args.join(""))
    }
}

fn indent(text: &str) -> String {
    text.lines()
        .map(|l| format!("  {l}\n"))
        .collect::<String>()
        .trim_end()
        .to_string()
}
