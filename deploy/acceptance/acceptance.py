#!/usr/bin/env python3
"""xlb against real clients and servers, and what production traffic does to it.

    client ns (curl, dig, python) --veth-- node ns (xlb run) --veth-- backend ns 1..3
                                                                        nginx, dnsmasq, socat

Each scenario checks a behaviour an operator relies on, with Debian's own clients and servers:
HTTP keep-alive and new connections (curl and nginx), DNS over UDP (dig and dnsmasq), UDP
datagrams of 4 000 bytes (fragmented both ways) echoed, a long
upload verified by hash (socat computing sha256), IPv4 and IPv6, with the senders' checksum
offload on (the veth default: partial checksums) and off, a new client's first connection
(no SYN retransmission while xlb resolves the client), a client reusing its port after its
backend was removed, a backend removed mid-download (the client is reset at once), a live
reload mid-transfer, a restart by kill -9 and by SIGTERM mid-download with a client that only
reads (dnat: the download completes, and the gap is measured), and floods of new flows (TCP
SYNs and UDP, from xlb-pktgen) against a small flow table while established streams run.

Usage: acceptance.py XLB [--mode dnat|snat] [--pktgen XLB_PKTGEN] [--only NAME,...]
Prints one line per scenario, "ok NAME {figures}", and exits non-zero at the first failure
(after printing xlb's log). Everything it creates — namespaces, veths, XDP programs,
processes, files — is removed on exit, failure included. Traffic stays inside the namespaces
and is bounded: every client has a timeout, every flood a packet count and seconds.
Addresses: 198.18.0.0/15 and 2001:2::/48 only; 198.19.0.0/16 are the flood's sources,
routed by the node to the client, which drops what comes back.
"""

import argparse
import hashlib
import json
import os
import random
import shutil
import signal
import subprocess
import sys
import tempfile
import time

HERE = os.path.dirname(os.path.abspath(__file__))
TOPOLOGY = os.path.join(HERE, "..", "demo", "topology.sh")
PREFIX = f"xlbt{os.getpid() % 100000}"
NODE, CLIENT = f"{PREFIX}-node", f"{PREFIX}-client"
BACKENDS = 3
VIP4, VIP6 = "198.18.64.1", "2001:2:0:40::1"
SNAT4, SNAT6 = "198.18.64.100", "2001:2:0:40::100"
MiB = 1 << 20


def backend4(i):
    return f"198.18.{128 + i}.1"


def backend6(i):
    return f"2001:2:0:{80 + i}::1"


def run(*cmd, ns=None, check=True, timeout=60, capture=True):
    """Runs a command (in namespace `ns`), returning its stdout."""
    full = (["ip", "netns", "exec", ns] if ns else []) + [str(c) for c in cmd]
    p = subprocess.run(full, capture_output=capture, text=True, timeout=timeout)
    if check and p.returncode != 0:
        raise Failure(f"{' '.join(full)} exited {p.returncode}: {p.stderr.strip()[:400]}")
    return p.stdout if capture else ""


def spawn(*cmd, ns=None, log=None):
    full = (["ip", "netns", "exec", ns] if ns else []) + [str(c) for c in cmd]
    out = open(log, "ab") if log else subprocess.DEVNULL
    return subprocess.Popen(full, stdout=out, stderr=out, start_new_session=True)


class Failure(Exception):
    pass


def missing_tool(*tools):
    """The first of `tools` that is not installed, if any (the suites then say SKIPPED)."""
    return next((t for t in tools if not shutil.which(t)), None)


def remove_namespaces(prefix):
    """Kills what runs in every namespace named `prefix-*` and deletes them (their veths and
    XDP programs go with them)."""
    for line in run("ip", "netns", "list", check=False).splitlines():
        ns = line.split()[0] if line.split() else ""
        if ns.startswith(prefix + "-"):
            for pid in run("ip", "netns", "pids", ns, check=False).split():
                try:
                    os.kill(int(pid), signal.SIGKILL)
                except OSError:
                    pass
            run("ip", "netns", "del", ns, check=False)


def expect(condition, message):
    if not condition:
        raise Failure(message)


def in_client(code, *args):
    """Runs a small python program (below) in the client namespace; returns its JSON output."""
    return json.loads(run(sys.executable, "-c", code, *args, ns=CLIENT, timeout=120))


