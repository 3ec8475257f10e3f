//! The `xlb` binary as a user runs it.

use std::process::Command;

fn xlb(args: &[&str]) -> (bool, String, String) {
    let out = Command::new(env!("CARGO_BIN_EXE_xlb"))
        .args(args)
        .output()
        .expect("the xlb binary runs");
    (
        out.status.success(),
        String::from_utf8_lossy(&out.stdout).into_owned(),
        String::from_utf8_lossy(&out.stderr).into_owned(),
    )
}

#[test]
fn maglev_json_reports_table_size_shares_and_moved_fraction() {
    let (ok, stdout, stderr) = xlb(&[
        "maglev",
        "--backends",
        "198.19.1.2:8080,198.19.2.2:8080,198.19.3.2:8080",
        "--weights",
        "1,1,2",
        "--table-size",
        "65537",
        "--remove",
        "198.19.2.2:8080",
        "--json",
    ]);
    assert!(ok, "{stderr}");
    let v: serde_json::Value = serde_json::from_str(&stdout).unwrap();
    assert_eq!(v["table_size"], 65537);
    let share = v["shares"]["198.19.3.2:8080"].as_f64().unwrap();
    assert!((share - 0.5).abs() < 0.001, "{share}");
    let moved = v["moved_fraction"].as_f64().unwrap();
    assert!((0.25..0.35).contains(&moved), "{moved}");
}

#[test]
fn maglev_with_a_bad_table_size_fails_with_a_clear_message() {
    let (ok, _, stderr) = xlb(&[
        "maglev",
        "--backends",
        "198.19.1.2:80",
        "--table-size",
        "1000",
    ]);
    assert!(!ok);
    assert!(
        stderr.contains("table size 1000 is not a prime"),
        "{stderr}"
    );
}

#[test]
fn decode_names_the_drop_reason_of_a_short_frame() {
    let (ok, stdout, stderr) = xlb(&["decode", "00112233"]);
    assert!(ok, "{stderr}");
    assert!(stdout.contains("drop  EthernetTruncated"), "{stdout}");
}

const EXAMPLE: &str = concat!(env!("CARGO_MANIFEST_DIR"), "/../deploy/examples/xlb.yaml");

#[test]
fn the_example_configuration_checks_clean() {
    let (ok, out, err) = xlb(&["check", "--config", EXAMPLE]);
    assert!(ok, "{err}");
    assert!(out.contains("ok"), "{out}");
}

#[test]
fn check_says_when_services_also_come_from_kubernetes() {
    let path = std::env::temp_dir().join(format!("xlb-k8s-{}.yaml", std::process::id()));
    std::fs::write(
        &path,
        "interfaces: [eth0]\nkubernetes: { node_name: node-a, min_sync_period_ms: 20 }\n",
    )
    .unwrap();
    let (ok, out, err) = xlb(&["check", "--config", path.to_str().unwrap()]);
    let _ = std::fs::remove_file(&path);
    assert!(ok, "{err}");
    assert!(
        out.contains("0 Service ports")
            && out.contains("Services from Kubernetes")
            && out.contains("node node-a")
            && out.contains("every 20 ms"),
        "{out}"
    );
}

#[test]
fn explain_json_names_one_of_the_services_ready_backends() {
    let (ok, out, err) = xlb(&[
        "explain",
        "--json",
        "--config",
        EXAMPLE,
        "tcp",
        "198.18.0.1:40000",
        "198.18.64.1:80",
    ]);
    assert!(ok, "{err}");
    let v: serde_json::Value = serde_json::from_str(&out).unwrap();
    let backend = v["backend"].as_str().unwrap();
    assert!(
        ["198.18.129.1:8080", "198.18.130.1:8080"].contains(&backend),
        "a ready backend on the target port, not the terminating one: {backend}"
    );
}

#[test]
fn check_refuses_a_bad_value_naming_its_field_and_line() {
    let bad = std::env::temp_dir().join(format!("xlb-bad-{}.yaml", std::process::id()));
    let example = std::fs::read_to_string(EXAMPLE).unwrap();
    let line = 1 + example
        .lines()
        .position(|l| l.contains("weight: 2"))
        .unwrap();
    std::fs::write(&bad, example.replace("weight: 2", "weight: -2")).unwrap();
    let (ok, _, err) = xlb(&["check", "--config", bad.to_str().unwrap()]);
    let _ = std::fs::remove_file(&bad);
    assert!(!ok);
    assert!(
        err.contains("services[0].backends[1].weight") && err.contains(&format!("line {line} ")),
        "{err}"
    );
}

