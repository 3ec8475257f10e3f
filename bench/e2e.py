#!/usr/bin/env python3
"""The end-to-end benchmark (`make bench-e2e`): xlb against kube-proxy's kernel dataplanes.

One topology (deploy/demo/topology.sh): a client namespace running xlb-pktgen, the node under
test, four backend namespaces whose interfaces count and drop what they receive in XDP
(bench/sink.c). In one run, with the same generator and counters, for each Service count:

  iptables   kube-proxy-shaped legacy iptables rules (KUBE-SERVICES -> KUBE-SVC-* with
             `statistic --mode random` -> KUBE-SEP-* DNAT, KUBE-MARK-MASQ / KUBE-POSTROUTING)
  nftables   kube-proxy-shaped nftables rules (the service-ips verdict map keyed by address,
             protocol and port; per-Service chains with `numgen random mod N` verdict maps)
  bare       an AF_XDP forwarder that rewrites to one backend with no lookup (the floor)
  xlb        xlb, dnat mode against the rules without masquerade, snat mode against the rules
             masquerading every client (kube-proxy's treatment of off-cluster clients), and
             dsr mode (frames to the backend unchanged but for Ethernet; xlb's alone)

with established flows (4096 flows cycled), with a new flow per packet (12 million source
address/port pairs), and with replies: established flows whose backends answer every packet
(bench/sink.c's reflector), so that the node translates request and response, as a real
Service's traffic is (not the bare forwarder, which forwards one way, nor dsr, whose replies
bypass xlb); a reply counts as delivered when it reaches the client. Caveat of this 2-core
veth topology: a frame xlb sends is received by its veth peer in the sender's context, so the
backends' reflection and the node's receive of the replies run in softirq on core 1, beside
xlb's busy-polling worker, which they starve when their per-packet cost grows (the XDP
filter's map lookups at many Services: pitfall 6 of AFXDP-ON-VETH.md); the kernel's
dataplanes do all their work in that softirq anyway. Spreads show it; on a NIC the backends
are elsewhere. Threaded NAPI on the backends' veths made no threads here.

Holding still on a shared machine: every figure is measured --reps times (5 by default),
the contenders interleaved within each repetition (kernel rules, bare, xlb; kernel rules,
bare, xlb; ... - the rules stay installed throughout a block, the XDP contenders run in front
of them), and reported as the median and the spread (min-max). Each ratio (xlb against each
other contender) is taken within a repetition, then its median and spread reported; a ratio
whose contenders' spreads overlap is marked not significant. A noise probe - the bare
forwarder on established flows, a fixed workload - runs before and after everything; their
ratio says how much the machine drifted during the run. Placement, the same for every contender: the generator on core 0 (and
with it the kernel's receive of the client's veth, which runs in the generator's sendto());
the node under test on core 1 - xlb's or the bare forwarder's worker pinned there, the
kernel's forwarding steered there by RPS on the node's client-facing interface. Reported per
run: delivered packets per second, core-1 CPU nanoseconds per delivered packet (the node's
share; the fair figure when the generator is the bottleneck), all-cores CPU per delivered
packet, offered pps, and the rule or table install time.

Network safety: only 198.18.0.0/15 inside namespaces this script creates and removes (on
failure too); every run is bounded in seconds.

Usage: bench/e2e.py [--services 1,1000,10000,100000] [--seconds 4] [--reps 5] [--out bench/results]
                   [--contenders ...] [--modes ...] [--patterns established,replies,new-flow]
"""

import argparse
import json
import math
import os
import platform
import statistics
import subprocess
import sys
import tempfile
import time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
XLB = os.path.join(ROOT, "target/release/xlb")
PKTGEN = os.path.join(ROOT, "target/release/xlb-pktgen")
BARE = os.path.join(ROOT, "target/release/bare-forwarder")
P = f"xlbe{os.getpid() % 10000}"
BACKENDS = [f"198.18.{129 + i}.1" for i in range(4)]
BACKEND_PORT = 5353
USER_HZ = os.sysconf("SC_CLK_TCK")
SINK = None  # the compiled bench/sink.c, set by main()


