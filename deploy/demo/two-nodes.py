#!/usr/bin/env python3
"""The two-node demo: xlb in place of kube-proxy on two nodes, Services from Kubernetes.

      pod a1, pod a2 ── node-a (xlb) ── node-b (xlb) ── pod b1, pod b2
                          │
                        client (outside the cluster)

Both nodes run `xlb run` with a `node:` section and the Kubernetes source, against one API
server (xlb-fake-api, in node-a). The Service `web` (ClusterIP 198.18.100.1 and
2001:2:0:100::1, port 80, NodePort 30080) has its endpoints on both nodes: a2 on node-a and b1
on node-b. The demo shows, for each request, which pod answered, on which node, and the client
address it saw:
  * pod a1 on node-a, and node-a itself, to the ClusterIP (both endpoints answer; pods keep
    their address, the node uses its own);
  * pod b2 on node-b to the ClusterIP over IPv6 (once b2 is an endpoint itself, its own
    answers are hairpin traffic, masqueraded to node-b's address);
  * the client to the NodePort on node-a (masqueraded to node-a's address: it is outside
    the cluster);
  * then the endpoint on node-a moves to node-b (a2 out, b2 in, in the EndpointSlice) and the
    same requests show the move, live.
Every answer is checked; the demo exits non-zero if one is wrong. Everything is removed on
exit. Usage: two-nodes.py XLB XLB_FAKE_API.
"""

import json
import os
import signal
import subprocess
import sys
import tempfile
import time

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), "..", "acceptance"))
import node as topo  # noqa: E402
from acceptance import Failure, expect, run, spawn  # noqa: E402

NODES = {"node-a": (topo.NODE_A, topo.A4, topo.A6, 0), "node-b": (topo.NODE_B, topo.B4, topo.B6, 1)}
NODE_OF = {"a1": "node-a", "a2": "node-a", "b1": "node-b", "b2": "node-b"}
VIP4, VIP6 = topo.REMOTE4, topo.REMOTE6


def api(pipe, obj):
    pipe.write(json.dumps(obj) + "\n")
    pipe.flush()


def endpoints(pipe, pods):
    for family, addr in (("IPv4", topo.pod4), ("IPv6", topo.pod6)):
        eps = [{"addresses": [addr(p)], "conditions": {"ready": True, "serving": True, "terminating": False},
                "nodeName": NODE_OF[p]} for p in pods]
        api(pipe, {"apply": "endpointslices", "object": {
            "metadata": {"namespace": "demo", "name": f"web-{family}", "labels": {"kubernetes.io/service-name": "web"}},
            "addressType": family, "ports": [{"name": "http", "protocol": "TCP", "port": 8080}], "endpoints": eps}})


def config(work, name, url):
    ns, a4, a6, core = NODES[name]
    kubeconfig = os.path.join(work, f"{name}.kubeconfig")
    with open(kubeconfig, "w") as f:
        f.write(f"""apiVersion: v1
kind: Config
clusters: [{{ name: demo, cluster: {{ server: "{url}" }} }}]
users: [{{ name: demo, user: {{}} }}]
contexts: [{{ name: demo, context: {{ cluster: demo, user: demo }} }}]
current-context: demo
""")
    path = os.path.join(work, f"{name}.yaml")
    with open(path, "w") as f:
        f.write(f"""interfaces: []
node: {{ address: 198.19.255.1 }}
cores: [{core if os.cpu_count() > 1 else 0}]
flow_capacity: 65536
cluster_cidrs: [198.18.10.0/24, 198.18.30.0/24, '2001:2:0:10::/63', '2001:2:0:30::/63']
snat: {{ ipv4: {a4}, ipv6: '{a6}', first_port: 20000, last_port: 29999 }}
kubernetes: {{ kubeconfig: {kubeconfig}, node_name: {name}, health_address: null }}
""")
    return path


def synced(ns, xlb, generation_after=0):
    out = run(xlb, "metrics", ns=ns, check=False, timeout=10)
    lines = dict(l.rsplit(" ", 1) for l in out.splitlines() if l and not l.startswith("#") and " " in l)
    return lines.get("xlb_kubernetes_synced") == "1" and float(lines.get("xlb_snapshot_generation", 0)) > generation_after


def generation(ns, xlb):
    for line in run(xlb, "metrics", ns=ns, check=False, timeout=10).splitlines():
        if line.startswith("xlb_snapshot_generation "):
            return float(line.split()[1])
    return 0


def ask(ns, host, want, port=80):
    """Requests, each on a new connection (so a new pick): 8, or up to 40 until every answer
    in `want` has come (8 requests all went to one of two backends once in a few hundred
    runs); returns {answer: count}."""
    seen = {}
    for n in range(40):
        if n >= 8 and want <= set(seen):
            break
        body, _ = topo.curl(ns, host, port)
        seen[body] = seen.get(body, 0) + 1
    return seen


def show(who, target, ns, host, want, port=80):
    seen = ask(ns, host, want, port)
    for answer, count in sorted(seen.items()):
        pod, client = answer.split()
        print(f"  {who:<22} -> {target:<24} answered by {pod} on {NODE_OF[pod]} "
              f"(saw client {client}) x{count}")
    expect(set(seen) == want, f"{who} -> {target}: {sorted(seen)}, expected {sorted(want)}")


