#!/usr/bin/env python3
"""xlb as bare-metal gateways (issue 14): direct server return, and two gateways behind a
router that moves a live download from one to the other.

    client ── router r ── LAN (a bridge in r) ── gateway g1 (xlb), gateway g2 (xlb)
                                               └─ backends b1, b2, b3 (VIP on lo for dsr)

The router routes the VIP to g1, and later to g2 (as an ECMP router re-hashes a flow when its
next hops change). Both gateways run xlb with the same Services, fed in different orders.
Checked:
  * dsr: connections answered by the backends, which answer the client directly (through
    the router): xlb sees the requests only (no reply counted, none steered);
  * dsr: a download goes on, byte for byte, while a third backend joins the Service;
  * dnat and dsr: a download through g1 goes on through g2 when the router moves the VIP
    mid-transfer (g2 has no state for it: Maglev gives it the same backend; in dnat mode the
    backends' replies still go through g1, which un-NATs them), bytes verified;
  * dsr with IP-in-IP: this kernel has no ipip device to decapsulate with, so the frames are
    captured at the backends and read: the client's SYN, unchanged, inside an outer header
    from the gateway to the backend.

Usage: gateways.py XLB. Prints "ok NAME {figures}" and "gateways: all passed". Everything it
creates is removed on exit, failure included. Addresses: 198.18.0.0/15 only; traffic bounded
in bytes and seconds.
"""

import hashlib
import json
import os
import signal
import subprocess
import sys
import tempfile
import time

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from acceptance import Failure, expect, missing_tool, remove_namespaces, run, spawn  # noqa: E402

P = f"xlbg{os.getpid() % 100000}"
R, C = f"{P}-r", f"{P}-c"
GATEWAYS = {"g1": "198.18.50.2", "g2": "198.18.50.3"}
BACKENDS = {"b1": "198.18.50.11", "b2": "198.18.50.12", "b3": "198.18.50.13"}
ROUTER, CLIENT, VIP = "198.18.50.1", "198.18.0.1", "198.18.64.1"
MiB = 1 << 20

# A backend: `GET /name` answers its name; `GET /bytes/N` sends N bytes of a fixed pattern at
# about 16 MiB/s (so that a download lasts long enough to be moved).
SERVER = r"""
import socket, sys, threading, time
name = sys.argv[1]
BLOCK = bytes(range(256)) * 256
def serve(c):
    with c:
        req = c.recv(4096).decode(errors="replace").split()
        path = req[1] if len(req) > 1 else "/"
        if path.startswith("/bytes/"):
            n = int(path[7:]); c.sendall(b"HTTP/1.0 200 OK\r\nContent-Length: %d\r\n\r\n" % n)
            started, sent = time.time(), 0
            while sent < n:
                chunk = BLOCK[: min(len(BLOCK), n - sent)]; c.sendall(chunk); sent += len(chunk)
                ahead = sent / (16 << 20) - (time.time() - started)
                if ahead > 0:
                    time.sleep(ahead)
        else:
            body = name.encode() + b"\n"
            c.sendall(b"HTTP/1.0 200 OK\r\nContent-Length: %d\r\n\r\n" % len(body) + body)
s = socket.socket(); s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
s.bind(("0.0.0.0", 80)); s.listen(128)
while True:
    c, _ = s.accept(); threading.Thread(target=serve, args=(c,), daemon=True).start()
"""

# Downloads N bytes from the VIP; prints the length, whether the bytes are the pattern, and
# the longest wait for data.
DOWNLOAD = r"""
import json, socket, sys, time, hashlib
vip, n, port = sys.argv[1], int(sys.argv[2]), int(sys.argv[3])
BLOCK = bytes(range(256)) * 256
want = hashlib.sha256()
left = n
while left:
    want.update(BLOCK[: min(len(BLOCK), left)]); left -= min(len(BLOCK), left)
s = socket.create_connection((vip, 80), timeout=10, source_address=("0.0.0.0", port))
s.sendall(b"GET /bytes/%d HTTP/1.0\r\n\r\n" % n)
data, worst, last = bytearray(), 0.0, time.time()
while True:
    chunk = s.recv(1 << 16)
    now = time.time(); worst = max(worst, now - last); last = now
    if not chunk:
        break
    data += chunk
data = bytes(data)
body = data.split(b"\r\n\r\n", 1)[1]
print(json.dumps({"bytes": len(body), "intact": hashlib.sha256(body).digest() == want.digest(),
                  "longest_wait_s": round(worst, 3)}), flush=True)
"""