def sh(cmd, check=True, capture=False, timeout=900):
    r = subprocess.run(["bash", "-c", cmd], check=False, text=True, timeout=timeout,
                       capture_output=capture)
    if check and r.returncode != 0:
        raise RuntimeError(f"failed ({r.returncode}): {cmd}\n{r.stdout or ''}{r.stderr or ''}")
    return r.stdout if capture else r.returncode


def ns(name, cmd):
    return f"ip netns exec {P}-{name} {cmd}"


def topology(action):
    sh(f"source {ROOT}/deploy/demo/topology.sh; topology_{action} {P} {4 if action == 'up' else ''}")


def services(n):
    """(VIP, port) of n Services: 4 ports per VIP from 198.19.0.1 on (one port for n < 4)."""
    per_vip = 1 if n < 4 else 4
    vips = math.ceil(n / per_vip)
    base = (198 << 24) | (19 << 16) | 1
    out = []
    for v in range(vips):
        a = base + v
        vip = f"{a >> 24}.{(a >> 16) & 255}.{(a >> 8) & 255}.{a & 255}"
        for p in range(per_vip):
            if len(out) < n:
                out.append((vip, 80 + p))
    return out, vips, per_vip


def iptables_rules(svcs, masquerade):
    lines = ["*nat", ":PREROUTING ACCEPT [0:0]", ":INPUT ACCEPT [0:0]", ":OUTPUT ACCEPT [0:0]",
             ":POSTROUTING ACCEPT [0:0]", ":KUBE-SERVICES - [0:0]", ":KUBE-MARK-MASQ - [0:0]",
             ":KUBE-POSTROUTING - [0:0]"]
    rules = ["-A PREROUTING -m comment --comment \"kubernetes service portals\" -j KUBE-SERVICES",
             "-A OUTPUT -m comment --comment \"kubernetes service portals\" -j KUBE-SERVICES",
             "-A POSTROUTING -m comment --comment \"kubernetes postrouting rules\" -j KUBE-POSTROUTING",
             "-A KUBE-MARK-MASQ -j MARK --set-xmark 0x4000/0x4000",
             "-A KUBE-POSTROUTING -m mark ! --mark 0x4000/0x4000 -j RETURN",
             "-A KUBE-POSTROUTING -j MARK --set-xmark 0x4000/0x0",
             "-A KUBE-POSTROUTING -m comment --comment \"kubernetes service traffic requiring SNAT\" -j MASQUERADE --random-fully"]
    for i, (vip, port) in enumerate(svcs):
        svc = f"KUBE-SVC-{i:012X}"
        lines.append(f":{svc} - [0:0]")
        rules.append(f"-A KUBE-SERVICES -d {vip}/32 -p udp -m comment --comment \"bench/svc{i}:udp\" -m udp --dport {port} -j {svc}")
        if masquerade:
            # kube-proxy masquerades traffic from outside the cluster CIDR: here, every client.
            rules.append(f"-A {svc} ! -s 10.0.0.0/8 -d {vip}/32 -p udp -m udp --dport {port} -j KUBE-MARK-MASQ")
        for k, backend in enumerate(BACKENDS):
            sep = f"KUBE-SEP-{i:08X}{k:04X}"
            lines.append(f":{sep} - [0:0]")
            left = len(BACKENDS) - k
            if left > 1:
                rules.append(f"-A {svc} -m statistic --mode random --probability {1 / left:.11f} -j {sep}")
            else:
                rules.append(f"-A {svc} -j {sep}")
            rules.append(f"-A {sep} -s {backend}/32 -j KUBE-MARK-MASQ")
            rules.append(f"-A {sep} -p udp -m udp -j DNAT --to-destination {backend}:{BACKEND_PORT}")
    return "\n".join(lines + rules + ["COMMIT", ""])


