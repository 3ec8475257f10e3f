//! Prints the benchmarks' medians — per packet (ns and Mpps) where a benchmark declares
//! packets per iteration, per iteration otherwise —, from criterion's output
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
    rows.sort_by(|a, b| a.name.cmp(&b.name));
    println!("| benchmark | median ns/packet | Mpps |");
    println!("|---|---|---|");
    for row in rows.iter().filter(|r| r.elements.is_some()) {
        let ns = row.median_ns / row.elements.unwrap_or(1.0);
        println!("| {} | {ns:.1} | {:.1} |", row.name, 1000.0 / ns);
    }
    println!();
    println!("| benchmark | median per iteration |");
    println!("|---|---|");
    for row in rows.iter().filter(|r| r.elements.is_none()) {
        println!("| {} | {:.3} ms |", row.name, row.median_ns / 1e6);
    }
    ExitCode::SUCCESS
}

/// One benchmark's result.
struct Row {
    name: String,
    /// Median time of one iteration.
    median_ns: f64,
    /// Elements (packets) per iteration, when the benchmark declares a throughput.
    elements: Option<f64>,
}

/// Finds every `new/estimates.json` below `dir` and records its median.
fn collect(dir: &Path, rows: &mut Vec<Row>) {
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
        let (Some(median_ns), Some(name)) = (
            number_after(&estimates, "\"median\":{", "\"point_estimate\":"),
            string_after(&meta, "\"full_id\":\""),
        ) else {
            eprintln!("bench-summary: cannot read {}", new.display());
            continue;
        };
        let elements =
            number_after(&meta, "\"throughput\":{", "\"Elements\":").filter(|&e| e > 0.0);
        rows.push(Row {
            name,
            median_ns,
            elements,
        });
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