def build():
    for ns in (R, C, *(f"{P}-{g}" for g in GATEWAYS), *(f"{P}-{b}" for b in BACKENDS)):
        run("ip", "netns", "add", ns)
        run("ip", "link", "set", "lo", "up", ns=ns)
    run("sysctl", "-qw", "net.ipv4.ip_forward=1", ns=R)
    run("ip", "link", "add", "br0", "type", "bridge", ns=R)
    run("ip", "addr", "add", f"{ROUTER}/24", "dev", "br0", ns=R)
    run("ip", "link", "set", "br0", "up", ns=R)
    # The client's link to the router.
    run("ip", "link", "add", "eth0", "netns", C, "type", "veth", "peer", "name", "rc", "netns", R)
    run("ip", "addr", "add", f"{CLIENT}/24", "dev", "eth0", ns=C)
    run("ip", "addr", "add", "198.18.0.254/24", "dev", "rc", ns=R)
    run("ip", "link", "set", "eth0", "up", ns=C)
    run("ip", "link", "set", "rc", "up", ns=R)
    run("ip", "route", "add", "default", "via", "198.18.0.254", ns=C)
    # Gateways and backends on the LAN.
    for name, addr in {**GATEWAYS, **BACKENDS}.items():
        ns = f"{P}-{name}"
        run("ip", "link", "add", "n0", "netns", ns, "type", "veth", "peer", "name", f"l{name}", "netns", R)
        run("ip", "link", "set", f"l{name}", "master", "br0", "up", ns=R)
        run("ip", "addr", "add", f"{addr}/24", "dev", "n0", ns=ns)
        run("ip", "link", "set", "n0", "up", ns=ns)
        run("ip", "route", "add", "default", "via", ROUTER, ns=ns)
    for name in BACKENDS:
        ns = f"{P}-{name}"
        # dsr: the backend holds the VIP, but never answers ARP for it on the LAN.
        run("ip", "addr", "add", f"{VIP}/32", "dev", "lo", ns=ns)
        run("sysctl", "-qw", "net.ipv4.conf.all.arp_ignore=1", "net.ipv4.conf.all.arp_announce=2", ns=ns)
    route_vip("g1")


def route_vip(gateway):
    run("ip", "route", "replace", f"{VIP}/32", "via", GATEWAYS[gateway], ns=R)


def teardown():
    remove_namespaces(P)


