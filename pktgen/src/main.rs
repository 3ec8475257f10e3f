//! `xlb-pktgen send`: sends UDP, TCP SYN or TCP ACK frames (IPv4 or IPv6) over ranges of flows
//! from AF_XDP sockets, on one or more cores, as fast as possible or at a rate, for a bounded
//! time and count, and reports what it sent: a live line on stderr, a summary or `--json` on
//! stdout.
//!
//! Few long flows: the frames are written once and sent over and over. `--new-flows`: every
//! frame is rewritten just before it is queued, so each packet is a new flow (until the range,
//! `--sources` × `--ports` × destinations, wraps). `--latency`: every UDP frame carries the
//! time it was queued, its sender and its number.
//!
//! `xlb-pktgen receive`: counts the UDP packets to one address and port on an interface (over
//! xlb's XDP filter and an AF_XDP socket), and from the stamps reports loss and latency
//! percentiles (an HDR histogram).

use std::net::SocketAddr;
use std::process::ExitCode;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use clap::{Parser, ValueEnum};
use xlb_dataplane::packet::builder::pkt;
use xlb_dataplane::packet::MacAddr;
use xlb_dataplane::packet::{Endpoint, IpProto};
use xlb_dataplane::worker::PacketIo;
use xlb_dataplane::xsk::{interface_index, SteerKey, XdpFilter, XdpMode, XskIo};
use xlb_dataplane::xsk::{XskConfig, XskSender};
use xlb_pktgen::{FlowRange, Stamp, Stream};

/// Nanoseconds since the Unix epoch: the clock both ends of a latency run share.
fn now_ns() -> u64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0, |d| u64::try_from(d.as_nanos()).unwrap_or(u64::MAX))
}

fn receive(r: &Receive) -> Result<(), String> {
    if !(0.0..=600.0).contains(&r.seconds) {
        return Err("--seconds: 0 to 600".into());
    }
    let mut filter = XdpFilter::load().map_err(|e| e.to_string())?;
    let ports = [r.interface.clone()];
    let mut io =
        XskIo::open(&ports, 0, &XskConfig::default(), &filter).map_err(|e| e.to_string())?;
    let key = SteerKey::destination(&Endpoint::new(r.listen.ip(), r.listen.port()), IpProto::UDP);
    filter.sync(&[key].into()).map_err(|e| e.to_string())?;
    filter
        .attach(
            interface_index(&r.interface).map_err(|e| e.to_string())?,
            XdpMode::Native,
        )
        .map_err(|e| e.to_string())?;
    let mut histogram = hdrhistogram::Histogram::<u64>::new_with_bounds(1, 60_000_000_000, 3)
        .map_err(|e| e.to_string())?;
    let mut frames = Vec::with_capacity(64);
    let (mut received, mut stamped) = (0u64, 0u64);
    // Per sender: frames seen and the highest number seen.
    let mut senders: std::collections::HashMap<u16, (u64, u32)> = std::collections::HashMap::new();
    let started = Instant::now();
    let mut first: Option<Instant> = None;
    let mut last = Instant::now();
    while started.elapsed() < Duration::from_secs_f64(r.seconds) {
        let n = io.receive(0, &mut frames, 64);
        if n == 0 {
            if first.is_some() && last.elapsed() > Duration::from_secs(1) {
                break;
            }
            io.flush();
            io.wait(Duration::from_millis(10));
            continue;
        }
        let now = now_ns();
        last = Instant::now();
        first.get_or_insert(last);
        for frame in &mut frames {
            if let Some(stamp) = io.with_frame(frame, |buf, len| {
                (len, buf.get(..len).and_then(Stamp::read))
            }) {
                stamped += 1;
                let _ = histogram.record(now.saturating_sub(stamp.sent_ns).max(1));
                let entry = senders.entry(stamp.sender).or_insert((0, 0));
                entry.0 += 1;
                entry.1 = entry.1.max(stamp.seq);
            }
        }
        received += n as u64;
        io.recycle(&mut frames);
        io.flush();
    }
    let span = first.map_or(0.0, |f| last.duration_since(f).as_secs_f64());
    let expected: u64 = senders.values().map(|&(_, max)| u64::from(max) + 1).sum();
    let lost = expected.saturating_sub(stamped);
    let us = |q: f64| histogram.value_at_quantile(q) as f64 / 1e3;
    if r.json {
        println!(
            "{}",
            serde_json::json!({
                "received": received, "stamped": stamped, "lost": lost,
                "loss": if expected > 0 { lost as f64 / expected as f64 } else { 0.0 },
                "pps": if span > 0.0 { received as f64 / span } else { 0.0 },
                "latency_us": { "p50": us(0.5), "p99": us(0.99), "p999": us(0.999), "max": histogram.max() as f64 / 1e3 },
            })
        );
    } else {
        println!(
            "received {received} packets ({stamped} stamped), lost {lost}; latency p50 {:.1} us, p99 {:.1} us, p99.9 {:.1} us",
            us(0.5), us(0.99), us(0.999)
        );
    }
    Ok(())
}

