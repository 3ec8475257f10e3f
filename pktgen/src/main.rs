//! `xlb-pktgen`: sends UDP or TCP frames over a range of flows from an AF_XDP socket as fast
//! as it can, for a bounded time and count, and reports packets per second.
//!
//! This is the generator the end-to-end benchmark drives; the receiver, rates, IMIX and
//! latency belong to the pktgen issue.

use std::net::SocketAddr;
use std::process::ExitCode;
use std::time::{Duration, Instant};

use clap::{Parser, ValueEnum};
use xlb_dataplane::packet::builder::pkt;
use xlb_dataplane::packet::MacAddr;
use xlb_dataplane::xsk::{XskConfig, XskSender};
use xlb_pktgen::{FlowRange, Stream};

#[derive(Clone, Copy, ValueEnum)]
enum Kind {
    Udp,
    TcpSyn,
    TcpAck,
}

/// Send frames from an AF_XDP socket as fast as possible.
#[derive(Parser)]
#[command(version, about)]
struct Cli {
    /// The interface to send on.
    #[arg(long)]
    interface: String,
    /// Its queue.
    #[arg(long, default_value_t = 0)]
    queue: u32,
    /// Ethernet source address (default: the interface's).
    #[arg(long)]
    src_mac: Option<String>,
    /// Ethernet destination address (the next hop).
    #[arg(long)]
    dst_mac: String,
    /// Source address and first source port.
    #[arg(long)]
    src: SocketAddr,
    /// Destination address and port.
    #[arg(long)]
    dst: SocketAddr,
    /// What to send.
    #[arg(long, value_enum, default_value_t = Kind::Udp)]
    kind: Kind,
    /// Distinct flows (consecutive source ports).
    #[arg(long, default_value_t = 1024)]
    flows: u32,
    /// Frame size in bytes (without the FCS), at least the headers.
    #[arg(long, default_value_t = 60)]
    size: usize,
    /// Stop after this many seconds (at most 600).
    #[arg(long, default_value_t = 5.0)]
    seconds: f64,
    /// Stop after this many packets.
    #[arg(long, default_value_t = u64::MAX)]
    count: u64,
    /// Pin to this core.
    #[arg(long)]
    core: Option<usize>,
    /// Print the summary as JSON.
    #[arg(long)]
    json: bool,
}

fn mac(text: &str) -> Result<MacAddr, String> {
    let bytes: Vec<u8> = text
        .split(':')
        .map(|b| u8::from_str_radix(b, 16))
        .collect::<Result<_, _>>()
        .map_err(|_| format!("{text:?} is not a MAC address"))?;
    <[u8; 6]>::try_from(bytes)
        .map(MacAddr)
        .map_err(|_| format!("{text:?} is not a MAC address"))
}

fn run(cli: &Cli) -> Result<(), String> {
    if !(0.0..=600.0).contains(&cli.seconds) {
        return Err("--seconds: 0 to 600".into());
    }
    let src_mac = match &cli.src_mac {
        Some(m) => mac(m)?,
        None => mac(
            std::fs::read_to_string(format!("/sys/class/net/{}/address", cli.interface))
                .map_err(|e| format!("{}: {e}", cli.interface))?
                .trim(),
        )?,
    };
    let dst_mac = mac(&cli.dst_mac)?;
    let base = pkt().eth(src_mac, dst_mac).ip(cli.src.ip(), cli.dst.ip());
    let headers = match cli.kind {
        Kind::Udp => base
            .clone()
            .udp(cli.src.port(), cli.dst.port())
            .build()
            .len(),
        Kind::TcpSyn | Kind::TcpAck => base
            .clone()
            .tcp(cli.src.port(), cli.dst.port())
            .build()
            .len(),
    };
    let payload = vec![0x78u8; cli.size.saturating_sub(headers)];
    let template = match cli.kind {
        Kind::Udp => base
            .udp(cli.src.port(), cli.dst.port())
            .payload(&payload)
            .build(),
        Kind::TcpSyn => base
            .tcp(cli.src.port(), cli.dst.port())
            .syn()
            .payload(&payload)
            .build(),
        Kind::TcpAck => base
            .tcp(cli.src.port(), cli.dst.port())
            .ack()
            .payload(&payload)
            .build(),
    };
    let mut stream = Stream::new(
        template,
        FlowRange {
            sources: 1,
            ports: cli.flows.max(1),
        },
    )
    .map_err(|e| format!("cannot build the frames: {e:?}"))?;
    if let Some(core) = cli.core {
        if !core_affinity::set_for_current(core_affinity::CoreId { id: core }) {
            return Err(format!("cannot pin to core {core}"));
        }
    }
    let config = XskConfig::default();
    let frames = config.ring_size * 2;
    let mut sender = XskSender::open(&cli.interface, cli.queue, &config, frames, |_, buf| {
        stream.next_into(buf).unwrap_or(0)
    })
    .map_err(|e| e.to_string())?;
    let deadline = Duration::from_secs_f64(cli.seconds);
    let started = Instant::now();
    let mut sent = 0u64;
    while sent < cli.count && started.elapsed() < deadline {
        let left = usize::try_from(cli.count - sent)
            .unwrap_or(usize::MAX)
            .min(64);
        sent += sender.send(left) as u64;
    }
    let elapsed = started.elapsed().as_secs_f64();
    // Let the last frames leave before the socket closes.
    for _ in 0..100 {
        sender.send(0);
    }
    let pps = sent as f64 / elapsed;
    if cli.json {
        println!(
            "{}",
            serde_json::json!({ "sent": sent, "seconds": elapsed, "pps": pps })
        );
    } else {
        println!(
            "sent {sent} packets in {elapsed:.2} s: {:.3} Mpps",
            pps / 1e6
        );
    }
    Ok(())
}

fn main() -> ExitCode {
    match run(&Cli::parse()) {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("xlb-pktgen: {e}");
            ExitCode::FAILURE
        }
    }
}
