//! The Kubernetes source end to end: N Services x 10 endpoints served by an in-process API
//! server (`control::fake_api`, in a child process so that its objects do not count in
//! xlb's memory), watched, translated and published as the daemon does it.
//!
//! `kube-sync [--services N] [--changes K] [--json]` reports:
//! * the time to the first whole snapshot (list, decode, translate, publish), and its
//!   translation-and-publication part (translating the stale Services and publishing them);
//! * for K single EndpointSlice changes, one at a time: event-to-live (from the event's
//!   arrival at xlb to its snapshot being live, as the `xlb_sync_duration_seconds` histogram
//!   measures it) and change-to-live (from the API server's write), p50 / p99 / max;
//! * resident memory after the first snapshot and at the end (VmRSS, VmHWM).
//!
//! (`kube-sync serve N` is the child: it prints its URL, then applies "change I K" lines.)

use std::io::{BufRead, Write};
use std::process::{ExitCode, Stdio};
use std::sync::Arc;
use std::time::{Duration, Instant};

use arc_swap::ArcSwap;
use serde_json::{json, Value};
use tokio::io::{AsyncBufReadExt, BufReader};
use xlb_bench::{memory, Memory};
use xlb_control::config::Config;
use xlb_control::fake_api::{FakeApi, Resource};
use xlb_control::kube_source::{KubeMetrics, KubeSource, SourceOptions};
use xlb_control::publish::{NoSteering, Publisher};
use xlb_dataplane::lb::snapshot::ServiceKey;
use xlb_dataplane::packet::{Endpoint, IpProto};
use xlb_dataplane::worker::Tables;

const ENDPOINTS: u32 = 10;

fn vip(i: u32) -> std::net::Ipv4Addr {
    std::net::Ipv4Addr::from(0xc612_0000 + i)
}

fn service(i: u32) -> Value {
    let ip = vip(i).to_string();
    json!({
        "metadata": {"namespace": "bench", "name": format!("s{i}"),
                     "labels": {"app": format!("s{i}")},
                     "annotations": {"kubectl.kubernetes.io/last-applied-configuration": "{\"apiVersion\":\"v1\",\"kind\":\"Service\"}"}},
        "spec": {"type": "ClusterIP", "clusterIP": ip, "clusterIPs": [ip], "ipFamilies": ["IPv4"],
                 "ipFamilyPolicy": "SingleStack", "sessionAffinity": "None",
                 "internalTrafficPolicy": "Cluster",
                 "ports": [{"name": "http", "protocol": "TCP", "port": 80, "targetPort": "http"}]},
        "status": {"loadBalancer": {}},
    })
}

/// Service i's slice; `variant` moves one endpoint to another address.
fn slice(i: u32, variant: u32) -> Value {
    let endpoints: Vec<Value> = (0..ENDPOINTS)
        .map(|j| {
            let n = i * ENDPOINTS + j + if j == 0 { variant * 7919 } else { 0 };
            let addr = std::net::Ipv4Addr::from(0xc613_0000 + (n % 65_536));
            json!({"addresses": [addr.to_string()],
                   "conditions": {"ready": true, "serving": true, "terminating": false},
                   "nodeName": format!("node-{}", n % 50), "zone": format!("zone-{}", n % 3),
                   "targetRef": {"kind": "Pod", "namespace": "bench", "name": format!("s{i}-{j}"),
                                 "uid": "00000000-0000-4000-8000-000000000000"}})
        })
        .collect();
    json!({
        "metadata": {"namespace": "bench", "name": format!("s{i}-abcde"),
                     "labels": {"kubernetes.io/service-name": format!("s{i}"),
                                "endpointslice.kubernetes.io/managed-by": "endpointslice-controller.k8s.io"},
                     "generateName": format!("s{i}-")},
        "addressType": "IPv4",
        "ports": [{"name": "http", "protocol": "TCP", "port": 8080 + (i * ENDPOINTS) / 65_536}],
        "endpoints": endpoints,
    })
}

fn percentile(sorted: &[Duration], p: f64) -> Duration {
    if sorted.is_empty() {
        return Duration::ZERO;
    }
    let i = ((sorted.len() as f64 - 1.0) * p).round() as usize;
    sorted[i.min(sorted.len() - 1)]
}