class Xlb:
    """xlb on the node: its configuration file, its process, its admin API."""

    def __init__(self, binary, work, mode, flow_capacity=1 << 16):
        self.binary, self.work, self.mode = binary, work, mode
        self.flow_capacity = flow_capacity
        self.path = os.path.join(work, "xlb.yaml")
        self.log = os.path.join(work, "xlb.log")
        self.proc = None
        self.backends = list(range(1, BACKENDS + 1))
        self.extra = ""

    def write(self, backends=None, extra=None):
        if backends is not None:
            self.backends = list(backends)
        if extra is not None:
            self.extra = extra
        lines = [
            "interfaces: [n0, " + ", ".join(f"n{i}" for i in range(1, BACKENDS + 1)) + "]",
            f"mode: {self.mode}",
            "cores: [1]" if os.cpu_count() > 1 else "cores: [0]",
            f"flow_capacity: {self.flow_capacity}",
        ]
        if self.mode == "snat":
            lines.append(f"snat: {{ ipv4: {SNAT4}, ipv6: '{SNAT6}' }}")
        lines.append("services:")
        for name, vip, addr in (("web-v4", VIP4, backend4), ("web-v6", f"'{VIP6}'", backend6)):
            lines += [
                f"  - name: {name}",
                f"    vip: {vip}",
                "    ports: [{ port: 80, target_port: 8080 }, { port: 53, protocol: udp, target_port: 5353 },"
                " { port: 9000 }, { port: 7, protocol: udp, target_port: 7007 }]",
                "    backends:",
            ]
            lines += [f"      - {{ address: '{addr(i)}' }}" for i in self.backends]
        lines.append(self.extra)
        tmp = self.path + ".new"
        with open(tmp, "w") as f:
            f.write("\n".join(lines) + "\n")
        os.replace(tmp, self.path)

    def generation(self):
        for line in self.metrics().splitlines():
            if line.startswith("xlb_snapshot_generation "):
                return int(line.split()[1])
        return -1

    def start(self):
        before = os.path.getsize(self.log) if os.path.exists(self.log) else 0
        self.proc = spawn(self.binary, "run", "--config", self.path, ns=NODE, log=self.log)
        deadline = time.time() + 20
        while time.time() < deadline:
            if self.proc.poll() is not None:
                raise Failure(f"xlb exited at start:\n{self.tail(before)}")
            if self.generation() > 0:
                return
            time.sleep(0.05)
        raise Failure("xlb's admin API did not come up")

    def reload(self, backends=None, extra=None):
        """Writes a new configuration and waits until xlb has published it."""
        before = self.generation()
        self.write(backends, extra)
        deadline = time.time() + 10
        while time.time() < deadline:
            if self.generation() > before:
                return
            time.sleep(0.05)
        raise Failure("xlb did not apply the edit")

    def kill(self, sig):
        if self.proc and self.proc.poll() is None:
            self.proc.send_signal(sig)
            self.proc.wait(timeout=20)
        self.proc = None

    def status(self):
        """`xlb status`'s tables (for a failure report)."""
        return run(self.binary, "status", "--interval", "0", ns=NODE, check=False, timeout=10)

    def metrics(self):
        return run(self.binary, "metrics", ns=NODE, check=False, timeout=10)

    def counter(self, name, **labels):
        """The sum of a metric's series (matching `labels`)."""
        total = 0
        for line in self.metrics().splitlines():
            if not line.startswith(name + "{") and not line.startswith(name + " "):
                continue
            if all(f'{k}="{v}"' in line for k, v in labels.items()):
                total += float(line.rsplit(" ", 1)[1])
        return total

    def tail(self, since=0):
        with open(self.log, "rb") as f:
            f.seek(since)
            return f.read().decode(errors="replace")[-4000:]


