//! The end-to-end benchmark's floor: an AF_XDP forwarder that rewrites every frame it gets to
//! one backend without any lookup (parse, DNAT with incremental checksums, Ethernet), over the
//! same XDP filter, sockets and batch sizes as xlb. What xlb costs beyond this is its lookup
//! and decision.
//!
//! Usage: bare-forwarder IN_IFACE OUT_IFACE VIP:PORT/udp BACKEND:PORT BACKEND_MAC SECONDS CORE

use std::collections::HashSet;
use std::net::SocketAddr;
use std::process::ExitCode;
use std::time::{Duration, Instant};

use xlb_dataplane::packet::{parse, set_destination, set_ethernet, Endpoint, IpProto, MacAddr};
use xlb_dataplane::worker::PacketIo;
use xlb_dataplane::xsk::{interface_index, SteerKey, XdpFilter, XdpMode, XskConfig, XskIo};

fn mac(text: &str) -> Result<MacAddr, String> {
    text.parse().map_err(|e| format!("{text:?}: {e}"))
}

fn run(args: &[String]) -> Result<(), String> {
    let [input, output, vip, backend, backend_mac, seconds, core] = args else {
        return Err(
            "usage: bare-forwarder IN OUT VIP:PORT BACKEND:PORT BACKEND_MAC SECONDS CORE".into(),
        );
    };
    let vip: SocketAddr = vip.parse().map_err(|e| format!("{vip}: {e}"))?;
    let backend: SocketAddr = backend.parse().map_err(|e| format!("{backend}: {e}"))?;
    let to = Endpoint::new(backend.ip(), backend.port());
    let dst_mac = mac(backend_mac)?;
    let src_mac = mac(
        &std::fs::read_to_string(format!("/sys/class/net/{output}/address"))
            .map_err(|e| e.to_string())?,
    )?;
    let seconds: f64 = seconds.parse().map_err(|_| "SECONDS: a number")?;
    let core: usize = core.parse().map_err(|_| "CORE: a number")?;
    if !core_affinity::set_for_current(core_affinity::CoreId { id: core }) {
        return Err(format!("cannot pin to core {core}"));
    }
    let mut filter = XdpFilter::load().map_err(|e| e.to_string())?;
    let interfaces = [input.clone(), output.clone()];
    let mut io =
        XskIo::open(&interfaces, 0, &XskConfig::default(), &filter).map_err(|e| e.to_string())?;
    let steer: HashSet<SteerKey> = [SteerKey::destination(
        &Endpoint::new(vip.ip(), vip.port()),
        IpProto::UDP,
    )]
    .into();
    filter.sync(&steer).map_err(|e| e.to_string())?;
    for name in &interfaces {
        filter
            .attach(
                interface_index(name).map_err(|e| e.to_string())?,
                XdpMode::Native,
            )
            .map_err(|e| e.to_string())?;
    }
    let mut rx = Vec::with_capacity(64);
    let mut tx = Vec::with_capacity(64);
    let mut drop = Vec::with_capacity(64);
    let started = Instant::now();
    let mut forwarded = 0u64;
    while started.elapsed() < Duration::from_secs_f64(seconds) {
        let n = io.receive(0, &mut rx, 64);
        for mut frame in rx.drain(..) {
            let ok = io.with_frame(&mut frame, |buf, len| {
                let Some(frame) = buf.get_mut(..len) else {
                    return (len, false);
                };
                let Ok(mut parsed) = parse(frame) else {
                    return (len, false);
                };
                let ok = set_destination(frame, &mut parsed, &to).is_ok()
                    && set_ethernet(frame, src_mac, dst_mac).is_ok();
                (len, ok)
            });
            if ok {
                tx.push(frame);
            } else {
                drop.push(frame);
            }
        }
        forwarded += io.transmit(1, &mut tx) as u64;
        drop.append(&mut tx);
        io.recycle(&mut drop);
        io.flush();
        if n == 0 {
            io.wait(Duration::from_millis(1));
        }
    }
    println!("{forwarded}");
    Ok(())
}

fn main() -> ExitCode {
    let args: Vec<String> = std::env::args().skip(1).collect();
    match run(&args) {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("bare-forwarder: {e}");
            ExitCode::FAILURE
        }
    }
}
