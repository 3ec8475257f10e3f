#!/usr/bin/env python3
"""New flows accepted during and after a flood: xlb against nftables + conntrack, one run.

The topology, servers and clients of deploy/acceptance (client, node, three backends with
nginx and dnsmasq). In each repetition, for each contender in turn:
  xlb        `xlb run`, dnat mode, flow_capacity FLOWS (default 65 536);
  nftables   the node's kernel forwarding, kube-proxy-shaped nftables DNAT rules
             (numgen random over the backends), conntrack at its default size;
a read-only download runs (4 MB/s) while xlb-pktgen floods the VIP's port 80 with TCP SYNs, a
new flow per packet from 4 096 x 1 000 sources and ports routed to the client, for SECONDS
seconds, at RATE packets per second and at the generator's full rate; meanwhile and
afterwards, 20 clients each open a new connection (curl, 3 s timeout). Reported per contender
and rate: new connections accepted during and after the flood, the download's longest pause
and whether it completed intact, the flood's packets per second as sent. Medians over the
repetitions, interleaved (xlb, nftables, xlb, nftables, ...). The offered rate differs by
contender at full rate: the kernel's receive path of the node's veth runs on the generator's
core and slows it, which is why a fixed rate both sustain is the fair comparison.

Usage (as root): flood.py XLB XLB_PKTGEN [--seconds 5] [--repeat 3] [--flows 65536]
                          [--rate 200000]
Results are printed as a table and written to bench/results/flood.md and flood.json.
"""

import argparse
import json
import os
import signal
import statistics
import subprocess
import sys
import threading
import time

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), "..", "deploy", "acceptance"))
import acceptance as a  # noqa: E402  (the shared topology, servers and clients)

RESULTS = os.path.join(os.path.dirname(os.path.abspath(__file__)), "results")


def nft_rules():
    backends = ", ".join(f"{k} : {a.backend4(i)} . 8080" for k, i in enumerate(range(1, a.BACKENDS + 1)))
    return f"""table ip kube-proxy {{
  chain nat-prerouting {{
    type nat hook prerouting priority dstnat; policy accept;
    ip daddr {a.VIP4} tcp dport 80 dnat ip to numgen random mod {a.BACKENDS} map {{ {backends} }}
  }}
}}
"""


def kernel_up():
    a.run("sysctl", "-qw", "net.ipv4.ip_forward=1", ns=a.NODE)
    p = subprocess.run(["ip", "netns", "exec", a.NODE, "nft", "-f", "-"], input=nft_rules(), text=True,
                       capture_output=True)
    if p.returncode != 0:
        raise a.Failure(f"nft: {p.stderr}")


def kernel_down():
    a.run("nft", "delete", "table", "ip", "kube-proxy", ns=a.NODE, check=False)
    a.run("conntrack", "-F", ns=a.NODE, check=False)
    a.run("sysctl", "-qw", "net.ipv4.ip_forward=0", ns=a.NODE)