class Backends:
    """nginx, dnsmasq and a socat hasher in each backend namespace."""

    def __init__(self, work):
        self.work = work
        self.procs = []
        self.files = {}

    def start(self):
        site = os.path.join(self.work, "site")
        os.makedirs(site)
        rng = random.Random(11)
        for name, size in (("big", 48 * MiB), ("mid", 12 * MiB)):
            data = rng.randbytes(size)
            with open(os.path.join(site, name), "wb") as f:
                f.write(data)
            self.files[name] = (size, hashlib.sha256(data).hexdigest())
        for i in range(1, BACKENDS + 1):
            ns = f"{PREFIX}-b{i}"
            root = os.path.join(self.work, f"b{i}")
            os.makedirs(root)
            with open(os.path.join(root, "name"), "w") as f:
                f.write(f"b{i}\n")
            conf = os.path.join(root, "nginx.conf")
            temp = " ".join(
                f"{k}_temp_path {root}/{k};" for k in ("client_body", "proxy", "fastcgi", "uwsgi", "scgi")
            )
            with open(conf, "w") as f:
                f.write(
                    f"""user root; worker_processes 1; pid {root}/nginx.pid; error_log {root}/error.log;
events {{ worker_connections 1024; }}
http {{
  access_log off; {temp} keepalive_requests 1000;
  server {{
    listen 8080 reuseport; listen [::]:8080 reuseport;
    root {root}; add_header X-Backend b{i};
    location /files/ {{ alias {site}/; }}
    location /slow/ {{ alias {site}/; limit_rate 4m; }}
  }}
}}
"""
                )
            self.procs.append(spawn("nginx", "-p", root, "-c", conf, "-g", "daemon off;", ns=ns))
            self.procs.append(
                spawn(
                    "dnsmasq", "--keep-in-foreground", "--no-resolv", "--no-hosts", "--port=5353",
                    f"--listen-address={backend4(i)}", f"--listen-address={backend6(i)}",
                    "--bind-interfaces", f"--host-record=svc.test,198.18.200.{i},2001:2::200:{i}",
                    f"--pid-file={root}/dnsmasq.pid", "--user=root", ns=ns,
                )
            )
            self.procs.append(
                spawn("socat", "TCP6-LISTEN:9000,ipv6only=0,fork,reuseaddr", "SYSTEM:sha256sum", ns=ns)
            )
            self.procs.append(spawn(sys.executable, "-c", UDP_ECHO, ns=ns))
        # Wait for every server to answer.
        deadline = time.time() + 15
        for i in range(1, BACKENDS + 1):
            ns = f"{PREFIX}-b{i}"
            while True:
                ok = run("curl", "-sf", "--max-time", "1", f"http://{backend4(i)}:8080/name", ns=ns, check=False)
                dns = run("dig", f"@{backend4(i)}", "-p", "5353", "svc.test", "+short", "+tries=1", "+time=1",
                          ns=ns, check=False)
                if ok.strip() == f"b{i}" and dns.strip():
                    break
                if time.time() > deadline:
                    raise Failure(f"backend {i}'s servers did not come up")
                time.sleep(0.1)

    def stop(self):
        for p in self.procs:
            try:
                os.killpg(p.pid, signal.SIGKILL)
            except ProcessLookupError:
                pass
            p.wait()


# A UDP echo server on port 7007 (both families): large datagrams come back as large.
UDP_ECHO = r"""
import socket
s = socket.socket(socket.AF_INET6, socket.SOCK_DGRAM)
s.setsockopt(socket.IPPROTO_IPV6, socket.IPV6_V6ONLY, 0)
s.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 1 << 22)
s.bind(("::", 7007))
while True:
    data, peer = s.recvfrom(65535)
    s.sendto(data, peer)
"""

# Programs run in the client namespace (python, stdlib only), printing JSON.

# `n` datagrams of `size` bytes to VIP:7, 8 in flight, each answered by its echo (the same
# bytes); counts the datagrams answered intact.
BIG_UDP = r"""
import json, os, socket, sys, time
vip, n, size = sys.argv[1], int(sys.argv[2]), int(sys.argv[3])
fam = socket.AF_INET6 if ":" in vip else socket.AF_INET
s = socket.socket(fam, socket.SOCK_DGRAM)
s.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 1 << 22)
s.connect((vip, 7)); s.settimeout(2)
payload = lambda i: i.to_bytes(4, "big") + os.urandom(16) * ((size - 4) // 16) + bytes((size - 4) % 16)
sent, intact, wanted, lost = 0, 0, {}, 0
started = time.time()
while sent < n or wanted:
    while sent < n and len(wanted) < 8:
        data = payload(sent); wanted[sent] = data; s.send(data); sent += 1
    try:
        data = s.recv(65535)
    except socket.timeout:
        lost += len(wanted); wanted.clear()
        if lost > 80:  # broken, not lossy: stop within seconds
            break
        continue
    i = int.from_bytes(data[:4], "big")
    if wanted.pop(i, None) == data:
        intact += 1
print(json.dumps({"sent": sent, "intact": intact, "lost": lost, "seconds": round(time.time() - started, 2)}))
"""

