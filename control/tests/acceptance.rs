//! xlb against real clients and servers, on the kernel: `deploy/acceptance/acceptance.py`
//! builds a client, a node and three backend namespaces running nginx, dnsmasq and a socat
//! hasher, runs `xlb run` on the node, and checks what an operator relies on (issue 11):
//! HTTP keep-alive and new connections, DNS over UDP, a 24 MiB upload and a 48 MiB download
//! verified by hash, IPv4 and IPv6, checksum offload on and off, a new client's first
//! connection without a SYN retransmission, port reuse after a backend removal, a backend
//! removed mid-download (reset at once), a reload mid-transfer, restarts by kill -9 and by
//! SIGTERM under a read-only download (dnat), and SYN and UDP floods of new flows against a
//! 1024-entry flow table while downloads run. In dnat and in snat mode.
//!
//! It needs root, network namespaces and the Debian packages `make deps` installs; without
//! them it says why and skips.

mod common;

use std::process::Command;

use common::skip_reason;

fn acceptance(mode: &str) {
    let script = concat!(
        env!("CARGO_MANIFEST_DIR"),
        "/../deploy/acceptance/acceptance.py"
    );
    // The generator is built beside xlb (the workspace's target directory).
    let xlb = std::path::Path::new(env!("CARGO_BIN_EXE_xlb"));
    let pktgen = xlb.with_file_name("xlb-pktgen");
    assert!(
        pktgen.exists(),
        "{} is missing: build the workspace first (make test does)",
        pktgen.display()
    );
    let out = Command::new("python3")
        .arg(script)
        .arg(xlb)
        .args(["--mode", mode, "--pktgen"])
        .arg(&pktgen)
        .output()
        .expect("python3 runs the acceptance suite");
    let stdout = String::from_utf8_lossy(&out.stdout);
    let stderr = String::from_utf8_lossy(&out.stderr);
    if let Some(why) = stdout.lines().find(|l| l.starts_with("SKIPPED")) {
        eprintln!("{why}");
        return;
    }
    assert!(
        out.status.success() && stdout.contains(&format!("acceptance ({mode}): all passed")),
        "the acceptance suite failed in {mode} mode\n--- stdout\n{stdout}\n--- stderr\n{stderr}"
    );
    // Figures, for the record (cargo test --nocapture shows them).
    eprintln!("{stdout}");
}

/// Both modes, one after the other (they would compete for the two cores in parallel).
#[test]
#[ignore = "kernel test (root, BPF, network namespaces): make test runs it as root"]
fn real_clients_and_servers_survive_floods_restarts_port_reuse_and_removed_backends() {
    if let Some(why) = skip_reason() {
        eprintln!("SKIPPED: {why}");
        return;
    }
    acceptance("dnat");
    acceptance("snat");
}