class Gateway:
    def __init__(self, binary, work, name, core):
        self.binary, self.name, self.core = binary, name, core
        self.ns = f"{P}-{name}"
        self.path = os.path.join(work, f"{name}.yaml")
        self.log = os.path.join(work, f"{name}.log")
        self.proc = None
        self.backends = []

    def write(self, mode, backends, extra=()):
        self.write_to(self.path, mode, backends, extra)

    def write_to(self, path, mode, backends, extra=()):
        self.backends = list(backends)
        # The two gateways list their backends in opposite orders: Maglev must not care.
        order = sorted(backends, reverse=self.name == "g2")
        lines = [
            "interfaces: [n0]",
            f"mode: {mode}",
            f"cores: [{self.core}]",
            "flow_capacity: 65536",
            # A fixed table size: the automatic one grows with the backend count, and a
            # table of another size moves most flows (README, "Several gateways").
            "maglev_table_size: 4093",
            *extra,
            "services:",
            "  - name: web",
            f"    vip: {VIP}",
            "    ports: [{ port: 80 }]",
            "    backends:",
            *(f"      - {{ address: {BACKENDS[b]} }}" for b in order),
        ]
        with open(path + ".new", "w") as f:
            f.write("\n".join(lines) + "\n")
        os.replace(path + ".new", path)

    def metric(self, name):
        out = run(self.binary, "metrics", ns=self.ns, check=False, timeout=10)
        return sum(float(l.rsplit(" ", 1)[1]) for l in out.splitlines()
                   if l.startswith(name + " ") or l.startswith(name + "{"))

    def start(self, mode, backends, extra=()):
        self.write(mode, backends, extra)
        self.proc = spawn(self.binary, "run", "--config", self.path, ns=self.ns, log=self.log)
        deadline = time.time() + 20
        while self.metric("xlb_snapshot_generation") < 1:
            expect(self.proc.poll() is None, f"xlb on {self.name} exited:\n{self.tail()}")
            expect(time.time() < deadline, f"xlb on {self.name} did not start")
            time.sleep(0.05)

    def reload(self, mode, backends, extra=()):
        before = self.metric("xlb_snapshot_generation")
        self.write(mode, backends, extra)
        deadline = time.time() + 10
        while self.metric("xlb_snapshot_generation") <= before:
            expect(time.time() < deadline, f"{self.name} did not apply the edit")
            time.sleep(0.05)

    def stop(self):
        if self.proc and self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            self.proc.wait(timeout=20)
        self.proc = None

    def tail(self):
        try:
            with open(self.log, "rb") as f:
                return f.read().decode(errors="replace")[-3000:]
        except OSError:
            return ""


def curl_names(n):
    seen = {}
    for _ in range(n):
        out = run("curl", "-sS", "--max-time", "3", f"http://{VIP}/name", ns=C, timeout=10).strip()
        seen[out] = seen.get(out, 0) + 1
    return seen


def download(n, port=0):
    """Downloads n bytes from the VIP, from client port `port` (0: any)."""
    return subprocess.Popen(["ip", "netns", "exec", C, sys.executable, "-c", DOWNLOAD, VIP, str(n), str(port)],
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)


def picks(gateway, backends, ports, clients=1):
    """The backend `xlb explain` gives each (client address, port) with `backends` in the
    gateway's configuration (its own order)."""
    path = gateway.path + ".explain"
    saved = gateway.backends
    gateway.write_to(path, "dsr", backends)
    gateway.backends = saved
    flows = "".join(f"tcp 198.18.{c // 250}.{c % 250 + 1}:{p} {VIP}:80\n"
                    for c in range(clients) for p in ports)
    out = subprocess.run([gateway.binary, "explain", "--config", path, "--batch", "-"], input=flows,
                         capture_output=True, text=True, check=True).stdout
    return [line.split()[-1] for line in out.splitlines()]


def finished(proc, what):
    out, err = proc.communicate(timeout=60)
    expect(proc.returncode == 0, f"{what}: the download failed: {err.strip()[-300:]}")
    got = json.loads(out)
    expect(got["intact"] and got["bytes"] == 48 * MiB, f"{what}: {got}")
    return got


def dsr_replies_bypass(g1, _g2):
    before = (g1.metric("xlb_received_packets_total"), g1.metric("xlb_replied_packets_total"))
    seen = curl_names(30)
    expect(set(seen) <= {"b1", "b2"} and len(seen) == 2, f"30 connections answered by {seen}")
    received = g1.metric("xlb_received_packets_total") - before[0]
    replied = g1.metric("xlb_replied_packets_total") - before[1]
    expect(replied == 0, f"xlb translated {replied} replies in dsr mode")
    # A curl connection sends 5-7 packets (handshake, request, acknowledgments, close) and
    # receives as many: xlb must have seen the requests' half only.
    expect(received <= 30 * 8, f"xlb received {received} packets for 30 connections")
    return {"answers": seen, "xlb_received": int(received), "xlb_replied": int(replied)}