#[derive(Clone, Copy, ValueEnum)]
enum Kind {
    Udp,
    TcpSyn,
    TcpAck,
}

/// AF_XDP traffic generator and receiver.
#[derive(Parser)]
#[command(version, about)]
enum Command {
    /// Send frames.
    Send(Cli),
    /// Count and time stamped frames.
    Receive(Receive),
}

/// What `receive` listens to.
#[derive(Parser)]
struct Receive {
    /// The interface to receive on (queue 0).
    #[arg(long)]
    interface: String,
    /// The UDP address and port to take.
    #[arg(long)]
    listen: SocketAddr,
    /// Stop after this many seconds (at most 600), or after one idle second once traffic came.
    #[arg(long, default_value_t = 10.0)]
    seconds: f64,
    /// Print the summary as JSON.
    #[arg(long)]
    json: bool,
}

/// Send frames from AF_XDP sockets.
#[derive(Parser)]
struct Cli {
    /// The interface to send on.
    #[arg(long)]
    interface: String,
    /// Ethernet source address (default: the interface's).
    #[arg(long)]
    src_mac: Option<String>,
    /// Ethernet destination address (the next hop).
    #[arg(long)]
    dst_mac: String,
    /// First source address and port.
    #[arg(long)]
    src: SocketAddr,
    /// First destination address and port.
    #[arg(long)]
    dst: SocketAddr,
    /// What to send.
    #[arg(long, value_enum, default_value_t = Kind::Udp)]
    kind: Kind,
    /// Consecutive source addresses.
    #[arg(long, default_value_t = 1)]
    sources: u32,
    /// Consecutive source ports.
    #[arg(long, default_value_t = 1024)]
    ports: u32,
    /// Consecutive destination addresses.
    #[arg(long, default_value_t = 1)]
    destinations: u32,
    /// Consecutive destination ports.
    #[arg(long, default_value_t = 1)]
    dst_ports: u32,
    /// Rewrite every frame before sending it: a new flow per packet.
    #[arg(long)]
    new_flows: bool,
    /// Stamp every UDP frame with its send time, sender and number (for `receive`).
    #[arg(long)]
    latency: bool,
    /// Frame size in bytes without the FCS (at least the headers), or "imix" (7:4:1 of 60,
    /// 590 and 1514 bytes).
    #[arg(long, default_value = "60")]
    size: String,
    /// Packets per second over all cores (default: as fast as possible).
    #[arg(long)]
    rate: Option<f64>,
    /// Stop after this many seconds (at most 600).
    #[arg(long, default_value_t = 5.0)]
    seconds: f64,
    /// Stop after this many packets (over all cores).
    #[arg(long, default_value_t = u64::MAX)]
    count: u64,
    /// The cores to send from, one socket each, on queues 0, 1, ... of the interface.
    #[arg(long, value_delimiter = ',', default_value = "0")]
    cores: Vec<usize>,
    /// Bind the sockets in zero-copy mode (needs a driver with AF_XDP zero-copy; veth has
    /// none) instead of copy mode.
    #[arg(long)]
    zero_copy: bool,
    /// Print the summary as JSON.
    #[arg(long)]
    json: bool,
    /// No live progress line.
    #[arg(long)]
    quiet: bool,
}

fn mac(text: &str) -> Result<MacAddr, String> {
    text.parse().map_err(|e| format!("{text:?}: {e}"))
}

