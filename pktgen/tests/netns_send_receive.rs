//! `xlb-pktgen send` to `xlb-pktgen receive` over a veth pair between two namespaces the test
//! creates (and removes, on failure too): every stamped packet arrives, none is reported lost,
//! the rate asked is held, and latency percentiles come out. Bounded: 20 000 packets at
//! 40 000 pps, 10 s at most. Skips, saying why, without root or network namespaces.

use std::process::{Command, Stdio};

/// Removes the namespaces (and so the veth pair and the receiver's XDP program) and stops the
/// receiver, also when an assertion fails.
struct Namespaces(Vec<String>, Option<std::process::Child>);

impl Drop for Namespaces {
    fn drop(&mut self) {
        if let Some(child) = &mut self.1 {
            let _ = child.kill();
            let _ = child.wait();
        }
        for ns in &self.0 {
            let _ = Command::new("ip").args(["netns", "del", ns]).status();
        }
    }
}

fn ip(args: &[&str]) {
    let ok = Command::new("ip")
        .args(args)
        .status()
        .map(|s| s.success())
        .unwrap_or(false);
    assert!(ok, "ip {}", args.join(" "));
}

#[test]
fn every_stamped_packet_sent_arrives_with_its_latency_and_the_rate_is_held() {
    let root = Command::new("id")
        .arg("-u")
        .output()
        .map(|o| o.stdout == b"0\n")
        .unwrap_or(false);
    if !root {
        eprintln!("SKIPPED: not root: AF_XDP and network namespaces need root");
        return;
    }
    let id = std::process::id();
    let (a, b) = (format!("xlbpa{id}"), format!("xlbpb{id}"));
    if !Command::new("ip")
        .args(["netns", "add", &a])
        .status()
        .map(|s| s.success())
        .unwrap_or(false)
    {
        eprintln!("SKIPPED: this kernel or sandbox cannot create network namespaces");
        return;
    }
    let mut guard = Namespaces(vec![a.clone(), b.clone()], None);
    ip(&["netns", "add", &b]);
    ip(&[
        "link", "add", "va", "netns", &a, "type", "veth", "peer", "name", "vb", "netns", &b,
    ]);
    ip(&["-n", &a, "addr", "add", "198.18.1.1/24", "dev", "va"]);
    ip(&["-n", &b, "addr", "add", "198.18.1.2/24", "dev", "vb"]);
    ip(&["-n", &a, "link", "set", "va", "up"]);
    ip(&["-n", &b, "link", "set", "vb", "up"]);
    let mac = Command::new("ip")
        .args(["netns", "exec", &b, "cat", "/sys/class/net/vb/address"])
        .output()
        .unwrap();
    let mac = String::from_utf8_lossy(&mac.stdout).trim().to_owned();
    let bin = env!("CARGO_BIN_EXE_xlb-pktgen");
    let mut receiver = Command::new("ip")
        .args([
            "netns",
            "exec",
            &b,
            bin,
            "receive",
            "--interface",
            "vb",
            "--listen",
        ])
        .args(["198.18.1.2:9000", "--seconds", "10", "--json"])
        .stdout(Stdio::piped())
        .stderr(Stdio::inherit())
        .spawn()
        .unwrap();
    let receiver_stdout = receiver.stdout.take();
    guard.1 = Some(receiver);
    std::thread::sleep(std::time::Duration::from_millis(1500));
    let sent = Command::new("ip")
        .args([
            "netns",
            "exec",
            &a,
            bin,
            "send",
            "--interface",
            "va",
            "--dst-mac",
            &mac,
        ])
        .args([
            "--src",
            "198.18.1.1:10000",
            "--dst",
            "198.18.1.2:9000",
            "--ports",
            "64",
        ])
        .args([
            "--count",
            "20000",
            "--rate",
            "40000",
            "--seconds",
            "5",
            "--latency",
        ])
        .args(["--json", "--quiet"])
        .output()
        .unwrap();
    assert!(
        sent.status.success(),
        "{}",
        String::from_utf8_lossy(&sent.stderr)
    );
    let sent: serde_json::Value = serde_json::from_slice(&sent.stdout).unwrap();
    let status = guard.1.take().map(|mut c| c.wait().unwrap()).unwrap();
    assert!(
        status.success(),
        "the receiver failed (its stderr is above)"
    );
    let mut stdout = Vec::new();
    std::io::Read::read_to_end(&mut receiver_stdout.unwrap(), &mut stdout).unwrap();
    let got: serde_json::Value = serde_json::from_slice(&stdout).unwrap();
    assert_eq!(sent["sent"], 20000, "{sent}");
    let held = sent["rate_held"].as_f64().unwrap();
    assert!((0.9..1.1).contains(&held), "rate held {held}");
    assert_eq!(got["stamped"], 20000, "{got}");
    assert_eq!(got["lost"], 0, "{got}");
    let p50 = got["latency_us"]["p50"].as_f64().unwrap();
    let p999 = got["latency_us"]["p999"].as_f64().unwrap();
    assert!(p50 > 0.0 && p999 >= p50, "{got}");
}
