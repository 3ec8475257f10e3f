//! The deployment files agree with xlb: the DaemonSet's ConfigMap is a configuration xlb
//! accepts (with the Kubernetes source), the DaemonSet and the systemd unit grant exactly the
//! capabilities xlb needs (those the netns test runs it with), and the ClusterRole only reads
//! what the Kubernetes source watches. (`make manifests` checks the schemas.)

use serde::Deserialize;
use serde_json::Value;
use xlb_control::config::Config;
use xlb_control::daemon::CAPABILITIES;

fn manifests() -> Vec<Value> {
    let text = std::fs::read_to_string(concat!(
        env!("CARGO_MANIFEST_DIR"),
        "/../deploy/kubernetes/xlb.yaml"
    ))
    .unwrap();
    serde_yaml_ng::Deserializer::from_str(&text)
        .map(|doc| Value::deserialize(doc).unwrap())
        .filter(|v| !v.is_null())
        .collect()
}

fn of_kind<'a>(docs: &'a [Value], kind: &str) -> &'a Value {
    docs.iter().find(|d| d["kind"] == kind).unwrap()
}

fn sorted(mut v: Vec<String>) -> Vec<String> {
    v.sort();
    v
}

#[test]
fn the_configmap_holds_a_configuration_xlb_accepts_with_the_kubernetes_source() {
    let docs = manifests();
    let text = of_kind(&docs, "ConfigMap")["data"]["xlb.yaml"]
        .as_str()
        .unwrap();
    let config = Config::parse(text).unwrap();
    let kubernetes = config
        .kubernetes
        .expect("the Kubernetes source is configured");
    assert_eq!(kubernetes.min_sync_period_ms, 10);
    assert!(
        kubernetes.node_name.is_none(),
        "the node name comes from NODE_NAME"
    );
    let daemonset = of_kind(&docs, "DaemonSet");
    let container = &daemonset["spec"]["template"]["spec"]["containers"][0];
    assert_eq!(container["env"][0]["name"], "NODE_NAME");
    assert_eq!(
        container["env"][0]["valueFrom"]["fieldRef"]["fieldPath"],
        "spec.nodeName"
    );
    assert_eq!(container["livenessProbe"]["httpGet"]["path"], "/healthz");
    assert_eq!(
        container["livenessProbe"]["httpGet"]["port"].as_u64(),
        Some(u64::from(config.admin.port()))
    );
}

#[test]
fn the_daemonset_and_the_systemd_unit_grant_exactly_the_capabilities_xlb_needs() {
    let needed = sorted(CAPABILITIES.iter().map(|c| (*c).to_owned()).collect());
    let docs = manifests();
    let security = &of_kind(&docs, "DaemonSet")["spec"]["template"]["spec"]["containers"][0]
        ["securityContext"];
    assert_eq!(security["privileged"], false);
    assert_eq!(security["capabilities"]["drop"][0], "ALL");
    let granted: Vec<String> = security["capabilities"]["add"]
        .as_array()
        .unwrap()
        .iter()
        .map(|c| c.as_str().unwrap().to_owned())
        .collect();
    assert_eq!(sorted(granted), needed);
    let unit = std::fs::read_to_string(concat!(
        env!("CARGO_MANIFEST_DIR"),
        "/../deploy/systemd/xlb.service"
    ))
    .unwrap();
    for setting in ["AmbientCapabilities=", "CapabilityBoundingSet="] {
        let line = unit.lines().find(|l| l.starts_with(setting)).unwrap();
        let caps: Vec<String> = line[setting.len()..]
            .split_whitespace()
            .map(|c| c.trim_start_matches("CAP_").to_owned())
            .collect();
        assert_eq!(sorted(caps), needed, "{setting}");
    }
}

#[test]
fn the_cluster_role_only_reads_services_endpointslices_and_nodes() {
    let docs = manifests();
    let rules = of_kind(&docs, "ClusterRole")["rules"].as_array().unwrap();
    let mut resources = Vec::new();
    for rule in rules {
        let verbs: Vec<&str> = rule["verbs"]
            .as_array()
            .unwrap()
            .iter()
            .map(|v| v.as_str().unwrap())
            .collect();
        assert_eq!(verbs, ["get", "list", "watch"]);
        for r in rule["resources"].as_array().unwrap() {
            resources.push(r.as_str().unwrap().to_owned());
        }
    }
    assert_eq!(sorted(resources), ["endpointslices", "nodes", "services"]);
}
