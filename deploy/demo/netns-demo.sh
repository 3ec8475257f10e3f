#!/usr/bin/env bash
# xlb balancing real TCP and UDP traffic, IPv4 and IPv6, between network namespaces.
#
#   client ns ──veth── node ns (xlb on n0..n3) ──veth── backend ns 1..3   (deploy/demo/topology.sh)
#
# The node's kernel does not forward: every packet between the client and the backends crosses
# xlb. Service 198.18.64.1 and 2001:2:0:40::1 (tcp/80 -> 8080, udp/53 -> 5353) has three
# backends; 198.18.64.2 tcp/80 has none and is refused with a reset. Each backend answers with
# its name and the source address it saw: the client's in dnat mode, xlb's SNAT address in
# snat mode. Then, unless --quick: an edit of the file that removes a backend is applied live,
# an invalid edit is refused while traffic goes on, and after `kill -9` a new xlb replaces the
# leftover XDP program and forwards again. Finally SIGTERM must detach the XDP program.
#
# Usage: netns-demo.sh XLB_BINARY [--quiet] [--quick]; MODE=dnat|snat, XDP_MODE=native|skb,
# BUSY_POLL=false|true and CAPS in the environment (default dnat, native, false, unset). With
# CAPS=net_admin,net_raw,... xlb runs as nobody with exactly those capabilities (what the
# DaemonSet and the systemd unit grant). With SOURCE=kubernetes and FAKE_API=path/to/
# xlb-fake-api, the Services come from an in-namespace Kubernetes API server instead of the
# file (Services and EndpointSlices; an edit is an EndpointSlice change, the invalid edit a
# malformed Service). Exits non-zero if any check fails. Everything it
# creates (namespaces, veths, XDP programs, processes) is removed on exit, failure included.
# Traffic stays inside the namespaces and is bounded: at most 30 connections and 30 datagrams
# per step, 3 s timeouts, and `timeout` around every step.
set -euo pipefail

XLB=$(realpath "${1:?usage: netns-demo.sh XLB_BINARY [--quiet] [--quick]}")
shift
QUIET= QUICK=
for arg in "$@"; do
  case $arg in --quiet) QUIET=1 ;; --quick) QUICK=1 ;; *) echo "unknown argument $arg" >&2; exit 2 ;; esac
done
MODE=${MODE:-dnat} XDP_MODE=${XDP_MODE:-native} SOURCE=${SOURCE:-file}
P=xlbd$$                     # a prefix unique to this run
NODE=$P-node CLIENT=$P-client
BACKENDS=3
WORK=$(mktemp -d)
XLB_PID=
API_PID=

say() { [ -n "$QUIET" ] || echo "$@"; }
source "$(dirname "$0")/topology.sh"

cleanup() {
  set +e
  [ -n "$XLB_PID" ] && kill -TERM "$XLB_PID" 2>/dev/null && wait "$XLB_PID" 2>/dev/null
  [ -n "$API_PID" ] && kill "$API_PID" 2>/dev/null && wait "$API_PID" 2>/dev/null
  topology_down "$P"
  rm -rf "$WORK"
}
trap cleanup EXIT
fail() {
  echo "FAILED: $*" >&2
  [ -f "$WORK/client.out" ] && cat "$WORK/client.out" >&2
  in_ns "$NODE" "$XLB" status --interval 0 >&2 || true
  if [ -n "$XLB_PID" ]; then kill -TERM "$XLB_PID"; wait "$XLB_PID" || true; XLB_PID=; fi
  sed 's/\x1b\[[0-9;]*m//g' "$WORK/xlb.log" >&2
  exit 1
}

topology_up "$P" "$BACKENDS"

# settings: the configuration's lines other than the Services.
settings() {
  echo "interfaces: [$IFACES]"
  echo "mode: $MODE"
  [ "$MODE" = snat ] && echo "snat: { ipv4: 198.18.64.100, ipv6: '2001:2:0:40::100' }"
  echo "cores: [0]"
  echo "xdp_mode: $XDP_MODE"
  echo "busy_poll: ${BUSY_POLL:-false}"
}

