#!/usr/bin/env python3
"""xlb on a node against kube-proxy's nftables path for the same traffic (`make bench-node`).

The topology of deploy/acceptance/node.py (two node namespaces with routed pods). Node A runs,
in turn, either xlb with a `node:` section or kube-proxy-shaped nftables rules (the
service-ips verdict map, a per-Service chain choosing an endpoint with numgen, DNAT, in
prerouting for pods and output for the node's own sockets). Interleaved within each
repetition (nftables, xlb, nftables, xlb, ...), at least 5 repetitions; medians and spreads
(min-max) of every figure and of the ratios, each ratio taken within one repetition:

  throughput  pod a1 -> ClusterIP (UDP, 64 established flows, 60-byte frames, xlb-pktgen at a
              fixed rate) -> pod b2 on node B, which counts and drops in XDP (bench/sink.c).
              Placement, the same for both: the generator on core 0; node A's receive of the
              pod's veth steered to core 1 by RPS, where xlb's worker is pinned too, so that
              node A's work (and node B's forwarding, the same for both) is core 1's.
              Figures: at --rate, delivered pps and core-1 CPU ns per delivered packet (for
              xlb an upper bound: its worker polls while frames trickle in, and that counts
              as busy); then with the generator unbounded, delivered pps (node A's capacity
              on one core, where the kernel's receive and xlb's worker share core 1).
  latency     node A's own process -> ClusterIP -> pod b1 (TCP, one connection, 1-byte
              request and answer, 2 000 round trips a repetition), against the same client
              connected to b1 directly in the same repetition: p50 and p99 of each, and the
              difference of the p50s (what the Service path adds).

Writes bench/results/node.md and node.json. Traffic stays in the namespaces (198.18.0.0/15,
2001:2::/48) and is bounded in packets and seconds; everything is removed on exit.
Usage: bench/node.py [--repetitions 5] [--seconds 3] [--rate 150000]
"""

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, os.path.join(ROOT, "deploy", "acceptance"))
import node as topo  # noqa: E402
from acceptance import run, spawn  # noqa: E402

sys.path.insert(0, os.path.join(ROOT, "bench"))
from e2e import busy  # noqa: E402  (core 1's and all cores' busy ticks)

XLB = os.path.join(ROOT, "target/release/xlb")
PKTGEN = os.path.join(ROOT, "target/release/xlb-pktgen")
UDP_VIP, ECHO_VIP = "198.18.100.1", "198.18.100.2"
USER_HZ = os.sysconf("SC_CLK_TCK")

# One TCP connection, `n` one-byte round trips; prints the sorted round-trip times in µs.
PING = r"""
import socket, sys, time, json
host, n = sys.argv[1], int(sys.argv[2])
s = socket.create_connection((host, 9000), timeout=5)
s.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
for _ in range(200):  # warm-up
    s.sendall(b"x"); s.recv(1)
took = []
for _ in range(n):
    t = time.perf_counter_ns(); s.sendall(b"x"); s.recv(1); took.append((time.perf_counter_ns() - t) / 1000)
print(json.dumps(sorted(took)))
"""


def xlb_config(work):
    path = os.path.join(work, "xlb.yaml")
    with open(path, "w") as f:
        f.write(f"""interfaces: []
node: {{ address: 198.19.255.1 }}
cores: [1]
flow_capacity: 65536
cluster_cidrs: [198.18.10.0/24, 198.18.30.0/24]
snat: {{ ipv4: {topo.A4}, first_port: 20000, last_port: 29999 }}
services:
  - {{ name: udp, vip: {UDP_VIP}, ports: [{{ port: 53, protocol: udp, target_port: 5353 }}], backends: [{{ address: {topo.pod4('b2')} }}] }}
  - {{ name: echo, vip: {ECHO_VIP}, ports: [{{ port: 9000 }}], backends: [{{ address: {topo.pod4('b1')} }}] }}
""")
    return path