DOWNLOAD = r"""
import hashlib, json, socket, sys, time
host, path, bind, deadline = sys.argv[1], sys.argv[2], sys.argv[3], float(sys.argv[4])
family = socket.AF_INET6 if ":" in host else socket.AF_INET
s = socket.socket(family)
s.settimeout(deadline)
if bind: s.bind((bind, 0))
s.connect((host, 80))
s.sendall(f"GET {path} HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n".encode())
h, got, head, gap, last, start = hashlib.sha256(), 0, b"", 0.0, time.time(), time.time()
error, in_body = None, False
print(json.dumps({"event": "connected"}), flush=True)
try:
    while True:
        chunk = s.recv(1 << 16)
        now = time.time()
        if not chunk: break
        gap = max(gap, now - last); last = now
        if not in_body:
            head += chunk
            if b"\r\n\r\n" not in head: continue
            head, chunk = head.split(b"\r\n\r\n", 1)
            in_body = True
            backend = [l.split(b": ")[1].decode() for l in head.split(b"\r\n")
                       if l.lower().startswith(b"x-backend")]
            print(json.dumps({"event": "headers", "backend": backend[0] if backend else None}), flush=True)
        h.update(chunk); got += len(chunk)
except OSError as e:
    error = type(e).__name__ + ": " + str(e)
print(json.dumps({"event": "done", "bytes": got, "sha256": h.hexdigest(), "gap": gap, "error": error,
                  "seconds": time.time() - start}), flush=True)
"""

UPLOAD = r"""
import hashlib, json, random, socket, sys
host, size = sys.argv[1], int(sys.argv[2])
data = random.Random(5).randbytes(size)
family = socket.AF_INET6 if ":" in host else socket.AF_INET
s = socket.create_connection((host, 9000), timeout=30)
s.sendall(data); s.shutdown(socket.SHUT_WR)
answer = b""
while True:
    chunk = s.recv(4096)
    if not chunk: break
    answer += chunk
print(json.dumps({"sent": hashlib.sha256(data).hexdigest(), "got": answer.decode().split()[0] if answer else ""}))
"""

CONNECT = r"""
import json, socket, sys, time
host, port, bind, bind_port = sys.argv[1], int(sys.argv[2]), sys.argv[3], int(sys.argv[4])
family = socket.AF_INET6 if ":" in host else socket.AF_INET
s = socket.socket(family)
s.settimeout(5)
s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
s.bind((bind, bind_port))
start = time.time()
try:
    s.connect((host, port))
    took = time.time() - start
    s.sendall(b"GET /name HTTP/1.0\r\nHost: x\r\n\r\n")
    answer = b""
    while True:
        chunk = s.recv(4096)
        if not chunk: break
        answer += chunk
    print(json.dumps({"ok": answer.startswith(b"HTTP/1.1 200"), "connect": took,
                      "backend": answer.rsplit(b"\n", 2)[-2].decode().strip() if answer else None}))
except OSError as e:
    print(json.dumps({"ok": False, "error": type(e).__name__ + ": " + str(e)}))
"""


def syn_retransmissions():
    """TCPSynRetrans of the client namespace."""
    lines = run("cat", "/proc/net/netstat", ns=CLIENT).splitlines()
    for names, values in zip(lines[::2], lines[1::2]):
        if names.startswith("TcpExt:"):
            table = dict(zip(names.split()[1:], values.split()[1:]))
            return int(table["TCPSynRetrans"])
    return 0


def curl(url, *args, timeout=10):
    return run("curl", "-sS", "--max-time", timeout, *args, url, ns=CLIENT, check=False, timeout=timeout + 5)