def requests(xlb, pods_a, pods_b):
    """The demo's requests against the endpoints `pods_a` (on node-a) + `pods_b` (node-b)."""
    serving = pods_a + pods_b
    a1, a14, b26 = f"{topo.P}-a1", topo.pod4("a1"), topo.pod6("b2")
    show("pod a1 (node-a)", f"{VIP4}:80", a1, VIP4, {f"{p} {a14}" for p in serving})
    show("node-a itself", f"{VIP4}:80", topo.NODE_A, VIP4, {f"{p} {topo.A4}" for p in serving})
    # b2 reaching itself is hairpin traffic: masqueraded to node-b's address.
    show("pod b2 (node-b)", f"[{VIP6}]:80", f"{topo.P}-b2", VIP6,
         {f"{p} {topo.B6 if p == 'b2' else b26}" for p in serving})
    show("client (outside)", f"{topo.CA4}:30080", topo.CLIENT, topo.CA4,
         {f"{p} {topo.A4}" for p in serving}, 30080)


def main():
    if len(sys.argv) != 3:
        print(__doc__)
        return 2
    xlb, fake_api = (os.path.abspath(a) for a in sys.argv[1:])
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(1))
    work = tempfile.mkdtemp(prefix="xlb-two-nodes-")
    procs, xlbs, failed = [], {}, False
    started = time.time()
    try:
        topo.build()
        for pod in topo.PODS:
            procs.append(spawn(sys.executable, "-c", topo.SERVER, pod, ns=f"{topo.P}-{pod}"))
        # One API server, in node-a, reached by node-b over the nodes' link.
        out = os.path.join(work, "api.out")
        api_proc = subprocess.Popen(["ip", "netns", "exec", topo.NODE_A, fake_api, "--listen", f"{topo.A4}:0",
                                     "--seconds", "120"], stdin=subprocess.PIPE, stdout=open(out, "w"),
                                    stderr=subprocess.STDOUT, text=True)
        procs.append(api_proc)
        deadline = time.time() + 10
        while not (url := next((l.split()[1] for l in open(out) if l.startswith("URL ")), None)):
            expect(time.time() < deadline and api_proc.poll() is None, "the API server did not start")
            time.sleep(0.05)
        pipe = api_proc.stdin
        for name in NODES:
            api(pipe, {"apply": "nodes", "object": {"metadata": {"name": name}}})
        api(pipe, {"apply": "services", "object": {
            "metadata": {"namespace": "demo", "name": "web"},
            "spec": {"type": "NodePort", "clusterIP": VIP4, "clusterIPs": [VIP4, VIP6], "ipFamilies": ["IPv4", "IPv6"],
                     "ports": [{"name": "http", "protocol": "TCP", "port": 80, "targetPort": "http", "nodePort": 30080}]}}})
        endpoints(pipe, ["a2", "b1"])
        for name, (ns, _, _, _) in NODES.items():
            log = os.path.join(work, f"{name}.log")
            xlbs[name] = (spawn(xlb, "run", "--config", config(work, name, url), ns=ns, log=log), log)
        deadline = time.time() + 30
        while not all(synced(NODES[n][0], xlb) and run("nft", "list", "set", "inet", "xlb", "services4",
                                                       ns=NODES[n][0], check=False).count("30080") for n in NODES):
            for name, (proc, log) in xlbs.items():
                expect(proc.poll() is None, f"xlb on {name} exited:\n{open(log).read()[-3000:]}")
            expect(time.time() < deadline, "xlb did not sync on both nodes")
            time.sleep(0.1)
        print("== two nodes, xlb in place of kube-proxy on each; Service web has endpoints a2 (node-a), b1 (node-b)")
        requests(xlb, ["a2"], ["b1"])
        print("== the endpoint on node-a moves to node-b (EndpointSlice: a2 out, b2 in), live")
        before = {n: generation(NODES[n][0], xlb) for n in NODES}
        endpoints(pipe, ["b1", "b2"])
        deadline = time.time() + 10
        while not all(generation(NODES[n][0], xlb) > before[n] for n in NODES):
            expect(time.time() < deadline, "the move did not reach both nodes")
            time.sleep(0.05)
        requests(xlb, [], ["b1", "b2"])
        print(f"two-node demo: ok ({time.time() - started:.1f} s)")
    except Exception as e:  # every failure is reported the same way, and cleaned up after
        failed = True
        print(f"FAILED: {type(e).__name__}: {e}", flush=True)
        for name, (_, log) in xlbs.items():
            print(f"--- xlb on {name}\n{open(log).read()[-3000:]}")
    finally:
        for proc, _ in xlbs.values():
            if proc.poll() is None:
                proc.send_signal(signal.SIGTERM)
                try:
                    proc.wait(timeout=20)
                except subprocess.TimeoutExpired:
                    proc.kill()
        for p in procs:
            p.kill()
        topo.teardown()
        subprocess.run(["rm", "-rf", work])
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