/// The frame sizes, one per frame slot in turn.
fn sizes(spec: &str) -> Result<Vec<usize>, String> {
    if spec == "imix" {
        let mut v = vec![60; 7];
        v.extend([590; 4]);
        v.push(1514);
        return Ok(v);
    }
    let size: usize = spec
        .parse()
        .map_err(|_| format!("--size {spec:?}: a number or imix"))?;
    if !(60..=3000).contains(&size) {
        return Err("--size: 60 to 3000 bytes".into());
    }
    Ok(vec![size])
}

/// One stream per distinct frame size.
fn streams(cli: &Cli, sizes: &[usize]) -> Result<Vec<Stream>, String> {
    let src_mac = match &cli.src_mac {
        Some(m) => mac(m)?,
        None => mac(
            std::fs::read_to_string(format!("/sys/class/net/{}/address", cli.interface))
                .map_err(|e| format!("{}: {e}", cli.interface))?
                .trim(),
        )?,
    };
    let dst_mac = mac(&cli.dst_mac)?;
    let range = FlowRange {
        sources: cli.sources,
        ports: cli.ports,
        destinations: cli.destinations,
        dst_ports: cli.dst_ports,
    };
    let mut distinct: Vec<usize> = sizes.to_vec();
    distinct.dedup();
    distinct.sort_unstable();
    distinct.dedup();
    distinct
        .iter()
        .map(|&size| {
            let base = pkt().eth(src_mac, dst_mac).ip(cli.src.ip(), cli.dst.ip());
            let (sp, dp) = (cli.src.port(), cli.dst.port());
            let build = |payload: &[u8]| match cli.kind {
                Kind::Udp => base.clone().udp(sp, dp).payload(payload).build(),
                Kind::TcpSyn => base.clone().tcp(sp, dp).syn().payload(payload).build(),
                Kind::TcpAck => base.clone().tcp(sp, dp).ack().payload(payload).build(),
            };
            let headers = build(&[]).len();
            let template = build(&vec![0x78u8; size.saturating_sub(headers)]);
            Stream::new(template, range).map_err(|e| format!("cannot build the frames: {e:?}"))
        })
        .collect()
}

struct Shared {
    sent: AtomicU64,
    stop: AtomicBool,
}

fn sender(
    cli: &Cli,
    index: usize,
    core: usize,
    sizes: &[usize],
    shared: &Shared,
    started: Instant,
) -> Result<Instant, String> {
    if !core_affinity::set_for_current(core_affinity::CoreId { id: core }) {
        return Err(format!("cannot pin to core {core}"));
    }
    let of = cli.cores.len() as u64;
    let mut streams: Vec<Stream> = streams(cli, sizes)?
        .into_iter()
        .map(|s| s.share(index as u64, of))
        .collect();
    let distinct: Vec<usize> = {
        let mut d = sizes.to_vec();
        d.sort_unstable();
        d.dedup();
        d
    };
    let slot_stream: Vec<usize> = sizes
        .iter()
        .map(|s| distinct.iter().position(|d| d == s).unwrap_or(0))
        .collect();
    let config = XskConfig {
        zero_copy: cli.zero_copy,
        ..XskConfig::default()
    };
    let frames = config.ring_size * 2;
    let queue = u32::try_from(index).unwrap_or(0);
    let mut sender = XskSender::open(&cli.interface, queue, &config, frames, |i, buf| {
        streams[slot_stream[i % slot_stream.len()]]
            .next_into(buf)
            .unwrap_or(0)
    })
    .map_err(|e| e.to_string())?;
    let per_core_rate = cli.rate.map(|r| r / of as f64);
    let per_core_count = cli.count / of + u64::from((index as u64) < cli.count % of);
    let mut sent = 0u64;
    let mut slot = 0usize;
    let mut stamped = 0u32;
    // Relaxed: a stop flag and statistics; nothing else is communicated through them.
    while !shared.stop.load(Ordering::Relaxed) && sent < per_core_count {
        let mut budget = usize::try_from(per_core_count - sent)
            .unwrap_or(usize::MAX)
            .min(64);
        if let Some(rate) = per_core_rate {
            let allowed = (started.elapsed().as_secs_f64() * rate) as u64;
            budget = budget.min(usize::try_from(allowed.saturating_sub(sent)).unwrap_or(0));
            if budget == 0 {
                std::hint::spin_loop();
                continue;
            }
        }
        let n = if cli.new_flows || cli.latency {
            sender.send_with(budget, |buf| {
                let s = slot_stream[slot % slot_stream.len()];
                slot = slot.wrapping_add(1);
                // The stream cycles through its range: with a small range, the same flows as
                // the frames written at open.
                let len = streams[s].next_into(buf).unwrap_or(0);
                if cli.latency {
                    if let Some(frame) = buf.get_mut(..len) {
                        let stamp = Stamp {
                            sent_ns: now_ns(),
                            seq: stamped,
                            sender: index as u16,
                        };
                        stamped = stamped.wrapping_add(1);
                        stamp.write(frame);
                    }
                }
                len
            })
        } else {
            sender.send(budget)
        };
        sent += n as u64;
        shared.sent.fetch_add(n as u64, Ordering::Relaxed);
    }
    let done = Instant::now();
    // Let the last frames leave before the socket closes.
    for _ in 0..100 {
        sender.send(0);
    }
    Ok(done)
}