def http(ctx, vip):
    """20 new connections spread over the backends, and 20 requests on one kept-alive one."""
    host = f"[{vip}]" if ":" in vip else vip
    seen = {}
    retransmitted = syn_retransmissions()
    for _ in range(20):
        name = curl(f"http://{host}/name").strip()
        expect(name in {f"b{i}" for i in ctx.xlb.backends}, f"GET /name via {vip} answered {name!r}")
        seen[name] = seen.get(name, 0) + 1
    expect(len(seen) >= 2, f"20 connections all went to one backend: {seen}")
    urls = [arg for _ in range(20) for arg in ("-o", "/dev/null", f"http://{host}/name")]
    out = run("curl", "-sS", "--max-time", "10", "-w", "%{num_connects} %{http_code}\n", *urls,
              ns=CLIENT, timeout=20)
    rows = [line.split() for line in out.splitlines() if line.strip()]
    expect(len(rows) == 20 and all(code == "200" for _, code in rows), f"keep-alive requests: {rows}")
    connects = sum(int(n) for n, _ in rows)
    expect(connects == 1, f"20 keep-alive requests took {connects} connections")
    return {"backends": seen, "syn_retransmissions": syn_retransmissions() - retransmitted}


def long_download(ctx, vip):
    """A 48 MiB download at full speed, verified by hash."""
    proc = download(vip, "/files/big", deadline=60)
    wait_connected(proc)
    result = download_result(proc)
    size, digest = ctx.backends.files["big"]
    expect(result["bytes"] == size and result["sha256"] == digest, f"download via {vip}: {result}")
    return {"bytes": size, "mib_per_s": round(size / MiB / max(result["seconds"], 1e-6), 1)}


def dns(ctx, vip):
    answered = 0
    for _ in range(20):
        out = run("dig", f"@{vip}", "-p", "53", "svc.test", "A", "+short", "+tries=1", "+time=2",
                  ns=CLIENT, check=False, timeout=10).strip()
        answered += out.startswith("198.18.200.")
    expect(answered == 20, f"{answered}/20 DNS queries via {vip} answered")
    return {"answered": answered}


def big_udp(ctx, vip):
    """Issue 14: 2 000 datagrams of 4 000 bytes, fragmented on the way in and on the way back
    (the echo is as large), every one answered intact."""
    expired = ctx.xlb.counter("xlb_fragments_expired_drops_total")
    result = in_client(BIG_UDP, vip, int(os.environ.get("BIG_UDP_COUNT", "2000")), 4000)
    expect(result["intact"] == result["sent"], f"fragmented datagrams via {vip}: {result}")
    result["fragments_expired"] = ctx.xlb.counter("xlb_fragments_expired_drops_total") - expired
    return result


def upload(ctx, vip):
    result = in_client(UPLOAD, vip, 24 * MiB)
    expect(result["sent"] == result["got"], f"upload via {vip}: sent {result['sent']}, backend hashed {result['got']}")
    return {"bytes": 24 * MiB}


def download(vip, path, bind="", deadline=60.0):
    """Starts a read-only download in the client namespace; returns the process."""
    host = vip
    return subprocess.Popen(
        ["ip", "netns", "exec", CLIENT, sys.executable, "-c", DOWNLOAD, host, path, bind, str(deadline)],
        stdout=subprocess.PIPE, text=True,
    )


def download_result(proc, timeout=120):
    out, _ = proc.communicate(timeout=timeout)
    events = [json.loads(line) for line in out.splitlines() if line.strip()]
    return events[-1] if events and events[-1]["event"] == "done" else {"error": "no result", "bytes": 0}


def wait_connected(proc):
    """Waits for the download's answer to begin; returns the backend that answers."""
    for event in ("connected", "headers"):
        line = proc.stdout.readline()
        got = json.loads(line) if line else {}
        expect(got.get("event") == event, f"the download did not get to {event}: {line!r}")
    return got["backend"]


def first_connection(ctx, vip):
    """A client address the node has never heard of: its first connection completes without a
    SYN retransmission (xlb holds the SYN-ACK while the node resolves the client)."""
    new = "198.18.0.9" if ":" not in vip else "2001:2::9"
    plen = "24" if ":" not in vip else "64"
    run("ip", "addr", "add", f"{new}/{plen}", "dev", "c0", *(["nodad"] if ":" in vip else []), ns=CLIENT)
    before = syn_retransmissions()
    held = ctx.xlb.counter("xlb_held_packets_total")
    result = in_client(CONNECT, vip, 80, new, 0)
    expect(result["ok"], f"first connection from {new}: {result}")
    retrans = syn_retransmissions() - before
    expect(retrans == 0, f"the first connection from {new} retransmitted its SYN {retrans} time(s)")
    return {"connect_ms": round(result["connect"] * 1000, 2), "held": ctx.xlb.counter("xlb_held_packets_total") - held}


