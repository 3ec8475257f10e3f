//! xlb as bare-metal gateways on the kernel (issue 14): `deploy/acceptance/gateways.py`
//! builds a client, a router with a LAN, two gateway namespaces running `xlb run` and three
//! backends, and checks that the two gateways (their backends listed in opposite orders)
//! answer 10^5 `xlb explain` flows identically and disagree, while a backend has reached only
//! one of them, on the third of the flows Maglev moves to it; that in dsr mode the backends
//! answer clients directly (no reply through xlb) and a download stays on its backend while
//! a backend joins; and that a download moves from one gateway to the other mid-transfer in
//! dsr and dnat mode, every byte verified. Everything it creates is removed, on failure too.
//!
//! It needs root, network namespaces, two cores and curl; without them it says why and
//! skips.

mod common;

use std::process::Command;

use common::skip_reason;

#[test]
#[ignore = "kernel test (root, BPF, network namespaces): make test runs it as root"]
fn two_gateways_agree_dsr_replies_bypass_them_and_a_download_moves_between_them() {
    if let Some(why) = skip_reason() {
        eprintln!("SKIPPED: {why}");
        return;
    }
    let script = concat!(
        env!("CARGO_MANIFEST_DIR"),
        "/../deploy/acceptance/gateways.py"
    );
    let out = Command::new("python3")
        .arg(script)
        .arg(env!("CARGO_BIN_EXE_xlb"))
        .output()
        .expect("python3 runs the gateway suite");
    let stdout = String::from_utf8_lossy(&out.stdout);
    if let Some(why) = stdout.lines().find(|l| l.starts_with("SKIPPED")) {
        eprintln!("{why}");
        return;
    }
    assert!(
        out.status.success() && stdout.contains("gateways: all passed"),
        "the gateway suite failed\n--- stdout\n{stdout}\n--- stderr\n{}",
        String::from_utf8_lossy(&out.stderr)
    );
    eprintln!("{stdout}");
}
