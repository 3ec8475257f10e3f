#!/usr/bin/env python3
"""xlb as a node's kube-proxy (issue 13), on the kernel, with curl and real sockets.

      pod a1 ─┐                                         ┌─ pod b1
      pod a2 ─┴─ node A (xlb run, node: link xlb0/xlb1) ── node B (plain kernel routing)

Pods sit behind per-pod veths routed by their node (as Calico, Cilium or kindnet do); the
nodes route each other's pod prefixes. Only node A runs xlb, with `interfaces: []` and a
`node:` section: the kernel routes the Service traffic of A's pods and of A itself into xlb's
link. Checked, for IPv4 and IPv6 where it applies:
  * a pod's TCP (curl) and UDP to a ClusterIP served by a pod on the other node, and by a
    pod on its own node, keeping the client's address (cluster_cidrs: detect-local);
  * hairpin: a pod reaching a Service whose pick is itself (masqueraded to the node);
  * the node's own curl and UDP to ClusterIPs (its address as the source);
  * a NodePort from a client outside the cluster, masqueraded;
  * a ClusterIP on a port no Service has: refused at once, not leaked;
  * a pod's direct connection to another pod's Service port: untouched by xlb;
  * many connections (no loss), a restart after kill -9 with connections open (they live
    through it; the stale link is replaced), and a SIGTERM that removes the link, the
    nftables table and the rules.

Usage: node.py XLB [--workers 2]. With two workers (two queues on the link), it checks
instead that flows spread over both, a connection whose directions land on different workers
works, and a Service change reaches both. Prints "ok NAME {figures}" lines and
"node (kube-proxy, N worker(s)): all passed".
Everything it creates is removed on exit, failure included; traffic is bounded (timeouts,
counts) and stays in the namespaces. Addresses: 198.18.0.0/15 and 2001:2::/48 only.
"""

import json
import os
import signal
import socket
import subprocess
import sys
import tempfile
import time

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from acceptance import Failure, expect, missing_tool, remove_namespaces, run, spawn  # noqa: E402

P = f"xlbn{os.getpid() % 100000}"
NODE_A, NODE_B = f"{P}-a", f"{P}-b"
PODS = {  # name: (node, v4 /30 base, v6 /64 index)
    "a1": (NODE_A, "198.18.10.0", 0x10),
    "a2": (NODE_A, "198.18.10.4", 0x11),
    "b1": (NODE_B, "198.18.30.0", 0x30),
    "b2": (NODE_B, "198.18.30.4", 0x31),
}
A4, B4, A6, B6 = "198.18.20.1", "198.18.20.2", "2001:2:0:20::1", "2001:2:0:20::2"
# A client outside the cluster, behind node A.
CLIENT = f"{P}-c"
C4, CA4, C6, CA6 = "198.18.40.2", "198.18.40.1", "2001:2:0:40::2", "2001:2:0:40::1"
REMOTE4, REMOTE6 = "198.18.100.1", "2001:2:0:100::1"
LOCAL4, LOCAL6 = "198.18.100.2", "2001:2:0:100::2"
HAIRPIN4 = "198.18.100.3"
NODEPORT = 30080


def pod4(name, host=False):
    base = PODS[name][1].rsplit(".", 1)
    return f"{base[0]}.{int(base[1]) + (1 if host else 2)}"


def pod6(name, host=False):
    return f"2001:2:0:{PODS[name][2]:x}::{1 if host else 2}"


# A server answering every TCP request (HTTP, for curl) and UDP datagram with its pod's name
# and the address it saw the client at, on ports 8080 (TCP) and 5353 (UDP), both families.
SERVER = r"""
import socket, sys, threading
name = sys.argv[1]
def tcp():
    s = socket.socket(socket.AF_INET6); s.setsockopt(socket.IPPROTO_IPV6, socket.IPV6_V6ONLY, 0)
    s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1); s.bind(("::", 8080)); s.listen(512)
    while True:
        c, peer = s.accept()
        try:
            c.settimeout(5); c.recv(4096)
            body = f"{name} {peer[0].removeprefix('::ffff:')}\n".encode()
            c.sendall(b"HTTP/1.0 200 OK\r\nContent-Length: %d\r\n\r\n" % len(body) + body)
        except OSError:
            pass
        c.close()
def echo():
    s = socket.socket(socket.AF_INET6); s.setsockopt(socket.IPPROTO_IPV6, socket.IPV6_V6ONLY, 0)
    s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1); s.bind(("::", 9000)); s.listen(64)
    def serve(c):
        with c:
            while data := c.recv(4096):
                c.sendall(data)
    while True:
        c, _ = s.accept()
        threading.Thread(target=serve, args=(c,), daemon=True).start()
threading.Thread(target=tcp, daemon=True).start()
threading.Thread(target=echo, daemon=True).start()
u = socket.socket(socket.AF_INET6, socket.SOCK_DGRAM); u.setsockopt(socket.IPPROTO_IPV6, socket.IPV6_V6ONLY, 0)
u.bind(("::", 5353))
while True:
    data, peer = u.recvfrom(2048)
    u.sendto(f"{name} {peer[0].removeprefix('::ffff:')}".encode(), peer)
"""

