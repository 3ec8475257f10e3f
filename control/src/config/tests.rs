//! The configuration's parsing and checks, against files with one thing wrong each.

use super::*;

const GOOD: &str = "
interfaces: [xlb-c, xlb-b]
services:
  - name: web
    vip: 198.18.64.1
    ports:
      - { port: 80, target_port: 8080 }
      - { port: 53, protocol: udp }
    backends:
      - { address: 198.18.128.1 }
      - { address: 198.18.128.2, weight: 3, state: terminating }
    scheduler: least-connections
    session_affinity: {}
";

#[test]
fn a_good_file_parses_with_its_defaults() {
    let c = Config::parse(GOOD).unwrap();
    assert_eq!(c.mode, ModeConfig::Dnat);
    assert_eq!(c.cores, vec![0]);
    let s = &c.services[0];
    assert_eq!(s.ports[1].protocol, ProtocolConfig::Udp);
    assert_eq!(s.backends[1].state, BackendStateConfig::Terminating);
    assert_eq!(s.session_affinity.unwrap().timeout_seconds, 10_800);
    assert_eq!(s.scheduler, SchedulerConfig::LeastConnections);
}

#[test]
fn an_unknown_value_names_the_field_and_the_line() {
    let bad = GOOD.replace("protocol: udp", "protocol: dccp");
    let e = Config::parse(&bad).unwrap_err().to_string();
    assert!(e.contains("services[0].ports[1].protocol"), "{e}");
    assert!(e.contains("line 8"), "{e}");
}

#[test]
fn an_unknown_field_is_refused_not_ignored() {
    let bad = GOOD.replace("scheduler:", "schedular:");
    let e = Config::parse(&bad).unwrap_err().to_string();
    assert!(e.contains("schedular"), "{e}");
}

#[test]
fn a_backend_of_the_other_family_is_refused_with_its_path_and_line() {
    let bad = GOOD.replace("198.18.128.2", "2001:2::2");
    let e = Config::parse(&bad).unwrap_err().to_string();
    assert!(e.contains("services[0] (web).backends[1].address"), "{e}");
    assert!(e.ends_with("(line 4)"), "the Service's line: {e}");
}

#[test]
fn a_semantic_error_in_a_later_service_names_that_services_line() {
    let two = format!("{GOOD}  - name: api\n    vip: 198.18.64.9\n    ports: []\n");
    let e = Config::parse(&two).unwrap_err().to_string();
    assert!(
        e.contains("services[1] (api).ports") && e.ends_with("(line 14)"),
        "{e}"
    );
    let e = Config::parse(&format!("mode: snat\n{GOOD}"))
        .unwrap_err()
        .to_string();
    assert!(e.ends_with("(line 1)"), "{e}");
}

#[test]
fn a_port_given_twice_is_refused() {
    let bad = GOOD.replace("{ port: 53, protocol: udp }", "{ port: 80 }");
    let e = Config::parse(&bad).unwrap_err().to_string();
    assert!(e.contains("already a port"), "{e}");
}