def port_reuse(ctx, vip):
    """A client reuses its source port after its backend was removed: a new connection, not a
    reset (conntrack treats a SYN on a closed flow as new)."""
    port = 45000 + random.randrange(1000)
    src = "198.18.0.1" if ":" not in vip else "2001:2::1"
    first = in_client(CONNECT, vip, 80, src, port)
    expect(first["ok"], f"first connection: {first}")
    gone = int(first["backend"][1:])
    ctx.xlb.reload(backends=[i for i in ctx.xlb.backends if i != gone])
    second = in_client(CONNECT, vip, 80, src, port)
    ctx.xlb.reload(backends=range(1, BACKENDS + 1))
    expect(second["ok"], f"the same port after {first['backend']} was removed: {second}")
    expect(second["backend"] != first["backend"], "the removed backend answered")
    return {"first": first["backend"], "then": second["backend"]}


def removed_mid_download(ctx, vip):
    """The backend of a running download is removed: the client is reset at once, instead of
    waiting for data that will never come."""
    proc = download(vip, "/slow/big", deadline=30)
    gone = int(wait_connected(proc)[1:])
    time.sleep(1.0)
    removed_at = time.time()
    ctx.xlb.reload(backends=[i for i in ctx.xlb.backends if i != gone])
    result = download_result(proc)
    ended = time.time() - removed_at
    ctx.xlb.reload(backends=range(1, BACKENDS + 1))
    expect(result.get("error") and "Reset" in result["error"],
           f"the download of a removed backend ended with {result}, not a reset")
    return {"reset_after_s": round(ended, 2), "bytes_before": result["bytes"]}


def reload_mid_transfer(ctx, vip):
    proc = download(vip, "/slow/mid", deadline=30)
    wait_connected(proc)
    time.sleep(0.5)
    ctx.xlb.reload(extra="  - { name: other, vip: 198.18.64.7, ports: [{ port: 80 }], backends: [{ address: 198.18.129.1 }] }")
    ctx.xlb.reload(extra="")
    result = download_result(proc)
    size, digest = ctx.backends.files["mid"]
    expect(result["bytes"] == size and result["sha256"] == digest, f"download across reloads: {result}")
    return {"bytes": size}


def restart(ctx, vip, sig):
    """xlb is killed (or stopped) mid-download and started again; the client only reads, so
    only the backend's retransmissions can bring the flow back (dnat)."""
    proc = download(vip, "/slow/big", deadline=40)
    wait_connected(proc)
    time.sleep(1.5)
    stopped = time.time()
    ctx.xlb.kill(sig)
    ctx.xlb.start()
    restarted = time.time() - stopped
    result = download_result(proc)
    size, digest = ctx.backends.files["big"]
    expect(result["bytes"] == size and result["sha256"] == digest,
           f"download across a restart ({signal.Signals(sig).name}): {result}")
    return {"restart_s": round(restarted, 2), "gap_s": round(result["gap"], 2),
            "recreated": ctx.xlb.counter("xlb_flow_events_total", event="Recreated")}


def offload_off(ctx, vip):
    """Checksums finished by the senders (offload off) as well as partial ones (on)."""
    for ns, dev in ((CLIENT, "c0"), *((f"{PREFIX}-b{i}", "b0") for i in range(1, BACKENDS + 1))):
        run("ethtool", "-K", dev, "tx", "off", ns=ns)
    try:
        http(ctx, vip)
        dns(ctx, vip)
        upload(ctx, vip)
    finally:
        for ns, dev in ((CLIENT, "c0"), *((f"{PREFIX}-b{i}", "b0") for i in range(1, BACKENDS + 1))):
            run("ethtool", "-K", dev, "tx", "on", ns=ns, check=False)
    return {}