fn run(cli: &Cli) -> Result<(), String> {
    if !(0.0..=600.0).contains(&cli.seconds) {
        return Err("--seconds: 0 to 600".into());
    }
    if cli.rate.is_some_and(|r| r.is_nan() || r <= 0.0) {
        return Err("--rate: a positive number of packets per second".into());
    }
    let sizes = sizes(&cli.size)?;
    streams(cli, &sizes)?; // check the arguments before starting anything
    let shared = Arc::new(Shared {
        sent: AtomicU64::new(0),
        stop: AtomicBool::new(false),
    });
    let started = Instant::now();
    let deadline = Duration::from_secs_f64(cli.seconds);
    let mean_size = sizes.iter().sum::<usize>() as f64 / sizes.len() as f64;
    let result = std::thread::scope(|scope| {
        let handles: Vec<_> = cli
            .cores
            .iter()
            .enumerate()
            .map(|(i, &core)| {
                let (shared, sizes) = (&shared, &sizes);
                scope.spawn(move || sender(cli, i, core, sizes, shared, started))
            })
            .collect();
        let mut last = (Instant::now(), 0u64);
        while started.elapsed() < deadline && !handles.iter().all(|h| h.is_finished()) {
            std::thread::sleep(Duration::from_millis(20));
            let now = Instant::now();
            if now.duration_since(last.0) >= Duration::from_secs(1) {
                // Relaxed: statistics.
                let sent = shared.sent.load(Ordering::Relaxed);
                let pps = (sent - last.1) as f64 / now.duration_since(last.0).as_secs_f64();
                if !cli.quiet {
                    eprint!(
                        "\r{:6.1} s  {:>12} packets  {:7.3} Mpps  {:6.2} Gbit/s ",
                        started.elapsed().as_secs_f64(),
                        sent,
                        pps / 1e6,
                        pps * (mean_size + 24.0) * 8.0 / 1e9
                    );
                }
                last = (now, sent);
            }
        }
        // Relaxed: the join orders the rest.
        shared.stop.store(true, Ordering::Relaxed);
        handles
            .into_iter()
            .map(|h| {
                h.join()
                    .unwrap_or_else(|_| Err("a sender thread failed".into()))
            })
            .collect::<Result<Vec<Instant>, String>>()
    });
    if !cli.quiet {
        eprintln!();
    }
    // The time the senders took, not the time this thread noticed they were done.
    let finished = result?.into_iter().max().unwrap_or_else(Instant::now);
    let elapsed = finished.duration_since(started).as_secs_f64();
    let sent = shared.sent.load(Ordering::Relaxed);
    let pps = sent as f64 / elapsed;
    let held = cli.rate.map(|r| pps / r);
    if cli.json {
        let summary = serde_json::json!({
            "sent": sent,
            "seconds": elapsed,
            "pps": pps,
            "pps_per_core": pps / cli.cores.len() as f64,
            "gbps": pps * (mean_size + 24.0) * 8.0 / 1e9,
            "rate_held": held,
        });
        println!("{summary}");
    } else {
        print!(
            "sent {sent} packets in {elapsed:.2} s: {:.3} Mpps",
            pps / 1e6
        );
        match held {
            Some(h) => println!(" ({:.1}% of the rate asked)", h * 100.0),
            None => println!(),
        }
    }
    Ok(())
}

fn main() -> ExitCode {
    let result = match Command::parse() {
        Command::Send(cli) => run(&cli),
        Command::Receive(r) => receive(&r),
    };
    match result {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("xlb-pktgen: {e}");
            ExitCode::FAILURE
        }
    }
}