UDP_CLIENT = r"""
import socket, sys, json
host, port, n = sys.argv[1], int(sys.argv[2]), int(sys.argv[3])
fam = socket.AF_INET6 if ":" in host else socket.AF_INET
answers, lost = {}, 0
for i in range(n):
    s = socket.socket(fam, socket.SOCK_DGRAM); s.settimeout(2)
    s.sendto(b"q%d" % i, (host, port))
    try:
        data, peer = s.recvfrom(2048)
        answers[data.decode()] = answers.get(data.decode(), 0) + 1
        assert peer[0] == host, f"answer from {peer[0]}, not {host}"
    except socket.timeout:
        lost += 1
    s.close()
print(json.dumps({"answers": answers, "lost": lost}))
"""


# A connection that lives through an xlb restart: a line every 50 ms for `seconds`, each
# echoed back; prints how many came back and the longest wait for one.
KEEPALIVE = r"""
import socket, sys, time, json
host, seconds = sys.argv[1], float(sys.argv[2])
fam = socket.AF_INET6 if ":" in host else socket.AF_INET
s = socket.create_connection((host, 9000), timeout=10)
sent = echoed = 0; worst = 0.0; end = time.time() + seconds
while time.time() < end:
    line = b"ping %d\n" % sent; started = time.time()
    s.sendall(line); sent += 1
    got = b""
    while len(got) < len(line):
        chunk = s.recv(len(line) - len(got))
        if not chunk:
            raise SystemExit("closed")
        got += chunk
    echoed += got == line; worst = max(worst, time.time() - started)
    time.sleep(0.05)
print(json.dumps({"sent": sent, "echoed": echoed, "worst_wait_s": round(worst, 3)}))
"""


def build():
    """The two nodes, their pods, and the outside client (see the module documentation)."""
    spaces = (NODE_A, NODE_B, CLIENT, *(f"{P}-{p}" for p in PODS))
    for ns in spaces:
        run("ip", "netns", "add", ns)
        run("ip", "link", "set", "lo", "up", ns=ns)
    for ns in (NODE_A, NODE_B):
        run("sysctl", "-qw", "net.ipv4.ip_forward=1", "net.ipv6.conf.all.forwarding=1", ns=ns)
    # The nodes' link.
    run("ip", "link", "add", "na", "netns", NODE_A, "type", "veth", "peer", "name", "nb", "netns", NODE_B)
    for ns, dev, a4, a6 in ((NODE_A, "na", A4, A6), (NODE_B, "nb", B4, B6)):
        run("ip", "addr", "add", f"{a4}/30", "dev", dev, ns=ns)
        run("ip", "addr", "add", f"{a6}/64", "dev", dev, "nodad", ns=ns)
        run("ip", "link", "set", dev, "up", ns=ns)
    # Pods: a /30 and a /64 each, routed by their node.
    for name, (node, _, _) in PODS.items():
        pod, host = f"{P}-{name}", f"p{name}"
        run("ip", "link", "add", "eth0", "netns", pod, "type", "veth", "peer", "name", host, "netns", node)
        run("ip", "addr", "add", f"{pod4(name)}/30", "dev", "eth0", ns=pod)
        run("ip", "addr", "add", f"{pod6(name)}/64", "dev", "eth0", "nodad", ns=pod)
        run("ip", "addr", "add", f"{pod4(name, True)}/30", "dev", host, ns=node)
        run("ip", "addr", "add", f"{pod6(name, True)}/64", "dev", host, "nodad", ns=node)
        run("ip", "link", "set", "eth0", "up", ns=pod)
        run("ip", "link", "set", host, "up", ns=node)
        run("ip", "route", "add", "default", "via", pod4(name, True), ns=pod)
        run("ip", "-6", "route", "add", "default", "via", pod6(name, True), ns=pod)
    # The client, on its own link to node A.
    run("ip", "link", "add", "eth0", "netns", CLIENT, "type", "veth", "peer", "name", "nc", "netns", NODE_A)
    for ns, dev, a4, a6 in ((CLIENT, "eth0", C4, C6), (NODE_A, "nc", CA4, CA6)):
        run("ip", "addr", "add", f"{a4}/30", "dev", dev, ns=ns)
        run("ip", "addr", "add", f"{a6}/64", "dev", dev, "nodad", ns=ns)
        run("ip", "link", "set", dev, "up", ns=ns)
    run("ip", "route", "add", "default", "via", CA4, ns=CLIENT)
    run("ip", "-6", "route", "add", "default", "via", CA6, ns=CLIENT)
    # Each node reaches the other's pods through it, and has a default route through it (a
    # node's own connections to a ClusterIP need one, with xlb as with kube-proxy).
    run("ip", "route", "add", "default", "via", B4, ns=NODE_A)
    run("ip", "-6", "route", "add", "default", "via", B6, ns=NODE_A)
    run("ip", "route", "add", "default", "via", A4, ns=NODE_B)
    run("ip", "-6", "route", "add", "default", "via", A6, ns=NODE_B)
    # Link-local addresses do duplicate address detection for a second after a link comes
    # up; neighbour discovery waits for it (no one's fault, and not xlb's to measure).
    deadline = time.time() + 10
    while any(run("ip", "-6", "addr", "show", "tentative", ns=ns).strip() for ns in spaces):
        expect(time.time() < deadline, "IPv6 addresses stayed tentative")
        time.sleep(0.1)


