//! xlb end to end on the kernel: `deploy/demo/netns-demo.sh` builds a client, a node and three
//! backend namespaces, runs `xlb run` on the node, and checks that real TCP connections and UDP
//! datagrams to a VIP are balanced over the backends and answered from the VIP, that a Service
//! without backends refuses with a reset, and that SIGTERM detaches the XDP program. The
//! script removes everything it created, on failure too.
//!
//! It needs root and network namespaces; without them it says why and skips.

use std::process::Command;

fn skip_reason() -> Option<String> {
    let uid = Command::new("id").arg("-u").output().ok()?;
    if String::from_utf8_lossy(&uid.stdout).trim() != "0" {
        return Some("not root: AF_XDP, XDP and network namespaces need root".into());
    }
    let probe = format!("xlbprobe{}", std::process::id());
    let added = Command::new("ip").args(["netns", "add", &probe]).status();
    let _ = Command::new("ip").args(["netns", "del", &probe]).status();
    match added {
        Ok(s) if s.success() => None,
        _ => Some("this kernel or sandbox cannot create network namespaces".into()),
    }
}

#[test]
fn xlb_balances_tcp_and_udp_between_namespaces_refuses_without_backends_and_detaches_on_sigterm() {
    if let Some(why) = skip_reason() {
        eprintln!("SKIPPED: {why}");
        return;
    }
    let script = concat!(env!("CARGO_MANIFEST_DIR"), "/../deploy/demo/netns-demo.sh");
    let out = Command::new("bash")
        .arg(script)
        .arg(env!("CARGO_BIN_EXE_xlb"))
        .output()
        .expect("bash runs the demo script");
    let stdout = String::from_utf8_lossy(&out.stdout);
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(
        out.status.success(),
        "the netns demo failed\n--- stdout\n{stdout}\n--- stderr\n{stderr}"
    );
    assert!(stdout.contains("netns demo: ok"), "{stdout}");
    assert!(stdout.contains("refused yes"), "{stdout}");
}