fn serve(n: u32) -> ExitCode {
    let Ok(runtime) = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
    else {
        return ExitCode::FAILURE;
    };
    runtime.block_on(async {
        let Ok(api) = FakeApi::start().await else {
            eprintln!("kube-sync serve: cannot listen");
            return ExitCode::FAILURE;
        };
        for i in 0..n {
            api.apply(Resource::Services, service(i)).await;
            api.apply(Resource::EndpointSlices, slice(i, 0)).await;
        }
        api.compact().await; // the history of the load is not a watch's business
        println!("READY {}", api.url());
        let _ = std::io::stdout().flush();
        let mut lines = BufReader::new(tokio::io::stdin()).lines();
        while let Ok(Some(line)) = lines.next_line().await {
            let words: Vec<u32> = line
                .split_whitespace()
                .skip(1)
                .filter_map(|w| w.parse().ok())
                .collect();
            if let [i, k] = words[..] {
                api.apply(Resource::EndpointSlices, slice(i, k)).await;
            }
        }
        ExitCode::SUCCESS
    })
}

fn main() -> ExitCode {
    let args: Vec<String> = std::env::args().skip(1).collect();
    let value = |name: &str, default: u32| {
        args.iter()
            .position(|a| a == name)
            .and_then(|i| args.get(i + 1))
            .and_then(|v| v.parse().ok())
            .unwrap_or(default)
    };
    if args.first().map(String::as_str) == Some("serve") {
        return serve(args.get(1).and_then(|v| v.parse().ok()).unwrap_or(1000));
    }
    let n = value("--services", 10_000);
    let changes = value("--changes", 200);
    let json_out = args.iter().any(|a| a == "--json");
    match measure(n, changes) {
        Ok(report) => {
            if json_out {
                println!("{report}");
            } else {
                print_report(&report);
            }
            ExitCode::SUCCESS
        }
        Err(e) => {
            eprintln!("kube-sync: {e}");
            ExitCode::FAILURE
        }
    }
}

fn print_report(r: &Value) {
    let ms = |v: &Value| v.as_f64().unwrap_or(0.0) * 1e3;
    println!("Services: {} x {} endpoints", r["services"], ENDPOINTS);
    println!(
        "first snapshot: {:.1} ms from start (list and decode included); translation and publication {:.1} ms (of which building the snapshot {:.1} ms)",
        ms(&r["first_snapshot_s"]),
        ms(&r["first_publication_s"]),
        ms(&r["first_build_s"])
    );
    println!(
        "one EndpointSlice change ({} changes): event-to-live p50 {:.3} ms, p99 {:.3} ms, max {:.3} ms; write-to-live p50 {:.3} ms, p99 {:.3} ms",
        r["changes"],
        ms(&r["event_to_live_p50_s"]),
        ms(&r["event_to_live_p99_s"]),
        ms(&r["event_to_live_max_s"]),
        ms(&r["write_to_live_p50_s"]),
        ms(&r["write_to_live_p99_s"])
    );
    println!(
        "resident: {:.0} MiB listed and translated, {:.0} MiB after the first snapshot, {:.0} MiB at the end, peak {:.0} MiB",
        r["rss_listed_bytes"].as_f64().unwrap_or(0.0) / 1048576.0,
        r["rss_first_bytes"].as_f64().unwrap_or(0.0) / 1048576.0,
        r["rss_end_bytes"].as_f64().unwrap_or(0.0) / 1048576.0,
        r["rss_peak_bytes"].as_f64().unwrap_or(0.0) / 1048576.0
    );
}