def nft_rules(svcs, masquerade):
    out = ["table ip kube-proxy {",
           "  chain mark-for-masquerade {", "    meta mark set meta mark or 0x4000", "  }",
           "  chain masquerading {",
           "    type nat hook postrouting priority srcnat; policy accept;",
           "    meta mark & 0x4000 == 0 return",
           "    meta mark set meta mark ^ 0x4000",
           "    masquerade fully-random", "  }",
           "  map service-ips {",
           "    type ipv4_addr . inet_proto . inet_service : verdict",
           "    elements = {"]
    out += [f"      {vip} . udp . {port} : goto service-{i}," for i, (vip, port) in enumerate(svcs)]
    out += ["    }", "  }",
            "  chain services {", "    ip daddr . meta l4proto . th dport vmap @service-ips", "  }",
            "  chain nat-prerouting {",
            "    type nat hook prerouting priority dstnat; policy accept;",
            "    jump services", "  }"]
    for i, (vip, port) in enumerate(svcs):
        endpoints = ", ".join(f"{k} : goto endpoint-{i}-{k}" for k in range(len(BACKENDS)))
        out.append(f"  chain service-{i} {{")
        if masquerade:
            out.append("    ip saddr != 10.0.0.0/8 jump mark-for-masquerade")
        out += [f"    numgen random mod {len(BACKENDS)} vmap {{ {endpoints} }}", "  }"]
        for k, backend in enumerate(BACKENDS):
            out += [f"  chain endpoint-{i}-{k} {{",
                    f"    ip saddr {backend} jump mark-for-masquerade",
                    f"    meta l4proto udp dnat to {backend}:{BACKEND_PORT}", "  }"]
    out.append("}")
    return "\n".join(out) + "\n"


def xlb_config(svcs, mode, ifaces):
    by_vip = {}
    for vip, port in svcs:
        by_vip.setdefault(vip, []).append(port)
    lines = [f"interfaces: [{ifaces}]", f"mode: {mode}", "cores: [1]"]
    if mode == "snat":
        lines.append("snat: { ipv4: 198.18.64.100 }")
    lines.append("services:")
    backends = ", ".join(f"{{ address: {b} }}" for b in BACKENDS)
    for n, (vip, ports) in enumerate(by_vip.items()):
        # dsr sends packets unchanged: the backends serve the Service port itself.
        target = "" if mode == "dsr" else f", target_port: {BACKEND_PORT}"
        ps = ", ".join(f"{{ port: {p}, protocol: udp{target} }}" for p in ports)
        lines.append(f"  - {{ name: s{n}, vip: {vip}, ports: [{ps}], backends: [{backends}] }}")
    return "\n".join(lines) + "\n"


def delivered(replies=False):
    """Packets delivered so far: dropped by the backends' sinks, or (replies) reflected by them
    and received by the client."""
    if replies:
        return int(sh(ns("client", "cat /sys/class/net/c0/statistics/rx_packets"), capture=True))
    return sum(xdp_drops(f"b{i}") for i in range(1, 5))


def xdp_drops(where):
    """The XDP drops of the veth b0 in namespace `where` (ethtool's veth statistics)."""
    for line in sh(ns(where, "ethtool -S b0"), capture=True).splitlines():
        if line.strip().startswith("rx_queue_0_xdp_drops:"):
            return int(line.split()[-1])
    return 0


def busy():
    """Busy USER_HZ ticks of cpu1 and of all cpus."""
    out = {}
    with open("/proc/stat") as f:
        for line in f:
            parts = line.split()
            if parts[0] in ("cpu", "cpu1"):
                v = [int(x) for x in parts[1:]]
                out[parts[0]] = v[0] + v[1] + v[2] + v[5] + v[6] + v[7]
    return out["cpu1"], out["cpu"]