def gateways_agree(g1, g2):
    """10^5 flows get the same backend from both gateways, whose configurations list the
    backends in opposite orders; and while a third backend has reached g1 but not g2 yet,
    the flows they disagree on are the ones Maglev moves to the new backend, about a third."""
    ports = range(10000, 11000)
    a, b = picks(g1, ["b1", "b2"], ports, 100), picks(g2, ["b1", "b2"], ports, 100)
    expect(len(a) == 100_000 and a == b, "the gateways disagree on the same Services")
    added = picks(g1, ["b1", "b2", "b3"], ports, 100)
    differ = [(x, y) for x, y in zip(b, added) if x != y]
    to_new = sum(y.startswith(BACKENDS["b3"]) for _, y in differ)
    share = len(differ) / len(a)
    expect(0.28 < share < 0.39, f"{share:.3f} of flows moved for one backend added to two")
    expect(to_new / len(differ) > 0.97, f"only {to_new} of {len(differ)} moved flows went to the new backend")
    return {"flows": len(a), "identical": True, "moved_share": round(share, 4),
            "moved_to_new_backend": round(to_new / len(differ), 4)}


def dsr_backend_joins(g1, _g2):
    """A download whose Maglev pick moves when the third backend joins (a client port chosen
    with `xlb explain`) stays on its backend: the flow table keeps it."""
    ports = list(range(41000, 41200))
    before, after = picks(g1, ["b1", "b2"], ports), picks(g1, ["b1", "b2", "b3"], ports)
    port = next(p for p, a, b in zip(ports, before, after) if a != b)
    proc = download(48 * MiB, port)
    time.sleep(1)
    g1.reload("dsr", ["b1", "b2", "b3"])
    got = finished(proc, "a third backend joined")
    got["client_port"] = port
    seen = curl_names(30)
    expect("b3" in seen, f"new connections never reach the new backend: {seen}")
    return {"download": got, "answers_after": seen}


def pcap_packets(path):
    """The frames of a classic pcap file."""
    with open(path, "rb") as f:
        data = f.read()
    at, out = 24, []
    while at + 16 <= len(data):
        caplen = int.from_bytes(data[at + 8:at + 12], "little")
        out.append(data[at + 16:at + 16 + caplen])
        at += 16 + caplen
    return out


def ipip_captured(g1, _g2):
    """dsr with IP-in-IP: this kernel cannot decapsulate, so the frames are captured at the
    backends and read: outer header from the gateway to the backend, protocol 4, and inside
    it the client's SYN to the VIP, unchanged."""
    g1.stop()
    g1.start("dsr", ["b1", "b2"], ["dsr: { encapsulation: ipip, ipv4: 198.18.50.2 }"])
    route_vip("g1")
    work = os.path.dirname(g1.path)
    captures = {}
    for b in ("b1", "b2"):
        path = os.path.join(work, f"{b}.pcap")
        captures[b] = (path, subprocess.Popen(
            ["ip", "netns", "exec", f"{P}-{b}", "timeout", "10", "tcpdump", "-i", "n0", "-U", "-w", path,
             "ip proto 4"], stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL))
    time.sleep(1)
    for port in range(42000, 42006):
        subprocess.run(["ip", "netns", "exec", C, "curl", "-s", "--max-time", "0.3", "--local-port", str(port),
                        f"http://{VIP}/name"], capture_output=True, timeout=10)
    time.sleep(0.5)
    seen = {}
    for b, (path, proc) in captures.items():
        proc.terminate()
        proc.wait(timeout=10)
        for frame in pcap_packets(path):
            outer, inner = frame[14:34], frame[34:]
            expect(frame[12:14] == b"\x08\x00" and outer[9] == 4, f"not IP-in-IP: {frame[:40].hex()}")
            expect(outer[12:16] == bytes(map(int, GATEWAYS["g1"].split("."))) and
                   outer[16:20] == bytes(map(int, BACKENDS[b].split("."))), f"outer header {outer.hex()}")
            expect(inner[9] == 6 and inner[12:16] == bytes(map(int, CLIENT.split("."))) and
                   inner[16:20] == bytes(map(int, VIP.split("."))), f"inner header {inner[:20].hex()}")
            tcp = inner[(inner[0] & 15) * 4:]
            expect(int.from_bytes(tcp[2:4], "big") == 80 and tcp[13] & 0x02, f"inner segment {tcp[:20].hex()}")
            seen[b] = seen.get(b, 0) + 1
    expect(sum(seen.values()) >= 6, f"captured IP-in-IP frames: {seen}")
    return {"captured": seen}