def nft_rules():
    """kube-proxy's nftables mode, shaped as it writes it, for the two Services."""
    svc = lambda name, ep, port, proto: f"""
	chain svc-{name} {{
		numgen random mod 1 vmap {{ 0 : goto sep-{name} }}
	}}
	chain sep-{name} {{
		meta l4proto {proto} dnat to {ep}:{port}
	}}"""
    return f"""table ip kube-proxy {{
	map service-ips {{
		type ipv4_addr . inet_proto . inet_service : verdict
		elements = {{ {UDP_VIP} . udp . 53 : goto svc-udp, {ECHO_VIP} . tcp . 9000 : goto svc-echo }}
	}}
	chain services {{
		ip daddr . meta l4proto . th dport vmap @service-ips
	}}
	chain nat-prerouting {{
		type nat hook prerouting priority dstnat; policy accept;
		jump services
	}}
	chain nat-output {{
		type nat hook output priority -100; policy accept;
		jump services
	}}{svc("udp", topo.pod4("b2"), 5353, "udp")}{svc("echo", topo.pod4("b1"), 9000, "tcp")}
}}
"""


def delivered():
    out = run("ethtool", "-S", "eth0", ns=f"{topo.P}-b2")
    return sum(int(l.split()[-1]) for l in out.splitlines() if "rx_queue_0_xdp_drops" in l)


def throughput(seconds, rate, pa1_mac):
    """At `rate` pps: delivered pps and core-1 CPU per delivered packet. Then as fast as the
    generator goes: delivered pps (the capacity of node A's core)."""
    out = {}
    for label, limit in (("", ["--rate", str(rate)]), ("max_", [])):
        rx0, (c0, _) = delivered(), busy()
        gen = json.loads(run(PKTGEN, "send", "--interface", "eth0", "--dst-mac", pa1_mac,
                             "--src", f"{topo.pod4('a1')}:10000", "--ports", "64", "--dst", f"{UDP_VIP}:53",
                             "--size", "60", *limit, "--seconds", str(seconds), "--cores", "0",
                             "--json", "--quiet", ns=f"{topo.P}-a1", timeout=seconds + 30))
        time.sleep(0.3)
        rx1, (c1, _) = delivered(), busy()
        got = max(rx1 - rx0, 1)
        out[f"{label}delivered_pps"] = got / gen["seconds"]
        if not label:
            out["core1_ns"] = (c1 - c0) * 1e9 / USER_HZ / got
        else:
            out["max_offered_pps"] = gen["pps"]
    return out