# config BACKEND_NUMBERS...: writes the configuration with these backends (or, with the
# Kubernetes source, the EndpointSlices of the Service).
config() {
  [ "$SOURCE" = kubernetes ] && { k8s_service web "$WEB"; k8s_endpoints "$@"; return; }
  {
    settings
    echo "services:"
    for vip in 198.18.64.1 "'2001:2:0:40::1'"; do
      echo "  - name: web-$([ "$vip" = 198.18.64.1 ] && echo v4 || echo v6)"
      echo "    vip: $vip"
      echo "    ports: [{ port: 80, target_port: 8080 }, { port: 53, protocol: udp, target_port: 5353 }]"
      echo "    backends:"
      for i in "$@"; do
        if [ "$vip" = 198.18.64.1 ]; then echo "      - { address: 198.18.$((128 + i)).1 }"
        else echo "      - { address: '2001:2:0:$((80 + i))::1' }"; fi
      done
    done
    echo "  - { name: empty, vip: 198.18.64.2, ports: [{ port: 80 }] }"
  } > "$WORK/xlb.yaml.new"
  mv "$WORK/xlb.yaml.new" "$WORK/xlb.yaml"
}

# The Kubernetes source: an API server in the node's namespace (where xlb reaches it on
# 127.0.0.1), fed JSON lines through a FIFO; the same Services as the file's.
api() { echo "$1" >&3; }
k8s_service() { # NAME SPEC_JSON
  api '{"apply":"services","object":{"metadata":{"namespace":"demo","name":"'"$1"'"},"spec":'"$2"'}}'
}
k8s_endpoints() { # BACKEND_NUMBERS...
  local family addr eps
  for family in IPv4 IPv6; do
    eps=
    for i in "$@"; do
      if [ $family = IPv4 ]; then addr=198.18.$((128 + i)).1; else addr=2001:2:0:$((80 + i))::1; fi
      eps="$eps${eps:+,}{\"addresses\":[\"$addr\"],\"conditions\":{\"ready\":true,\"serving\":true,\"terminating\":false},\"nodeName\":\"backend-$i\"}"
    done
    api '{"apply":"endpointslices","object":{"metadata":{"namespace":"demo","name":"web-'"$family"'","labels":{"kubernetes.io/service-name":"web"}},"addressType":"'"$family"'","ports":[{"name":"http","protocol":"TCP","port":8080},{"name":"dns","protocol":"UDP","port":5353}],"endpoints":['"$eps"']}}'
  done
}
if [ "$SOURCE" = kubernetes ]; then
  [ -x "${FAKE_API:-}" ] || { echo "SOURCE=kubernetes needs FAKE_API=path/to/xlb-fake-api" >&2; exit 2; }
  mkfifo "$WORK/api.in"
  ip netns exec "$NODE" "$FAKE_API" --seconds 300 < "$WORK/api.in" > "$WORK/api.out" 2>&1 &
  API_PID=$!
  exec 3> "$WORK/api.in"
  for _ in $(seq 1 50); do grep -q '^URL ' "$WORK/api.out" 2>/dev/null && break; sleep 0.1; done
  URL=$(sed -n 's/^URL //p' "$WORK/api.out")
  [ -n "$URL" ] || fail "the API server did not start: $(cat "$WORK/api.out")"
  cat > "$WORK/kubeconfig" <<KC
apiVersion: v1
kind: Config
clusters: [{ name: demo, cluster: { server: "$URL" } }]
users: [{ name: demo, user: {} }]
contexts: [{ name: demo, context: { cluster: demo, user: demo } }]
current-context: demo
KC
  { settings; echo "kubernetes: { kubeconfig: $WORK/kubeconfig, node_name: node }"; } > "$WORK/xlb.yaml"
  api '{"apply":"nodes","object":{"metadata":{"name":"node","labels":{"topology.kubernetes.io/zone":"demo"}}}}'
  WEB='{"type":"ClusterIP","clusterIP":"198.18.64.1","clusterIPs":["198.18.64.1","2001:2:0:40::1"],"ipFamilies":["IPv4","IPv6"],"ports":[{"name":"http","protocol":"TCP","port":80,"targetPort":"http"},{"name":"dns","protocol":"UDP","port":53,"targetPort":"dns"}]}'
  k8s_service empty '{"type":"ClusterIP","clusterIP":"198.18.64.2","clusterIPs":["198.18.64.2"],"ports":[{"name":"http","protocol":"TCP","port":80}]}'
