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
