//! xlb as a node's kube-proxy on the kernel (issue 13): `deploy/acceptance/node.py` builds two
//! node namespaces with pods behind routed per-pod veths, runs `xlb run` with a `node:`
//! section on one of them, and checks with curl and UDP sockets that the node's pods and the
//! node itself reach ClusterIPs served on either node (IPv4 and IPv6), hairpin, detect-local
//! masquerading, a node port from outside, an unknown port refused, direct pod-to-pod traffic
//! left alone, a restart after kill -9, and a SIGTERM that removes the link, the nftables
//! table and the rules; and with two workers on a two-queue link, that flows spread over
//! both, connections whose directions land on different workers work, and a Service change
//! reaches both. The script removes everything it created, on failure too.
//!
//! Then the two-node demo of `make demo` (`deploy/demo/two-nodes.py`), checked.
//!
//! It needs root, network namespaces, curl and nft; without them it says why and skips.

mod common;

use std::process::Command;

use common::skip_reason;

fn suite(workers: u32) {
    let script = concat!(env!("CARGO_MANIFEST_DIR"), "/../deploy/acceptance/node.py");
    let out = Command::new("python3")
        .arg(script)
        .arg(env!("CARGO_BIN_EXE_xlb"))
        .args(["--workers", &workers.to_string()])
        .output()
        .expect("python3 runs the node suite");
    let stdout = String::from_utf8_lossy(&out.stdout);
    let stderr = String::from_utf8_lossy(&out.stderr);
    if let Some(why) = stdout.lines().find(|l| l.starts_with("SKIPPED")) {
        eprintln!("{why}");
        return;
    }
    let plural = if workers > 1 { "s" } else { "" };
    assert!(
        out.status.success()
            && stdout.contains(&format!(
                "node (kube-proxy, {workers} worker{plural}): all passed"
            )),
        "the node suite ({workers} workers) failed\n--- stdout\n{stdout}\n--- stderr\n{stderr}"
    );
    eprintln!("{stdout}");
}

/// `make demo`'s two-node demo, checked: both nodes run xlb with the Services from one
/// Kubernetes API server, and every answer (which pod, which client address) is the
/// expected one, before and after an endpoint moves between the nodes.
fn two_node_demo() {
    let script = concat!(env!("CARGO_MANIFEST_DIR"), "/../deploy/demo/two-nodes.py");
    let out = Command::new("python3")
        .arg(script)
        .arg(env!("CARGO_BIN_EXE_xlb"))
        .arg(env!("CARGO_BIN_EXE_xlb-fake-api"))
        .output()
        .expect("python3 runs the two-node demo");
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert!(
        out.status.success() && stdout.contains("two-node demo: ok"),
        "the two-node demo failed\n--- stdout\n{stdout}\n--- stderr\n{}",
        String::from_utf8_lossy(&out.stderr)
    );
    eprintln!("{stdout}");
}

/// One worker, then two, then the two-node demo (one after the other: they would compete for
/// the two cores).
#[test]
#[ignore = "kernel test (root, BPF, network namespaces): make test runs it as root"]
fn pods_and_the_node_itself_reach_cluster_ips_through_xlb_on_one_node_or_two() {
    if let Some(why) = skip_reason() {
        eprintln!("SKIPPED: {why}");
        return;
    }
    suite(1);
    suite(2);
    two_node_demo();
}