def teardown():
    remove_namespaces(P)


def config(path, workers=1, remote=("b1",)):
    def service(name, vip, backends, port=80):
        lines = [
            f"  - name: {name}",
            f"    vip: '{vip}'",
            f"    ports: [{{ port: {port}, target_port: 8080 }}, {{ port: 53, protocol: udp, target_port: 5353 }},"
            " { port: 9000 }]",
            "    backends:",
        ]
        return lines + [f"      - {{ address: '{b}' }}" for b in backends]

    lines = [
        "interfaces: []",
        # The link's address: 169.254.42.1 by default; here from the test range.
        "node: { address: 198.19.255.1 }",
        "mode: dnat",
        "cores: [0, 1]" if workers == 2 else ("cores: [1]" if os.cpu_count() > 1 else "cores: [0]"),
        "flow_capacity: 65536",
        # Detect-local: the pod prefixes are the cluster; node addresses are not.
        "cluster_cidrs: [198.18.10.0/24, 198.18.30.0/24, '2001:2:0:10::/63', '2001:2:0:30::/64']",
        f"snat: {{ ipv4: {A4}, ipv6: '{A6}', first_port: 20000, last_port: 29999 }}",
        "services:",
    ]
    lines += service("remote", REMOTE4, [pod4(r) for r in remote])
    lines += service("remote-v6", REMOTE6, [pod6("b1")])
    lines += service("local", LOCAL4, [pod4("a2")])
    lines += service("local-v6", LOCAL6, [pod6("a2")])
    lines += service("hairpin", HAIRPIN4, [pod4("a1")])
    lines += service("nodeport", A4, [pod4("b1"), pod4("a2")], port=NODEPORT)
    with open(path, "w") as f:
        f.write("\n".join(lines) + "\n")