/// Issue 11, fault 9: `flow_capacity: 1e12` aborted on allocation and 2^64-1 panicked.
#[test]
fn unbounded_settings_are_refused_with_their_field_and_line() {
    for capacity in ["1000000000000", "18446744073709551615", "100000000", "1000"] {
        let bad = format!("flow_capacity: {capacity}\n{GOOD}");
        let e = Config::parse(&bad).unwrap_err().to_string();
        assert!(
            e.starts_with("flow_capacity:") && e.ends_with("(line 1)"),
            "{e}"
        );
    }
    let ok = format!("flow_capacity: {MAX_FLOW_CAPACITY}\n{GOOD}");
    assert!(Config::parse(&ok).is_ok());
    let bad = format!("flow_capacity: 4096\nflow_capacity_ipv6: 100\n{GOOD}");
    let e = Config::parse(&bad).unwrap_err().to_string();
    assert!(
        e.starts_with("flow_capacity_ipv6: 100 is outside") && e.ends_with("(line 2)"),
        "{e}"
    );
    let split = |text: &str| {
        let c = Config::parse(&format!("{text}{GOOD}")).unwrap();
        (c.flow_capacity, c.ipv6_flow_capacity())
    };
    assert_eq!(split("flow_capacity: 4096\n"), (4096, 1024), "a quarter");
    assert_eq!(
        split("flow_capacity: 4096\nflow_capacity_ipv6: 8192\n"),
        (4096, 8192)
    );
    let e = Config::parse(&format!("cores: [0, 1, 0]\n{GOOD}"))
        .unwrap_err()
        .to_string();
    assert!(
        e.contains("cores: core 0 is named twice") && e.ends_with("(line 1)"),
        "{e}"
    );
    let twice = GOOD.replace("[xlb-c, xlb-b]", "[xlb-c, xlb-c]");
    let e = Config::parse(&twice).unwrap_err().to_string();
    assert!(e.contains("interfaces: xlb-c is named twice"), "{e}");
    let e = Config::parse(&format!("queue: 63\ncores: [0, 1]\n{GOOD}"))
        .unwrap_err()
        .to_string();
    assert!(e.starts_with("queue:"), "{e}");
}

#[test]
fn addresses_no_host_can_have_are_refused_as_vips_backends_and_snat_addresses() {
    for vip in [
        "0.0.0.0",
        "127.0.0.1",
        "255.255.255.255",
        "224.0.0.1",
        "0.1.2.3",
    ] {
        let bad = GOOD.replace("vip: 198.18.64.1", &format!("vip: {vip}"));
        let e = Config::parse(&bad).unwrap_err().to_string();
        assert!(
            e.contains("services[0] (web).vip") && e.ends_with("(line 4)"),
            "{e}"
        );
    }
    for backend in ["0.0.0.0", "127.0.0.2", "255.255.255.255", "198.18.64.1"] {
        let bad = GOOD.replace("198.18.128.1", backend);
        let e = Config::parse(&bad).unwrap_err().to_string();
        assert!(e.contains("backends[0].address"), "{e}");
    }
    let v6 = GOOD
        .replace("vip: 198.18.64.1", "vip: '2001:2::40:1'")
        .replace("198.18.128.1", "'::1'")
        .replace("198.18.128.2", "'2001:2::80:2'");
    assert!(Config::parse(&v6)
        .unwrap_err()
        .to_string()
        .contains("loopback"));
    let snat = format!("mode: snat\nsnat: {{ ipv4: 0.0.0.0 }}\n{GOOD}");
    assert!(Config::parse(&snat)
        .unwrap_err()
        .to_string()
        .contains("snat.ipv4"));
}

#[test]
fn source_ranges_parse_as_prefixes_and_a_bad_one_names_its_field() {
    let with = GOOD.replace(
        "    scheduler: least-connections",
        "    source_ranges: [198.18.0.0/24, '2001:2::/48']\n    scheduler: least-connections",
    );
    let c = Config::parse(&with).unwrap();
    assert_eq!(c.services[0].source_ranges.len(), 2);
    let bad = with.replace("198.18.0.0/24", "198.18.0.0/40");
    let e = Config::parse(&bad).unwrap_err().to_string();
    assert!(e.contains("services[0].source_ranges"), "{e}");
}

#[test]
fn a_backend_named_twice_names_its_service_and_line() {
    let bad = GOOD.replace("198.18.128.2", "198.18.128.1");
    let e = Config::parse(&bad).unwrap_err().to_string();
    assert!(
        e.contains("services[0] (web).backends[1].address: 198.18.128.1 is a backend of web twice")
            && e.ends_with("(line 4)"),
        "{e}"
    );
}

#[test]
fn snat_mode_without_an_address_is_refused() {
    let bad = format!("mode: snat\n{GOOD}");
    assert!(Config::parse(&bad)
        .unwrap_err()
        .to_string()
        .contains("snat"));
}