fi

# How xlb is started: as root, or as nobody with only $CAPS.
XLB_RUN=("$XLB")
if [ -n "${CAPS:-}" ]; then
  caps=$(echo "$CAPS" | sed 's/^/+/; s/,/,+/g')
  XLB_RUN=(setpriv --reuid=65534 --regid=65534 --clear-groups --inh-caps="$caps"
           --ambient-caps="$caps" --bounding-set="-all,$caps" "$XLB")
fi

start_xlb() {
  [ -z "${CAPS:-}" ] || chmod -R a+rX "$WORK"
  ip netns exec "$NODE" "${XLB_RUN[@]}" run --config "$WORK/xlb.yaml" >/dev/null 2>>"$WORK/xlb.log" &
  XLB_PID=$!
  for _ in $(seq 1 100); do
    # Up, and with the Kubernetes source, listed.
    in_ns "$NODE" "$XLB" metrics 2>/dev/null |
      grep -q "$([ "$SOURCE" = kubernetes ] && echo '^xlb_kubernetes_synced 1' || echo .)" &&
      { sleep 0.2; return 0; }
    kill -0 "$XLB_PID" 2>/dev/null || { XLB_PID=; fail "xlb exited at start"; }
    sleep 0.1
  done
  fail "xlb's admin API did not come up"
}

# Backends: answer each TCP connection and each UDP datagram with their name and the address
# they saw the packet come from (IPv4 and IPv6: the sockets are dual-stack).
cat > "$WORK/backend.py" <<'PY'
import socket, sys, threading
name = sys.argv[1]
def seen(addr):
    return addr[0].removeprefix("::ffff:")
def tcp():
    s = socket.socket(socket.AF_INET6); s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    s.bind(("::", 8080)); s.listen(64)
    while True:
        c, peer = s.accept(); c.sendall(f"{name} {seen(peer)}\n".encode()); c.close()
def udp():
    s = socket.socket(socket.AF_INET6, socket.SOCK_DGRAM); s.bind(("::", 5353))
    while True:
        _, peer = s.recvfrom(2048); s.sendto(f"{name} {seen(peer)}".encode(), peer)
threading.Thread(target=udp, daemon=True).start()
tcp()
PY
for i in $(seq 1 $BACKENDS); do
  # Detached (setsid), so that this shell does not report the servers' end at cleanup.
  setsid -f ip netns exec "$P-b$i" timeout 300 python3 "$WORK/backend.py" "backend-$i" >/dev/null 2>&1
done

# The client: N connections and N datagrams to the VIP of each family; checks every answer
# came from the VIP, that the backend saw the expected source, and which backends answered.
cat > "$WORK/client.py" <<'PY'
import collections, socket, sys
n, expect_v4, expect_v6, want = int(sys.argv[1]), sys.argv[2], sys.argv[3], set(sys.argv[4].split(","))
ok = True
for vip, family, seen_src, base in (("198.18.64.1", socket.AF_INET, expect_v4, 20000),
                                    ("2001:2:0:40::1", socket.AF_INET6, expect_v6, 30000)):
    tcp, udp, lost, bad = collections.Counter(), collections.Counter(), 0, []
    for i in range(n):
        s = socket.create_connection((vip, 80), timeout=3)
        name, src = s.recv(128).decode().split(); s.close()
        tcp[name] += 1
        if src != seen_src: bad.append(src)
    for i in range(n):
        u = socket.socket(family, socket.SOCK_DGRAM); u.settimeout(1)
        u.bind(("", base + i + 100 * (sys.argv[5] == "again")))
        u.sendto(b"hi", (vip, 53))
        try:
            data, peer = u.recvfrom(128)
            if peer[0] != vip or peer[1] != 53: bad.append(f"reply from {peer}")
            name, src = data.decode().split(); udp[name] += 1
            if src != seen_src: bad.append(src)
        except socket.timeout:
            lost += 1
    print(vip, "tcp", dict(sorted(tcp.items())), "udp", dict(sorted(udp.items())), "lost", lost,
          "backends saw", seen_src if not bad else bad[:3])
    ok &= sum(tcp.values()) == n and lost <= n // 10 and not bad
    ok &= set(tcp) == want and set(udp) <= want and len(udp) >= min(2, len(want))