def generate(n_vips, per_vip, pattern, seconds, n0_mac):
    if pattern in ("established", "replies"):
        flows = f"--destinations {n_vips} --dst-ports {per_vip} --ports {max(1, math.ceil(4096 / (n_vips * per_vip)))} --src 198.18.0.1:10000"
    else:
        flows = f"--destinations {n_vips} --dst-ports {per_vip} --sources 200 --ports 60000 --new-flows --src 198.18.0.2:1024"
    cmd = ns("client", f"{PKTGEN} send --interface c0 --dst-mac {n0_mac} --dst 198.19.0.1:80 {flows} "
                       f"--size 60 --seconds {seconds} --cores 0 --json --quiet")
    replies = pattern == "replies"
    rx0, (c10, a0) = delivered(replies), busy()
    gen = json.loads(sh(cmd, capture=True))
    time.sleep(0.3)
    rx1, (c11, a1) = delivered(replies), busy()
    got = rx1 - rx0
    per = 1e9 / USER_HZ / max(got, 1)
    return {"delivered_pps": got / gen["seconds"], "core1_ns": (c11 - c10) * per,
            "all_ns": (a1 - a0) * per, "offered_pps": gen["pps"]}


class InstallTimeout(Exception):
    """The rules did not install within the allowed time."""


def kernel_setup(kind, svcs, masquerade, work, limit):
    sh(ns("node", "sysctl -qw net.ipv4.ip_forward=1"))
    sh(ns("node", "sh -c 'echo 2 > /sys/class/net/n0/queues/rx-0/rps_cpus'"))
    path = os.path.join(work, f"{kind}.rules")
    with open(path, "w") as f:
        f.write(iptables_rules(svcs, masquerade) if kind == "iptables" else nft_rules(svcs, masquerade))
    t0 = time.time()
    cmd = f"iptables-legacy-restore < {path}" if kind == "iptables" else f"nft -f {path}"
    try:
        sh(ns("node", cmd), timeout=limit)
    except subprocess.TimeoutExpired as e:
        raise InstallTimeout() from e
    return time.time() - t0


def kernel_teardown(kind):
    if kind == "iptables":
        sh(ns("node", "sh -c 'iptables-legacy -t nat -F; iptables-legacy -t nat -X'"), check=False)
    else:
        sh(ns("node", "nft flush ruleset"), check=False)
    sh(ns("node", "conntrack -F"), check=False, capture=True)
    sh(ns("node", "sh -c 'echo 0 > /sys/class/net/n0/queues/rx-0/rps_cpus'"))
    sh(ns("node", "sysctl -qw net.ipv4.ip_forward=0"))


def start_xlb(svcs, mode, ifaces, work):
    path = os.path.join(work, "xlb.yaml")
    with open(path, "w") as f:
        f.write(xlb_config(svcs, mode, ifaces))
    log = open(os.path.join(work, "xlb.log"), "a")
    t0 = time.time()
    proc = subprocess.Popen(["ip", "netns", "exec", f"{P}-node", XLB, "run", "--config", path],
                            stdout=subprocess.DEVNULL, stderr=log)
    while time.time() - t0 < 600:
        if proc.poll() is not None:
            raise RuntimeError(f"xlb exited at start; see {log.name}")
        if subprocess.run(["bash", "-c", ns("node", f"{XLB} metrics")], capture_output=True).returncode == 0:
            break
        time.sleep(0.2)
    return proc, time.time() - t0


def stop(proc):
    proc.terminate()
    try:
        proc.wait(timeout=30)
    except subprocess.TimeoutExpired:
        proc.kill()
    time.sleep(1)  # AF_XDP sockets close asynchronously


PATTERNS = ("established", "replies", "new-flow")


