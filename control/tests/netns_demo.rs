//! xlb end to end on the kernel: `deploy/demo/netns-demo.sh` builds a client, a node and three
//! backend namespaces, runs `xlb run` on the node, and checks that real TCP connections and UDP
//! datagrams to a VIP (IPv4 and IPv6) are balanced over the backends and answered from the
//! VIP, that a Service without backends refuses with a reset, that file edits apply live (and
//! invalid ones are refused), that a restart after kill -9 works, and that SIGTERM detaches
//! the XDP program; and the same with the Services coming from a Kubernetes API server. The
//! script removes everything it created, on failure too.
//!
//! It needs root and network namespaces; without them it says why and skips.

mod common;

use std::process::Command;

use common::skip_reason;

fn demo(mode: &str, xdp_mode: &str, busy_poll: bool, caps: Option<&str>, source: &str) {
    let script = concat!(env!("CARGO_MANIFEST_DIR"), "/../deploy/demo/netns-demo.sh");
    let out = Command::new("bash")
        .arg(script)
        .arg(env!("CARGO_BIN_EXE_xlb"))
        .env("MODE", mode)
        .env("XDP_MODE", xdp_mode)
        .env("BUSY_POLL", busy_poll.to_string())
        .env("CAPS", caps.unwrap_or(""))
        .env("SOURCE", source)
        .env("FAKE_API", env!("CARGO_BIN_EXE_xlb-fake-api"))
        .output()
        .expect("bash runs the demo script");
    let stdout = String::from_utf8_lossy(&out.stdout);
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(
        out.status.success(),
        "the netns demo ({mode}, {xdp_mode}) failed\n--- stdout\n{stdout}\n--- stderr\n{stderr}"
    );
    assert!(
        stdout.contains(&format!("netns demo ({mode}, {xdp_mode}, {source}): ok")),
        "{stdout}"
    );
    assert!(stdout.contains("refused yes"), "{stdout}");
    if let Some(caps) = caps {
        assert!(
            stdout.contains(&format!("as nobody with {caps}")),
            "{stdout}"
        );
    }
}

/// Both modes, one after the other (they would compete for the two cores if run in
/// parallel): dnat with native XDP as root, snat with generic (SKB) XDP and busy polling as
/// nobody with only the capabilities the deployment grants, and dnat again with the Services
/// from a Kubernetes API server (control::fake_api in the node's namespace) instead of the
/// file. Each checks IPv4 and IPv6, the source the backends see, a live change, a refused
/// edit (a malformed Service for Kubernetes), and a restart after kill -9.
#[test]
#[ignore = "kernel test (root, BPF, network namespaces): make test runs it as root"]
fn xlb_balances_real_traffic_from_the_file_or_kubernetes_reloads_live_and_survives_a_crash() {
    if let Some(why) = skip_reason() {
        eprintln!("SKIPPED: {why}");
        return;
    }
    demo("dnat", "native", false, None, "file");
    // Without CAP_PERFMON the verifier refuses the filter; without CAP_IPC_LOCK the UMEM
    // cannot be locked; CAP_SYS_ADMIN is not needed.
    let caps = xlb_control::daemon::CAPABILITIES.join(",").to_lowercase();
    demo("snat", "skb", true, Some(&caps), "file");
    demo("dnat", "native", false, None, "kubernetes");
}