if sys.argv[5] != "again":
    try:
        socket.create_connection(("198.18.64.2", 80), timeout=3); print("refused no"); ok = False
    except ConnectionRefusedError:
        print("refused yes")
sys.exit(0 if ok else 1)
PY
if [ "$MODE" = snat ]; then SEEN4=198.18.64.100 SEEN6=2001:2:0:40::100; else SEEN4=198.18.0.1 SEEN6=2001:2::1; fi
# traffic N BACKENDS_EXPECTED [again]
traffic() {
  in_ns "$CLIENT" timeout 90 python3 "$WORK/client.py" "$1" "$SEEN4" "$SEEN6" "$2" "${3:-first}" > "$WORK/client.out" 2>&1
}

config 1 2 3
say "== starting xlb ($MODE mode, $XDP_MODE XDP, $SOURCE source${CAPS:+, as nobody with $CAPS}) in $NODE on $IFACES"
start_xlb
say "== client: 30 TCP connections and 30 UDP datagrams to each VIP (IPv4 and IPv6)"
traffic 30 backend-1,backend-2,backend-3 || fail "traffic through xlb"
say "$(cat "$WORK/client.out")"
say "== xlb status: packets, drops, flow table, Services and backends"
say "$(in_ns "$NODE" "$XLB" status)"
say "== a few flows"
say "$(in_ns "$NODE" "$XLB" flows --limit 3)"

# http_get URL: the status code and the body on one line (from the node's namespace).
http_get() {
  in_ns "$NODE" python3 -c 'import sys, urllib.request, urllib.error
try: r = urllib.request.urlopen(sys.argv[1], timeout=3); print(r.status, r.read().decode().replace("\n", " "))
except urllib.error.HTTPError as e: print(e.code, e.read().decode().replace("\n", " "))' "$1"
}
# until_http URL STATUS: waits (5 s at most) for URL to answer STATUS.
until_http() {
  for _ in $(seq 1 50); do http_get "$1" 2>/dev/null | grep -q "^$2 " && return 0; sleep 0.1; done
  fail "$1 did not answer $2: $(http_get "$1" 2>&1)"
}
if [ "$SOURCE" = kubernetes ]; then
  say "== kube-proxy's health server: /healthz, and a LoadBalancer Service's healthCheckNodePort"
  until_http http://127.0.0.1:10256/healthz 200
  say "$(http_get http://127.0.0.1:10256/healthz)"
  k8s_service gw '{"type":"LoadBalancer","clusterIP":"198.18.64.3","clusterIPs":["198.18.64.3"],"externalTrafficPolicy":"Local","healthCheckNodePort":32100,"ports":[{"name":"http","protocol":"TCP","port":80,"nodePort":30080}]}'
  gw_slice() { # NODE_NAME: gw's one endpoint, on that node
    api '{"apply":"endpointslices","object":{"metadata":{"namespace":"demo","name":"gw-1","labels":{"kubernetes.io/service-name":"gw"}},"addressType":"IPv4","ports":[{"name":"http","protocol":"TCP","port":8080}],"endpoints":[{"addresses":["198.18.129.1"],"conditions":{"ready":true},"nodeName":"'"$1"'"}]}}'
  }
  gw_slice backend-1
  until_http http://127.0.0.1:32100/ 503
  say "endpoint elsewhere: $(http_get http://127.0.0.1:32100/)"
  gw_slice node
  until_http http://127.0.0.1:32100/ 200
  say "endpoint on this node: $(http_get http://127.0.0.1:32100/)"
fi
if [ "$SOURCE" = kubernetes ]; then
  # With traffic, a sync and the Kubernetes source, every metric the Grafana dashboard
  # queries must be on this xlb's /metrics.
  say "== the Grafana dashboard against this xlb's /metrics"
  in_ns "$NODE" "$XLB" metrics > "$WORK/metrics.txt" || fail "xlb metrics"
  checked=$(python3 "$(dirname "$0")/../grafana/check.py" "$(dirname "$0")/../grafana/xlb.json" \
    "$WORK/metrics.txt" 2>&1) || fail "the dashboard queries what /metrics lacks: $checked"
  say "$checked"