def latency(n):
    out = {}
    for name, host in (("service", ECHO_VIP), ("direct", topo.pod4("b1"))):
        took = json.loads(run(sys.executable, "-c", PING, host, str(n), ns=topo.NODE_A, timeout=120))
        out[f"{name}_p50_us"] = took[len(took) // 2]
        out[f"{name}_p99_us"] = took[int(len(took) * 0.99)]
    out["added_p50_us"] = out["service_p50_us"] - out["direct_p50_us"]
    return out


def start_xlb(work):
    proc = spawn(XLB, "run", "--config", xlb_config(work), ns=topo.NODE_A, log=os.path.join(work, "xlb.log"))
    deadline = time.time() + 30
    while "9000" not in run("nft", "list", "set", "inet", "xlb", "services4", ns=topo.NODE_A, check=False):
        if proc.poll() is not None or time.time() > deadline:
            raise RuntimeError("xlb did not start; see " + os.path.join(work, "xlb.log"))
        time.sleep(0.1)
    return proc


def summary(values):
    values = sorted(values)
    return {"median": statistics.median(values), "min": values[0], "max": values[-1]}


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--repetitions", type=int, default=5)
    ap.add_argument("--seconds", type=float, default=3)
    ap.add_argument("--rate", type=int, default=150000)
    ap.add_argument("--round-trips", type=int, default=2000)
    ap.add_argument("--placement", default="both", choices=["shared", "reserved", "both"],
                    help="shared: node A's receive of the pod's traffic on core 1 with xlb's worker "
                         "(RPS); reserved: on the pod's core 0, as without RPS, core 1 xlb's alone")
    ap.add_argument("--out", default=os.path.join(ROOT, "bench/results"))
    args = ap.parse_args()
    work = tempfile.mkdtemp(prefix="xlb-bench-node-")
    rows = []
    try:
        topo.build()
        for pod in ("b1",):
            spawn(sys.executable, "-c", topo.SERVER, pod, ns=f"{topo.P}-{pod}")
        sink = os.path.join(work, "sink.o")
        subprocess.run(["bash", "-c", f"clang -O2 -g -target bpf -I/usr/include/$(uname -m)-linux-gnu "
                        f"-c {ROOT}/bench/sink.c -o {sink}"], check=True)
        run("ip", "link", "set", "dev", "eth0", "xdpdrv", "obj", sink, "sec", "xdp", ns=f"{topo.P}-b2")
        pa1_mac = run("cat", "/sys/class/net/pa1/address", ns=topo.NODE_A).strip()
        rules = os.path.join(work, "kube-proxy.nft")
        with open(rules, "w") as f:
            f.write(nft_rules())
        placements = ["shared", "reserved"] if args.placement == "both" else [args.placement]
        for rep, placement in ((r, p) for p in placements for r in range(args.repetitions)):
            rps = "2" if placement == "shared" else "0"
            run("sh", "-c", f"echo {rps} > /sys/class/net/pa1/queues/rx-0/rps_cpus", ns=topo.NODE_A)
            for who in ("nftables", "xlb"):
                proc = None
                if who == "nftables":
                    run("nft", "-f", rules, ns=topo.NODE_A)
                else:
                    proc = start_xlb(work)
                time.sleep(0.5)
                row = {"placement": placement, "repetition": rep, "contender": who,
                       **throughput(args.seconds, args.rate, pa1_mac),
                       **latency(args.round_trips)}
                rows.append(row)
                print(json.dumps({k: round(v, 2) if isinstance(v, float) else v for k, v in row.items()}), flush=True)
                if proc:
                    proc.terminate()
                    proc.wait(timeout=30)
                    time.sleep(1)
                else:
                    run("nft", "delete", "table", "ip", "kube-proxy", ns=topo.NODE_A)
                run("conntrack", "-F", ns=topo.NODE_A, check=False)
        write(rows, args)
    finally:
        topo.teardown()
        subprocess.run(["rm", "-rf", work])


def write(rows, args):
    os.makedirs(args.out, exist_ok=True)
    with open(os.path.join(args.out, "node.json"), "w") as f:
        json.dump(rows, f, indent=1)
    figures = ["delivered_pps", "core1_ns", "max_delivered_pps", "max_offered_pps", "service_p50_us",
               "service_p99_us", "direct_p50_us", "added_p50_us"]
    lines = [
        "# xlb on a node vs kube-proxy's nftables path",
        "",
        f"`make bench-node` ({args.repetitions} interleaved repetitions per placement, {args.seconds} s of "
        f"{args.rate} pps, then {args.seconds} s unbounded, and {args.round_trips} round trips each; "
        f"{os.cpu_count()} cores). Median (min-max). See bench/node.py for the topology.",
        "",
        "Placements: **shared**, node A's receive of the pod's traffic steered by RPS to core 1, "
        "where xlb's worker runs (the kernel's whole path on one core for nftables); **reserved**, "
        "that receive on the pod's own core 0 (no RPS), core 1 xlb's alone (kubelet's reserved "
        "CPUs). core1_ns is node A's core-1 CPU per delivered packet at the fixed rate; for xlb it "
        "includes the worker's polling between frames (an upper bound).",
    ]
    for placement in dict.fromkeys(r["placement"] for r in rows):
        lines += table([r for r in rows if r["placement"] == placement], placement, figures)
    with open(os.path.join(args.out, "node.md"), "w") as f:
        f.write("\n".join(lines) + "\n")
    print("\n".join(lines))


def table(rows, placement, figures):
    by = {who: [r for r in rows if r["contender"] == who] for who in ("nftables", "xlb")}
    lines = [
        "",
        f"## {placement}",
        "",
        "| figure | nftables | xlb | xlb / nftables (per repetition) |",
        "|---|---|---|---|",
    ]
    for fig in figures:
        n, x = summary([r[fig] for r in by["nftables"]]), summary([r[fig] for r in by["xlb"]])
        ratios = summary([xr[fig] / nr[fig] for nr, xr in zip(by["nftables"], by["xlb"]) if nr[fig]])
        overlap = not (n["max"] < x["min"] or x["max"] < n["min"])
        lines.append(f"| {fig} | {n['median']:.1f} ({n['min']:.1f}-{n['max']:.1f}) | "
                     f"{x['median']:.1f} ({x['min']:.1f}-{x['max']:.1f}) | {ratios['median']:.2f} "
                     f"({ratios['min']:.2f}-{ratios['max']:.2f}){' (spreads overlap: not significant)' if overlap else ''} |")
    return lines


if __name__ == "__main__":
    sys.exit(main())