def set_backends(program, node_pass=None):
    """Loads `program` (sink.o's "xdp" sink or "xdp_reflect" reflector) on the backends. The
    reflector's frames go back into the node's veths, which take them only with an XDP
    program there (AFXDP-ON-VETH.md, pitfall 5): xlb has its own; for the kernel's dataplanes
    (`node_pass` True; False takes it off again; None leaves the node alone) sink.o's
    "xdp_pass" passes every frame on to the kernel."""
    for i in range(1, 5):
        sh(ns(f"b{i}", "ip link set dev b0 xdpdrv off"), check=False)
        sh(ns(f"b{i}", f"ip link set dev b0 xdpdrv obj {SINK} sec {program}"))
        if node_pass is not None:
            sh(ns("node", f"ip link set dev n{i} xdpdrv off"), check=False)
            # The kernel's forwarding of the replies, like that of the requests, on core 1.
            sh(ns("node", f"sh -c 'echo {2 if node_pass else 0} > /sys/class/net/n{i}/queues/rx-0/rps_cpus'"))
        if node_pass:
            sh(ns("node", f"ip link set dev n{i} xdpdrv obj {SINK} sec xdp_pass"))



def start_bare(svcs, seconds):
    b_mac = sh(ns("b1", "cat /sys/class/net/b0/address"), capture=True).strip()
    proc = subprocess.Popen(["ip", "netns", "exec", f"{P}-node", BARE, "n0", "n1",
                             f"{svcs[0][0]}:{svcs[0][1]}", f"{BACKENDS[0]}:{BACKEND_PORT}",
                             b_mac, str(int(seconds)), "1"], stdout=subprocess.DEVNULL)
    time.sleep(1)
    return proc


def measure(who, patterns, n_vips, per_vip, args, n0_mac):
    """Runs `patterns` against the contender in place; the rows' figures."""
    rows = {}
    kernel = who in ("iptables", "nftables")
    for pattern in patterns:
        if pattern == "replies":
            set_backends("xdp_reflect", node_pass=True if kernel else None)
        try:
            # The bare forwarder knows one Service.
            rows[pattern] = generate(1 if who == "bare" else n_vips, 1 if who == "bare" else per_vip,
                                     pattern, args.seconds, n0_mac)
        finally:
            if pattern == "replies":
                set_backends("xdp", node_pass=False if kernel else None)
        sh(ns("node", "conntrack -F"), check=False, capture=True)
    return rows


