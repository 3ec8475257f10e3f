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