#[test]
fn a_node_section_needs_no_interfaces_and_its_bad_values_are_named() {
    let node = GOOD.replace("interfaces: [xlb-c, xlb-b]", "interfaces: []\nnode: {}");
    let c = Config::parse(&node).unwrap();
    let n = c.node.unwrap();
    assert_eq!((n.link.as_str(), n.peer.as_str()), ("xlb0", "xlb1"));
    assert_eq!((n.mark, n.table, n.rule_priority), (0x8_0000, 4270, 90));
    for (field, value, says) in [
        ("mark", "0x3", "not a single bit"),
        ("table", "254", "kernel's own tables"),
        ("rule_priority", "100", "between 1 and 99"),
        ("link", "xlb-c", "do not list it in interfaces"),
        ("peer", "xlb0", "must differ"),
        ("address", "224.0.0.1", "multicast"),
        ("link", "a-name-far-too-long", "not an interface name"),
    ] {
        let bad = GOOD.replace(
            "interfaces: [xlb-c, xlb-b]",
            &format!("interfaces: [xlb-c]\nnode: {{ {field}: {value} }}"),
        );
        let e = Config::parse(&bad).unwrap_err().to_string();
        assert!(
            e.contains(&format!("node.{field}")) && e.contains(says),
            "{field}: {e}"
        );
    }
    let none = GOOD.replace("interfaces: [xlb-c, xlb-b]", "interfaces: []");
    assert!(Config::parse(&none)
        .unwrap_err()
        .to_string()
        .contains("node section"));
}

#[test]
fn detect_local_needs_dnat_mode_and_an_snat_address() {
    let cidrs = format!("cluster_cidrs: [198.18.128.0/17]\n{GOOD}");
    assert!(Config::parse(&cidrs)
        .unwrap_err()
        .to_string()
        .contains("an snat section with an address is needed"));
    let with_pool = format!("snat: {{ ipv4: 198.18.0.9 }}\n{cidrs}");
    assert_eq!(
        Config::parse(&with_pool).unwrap().cluster_cidrs.len(),
        1,
        "dnat with a pool: detect-local"
    );
    let snat = format!("mode: snat\n{with_pool}");
    assert!(Config::parse(&snat)
        .unwrap_err()
        .to_string()
        .contains("only in dnat mode"));
}

#[test]
fn dsr_keeps_ports_and_its_encapsulation_needs_dsr_mode_and_an_outer_address() {
    let dsr = GOOD.replace("{ port: 80, target_port: 8080 }", "{ port: 80 }");
    assert!(Config::parse(&format!("mode: dsr\n{dsr}")).is_ok());
    let e = Config::parse(&format!("mode: dsr\n{GOOD}"))
        .unwrap_err()
        .to_string();
    assert!(e.contains("target_port") && e.contains("unchanged"), "{e}");
    let e = Config::parse(&format!(
        "dsr: {{ encapsulation: ipip, ipv4: 198.18.0.9 }}\n{dsr}"
    ))
    .unwrap_err()
    .to_string();
    assert!(e.contains("only with mode: dsr"), "{e}");
    let e = Config::parse(&format!("mode: dsr\ndsr: {{ encapsulation: ipip }}\n{dsr}"))
        .unwrap_err()
        .to_string();
    assert!(e.contains("give ipv4, ipv6 or both"), "{e}");
    let v6_only = format!("mode: dsr\ndsr: {{ encapsulation: ipip, ipv6: '2001:2::9' }}\n{dsr}");
    assert!(Config::parse(&v6_only)
        .unwrap_err()
        .to_string()
        .contains("no outer address of this family"));
    let node = format!("mode: dsr\nnode: {{}}\n{dsr}");
    assert!(Config::parse(&node)
        .unwrap_err()
        .to_string()
        .contains("node"));
}
