#!/usr/bin/env bash
# xlb balancing real TCP and UDP traffic between network namespaces, end to end.
#
#   client ns  198.18.0.1 ──veth── node ns (xlb on n0, n1, n2, n3) ──veth── backend ns 1..3
#                                                                     198.18.(128+i).1
# The node's kernel does not forward (ip_forward=0): every packet between the client and the
# backends crosses xlb. Service 198.18.64.1 (tcp/80 -> 8080, udp/53 -> 5353) has three
# backends; 198.18.64.2 tcp/80 has none and is refused with a reset.
#
# Usage: netns-demo.sh XLB_BINARY [--quiet]. Exits non-zero if any check fails. Everything it
# creates (namespaces, veths, the XDP program) is removed on exit, failure included. Traffic
# stays inside the namespaces and is bounded: 30 TCP connections, 30 UDP datagrams, 1 s
# timeouts, and `timeout` around every step.
set -euo pipefail

XLB=${1:?usage: netns-demo.sh XLB_BINARY}
XLB=$(realpath "$XLB")
QUIET=${2:-}
P=xlbd$$                     # a prefix unique to this run
NODE=$P-node CLIENT=$P-client
BACKENDS=3
WORK=$(mktemp -d)
XLB_PID=

say() { [ "$QUIET" = --quiet ] || echo "$@"; }

source "$(dirname "$0")/topology.sh"

cleanup() {
  set +e
  [ -n "$XLB_PID" ] && kill -TERM "$XLB_PID" 2>/dev/null && wait "$XLB_PID" 2>/dev/null
  topology_down "$P"
  rm -rf "$WORK"
}
trap cleanup EXIT

topology_up "$P" "$BACKENDS"

cat > "$WORK/xlb.yaml" <<YAML
interfaces: [$IFACES]
mode: dnat
cores: [0]
xdp_mode: native
admin: 127.0.0.1:9901
services:
  - name: web
    vip: 198.18.64.1
    ports:
      - { port: 80, protocol: tcp, target_port: 8080 }
      - { port: 53, protocol: udp, target_port: 5353 }
    backends:
$(for i in $(seq 1 $BACKENDS); do echo "      - { address: 198.18.$((128 + i)).1 }"; done)
  - name: empty
    vip: 198.18.64.2
    ports: [{ port: 80 }]
YAML

# Backends: answer each TCP connection and each UDP datagram with their own name.
cat > "$WORK/backend.py" <<'PY'
import socket, sys, threading
name = sys.argv[1].encode()
def tcp():
    s = socket.socket(); s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    s.bind(("0.0.0.0", 8080)); s.listen(64)
    while True:
        c, _ = s.accept(); c.sendall(name + b"\n"); c.close()
def udp():
    s = socket.socket(socket.AF_INET, socket.SOCK_DGRAM); s.bind(("0.0.0.0", 5353))
    while True:
        _, peer = s.recvfrom(2048); s.sendto(name, peer)
threading.Thread(target=udp, daemon=True).start()
tcp()
PY
for i in $(seq 1 $BACKENDS); do
  # Detached (setsid), so that this shell does not report the servers' end at cleanup.
  setsid -f ip netns exec "$P-b$i" timeout 120 python3 "$WORK/backend.py" "backend-$i" >/dev/null 2>&1
done

say "== starting xlb in $NODE on $IFACES"
ip netns exec "$NODE" "$XLB" run --config "$WORK/xlb.yaml" 2>"$WORK/xlb.log" &
XLB_PID=$!
for _ in $(seq 1 100); do
  in_ns "$NODE" "$XLB" status >/dev/null 2>&1 && break
  kill -0 "$XLB_PID" 2>/dev/null || { cat "$WORK/xlb.log"; echo "xlb exited at start" >&2; exit 1; }
  sleep 0.1
done
sleep 0.5

cat > "$WORK/client.py" <<'PY'
import collections, errno, socket, sys
tcp, udp, lost = collections.Counter(), collections.Counter(), 0
for i in range(30):
    s = socket.create_connection(("198.18.64.1", 80), timeout=3)
    tcp[s.recv(64).decode().strip()] += 1; s.close()
for i in range(30):
    u = socket.socket(socket.AF_INET, socket.SOCK_DGRAM); u.settimeout(1)
    u.bind(("198.18.0.1", 20000 + i))
    u.sendto(b"hi", ("198.18.64.1", 53))
    try:
        data, peer = u.recvfrom(64)
        assert peer == ("198.18.64.1", 53), peer
        udp[data.decode()] += 1
    except socket.timeout:
        lost += 1
try:
    socket.create_connection(("198.18.64.2", 80), timeout=1); refused = "no"
except ConnectionRefusedError:
    refused = "yes"
print("tcp", dict(sorted(tcp.items())))
print("udp", dict(sorted(udp.items())), "lost", lost)
print("refused", refused)
ok = sum(tcp.values()) == 30 and len(tcp) >= 2 and sum(udp.values()) >= 28 and len(udp) >= 2 and refused == "yes"
sys.exit(0 if ok else 1)
PY
say "== client: 30 TCP connections and 30 UDP datagrams to 198.18.64.1, one connection to 198.18.64.2"
if ! in_ns "$CLIENT" timeout 60 python3 "$WORK/client.py" > "$WORK/client.out"; then
  cat "$WORK/client.out"; in_ns "$NODE" "$XLB" status | grep -v '^#' | grep -v ' 0$'
  kill -TERM "$XLB_PID"; wait "$XLB_PID" || true; XLB_PID=; cat "$WORK/xlb.log"
  echo "FAILED: traffic through xlb" >&2; exit 1
fi
say "$(cat "$WORK/client.out")"
say "== xlb counters (non-zero)"
say "$(in_ns "$NODE" "$XLB" status | grep -v '^#' | grep -v ' 0$')"
say "== a few flows"
say "$(in_ns "$NODE" "$XLB" flows --limit 4)"
kill -TERM "$XLB_PID"; wait "$XLB_PID" || true; XLB_PID=
if in_ns "$NODE" ip link show n0 | grep -q xdp; then
  echo "FAILED: the XDP program is still attached after SIGTERM" >&2; exit 1
fi
say "== xlb stopped on SIGTERM and detached its XDP program"
echo "netns demo: ok"
