//! `xlb-fake-api`: control::fake_api as a process, for the netns demo's Kubernetes mode (it
//! must listen inside the node's network namespace, where xlb runs).
//!
//! `xlb-fake-api [--listen ADDR] [--seconds N]` prints `URL http://ADDR`, then applies the
//! JSON lines it reads on standard input - `{"apply": "services", "object": {...}}`,
//! `{"delete": "endpointslices", "name": "namespace/name"}` (resources: services,
//! endpointslices, nodes) - and exits after N seconds (default 300) or at the end of its input.

use std::process::ExitCode;
use std::time::Duration;

use serde_json::Value;
use tokio::io::{AsyncBufReadExt, BufReader};
use xlb_control::fake_api::{FakeApi, Resource};

fn resource(name: &str) -> Option<Resource> {
    match name {
        "services" => Some(Resource::Services),
        "endpointslices" => Some(Resource::EndpointSlices),
        "nodes" => Some(Resource::Nodes),
        _ => None,
    }
}

async fn command(api: &FakeApi, line: &str) -> Result<(), String> {
    let v: Value = serde_json::from_str(line).map_err(|e| format!("not JSON: {e}"))?;
    if let Some(r) = v["apply"].as_str() {
        let r = resource(r).ok_or_else(|| format!("unknown resource {r}"))?;
        api.apply(r, v["object"].clone()).await;
        return Ok(());
    }
    if let Some(r) = v["delete"].as_str() {
        let r = resource(r).ok_or_else(|| format!("unknown resource {r}"))?;
        let name = v["name"].as_str().ok_or("delete needs a name")?;
        api.delete(r, name).await;
        return Ok(());
    }
    Err("neither apply nor delete".into())
}

fn main() -> ExitCode {
    let args: Vec<String> = std::env::args().skip(1).collect();
    let arg = |name: &str| {
        args.iter()
            .position(|a| a == name)
            .and_then(|i| args.get(i + 1))
    };
    let listen = arg("--listen").map_or("127.0.0.1:0", String::as_str);
    let Ok(listen) = listen.parse() else {
        eprintln!("xlb-fake-api: --listen {listen}: not an address:port");
        return ExitCode::from(2);
    };
    let seconds = arg("--seconds").and_then(|s| s.parse().ok()).unwrap_or(300);
    let Ok(runtime) = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
    else {
        return ExitCode::FAILURE;
    };
    runtime.block_on(async {
        let api = match FakeApi::start_at(listen).await {
            Ok(api) => api,
            Err(e) => {
                eprintln!("xlb-fake-api: cannot listen on {listen}: {e}");
                return ExitCode::FAILURE;
            }
        };
        println!("URL {}", api.url());
        let serve = async {
            let mut lines = BufReader::new(tokio::io::stdin()).lines();
            while let Ok(Some(line)) = lines.next_line().await {
                if let Err(e) = command(&api, &line).await {
                    eprintln!("xlb-fake-api: {e}: {line}");
                }
            }
        };
        // Bounded: the end of input or the time limit, whichever comes first.
        let _ = tokio::time::timeout(Duration::from_secs(seconds), serve).await;
        ExitCode::SUCCESS
    })
}