def main():
    global SINK
    ap = argparse.ArgumentParser()
    ap.add_argument("--services", default="1,1000,10000,100000")
    ap.add_argument("--seconds", type=float, default=4)
    ap.add_argument("--reps", type=int, default=5, help="repetitions of every figure (interleaved)")
    ap.add_argument("--contenders", default="iptables,nftables,bare,xlb")
    ap.add_argument("--modes", default="dnat,snat,dsr",
                    help="dsr: xlb only (the kernel's dataplanes and the bare forwarder have none)")
    ap.add_argument("--patterns", default=",".join(PATTERNS),
                    help="which traffic to run (for a narrow run, e.g. new-flow under perf)")
    ap.add_argument("--out", default=os.path.join(ROOT, "bench/results"))
    ap.add_argument("--install-timeout", type=float, default=900,
                    help="seconds a rule install may take before the contender is reported as not installed")
    args = ap.parse_args()
    counts = [int(x) for x in args.services.split(",")]
    contenders = args.contenders.split(",")
    os.makedirs(args.out, exist_ok=True)
    work = tempfile.mkdtemp()
    SINK = os.path.join(work, "sink.o")
    results, probes = [], []
    ifaces = ", ".join(["n0", "n1", "n2", "n3", "n4"])

    def record(row):
        results.append(row)
        print(json.dumps(row), flush=True)
        write_results(results, probes, args)

    def probe(when, n0_mac):
        svcs, _, _ = services(1)
        proc = start_bare(svcs, args.seconds + 4)
        try:
            g = generate(1, 1, "established", args.seconds, n0_mac)
        finally:
            stop(proc)
        probes.append({"when": when, **{k: round(v, 1) for k, v in g.items()}})
        print(json.dumps({"probe": probes[-1]}), flush=True)

    try:
        topology("up")
        sh(f"clang -O2 -g -target bpf -I/usr/include/$(uname -m)-linux-gnu -c {ROOT}/bench/sink.c -o {SINK}")
        set_backends("xdp")
        n0_mac = sh(ns("node", "cat /sys/class/net/n0/address"), capture=True).strip()
        probe("before", n0_mac)
        for n in counts:
            svcs, n_vips, per_vip = services(n)
            for mode in args.modes.split(","):
                # Blocks: each kernel contender's rules installed once, the XDP contenders
                # interleaved with it repetition by repetition (they run in front of the rules).
                kernels = [k for k in ("iptables", "nftables") if k in contenders and mode != "dsr"]
                for kernel in kernels or [None]:
                    install = {}
                    if kernel:
                        try:
                            install[kernel] = kernel_setup(kernel, svcs, mode == "snat", work, args.install_timeout)
                        except InstallTimeout:
                            for pattern in PATTERNS:
                                record({"contender": kernel, "mode": mode, "services": n, "pattern": pattern,
                                        "rep": 0, "block": kernel, "install_s": f"> {args.install_timeout:.0f} (not installed)"})
                            kernel_teardown(kernel)
                            install[kernel] = None
                    for rep in range(args.reps):
                        order = [kernel] if kernel and install.get(kernel) is not None else []
                        if "bare" in contenders and mode == "dnat" and n == counts[0]:
                            order.append("bare")
                        if "xlb" in contenders:
                            order.append("xlb")
                        for who in order:
                            proc = None
                            if who == "bare":
                                proc = start_bare(svcs, 3 * (args.seconds + 3))
                                install[who] = 0.0
                            elif who == "xlb":
                                proc, install[who] = start_xlb(svcs, mode, ifaces, work)
                                time.sleep(1)
                            # dsr replies bypass xlb; the bare forwarder forwards one way.
                            patterns = [p for p in PATTERNS if p in args.patterns.split(",")
                                        and (p != "replies" or (who != "bare" and mode != "dsr"))]
                            try:
                                rows = measure(who, patterns, n_vips, per_vip, args, n0_mac)
                            finally:
                                if proc is not None:
                                    stop(proc)
                            for pattern, g in rows.items():
                                record({"contender": who, "mode": mode, "services": n, "pattern": pattern,
                                        "rep": rep, "block": kernel or "-", "install_s": round(install[who], 3),
                                        **{k: round(v, 1) for k, v in g.items()}})
                    if kernel and install.get(kernel) is not None:
                        kernel_teardown(kernel)
        probe("after", n0_mac)
        write_results(results, probes, args)
    finally:
        topology("down")


def machine():
    model = "unknown CPU"
    with open("/proc/cpuinfo") as f:
        for line in f:
            if line.startswith("model name"):
                model = line.split(":", 1)[1].strip()
                break
    return f"{os.cpu_count()} cores ({model}), Linux {platform.release()}"


FIGURES = ("delivered_pps", "core1_ns", "all_ns")


def spread(values):
    """(median, min, max) of `values`."""
    return statistics.median(values), min(values), max(values)