fi

if [ -z "$QUICK" ]; then
  say "== edit: backend-3 removed from the $SOURCE source; xlb applies it live"
  if [ "$SOURCE" = file ]; then
    # inotify: the edit is live as soon as it is written (xlb_config_hash says which file).
    started=$(date +%s%N)
    config 1 2
    want=$("$XLB" check --config "$WORK/xlb.yaml" | sed -n 's/.*content hash \([0-9]*\).*/\1/p')
    for _ in $(seq 1 100); do
      in_ns "$NODE" "$XLB" metrics 2>/dev/null | grep -q "^xlb_config_hash $want\$" && break
      sleep 0.02
    done
    live_ms=$(( ($(date +%s%N) - started) / 1000000 ))
    in_ns "$NODE" "$XLB" metrics | grep -q "^xlb_config_hash $want\$" || fail "the edit was not live within 2 s"
    [ "$live_ms" -lt 1000 ] || fail "the edit took $live_ms ms to be live"
    say "edit live after $live_ms ms (content hash $want)"
    kill -HUP "$XLB_PID"
    for _ in $(seq 1 50); do grep -q "SIGHUP: reading the configuration again" "$WORK/xlb.log" && break; sleep 0.1; done
    grep -q "SIGHUP: reading the configuration again" "$WORK/xlb.log" || fail "SIGHUP was not acted on"
    say "SIGHUP: configuration read again"
  else
    config 1 2
    sleep 2.5
  fi
  traffic 20 backend-1,backend-2 again || fail "traffic after removing a backend"
  say "$(cat "$WORK/client.out")"
  if [ "$SOURCE" = kubernetes ]; then
    say "== edit: a malformed Service; xlb skips it and keeps the rest"
    k8s_service web '{"type":"ClusterIP","clusterIP":"198.18.64.1","ports":[{"name":"http","port":"eighty"}]}'
    refused="malformed object skipped"
  else
    say "== edit: an invalid file; xlb keeps the last good snapshot"
    echo "services: [ { name: broken, vip: not-an-address } ]" > "$WORK/xlb.yaml"
    refused="configuration edit refused"
  fi
  sleep 2.5
  grep -q "$refused" "$WORK/xlb.log" || fail "the invalid edit was not reported"
  traffic 20 backend-1,backend-2 again || fail "traffic after an invalid edit"
  say "$(grep "$refused" "$WORK/xlb.log" | tail -1 | sed 's/\x1b\[[0-9;]*m//g' | cut -c1-160)"
  say "== kill -9, then a new xlb replaces the leftover XDP program"
  config 1 2 3
  kill -9 "$XLB_PID"; wait "$XLB_PID" 2>/dev/null || true; XLB_PID=
  in_ns "$NODE" ip link show n0 | grep -q xdp || fail "no leftover program to replace after kill -9"
  start_xlb
  traffic 30 backend-1,backend-2,backend-3 again || fail "traffic after a restart over a leftover program"
  say "$(cat "$WORK/client.out")"
  say "== a second xlb on the same ports and queue fails clearly and disturbs nothing"
  if in_ns "$NODE" timeout 20 "$XLB" run --config "$WORK/xlb.yaml" > /dev/null 2> "$WORK/second.log"; then
    fail "a second xlb started on a busy queue"
  fi
  grep -q "cannot bind an AF_XDP socket" "$WORK/second.log" || { cat "$WORK/second.log" >&2; fail "the busy queue was not named"; }
  say "$(sed 's/\x1b\[[0-9;]*m//g' "$WORK/second.log" | tail -1 | cut -c1-200)"
  traffic 30 backend-1,backend-2,backend-3 again || fail "traffic after a second xlb was refused"
fi

kill -TERM "$XLB_PID"; wait "$XLB_PID" || true; XLB_PID=
for i in $(seq 0 $BACKENDS); do
  if in_ns "$NODE" ip link show "n$i" | grep -q xdp; then fail "an XDP program is still attached to n$i after SIGTERM"; fi
done
say "== xlb stopped on SIGTERM and detached its XDP program"
echo "netns demo ($MODE, $XDP_MODE, $SOURCE): ok"
