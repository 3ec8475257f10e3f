//! A fixed packet-layer workload for instruction counts under callgrind, which are repeatable
//! on a shared, noisy machine where wall-clock times are not (`bench/callgrind.sh`).
//!
//! `packet-workload STAGE KIND ROUNDS`: STAGE is `parse` or `pipeline` (parse + key + DNAT),
//! KIND one of tcp4, udp4, tcp6, udp6; each round handles the 64 frames of the criterion
//! benches once.

use std::hint::black_box;
use std::process::ExitCode;

use xlb_bench::{backends, frames, KINDS};
use xlb_dataplane::packet::{parse, set_destination};

fn main() -> ExitCode {
    let args: Vec<String> = std::env::args().skip(1).collect();
    let (Some(stage), Some(kind), Some(rounds)) = (args.first(), args.get(1), args.get(2)) else {
        eprintln!(
            "usage: packet-workload parse|pipeline {} ROUNDS",
            KINDS.join("|")
        );
        return ExitCode::FAILURE;
    };
    let Ok(rounds) = rounds.parse::<u32>() else {
        eprintln!("packet-workload: ROUNDS must be a number, not '{rounds}'");
        return ExitCode::FAILURE;
    };
    if !KINDS.contains(&kind.as_str()) || !["parse", "pipeline"].contains(&stage.as_str()) {
        eprintln!("packet-workload: unknown stage or kind '{stage} {kind}'");
        return ExitCode::FAILURE;
    }
    let mut batch = frames(kind);
    let backends = backends(kind);
    let mut keys = [None; 64];
    for round in 0..rounds {
        let target = &black_box(&backends)[round as usize % 2];
        for (frame, key) in batch.iter_mut().zip(keys.iter_mut()) {
            let Ok(mut p) = parse(black_box(frame)) else {
                continue;
            };
            *key = Some(p.key);
            if stage == "pipeline" {
                black_box(set_destination(frame, &mut p, target)).ok();
            }
        }
        black_box(&keys);
    }
    ExitCode::SUCCESS
}