#[test]
fn run_with_a_missing_interface_is_a_clear_error_not_a_panic() {
    let config = std::env::temp_dir().join(format!("xlb-noif-{}.yaml", std::process::id()));
    std::fs::write(&config, "interfaces: [xlbnope0]\nservices: []\n").unwrap();
    let (ok, _, err) = xlb(&["run", "--config", config.to_str().unwrap()]);
    let _ = std::fs::remove_file(&config);
    assert!(!ok);
    assert!(err.contains("no interface named \"xlbnope0\""), "{err}");
    assert!(!err.contains("panicked"), "{err}");
}

#[test]
fn run_without_privilege_is_a_clear_error_not_a_panic() {
    let config = std::env::temp_dir().join(format!("xlb-lo-{}.yaml", std::process::id()));
    std::fs::write(&config, "interfaces: [lo]\nservices: []\n").unwrap();
    let root = Command::new("id")
        .arg("-u")
        .output()
        .map(|o| o.stdout == b"0\n")
        .unwrap_or(false);
    // As root, drop to nobody for this one run; otherwise this already is the unprivileged case.
    let mut command = if root {
        let mut c = Command::new("setpriv");
        c.args([
            "--reuid=65534",
            "--regid=65534",
            "--clear-groups",
            env!("CARGO_BIN_EXE_xlb"),
        ]);
        c
    } else {
        Command::new(env!("CARGO_BIN_EXE_xlb"))
    };
    let out = command
        .args(["run", "--config", config.to_str().unwrap()])
        .output()
        .unwrap();
    let _ = std::fs::remove_file(&config);
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(!out.status.success());
    assert!(
        err.contains("cannot load the XDP filter") && err.contains("needs root"),
        "{err}"
    );
    assert!(!err.contains("panicked"), "{err}");
}

