//! The `xlb` command.

use std::io::Read as _;
use std::net::SocketAddr;
use std::process::ExitCode;

use clap::{Parser, Subcommand};
use xlb_control::inspect::{self, InputError, Rewrites};
use xlb_control::maglev_report;

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

fn run(cli: Cli) -> Result<(), InputError> {
    match cli.command {
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