def flood(ctx, vip):
    """Floods of new flows — TCP SYNs the backends answer, and one-packet UDP flows — from
    thousands of sources against a flow table of 1024 entries, while two downloads run: the
    downloads lose no byte, and every new connection and DNS query during and after the floods
    is answered."""
    expect(ctx.pktgen, "the flood needs --pktgen")
    ctx.xlb.kill(signal.SIGTERM)
    ctx.xlb.flow_capacity = 1024
    ctx.xlb.write()
    ctx.xlb.start()
    try:
        mac = run("cat", "/sys/class/net/n0/address", ns=NODE).strip()
        downloads = [download(vip, "/slow/big", deadline=60) for _ in range(2)]
        for d in downloads:
            wait_connected(d)
        during, sent = [], []
        for kind, port in (("tcp-syn", 80), ("udp", 53)):
            flood = subprocess.Popen(
                ["ip", "netns", "exec", CLIENT, ctx.pktgen, "send", "--interface", "c0", "--dst-mac", mac,
                 "--src", "198.19.0.1:1024", "--sources", "4096", "--ports", "1000", "--dst", f"{vip}:{port}",
                 "--kind", kind, "--new-flows", "--rate", str(ctx.flood_rate), "--seconds", "3", "--quiet",
                 "--json"], stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
            time.sleep(0.5)
            during += [http_once(vip) for _ in range(5)] + [dns_once(vip) for _ in range(3)]
            out, err = flood.communicate(timeout=30)
            expect(flood.returncode == 0, f"xlb-pktgen failed: {err.strip()[:300]}")
            sent.append(json.loads(out.strip().splitlines()[-1])["sent"])
        after = [http_once(vip) for _ in range(10)] + [dns_once(vip) for _ in range(5)]
        results = [download_result(d) for d in downloads]
        size, digest = ctx.backends.files["big"]
        for r in results:
            expect(r["bytes"] == size and r["sha256"] == digest, f"a download during the floods: {r}")
        expect(all(during), f"during the floods {during.count(False)} of {len(during)} new flows failed")
        expect(all(after), f"after the floods {after.count(False)} of {len(after)} new flows failed")
        return {"flood_packets": sent, "longest_pause_s": round(max(r["gap"] for r in results), 3),
                "evictions": ctx.xlb.counter("xlb_flow_evictions_total"),
                "untracked": ctx.xlb.counter("xlb_flow_events_total", event="Untracked"),
                "rx_ring_full": ctx.xlb.counter("xlb_socket_rx_ring_full_total"),
                "new_flows_during": f"{sum(during)}/{len(during)}", "after": f"{sum(after)}/{len(after)}"}
    finally:
        ctx.xlb.kill(signal.SIGTERM)
        ctx.xlb.flow_capacity = 1 << 16
        ctx.xlb.write()
        ctx.xlb.start()


def http_once(vip):
    host = f"[{vip}]" if ":" in vip else vip
    return curl(f"http://{host}/name", timeout=3).strip().startswith("b")


def dns_once(vip):
    out = run("dig", f"@{vip}", "-p", "53", "svc.test", "A", "+short", "+tries=1", "+time=2",
              ns=CLIENT, check=False, timeout=10)
    return out.strip().startswith("198.18.200.")


class Context:
    """What the scenarios share: xlb, the backends' servers, the generator, the work folder."""


def setup(prefix, xlb, mode, pktgen, flow_capacity=1 << 16):
    """The topology with the flood's route, the backends' servers running, xlb configured
    (not started). On failure, what was made is removed before the error goes on."""
    ctx = Context()
    ctx.work = tempfile.mkdtemp(prefix=prefix)
    ctx.pktgen = os.path.abspath(pktgen) if pktgen else None
    ctx.flood_rate = 20000
    ctx.backends = Backends(ctx.work)
    ctx.xlb = Xlb(xlb, ctx.work, mode, flow_capacity)
    try:
        subprocess.run(["bash", "-c", f"source {TOPOLOGY}; topology_up {PREFIX} {BACKENDS}"], check=True)
        # The flood's sources (198.19.0.0/16) are routed to the client, which drops them.
        run("ip", "route", "add", "198.19.0.0/16", "via", "198.18.0.1", ns=NODE)
        settle()
        ctx.backends.start()
        ctx.xlb.write()
    except BaseException:
        teardown(ctx)
        raise
    return ctx


def teardown(ctx):
    """Stops xlb and the servers, removes the namespaces (their veths and XDP programs with
    them) and the work folder."""
    try:
        ctx.xlb.kill(signal.SIGTERM)
    except Exception:  # it may have died already; the namespaces go regardless
        pass
    ctx.backends.stop()
    subprocess.run(["bash", "-c", f"source {TOPOLOGY}; topology_down {PREFIX}"], check=False)
    shutil.rmtree(ctx.work, ignore_errors=True)


def settle():
    """Waits until no namespace has a tentative IPv6 address (link-local addresses do
    duplicate address detection for a second after a link comes up; an IPv6 connection in that
    second can wait a neighbour-discovery retry that is no one's fault)."""
    spaces = [CLIENT, NODE] + [f"{PREFIX}-b{i}" for i in range(1, BACKENDS + 1)]
    deadline = time.time() + 10
    while time.time() < deadline:
        if not any(run("ip", "-6", "addr", "show", "tentative", ns=ns).strip() for ns in spaces):
            return
        time.sleep(0.1)
    raise Failure("IPv6 addresses stayed tentative")


def scenarios(mode):
    """(name, function, vip) in order; the restarts only in dnat mode (an snat flow cannot be
    recreated from its reply: only the table knew the client)."""
    rows = []
    for vip, fam in ((VIP4, "ipv4"), (VIP6, "ipv6")):
        rows += [
            (f"http-{fam}", http, vip),
            (f"dns-{fam}", dns, vip),
            (f"fragmented-udp-{fam}", big_udp, vip),
            (f"upload-{fam}", upload, vip),
            (f"download-{fam}", long_download, vip),
            (f"first-connection-{fam}", first_connection, vip),
        ]
    rows += [
        ("offload-off-ipv4", offload_off, VIP4),
        ("port-reuse-after-removal-ipv4", port_reuse, VIP4),
        ("port-reuse-after-removal-ipv6", port_reuse, VIP6),
        ("backend-removed-mid-download-ipv4", removed_mid_download, VIP4),
        ("reload-mid-transfer-ipv6", reload_mid_transfer, VIP6),
    ]
    if mode == "dnat":
        rows += [
            ("restart-kill-9-mid-download-ipv4", lambda c, v: restart(c, v, signal.SIGKILL), VIP4),
            ("restart-sigterm-mid-download-ipv6", lambda c, v: restart(c, v, signal.SIGTERM), VIP6),
        ]
    rows += [("flood-ipv4", flood, VIP4)]
    return rows


def main():
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("xlb")
    parser.add_argument("--mode", default="dnat", choices=["dnat", "snat"])
    parser.add_argument("--pktgen")
    parser.add_argument("--only", default="")
    parser.add_argument("--flood-rate", type=int, default=20000)
    args = parser.parse_args()
    # A timeout's SIGTERM unwinds through the cleanup below, like a failure.
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(1))
    tool = missing_tool("nginx", "dnsmasq", "socat", "curl", "dig", "ethtool")
    if tool:
        print(f"SKIPPED: {tool} is not installed (make deps installs it)")
        return 0
    try:
        ctx = setup("xlb-acceptance-", os.path.abspath(args.xlb), args.mode, args.pktgen)
    except Exception as e:
        print(f"FAILED ({args.mode}): setting up: {type(e).__name__}: {e}", flush=True)
        return 1
    ctx.flood_rate = args.flood_rate
    only = set(filter(None, args.only.split(",")))
    failed = False
    try:
        ctx.xlb.start()
        for name, scenario, vip in scenarios(args.mode):
            if only and name not in only:
                continue
            started = time.time()
            figures = scenario(ctx, vip)
            figures["seconds"] = round(time.time() - started, 1)
            print(f"ok {args.mode} {name} {json.dumps(figures)}", flush=True)
        print(f"acceptance ({args.mode}): all passed", flush=True)
    except Exception as e:  # every failure is reported the same way, and cleaned up after
        failed = True
        print(f"FAILED ({args.mode}): {type(e).__name__}: {e}", flush=True)
        try:
            print("--- xlb status\n" + ctx.xlb.status())
            print("--- xlb log\n" + ctx.xlb.tail())
        except Exception as more:  # the failure report must not hide the failure
            print(f"(no status: {more})")
    finally:
        teardown(ctx)
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