/// Two gateways given the same Services in different orders (Services and backends shuffled)
/// must send every flow to the same backend (Maglev's promise behind ECMP): `xlb explain
/// --batch` answers 100 000 random flows identically for both.
#[test]
fn explain_batch_answers_identically_for_the_same_services_in_any_order() {
    use std::io::Write as _;
    use std::process::Stdio;

    let dir = std::env::temp_dir().join(format!("xlb-batch-{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    let services: Vec<String> = (0..20u32)
        .map(|s| {
            let backends: Vec<String> = (1..=(3 + s % 5))
                .map(|b| format!("{{ address: 198.18.{}.{} }}", 128 + s, b))
                .collect();
            format!(
                "  - {{ name: s{s}, vip: 198.18.64.{}, ports: [{{ port: 80, target_port: 8080 }}, {{ port: 53, protocol: udp }}], backends: [{}] }}",
                s + 1,
                backends.join(", ")
            )
        })
        .collect();
    let reversed: Vec<String> = services
        .iter()
        .rev()
        .map(|line| {
            // The same backends, listed the other way round.
            let (head, list) = line.split_once("backends: [").unwrap();
            let list = list.trim_end_matches(" }").trim_end_matches(']');
            let mut items: Vec<&str> = list.split(", ").collect();
            items.reverse();
            format!("{head}backends: [{}] }}", items.join(", "))
        })
        .collect();
    let write = |name: &str, lines: &[String]| {
        let path = dir.join(name);
        std::fs::write(
            &path,
            format!("interfaces: [a]\nservices:\n{}\n", lines.join("\n")),
        )
        .unwrap();
        path
    };
    let a = write("a.yaml", &services);
    let b = write("b.yaml", &reversed);
    assert_ne!(std::fs::read(&a).unwrap(), std::fs::read(&b).unwrap());

    let mut x = 0x2545_f491_4f6c_dd1d_u64;
    let mut flows = String::new();
    for _ in 0..100_000 {
        x ^= x << 13;
        x ^= x >> 7;
        x ^= x << 17;
        let (proto, port) = if x & 1 == 0 { ("tcp", 80) } else { ("udp", 53) };
        let vip = 1 + (x >> 8) % 21; // one in 21 is no Service
        flows.push_str(&format!(
            "{proto} 198.18.{}.{}:{} 198.18.64.{vip}:{port}\n",
            (x >> 16) % 64,
            1 + (x >> 24) % 250,
            1024 + (x >> 32) % 60_000
        ));
    }
    let answers = |config: &std::path::Path| {
        let mut child = Command::new(env!("CARGO_BIN_EXE_xlb"))
            .args([
                "explain",
                "--config",
                config.to_str().unwrap(),
                "--batch",
                "-",
            ])
            .stdin(Stdio::piped())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .spawn()
            .unwrap();
        let mut stdin = child.stdin.take().unwrap();
        let input = flows.clone();
        let feeder = std::thread::spawn(move || stdin.write_all(input.as_bytes()));
        let out = child.wait_with_output().unwrap();
        feeder.join().unwrap().unwrap();
        assert!(
            out.status.success(),
            "{}",
            String::from_utf8_lossy(&out.stderr)
        );
        String::from_utf8(out.stdout).unwrap()
    };
    let (from_a, from_b) = (answers(&a), answers(&b));
    assert_eq!(from_a.lines().count(), 100_000);
    let differ = from_a
        .lines()
        .zip(from_b.lines())
        .filter(|(p, q)| p != q)
        .count();
    assert_eq!(differ, 0, "flows answered differently");
    let forwarded = from_a.lines().filter(|l| !l.ends_with(" -")).count();
    assert!(
        (90_000..97_000).contains(&forwarded),
        "about 20 in 21 flows reach a Service: {forwarded}"
    );

    // A line that is not a flow is an error naming it.
    let bad = dir.join("bad.txt");
    std::fs::write(&bad, "tcp 198.18.0.1:1 198.18.64.1:80\nicmp 1 2\n").unwrap();
    let (ok, _, err) = xlb(&[
        "explain",
        "--config",
        a.to_str().unwrap(),
        "--batch",
        bad.to_str().unwrap(),
    ]);
    assert!(!ok);
    assert!(err.contains("line 2"), "{err}");
    let _ = std::fs::remove_dir_all(&dir);
}

#[test]
fn status_without_a_running_xlb_says_so_instead_of_hanging() {
    // A port of 127.0.0.1 nothing listens on: a bound socket closed again.
    let port = std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port();
    let admin = format!("127.0.0.1:{port}");
    for args in [
        &["status", "--admin", &admin][..],
        &["status", "--json", "--admin", &admin],
        &["metrics", "--admin", &admin],
    ] {
        let (ok, _, err) = xlb(args);
        assert!(!ok, "{args:?}");
        assert!(err.contains("is `xlb run` running?"), "{args:?}: {err}");
    }
    let (ok, _, err) = xlb(&["status", "--interval=-1", "--admin", &admin]);
    assert!(!ok && err.contains("--interval -1"), "{err}");
}

/// One error type end to end: `xlb check` and `xlb run` refuse a bad file with the same words
/// (and the daemon's reloads too: `file_source`'s test).
#[test]
fn check_and_run_refuse_a_bad_file_with_the_same_words() {
    let example = std::fs::read_to_string(EXAMPLE).unwrap();
    let path = std::env::temp_dir().join(format!("xlb-same-{}.yaml", std::process::id()));
    for (bad, says) in [
        (
            example.replacen("weight: 2", "weight: -2", 1).into_bytes(),
            "weight",
        ),
        (
            example
                .replacen("mode: dnat", "mode: sideways", 1)
                .into_bytes(),
            "mode",
        ),
        (b"interfaces: [\xff]\n".to_vec(), "not UTF-8"),
    ] {
        std::fs::write(&path, &bad).unwrap();
        let config = path.to_str().unwrap();
        let (checked, _, check) = xlb(&["check", "--config", config]);
        let (ran, _, run) = xlb(&["run", "--config", config]);
        assert!(!checked && !ran);
        assert!(check.contains(says) && check.contains(config), "{check}");
        assert_eq!(check, run);
    }
    let _ = std::fs::remove_file(&path);
    let (_, _, check) = xlb(&["check", "--config", path.to_str().unwrap()]);
    let (_, _, run) = xlb(&["run", "--config", path.to_str().unwrap()]);
    assert!(check.contains("No such file"), "{check}");
    assert_eq!(check, run);
}
