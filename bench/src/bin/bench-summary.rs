//! Prints the packet benchmarks' medians as ns per packet and Mpps, from criterion's output
//! (`target/criterion/<group>/<bench>/new/estimates.json`); `make bench` runs it last.
//!
//! Criterion times one iteration, a batch of frames; the batch size is the element count each
//! benchmark declares as its throughput, read from `benchmark.json` beside the estimates.

use std::path::{Path, PathBuf};
use std::process::ExitCode;

fn main() -> ExitCode {
    let root = std::env::args_os()
        .nth(1)
        .map_or_else(|| PathBuf::from("target/criterion"), PathBuf::from);
    let mut rows = Vec::new();
    collect(&root, &mut rows);
    if rows.is_empty() {
        eprintln!(
            "bench-summary: no criterion results under {}",
            root.display()
        );
        return ExitCode::FAILURE;
    }
    rows.sort_by(|a, b| a.0.cmp(&b.0));
    println!("| benchmark | median ns/packet | Mpps |");
    println!("|---|---|---|");
    for (name, ns) in rows {
        println!("| {name} | {ns:.1} | {:.1} |", 1000.0 / ns);
    }
    ExitCode::SUCCESS
}

/// Finds every `new/estimates.json` below `dir` and records (name, median ns per element).
fn collect(dir: &Path, rows: &mut Vec<(String, f64)>) {
    let Ok(entries) = std::fs::read_dir(dir) else {
        return;
    };
    for entry in entries.flatten() {
        let path = entry.path();
        if !path.is_dir() {
            continue;
        }
        let new = path.join("new");
        let (Ok(estimates), Ok(meta)) = (
            std::fs::read_to_string(new.join("estimates.json")),
            std::fs::read_to_string(new.join("benchmark.json")),
        ) else {
            collect(&path, rows);
            continue;
        };
        let (Some(median), Some(elements), Some(name)) = (
            number_after(&estimates, "\"median\":{", "\"point_estimate\":"),
            number_after(&meta, "\"throughput\":{", "\"Elements\":"),
            string_after(&meta, "\"full_id\":\""),
        ) else {
            eprintln!("bench-summary: cannot read {}", new.display());
            continue;
        };
        if elements > 0.0 {
            rows.push((name, median / elements));
        }
    }
}

/// The number following `key` after the first `section` in a JSON text.
fn number_after(json: &str, section: &str, key: &str) -> Option<f64> {
    let rest = &json[json.find(section)? + section.len()..];
    let rest = &rest[rest.find(key)? + key.len()..];
    let end = rest
        .find(|c: char| !(c.is_ascii_digit() || matches!(c, '.' | 'e' | 'E' | '-' | '+')))
        .unwrap_or(rest.len());
    rest[..end].parse().ok()
}

/// The string value starting right after `key` (which ends with the opening quote).
fn string_after(json: &str, key: &str) -> Option<String> {
    let rest = &json[json.find(key)? + key.len()..];
    Some(rest[..rest.find('"')?].to_string())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn reads_the_median_and_the_batch_size_from_criterion_json() {
        let estimates = r#"{"mean":{"point_estimate":9.0},"median":{"confidence_interval":{"lower_bound":1.0},"point_estimate":1337.5,"standard_error":3.8}}"#;
        let meta =
            r#"{"group_id":"g","throughput":{"Elements":64},"full_id":"parse+key+dnat/tcp4"}"#;
        assert_eq!(
            number_after(estimates, "\"median\":{", "\"point_estimate\":"),
            Some(1337.5)
        );
        assert_eq!(
            number_after(meta, "\"throughput\":{", "\"Elements\":"),
            Some(64.0)
        );
        assert_eq!(
            string_after(meta, "\"full_id\":\"").as_deref(),
            Some("parse+key+dnat/tcp4")
        );
        assert_eq!(
            number_after("{}", "\"median\":{", "\"point_estimate\":"),
            None
        );
    }
}