def attempts(n):
    """n new connections at once (curl, 3 s timeout); how many were answered."""
    results = []

    def one():
        results.append(a.http_once(a.VIP4))

    threads = [threading.Thread(target=one) for _ in range(n)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    return sum(results)


def trial(ctx, seconds, rate):
    mac = a.run("cat", "/sys/class/net/n0/address", ns=a.NODE).strip()
    download = a.download(a.VIP4, "/slow/big", deadline=60)
    a.wait_connected(download)
    flood = subprocess.Popen(
        ["ip", "netns", "exec", a.CLIENT, ctx.pktgen, "send", "--interface", "c0", "--dst-mac", mac,
         "--src", "198.19.0.1:1024", "--sources", "4096", "--ports", "1000", "--dst", f"{a.VIP4}:80",
         "--kind", "tcp-syn", "--new-flows", "--seconds", str(seconds), "--quiet", "--json",
         *(["--rate", str(rate)] if rate else [])],
        stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    time.sleep(1)
    during = attempts(20)
    out, err = flood.communicate(timeout=seconds + 30)
    a.expect(flood.returncode == 0, f"xlb-pktgen: {err.strip()[:300]}")
    sent = json.loads(out.strip().splitlines()[-1])
    time.sleep(1)
    after = attempts(20)
    result = a.download_result(download)
    size, digest = ctx.backends.files["big"]
    # xlb counts what it could not take (a receive ring full: the worker saturated).
    dropped = ctx.xlb.counter("xlb_socket_rx_ring_full_total") if ctx.xlb.proc else None
    return {
        "rx_ring_full": dropped,
        "during": during, "after": after, "pause_s": round(result["gap"], 3),
        "download_intact": result["bytes"] == size and result["sha256"] == digest,
        "flood_pps": round(sent["pps"]), "flood_packets": sent["sent"],
    }


def main():
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("xlb")
    parser.add_argument("pktgen")
    parser.add_argument("--seconds", type=int, default=5)
    parser.add_argument("--repeat", type=int, default=3)
    parser.add_argument("--flows", type=int, default=65536)
    parser.add_argument("--rate", type=int, default=200000)
    args = parser.parse_args()
    rates = [args.rate, 0]
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(1))
    ctx = a.setup("xlb-flood-", os.path.abspath(args.xlb), "dnat", args.pktgen, flow_capacity=args.flows)
    rows = {(name, rate): [] for rate in rates for name in ("xlb", "nftables")}
    try:
        for _ in range(args.repeat):
            for rate in rates:
                ctx.xlb.start()
                try:
                    rows[("xlb", rate)].append(trial(ctx, args.seconds, rate))
                finally:
                    ctx.xlb.kill(signal.SIGTERM)
                kernel_up()
                try:
                    rows[("nftables", rate)].append(trial(ctx, args.seconds, rate))
                finally:
                    kernel_down()
                print(json.dumps({f"{k[0]}@{k[1] or 'full'}": v[-1] for k, v in rows.items() if k[1] == rate}),
                      flush=True)
    finally:
        a.teardown(ctx)
    table = ["| contender | flood rate asked | flood pps sent | new connections accepted during the flood "
             "| after | download longest pause (s) | download intact | frames dropped on a full receive ring "
             "(counted) |", "|---|---|---|---|---|---|---|---|"]
    summary = {}
    for (name, rate), trials in rows.items():
        med = {k: statistics.median(t[k] for t in trials)
               for k in ("during", "after", "pause_s", "flood_pps")}
        intact = all(t["download_intact"] for t in trials)
        summary[f"{name}@{rate or 'full'}"] = {"median": med, "trials": trials}
        ring = [t["rx_ring_full"] for t in trials if t["rx_ring_full"] is not None]
        ring = f"{statistics.median(ring):.0f}" if ring else "-"
        table.append(f"| {name} | {rate or 'full'} | {med['flood_pps']:.0f} | {med['during']:.0f}/20 "
                     f"| {med['after']:.0f}/20 | {med['pause_s']:.3f} | {'yes' if intact else 'no'} | {ring} |")
    text = "\n".join(table)
    print(text)
    os.makedirs(RESULTS, exist_ok=True)
    with open(os.path.join(RESULTS, "flood.md"), "w") as f:
        f.write(f"# New flows during a SYN flood: xlb vs nftables + conntrack\n\n"
                f"`make bench-flood` ({args.repeat} interleaved repetitions, medians; flood "
                f"{args.seconds} s at {args.rate} pps and at the generator's full rate; xlb "
                f"flow_capacity {args.flows}; "
                f"conntrack at its default size). Generator on core 0, xlb's worker (or the "
                f"kernel's forwarding) on core 1.\n\n{text}\n")
    with open(os.path.join(RESULTS, "flood.json"), "w") as f:
        json.dump(summary, f, indent=1)
    return 0


if __name__ == "__main__":
    sys.exit(main())