class Xlb:
    def __init__(self, binary, work, workers):
        self.binary, self.work, self.workers = binary, work, workers
        self.path = os.path.join(work, "xlb.yaml")
        self.log = os.path.join(work, "xlb.log")
        self.proc = None
        config(self.path, workers)

    def reload(self, **changes):
        """Writes a changed configuration and waits until xlb has published it."""
        before = self.metric("xlb_snapshot_generation")
        config(self.path + ".new", self.workers, **changes)
        os.replace(self.path + ".new", self.path)
        deadline = time.time() + 10
        while self.metric("xlb_snapshot_generation") <= before:
            expect(time.time() < deadline, "xlb did not apply the edit")
            time.sleep(0.05)

    def start(self):
        self.proc = spawn(self.binary, "run", "--config", self.path, ns=NODE_A, log=self.log)
        deadline = time.time() + 20
        while time.time() < deadline:
            if self.proc.poll() is not None:
                raise Failure(f"xlb exited at start:\n{self.tail()}")
            if self.metric("xlb_snapshot_generation") > 0 and self.sets_filled():
                return
            time.sleep(0.05)
        raise Failure(f"xlb did not come up:\n{self.tail()}")

    def sets_filled(self):
        out = run("nft", "list", "set", "inet", "xlb", "services4", ns=NODE_A, check=False)
        return str(NODEPORT) in out

    def stop(self, sig):
        if self.proc and self.proc.poll() is None:
            self.proc.send_signal(sig)
            self.proc.wait(timeout=20)
        self.proc = None

    def metric(self, name, **labels):
        """The sum of a metric's series (those matching `labels`)."""
        out = run(self.binary, "metrics", ns=NODE_A, check=False, timeout=10)
        total = 0.0
        for line in out.splitlines():
            if line.startswith(name + " ") or line.startswith(name + "{"):
                if all(f'{k}="{v}"' in line for k, v in labels.items()):
                    total += float(line.rsplit(" ", 1)[1])
        return total

    def tail(self):
        try:
            with open(self.log, "rb") as f:
                return f.read().decode(errors="replace")[-4000:]
        except OSError:
            return "(no log)"


def curl(ns, host, port=80, timeout=5):
    """One HTTP request with curl; returns (body, curl's time_total in seconds)."""
    url = f"http://[{host}]:{port}/" if ":" in host else f"http://{host}:{port}/"
    out = run("curl", "-sS", "--max-time", str(timeout), "-w", "\n%{time_total}", url, ns=ns, timeout=timeout + 5)
    body, took = out.rsplit("\n", 1)
    return body.strip(), float(took)


def udp(ns, host, n=20):
    return json.loads(run(sys.executable, "-c", UDP_CLIENT, host, "53", str(n), ns=ns, timeout=60))