def summarise(results):
    """One row per (Services, mode, flows, contender): each figure's median and spread over
    its repetitions; and per (Services, mode, flows), xlb's ratio against each other contender,
    taken repetition by repetition (within the same block), with its median and spread."""
    groups = {}
    for r in results:
        if "delivered_pps" not in r:
            continue
        groups.setdefault((r["services"], r["mode"], r["pattern"], r["contender"]), []).append(r)
    rows = []
    for (n, mode, pattern, who), rs in groups.items():
        row = {"services": n, "mode": mode, "pattern": pattern, "contender": who, "reps": len(rs),
               "install_s": rs[0]["install_s"]}
        for f in FIGURES:
            row[f] = spread([r[f] for r in rs])
        rows.append(row)
    ratios = []
    for (n, mode, pattern, who), rs in groups.items():
        if who == "xlb":
            continue
        xlb = {(r["block"], r["rep"]): r for r in groups.get((n, mode, pattern, "xlb"), [])}
        pairs = [(xlb[(r["block"], r["rep"])], r) for r in rs if (r["block"], r["rep"]) in xlb]
        if not pairs:
            continue
        pps = spread([x["delivered_pps"] / max(o["delivered_pps"], 1) for x, o in pairs])
        cpu = spread([x["core1_ns"] / max(o["core1_ns"], 1) for x, o in pairs])
        mine = spread([x["delivered_pps"] for x, _ in pairs])
        theirs = spread([o["delivered_pps"] for _, o in pairs])
        mine_ns = spread([x["core1_ns"] for x, _ in pairs])
        theirs_ns = spread([o["core1_ns"] for _, o in pairs])
        overlap = lambda a, b: a[1] <= b[2] and b[1] <= a[2]
        ratios.append({"services": n, "mode": mode, "pattern": pattern, "against": who, "pairs": len(pairs),
                       "pps_ratio": pps, "pps_significant": not overlap(mine, theirs),
                       "core1_ns_ratio": cpu, "core1_ns_significant": not overlap(mine_ns, theirs_ns)})
    return rows, ratios


def write_results(results, probes, args):
    out = args.out
    rows, ratios = summarise(results)
    noise = None
    if len(probes) == 2 and probes[0]["delivered_pps"]:
        noise = probes[1]["delivered_pps"] / probes[0]["delivered_pps"]
    with open(os.path.join(out, "e2e.json"), "w") as f:
        json.dump({"machine": machine(), "seconds": args.seconds, "reps": args.reps, "probes": probes,
                   "noise_after_over_before": noise, "summary": rows, "ratios": ratios,
                   "results": results}, f, indent=1)
    fmt = lambda t, unit="": f"{t[0]:,.0f}{unit} ({t[1]:,.0f}-{t[2]:,.0f})"
    lines = [
        "# End-to-end benchmark",
        "",
        f"Machine: {machine()}. Generated by `make bench-e2e` (bench/e2e.py), {args.seconds} s per run, "
        f"{args.reps} repetitions of every figure, contenders interleaved within each repetition; each cell is the "
        "median and, in brackets, the spread (min-max). Placement: generator (and the kernel's receive of its "
        "veth) on core 0; the node under test on core 1 (xlb's and the bare forwarder's worker pinned, the "
        "kernel's forwarding steered by RPS). 60-byte UDP frames; backends count and drop in XDP, or (replies) "
        "send every packet back, and a reply counts when the client receives it.",
        "",
        "dnat rows: xlb in dnat mode, kernel rules without masquerade; snat rows: xlb in snat mode, kernel "
        "rules masquerading every client. `bare` is the AF_XDP forwarder with no lookup (one Service).",
        "",
    ]
    if probes:
        p = "; ".join(f"{q['when']}: {q['delivered_pps']:,.0f} pps, {q['core1_ns']:,.0f} ns/pkt" for q in probes)
        verdict = "" if noise is None else (
            f" - after/before {noise:.2f}" + (" (NOISY: the machine drifted by more than 10%)" if abs(noise - 1) > 0.1 else ""))
        lines += [f"Noise probe (the bare forwarder, established flows, before and after everything): {p}{verdict}.", ""]
    lines += [
        "| Services | mode | flows | contender | delivered pps | core-1 ns/pkt | all-cores ns/pkt | install s |",
        "|---:|---|---|---|---:|---:|---:|---:|",
    ]
    for r in rows:
        lines.append(f"| {r['services']} | {r['mode']} | {r['pattern']} | {r['contender']} | {fmt(r['delivered_pps'])} | "
                     f"{fmt(r['core1_ns'])} | {fmt(r['all_ns'])} | {r['install_s']} |")
    for r in results:
        if "delivered_pps" not in r:
            lines.append(f"| {r['services']} | {r['mode']} | {r['pattern']} | {r['contender']} | - | - | - | {r['install_s']} |")
    lines += ["", "Ratios, xlb against each contender, taken within each repetition (median (min-max); "
              "\"n.s.\": the two contenders' spreads overlap, not significant):", "",
              "| Services | mode | flows | xlb vs | pps ratio | core-1 ns/pkt ratio |", "|---:|---|---|---|---:|---:|"]
    ratio = lambda t, sig: f"{t[0]:.2f} ({t[1]:.2f}-{t[2]:.2f}){'' if sig else ' n.s.'}"
    for q in ratios:
        lines.append(f"| {q['services']} | {q['mode']} | {q['pattern']} | {q['against']} | "
                     f"{ratio(q['pps_ratio'], q['pps_significant'])} | {ratio(q['core1_ns_ratio'], q['core1_ns_significant'])} |")
    lines += ["", "![delivered pps](e2e.svg)", ""]
    with open(os.path.join(out, "e2e.md"), "w") as f:
        f.write("\n".join(lines))
    with open(os.path.join(out, "e2e.svg"), "w") as f:
        f.write(svg_chart(rows))