def moved(mode):
    def scenario(g1, g2):
        if g2.backends != g1.backends:
            g2.reload(mode, g1.backends)
        route_vip("g1")
        proc = download(48 * MiB)
        time.sleep(1)
        on_g1 = g1.metric("xlb_received_packets_total")
        route_vip("g2")
        moved_at = g2.metric("xlb_received_packets_total")
        got = finished(proc, f"{mode}: moved from g1 to g2")
        through_g2 = g2.metric("xlb_received_packets_total") - moved_at
        expect(through_g2 > 100, f"{mode}: only {through_g2} packets went through g2 after the move")
        return {"download": got, "g1_before_move": int(on_g1), "g2_after_move": int(through_g2)}
    return scenario


def backends_route_via(gateway):
    for name in BACKENDS:
        run("ip", "route", "replace", "198.18.0.0/24", "via", GATEWAYS[gateway], ns=f"{P}-{name}")


def main():
    if len(sys.argv) != 2:
        print(__doc__)
        return 2
    if os.cpu_count() < 2:
        print("SKIPPED: two gateways need two cores")
        return 0
    tool = missing_tool("curl", "tcpdump")
    if tool:
        print(f"SKIPPED: {tool} is not installed (make deps installs it)")
        return 0
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(1))
    work = tempfile.mkdtemp(prefix="xlb-gateways-")
    gateways = {}
    failed = False
    try:
        build()
        for name in BACKENDS:
            spawn(sys.executable, "-c", SERVER, name, ns=f"{P}-{name}")
        for name in GATEWAYS:
            run("ip", "route", "add", "198.18.0.0/24", "via", ROUTER, ns=f"{P}-{name}")
        binary = os.path.abspath(sys.argv[1])
        g1, g2 = Gateway(binary, work, "g1", 0), Gateway(binary, work, "g2", 1)
        gateways = {"g1": g1, "g2": g2}
        time.sleep(0.5)
        for mode, rows in (
            ("dsr", [("gateways-agree-and-a-backend-added-first-moves-a-third", gateways_agree),
                     ("dsr-replies-bypass-the-gateway", dsr_replies_bypass),
                     ("dsr-download-lives-through-a-backend-joining", dsr_backend_joins),
                     ("dsr-download-moves-to-the-other-gateway", moved("dsr")),
                     ("dsr-ipip-frames-captured-at-the-backends", ipip_captured)]),
            ("dnat", [("dnat-download-moves-to-the-other-gateway", moved("dnat"))]),
        ):
            # dnat: the backends' replies go back through g1 (their route to the client).
            if mode == "dnat":
                backends_route_via("g1")
            g1.start(mode, ["b1", "b2"])
            g2.start(mode, ["b1", "b2"])
            for name, scenario in rows:
                started = time.time()
                figures = scenario(g1, g2)
                figures["seconds"] = round(time.time() - started, 1)
                print(f"ok {name} {json.dumps(figures)}", flush=True)
            g1.stop()
            g2.stop()
        print("gateways: all passed", flush=True)
    except Exception as e:  # every failure is reported the same way, and cleaned up after
        failed = True
        print(f"FAILED: {type(e).__name__}: {e}", flush=True)
        for name, g in gateways.items():
            print(f"--- xlb on {name}\n{g.tail()}")
        if os.environ.get("GATEWAYS_PAUSE"):
            print(f"paused (namespaces {P}-*)", flush=True)
            time.sleep(float(os.environ["GATEWAYS_PAUSE"]))
    finally:
        for g in gateways.values():
            try:
                g.stop()
            except Exception:
                pass
        teardown()
        subprocess.run(["rm", "-rf", work])
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