def check_tcp(ns, host, want, times=20):
    """`times` requests, each a new connection; the first without a SYN retransmission (a
    retransmission waits a second)."""
    seen, took = set(), []
    for _ in range(times):
        body, seconds = curl(ns, host)
        seen.add(body)
        took.append(seconds)
    expect(seen == {want}, f"curl {host} from {ns}: {sorted(seen)}, expected {want!r}")
    expect(took[0] < 0.9, f"the first connection to {host} from {ns} took {took[0]:.2f} s")
    return {"requests": times, "first_ms": round(took[0] * 1000, 1), "median_ms": round(sorted(took)[len(took) // 2] * 1000, 2)}


def check_udp(ns, host, want, n=20):
    got = udp(ns, host, n)
    expect(got["lost"] == 0 and got["answers"] == {want: n}, f"udp {host} from {ns}: {got}, expected {want!r} x{n}")
    return {"datagrams": n}


def scenarios():
    a1 = f"{P}-a1"
    rows = [
        ("pod-to-remote-pod-tcp-ipv4", lambda: check_tcp(a1, REMOTE4, f"b1 {pod4('a1')}")),
        ("pod-to-remote-pod-tcp-ipv6", lambda: check_tcp(a1, REMOTE6, f"b1 {pod6('a1')}")),
        ("pod-to-remote-pod-udp-ipv4", lambda: check_udp(a1, REMOTE4, f"b1 {pod4('a1')}")),
        ("pod-to-remote-pod-udp-ipv6", lambda: check_udp(a1, REMOTE6, f"b1 {pod6('a1')}")),
        ("pod-to-local-pod-tcp-ipv4", lambda: check_tcp(a1, LOCAL4, f"a2 {pod4('a1')}")),
        ("pod-to-local-pod-tcp-ipv6", lambda: check_tcp(a1, LOCAL6, f"a2 {pod6('a1')}")),
        ("pod-to-local-pod-udp-ipv4", lambda: check_udp(a1, LOCAL4, f"a2 {pod4('a1')}")),
        ("hairpin-tcp-ipv4", lambda: check_tcp(a1, HAIRPIN4, f"a1 {A4}")),
        ("hairpin-udp-ipv4", lambda: check_udp(a1, HAIRPIN4, f"a1 {A4}")),
        ("node-to-remote-pod-tcp-ipv4", lambda: check_tcp(NODE_A, REMOTE4, f"b1 {A4}")),
        ("node-to-remote-pod-tcp-ipv6", lambda: check_tcp(NODE_A, REMOTE6, f"b1 {A6}")),
        ("node-to-remote-pod-udp-ipv4", lambda: check_udp(NODE_A, REMOTE4, f"b1 {A4}")),
        ("node-to-remote-pod-udp-ipv6", lambda: check_udp(NODE_A, REMOTE6, f"b1 {A6}")),
        ("node-to-local-pod-udp-ipv6", lambda: check_udp(NODE_A, LOCAL6, f"a2 {A6}")),
        ("pod-to-local-pod-udp-ipv6", lambda: check_udp(a1, LOCAL6, f"a2 {pod6('a1')}")),
        ("node-to-local-pod-tcp-ipv4", lambda: check_tcp(NODE_A, LOCAL4, f"a2 {A4}")),
        ("node-to-local-pod-tcp-ipv6", lambda: check_tcp(NODE_A, LOCAL6, f"a2 {A6}")),
        ("nodeport-from-outside", nodeport),
        ("clusterip-unknown-port-refused", unknown_port),
        ("direct-pod-to-pod-untouched", direct),
    ]
    return rows


def nodeport():
    seen = set()
    for _ in range(30):
        body, _ = curl(CLIENT, A4, NODEPORT)
        seen.add(body)
    expect(seen == {f"b1 {A4}", f"a2 {A4}"}, f"node port answers {sorted(seen)}: both backends, masqueraded to {A4}")
    return {"requests": 30}


def unknown_port():
    started = time.time()
    p = subprocess.run(["ip", "netns", "exec", f"{P}-a1", "curl", "-sS", "--max-time", "5", f"http://{REMOTE4}:81/"],
                       capture_output=True, text=True, timeout=15)
    took = time.time() - started
    expect(p.returncode == 7 and took < 2, f"curl to an unknown port: rc {p.returncode} after {took:.1f}s ({p.stderr.strip()})")
    return {"refused_after_s": round(took, 3)}


def direct():
    """A pod connecting to a backend directly (not through a Service): its answers are no
    Service flow's replies and must reach the client untouched, not be taken for a lost
    flow's replies and given the VIP as their source."""
    before = XLB.metric("xlb_received_packets_total")
    for _ in range(10):
        body, _ = curl(f"{P}-a1", pod4("b1"), 8080)
        expect(body == f"b1 {pod4('a1')}", f"a direct connection answered {body!r}")
    seen = XLB.metric("xlb_received_packets_total") - before
    return {"requests": 10, "packets_through_xlb": int(seen)}


def restart():
    """kill -9 mid-connection: the crash leaves the link behind, the next start replaces it,
    and connections that lived through it go on (their replies are still steered to xlb by
    their connection-tracking entries, and xlb recreates their flows from them)."""
    live = [subprocess.Popen(["ip", "netns", "exec", ns, sys.executable, "-c", KEEPALIVE, host, "6"],
                             stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
            for ns, host in ((f"{P}-a1", REMOTE4), (f"{P}-a1", LOCAL6), (NODE_A, REMOTE6))]
    time.sleep(1.5)
    XLB.stop(signal.SIGKILL)
    expect("xlb0" in run("ip", "-o", "link", "show", ns=NODE_A), "kill -9 cannot have removed the link")
    down = time.time()
    XLB.start()
    gap = time.time() - down
    figures = {"restart_s": round(gap, 2)}
    for p, name in zip(live, ("pod-remote-v4", "pod-local-v6", "node-remote-v6")):
        out, err = p.communicate(timeout=30)
        expect(p.returncode == 0, f"the {name} connection did not live through the restart: {err.strip()[-300:]}")
        got = json.loads(out)
        expect(got["echoed"] == got["sent"], f"{name}: {got}")
        figures[name] = got
    check_tcp(f"{P}-a1", REMOTE4, f"b1 {pod4('a1')}", times=5)
    return figures


def spread():
    """Two workers, one queue each on a two-queue link: the kernel spreads flows over the
    queues by hash, and a connection's two directions hash independently, so over 200
    connections some have their forward packets on one worker and their replies on the
    other (the chance that none does is 2^-200): every connection must still work, through
    the one flow table they share, and each worker must forward and un-NAT."""
    out = run(sys.executable, "-c", MANY, REMOTE4, "200", ns=f"{P}-a1", timeout=120)
    got = json.loads(out)
    expect(got == {f"b1 {pod4('a1')}": 200}, f"200 connections through two workers: {got}")
    per_worker = {}
    for w in (0, 1):
        fwd = XLB.metric("xlb_forwarded_packets_total", worker=w)
        rep = XLB.metric("xlb_replied_packets_total", worker=w)
        expect(fwd > 0 and rep > 0, f"worker {w} forwarded {fwd} and replied {rep}: the queues are not spread")
        per_worker[f"worker{w}"] = {"forwarded": int(fwd), "replied": int(rep)}
    return per_worker


def change_reaches_both():
    """A Service change is published to both workers: after it, every new connection, on
    whichever worker, goes to the new backend."""
    XLB.reload(remote=("b2",))
    out = run(sys.executable, "-c", MANY, REMOTE4, "100", ns=f"{P}-a1", timeout=120)
    got = json.loads(out)
    expect(got == {f"b2 {pod4('a1')}": 100}, f"after the change: {got}")
    return {"connections": 100}


# `n` HTTP/1.0 requests, each on a new connection, counted by answer.
MANY = r"""
import socket, sys, json
host, n = sys.argv[1], int(sys.argv[2])
seen = {}
for i in range(n):
    s = socket.create_connection((host, 80), timeout=5)
    s.sendall(b"GET / HTTP/1.0\r\n\r\n")
    data = b""
    while chunk := s.recv(4096):
        data += chunk
    s.close()
    body = data.split(b"\r\n\r\n", 1)[1].decode().strip()
    seen[body] = seen.get(body, 0) + 1
print(json.dumps(seen))
"""


def leftovers():
    """What xlb leaves in node A: links, nftables table, rules (none after a clean stop)."""
    links = run("ip", "-o", "link", "show", ns=NODE_A)
    found = [n for n in ("xlb0", "xlb1") if f" {n}@" in links or f" {n}:" in links]
    if "table inet xlb" in run("nft", "list", "tables", ns=NODE_A, check=False):
        found.append("nft table")
    for fam in ("-4", "-6"):
        rules = run("ip", fam, "rule", ns=NODE_A)
        if "fwmark" in rules:
            found.append(f"{fam} fwmark rule")
        if not any(l.startswith("0:") and "lookup local" in l for l in rules.splitlines()):
            found.append(f"{fam} local rule not at 0")
    return found


XLB = None


def main():
    global XLB
    if len(sys.argv) not in (2, 4) or (len(sys.argv) == 4 and sys.argv[2] != "--workers") \
            or (len(sys.argv) == 4 and sys.argv[3] not in ("1", "2")):
        print(__doc__)
        return 2
    workers = int(sys.argv[3]) if len(sys.argv) == 4 else 1
    if workers == 2 and os.cpu_count() < 2:
        print("SKIPPED: two workers need two cores")
        return 0
    tool = missing_tool("curl", "nft")
    if tool:
        print(f"SKIPPED: {tool} is not installed (make deps installs it)")
        return 0
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(1))
    work = tempfile.mkdtemp(prefix="xlb-node-")
    procs = []
    failed = False
    try:
        build()
        for name, (node, _, _) in PODS.items():
            procs.append(spawn(sys.executable, "-c", SERVER, name, ns=f"{P}-{name}"))
        XLB = Xlb(os.path.abspath(sys.argv[1]), work, workers)
        XLB.start()
        rows = scenarios() if workers == 1 else [("two-workers-spread", spread),
                                                 ("change-reaches-both-workers", change_reaches_both)]
        for name, scenario in rows:
            started = time.time()
            figures = scenario()
            figures["seconds"] = round(time.time() - started, 2)
            print(f"ok {name} {json.dumps(figures)}", flush=True)
        if workers == 1:
            print(f"ok restart-after-kill-9 {json.dumps(restart())}", flush=True)
        XLB.stop(signal.SIGTERM)
        left = leftovers()
        expect(not left, f"SIGTERM left {left}")
        print("ok sigterm-removes-link-table-and-rules {}", flush=True)
        print(f"node (kube-proxy, {workers} worker{'s' if workers > 1 else ''}): all passed", flush=True)
    except Exception as e:  # every failure is reported the same way, and cleaned up after
        failed = True
        print(f"FAILED: {type(e).__name__}: {e}", flush=True)
        if XLB:
            print("--- xlb log\n" + XLB.tail())
        if os.environ.get("NODE_PAUSE"):
            print(f"paused for {os.environ['NODE_PAUSE']} s (namespaces {P}-*)", flush=True)
            time.sleep(float(os.environ["NODE_PAUSE"]))
    finally:
        if XLB:
            XLB.stop(signal.SIGKILL)
        for p in procs:
            p.kill()
        teardown()
        subprocess.run(["rm", "-rf", work])
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