def svg_chart(results):
    """Grouped bars: median delivered pps per contender, for each (Services, mode, flows) group,
    with the spread as a whisker."""
    groups = []
    for r in results:
        key = (r["services"], r["mode"], r["pattern"])
        if key not in groups:
            groups.append(key)
    contenders = ["iptables", "nftables", "bare", "xlb"]
    colours = {"iptables": "#999999", "nftables": "#4c72b0", "bare": "#55a868", "xlb": "#c44e52"}
    top = max([r["delivered_pps"][2] for r in results] + [1])
    w_bar, gap, h, left, base = 10, 14, 300, 70, 330
    width = left + len(groups) * (len(contenders) * w_bar + gap) + 20
    out = [f'<svg xmlns="http://www.w3.org/2000/svg" width="{width}" height="440" font-family="sans-serif" font-size="10">',
           f'<text x="{left}" y="16" font-size="13">Delivered packets per second (60-byte UDP, one core for the node)</text>']
    for k in range(5):
        y = base - h * k / 4
        out.append(f'<line x1="{left}" x2="{width - 10}" y1="{y:.0f}" y2="{y:.0f}" stroke="#ddd"/>')
        out.append(f'<text x="{left - 5}" y="{y + 3:.0f}" text-anchor="end">{top * k / 4 / 1e6:.2f}M</text>')
    for g, key in enumerate(groups):
        x0 = left + g * (len(contenders) * w_bar + gap)
        for c, who in enumerate(contenders):
            row = next((r for r in results if (r["services"], r["mode"], r["pattern"]) == key and r["contender"] == who), None)
            if row is None:
                continue
            median, low, high = row["delivered_pps"]
            bh = h * median / top
            x = x0 + c * w_bar
            out.append(f'<rect x="{x}" y="{base - bh:.1f}" width="{w_bar - 1}" height="{bh:.1f}" fill="{colours[who]}"/>')
            out.append(f'<line x1="{x + w_bar / 2 - 0.5:.1f}" x2="{x + w_bar / 2 - 0.5:.1f}" y1="{base - h * low / top:.1f}" '
                       f'y2="{base - h * high / top:.1f}" stroke="#000"/>')
        label = f"{key[0]} {key[1]} {dict(established='est', replies='rep').get(key[2], 'new')}"
        out.append(f'<text transform="translate({x0 + 8},{base + 8}) rotate(60)">{label}</text>')
    for c, who in enumerate(contenders):
        out.append(f'<rect x="{left + c * 90}" y="420" width="10" height="10" fill="{colours[who]}"/>'
                   f'<text x="{left + c * 90 + 14}" y="429">{who}</text>')
    out.append("</svg>")
    return "\n".join(out) + "\n"


if __name__ == "__main__":
    if os.geteuid() != 0:
        sys.exit("bench/e2e.py needs root (namespaces, XDP, AF_XDP, netfilter rules)")
    main()
