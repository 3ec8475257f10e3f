//! The client side of the admin API, for `xlb status` and `xlb flows`: one GET, the body back.
//! HTTP/1.0, so that a streamed answer ends with the connection instead of in chunks.

use std::io::{Read, Write};
use std::net::{SocketAddr, TcpStream};
use std::time::Duration;

/// GETs `path` from the admin API at `admin` and returns the body.
///
/// # Errors
/// A message when xlb is not running there or answers with an error status.
pub fn get(admin: SocketAddr, path: &str) -> Result<String, String> {
    let unreachable = |e: std::io::Error| {
        format!("cannot reach xlb's admin API at {admin}: {e} (is `xlb run` running?)")
    };
    let mut stream =
        TcpStream::connect_timeout(&admin, Duration::from_secs(2)).map_err(unreachable)?;
    stream
        .set_read_timeout(Some(Duration::from_secs(10)))
        .map_err(unreachable)?;
    write!(stream, "GET {path} HTTP/1.0\r\nhost: {admin}\r\n\r\n").map_err(unreachable)?;
    let mut response = String::new();
    stream.read_to_string(&mut response).map_err(unreachable)?;
    let (head, body) = response
        .split_once("\r\n\r\n")
        .ok_or("a malformed answer from the admin API")?;
    let status = head.lines().next().unwrap_or_default();
    if !status.contains(" 200 ") {
        return Err(format!("admin API: {status}"));
    }
    Ok(body.to_owned())
}

/// The most Services `xlb status` lists (ten `/services` pages); the rest are counted.
pub const STATUS_SERVICES_MAX: usize = 10_000;

/// `xlb status`'s Services: every page of `/services` up to [`STATUS_SERVICES_MAX`], each
/// Service on a line with its backends indented below it.
///
/// # Errors
/// As [`get`], or when an answer is not the admin API's JSON.
pub fn services_table(admin: SocketAddr) -> Result<String, String> {
    let mut out = String::new();
    let mut from = Some(0u64);
    let mut listed = 0usize;
    while let Some(at) = from.filter(|_| listed < STATUS_SERVICES_MAX) {
        let body = get(admin, &format!("/services?limit=1000&from={at}"))?;
        let page: serde_json::Value =
            serde_json::from_str(&body).map_err(|e| format!("admin API: /services: {e}"))?;
        for s in page["services"].as_array().into_iter().flatten() {
            out.push_str(&service_lines(s));
            listed += 1;
        }
        from = page["next"].as_u64();
    }
    if let Some(rest) = from {
        out.push_str(&format!(
            "(more Services from {rest} on: see /services?from={rest})\n"
        ));
    }
    if listed == 0 {
        out.push_str("no Services\n");
    }
    Ok(out)
}

/// One Service of `/services` as text.
fn service_lines(s: &serde_json::Value) -> String {
    let text = |v: &serde_json::Value| v.as_str().unwrap_or("-").to_owned();
    let vip = match s["vip"].as_str() {
        Some(v) if v.contains(':') => format!("[{v}]"),
        v => v.unwrap_or("-").to_owned(),
    };
    let affinity = s["affinity_timeout_seconds"]
        .as_u64()
        .map_or_else(|| "none".to_owned(), |t| format!("{t}s"));
    let ranges: Vec<String> = s["source_ranges"]
        .as_array()
        .into_iter()
        .flatten()
        .map(text)
        .collect();
    let mut out = format!(
        "{} {vip}:{}/{} ({}) scheduler {} affinity {affinity} policy {} sources {} no-endpoints {}\n",
        text(&s["name"]),
        s["port"],
        text(&s["protocol"]),
        text(&s["kind"]),
        text(&s["scheduler"]),
        text(&s["traffic_policy"]),
        if ranges.is_empty() { "any".to_owned() } else { ranges.join(",") },
        text(&s["no_endpoints"]),
    );
    let backends = s["backends"].as_array().map_or(&[][..], Vec::as_slice);
    if backends.is_empty() {
        out.push_str("    (no backends)\n");
    }
    for b in backends {
        let address = match b["address"].as_str() {
            Some(a) if a.contains(':') => format!("[{a}]"),
            a => a.unwrap_or("-").to_owned(),
        };
        out.push_str(&format!(
            "    {address}:{} {} {} weight {} flows {}\n",
            b["port"],
            text(&b["state"]),
            if b["local"].as_bool() == Some(true) {
                "local"
            } else {
                "remote"
            },
            b["weight"],
            b["live_flows"]
                .as_u64()
                .map_or_else(|| "-".to_owned(), |n| n.to_string()),
        ));
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_service_prints_as_one_line_with_its_backends_below() {
        let s = serde_json::json!({
            "name": "shop/web:http", "kind": "load-balancer", "vip": "2001:2::10", "port": 80,
            "protocol": "tcp", "scheduler": "maglev", "affinity_timeout_seconds": 10800,
            "traffic_policy": "Local", "source_ranges": ["198.18.0.0/24", "2001:2::/64"],
            "no_endpoints": "drop",
            "backends": [{"address": "2001:2::1:1", "port": 8080, "state": "terminating",
                          "weight": 1, "local": true, "live_flows": 3}],
        });
        assert_eq!(
            service_lines(&s),
            "shop/web:http [2001:2::10]:80/tcp (load-balancer) scheduler maglev affinity 10800s \
             policy Local sources 198.18.0.0/24,2001:2::/64 no-endpoints drop\n    \
             [2001:2::1:1]:8080 terminating local weight 1 flows 3\n"
        );
    }
}