fn measure(n: u32, changes: u32) -> Result<Value, String> {
    let exe = std::env::current_exe().map_err(|e| e.to_string())?;
    let mut child = std::process::Command::new(exe)
        .args(["serve", &n.to_string()])
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .spawn()
        .map_err(|e| format!("cannot start the API server: {e}"))?;
    let mut child_out = std::io::BufReader::new(child.stdout.take().ok_or("no stdout")?);
    let mut child_in = child.stdin.take().ok_or("no stdin")?;
    let mut line = String::new();
    child_out.read_line(&mut line).map_err(|e| e.to_string())?;
    let url = line
        .strip_prefix("READY ")
        .map(str::trim)
        .ok_or_else(|| format!("the API server said {line:?}"))?
        .to_owned();
    let runtime = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .map_err(|e| e.to_string())?;
    let result = runtime.block_on(async {
        let config = kube::Config::new(url.parse().map_err(|e| format!("{e}"))?);
        let tables = Arc::new(ArcSwap::from_pointee(Tables::empty()));
        let xlb_config = Config::parse("interfaces: [a]").map_err(|e| e.to_string())?;
        let mut publisher = Publisher::new(&xlb_config, tables);
        let started = Instant::now();
        let mut source = KubeSource::new(
            config,
            xlb_control::kubernetes::NodeContext::named("node-0"),
            SourceOptions::default(),
            Arc::new(KubeMetrics::default()),
        )
        .map_err(|e| e.to_string())?;
        let deadline = started + Duration::from_secs(600);
        let mut first_publication = Duration::ZERO;
        let mut first_build = Duration::ZERO;
        let mut rss_listed = 0;
        while publisher.snapshot().len() < n as usize {
            let batch = tokio::time::timeout_at(deadline.into(), source.next_batch())
                .await
                .map_err(|_| "no whole first snapshot within 600 s")?;
            let building = Instant::now();
            rss_listed = memory().resident;
            publisher
                .publish_kubernetes(batch.change, &mut NoSteering)
                .map_err(|e| e.to_string())?;
            first_build = building.elapsed();
            first_publication = batch.translated_in + first_build;
        }
        let first = started.elapsed();
        let rss_first = memory().resident;
        let mut event_to_live = Vec::new();
        let mut write_to_live = Vec::new();
        for k in 1..=changes {
            let i = (k * 7_919) % n;
            let key = ServiceKey {
                vip: Endpoint::new(vip(i).into(), 80),
                proto: IpProto::TCP,
            };
            let before = publisher
                .snapshot()
                .service(&key)
                .map(|s| s.spec().backends[0].endpoint);
            let written = Instant::now();
            writeln!(child_in, "change {i} {k}").map_err(|e| e.to_string())?;
            child_in.flush().map_err(|e| e.to_string())?;
            loop {
                let batch = tokio::time::timeout(Duration::from_secs(10), source.next_batch())
                    .await
                    .map_err(|_| format!("change {k} not seen within 10 s"))?;
                let arrival = batch.arrivals.iter().min().copied();
                publisher
                    .publish_kubernetes(batch.change, &mut NoSteering)
                    .map_err(|e| e.to_string())?;
                let now = publisher
                    .snapshot()
                    .service(&key)
                    .map(|s| s.spec().backends[0].endpoint);
                if now != before {
                    if let Some(a) = arrival {
                        event_to_live.push(a.elapsed());
                    }
                    write_to_live.push(written.elapsed());
                    break;
                }
            }
            // Changes one at a time, each after the minimum sync period.
            tokio::time::sleep(Duration::from_millis(15)).await;
        }
        event_to_live.sort();
        write_to_live.sort();
        let Memory {
            resident: rss_end,
            peak,
        } = memory();
        Ok::<Value, String>(json!({
            "services": n,
            "endpoints_per_service": ENDPOINTS,
            "first_snapshot_s": first.as_secs_f64(),
            "first_publication_s": first_publication.as_secs_f64(),
            "first_build_s": first_build.as_secs_f64(),
            "changes": changes,
            "event_to_live_p50_s": percentile(&event_to_live, 0.5).as_secs_f64(),
            "event_to_live_p99_s": percentile(&event_to_live, 0.99).as_secs_f64(),
            "event_to_live_max_s": event_to_live.last().copied().unwrap_or_default().as_secs_f64(),
            "write_to_live_p50_s": percentile(&write_to_live, 0.5).as_secs_f64(),
            "write_to_live_p99_s": percentile(&write_to_live, 0.99).as_secs_f64(),
            "rss_listed_bytes": rss_listed,
            "rss_first_bytes": rss_first,
            "rss_end_bytes": rss_end,
            "rss_peak_bytes": peak,
        }))
    });
    drop(child_in);
    let _ = child.kill();
    let _ = child.wait();
    result
}
