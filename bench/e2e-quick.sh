#!/usr/bin/env bash
# A preliminary end-to-end figure: delivered packets per second and CPU nanoseconds per
# delivered packet, established UDP flows, xlb (dnat) against plain kernel forwarding in the
# same topology and the same run. The full comparison (iptables, nftables, the bare AF_XDP
# floor, 1 to 100 000 Services, new flows) is the end-to-end benchmark issue's.
#
# Topology (deploy/demo/topology.sh): client -> node -> one backend. The generator
# (xlb-pktgen, AF_XDP copy mode) runs in the client namespace pinned to core 0 and sends
# 60-byte UDP frames over 1024 flows as fast as it can. Placement, the same for both:
#   core 0: the generator, and the node's veth receive of the client's frames (which runs in
#           the generator's sendto: xlb's XDP filter redirect + copy; or the kernel's RPS
#           hand-off);
#   core 1: the load balancing - xlb's worker (and its transmit into the backend veth), or
#           the kernel's forwarding (RPS steers n0's receive to core 1).
# Delivered = packets that reached the backend's interface, counted and dropped there by an
# XDP program (bench/sink.c), so the backend's own stack neither limits nor loads the node.
#
# Usage: bench/e2e-quick.sh [SECONDS] [RUNS]   (as root; builds release binaries first)
set -euo pipefail
cd "$(dirname "$0")/.."
SECONDS_PER_RUN=${1:-5}
RUNS=${2:-3}
cargo build -q --release -p xlb-control -p xlb-pktgen
XLB=$PWD/target/release/xlb
PKTGEN=$PWD/target/release/xlb-pktgen
source deploy/demo/topology.sh
P=xlbq$$
WORK=$(mktemp -d)
XLB_PID=
cleanup() {
  set +e
  [ -n "$XLB_PID" ] && kill -TERM "$XLB_PID" 2>/dev/null && wait "$XLB_PID" 2>/dev/null
  topology_down "$P"; rm -rf "$WORK"
}
trap cleanup EXIT
topology_up "$P" 1
NODE=$P-node CLIENT=$P-client BACKEND=$P-b1
clang -O2 -g -target bpf -I/usr/include/"$(uname -m)"-linux-gnu -c bench/sink.c -o "$WORK/sink.o"
in_ns "$BACKEND" ip link set dev b0 xdpdrv obj "$WORK/sink.o" sec xdp
N0_MAC=$(in_ns "$NODE" cat /sys/class/net/n0/address)

rx() { in_ns "$BACKEND" ethtool -S b0 | awk '/rx_queue_0_xdp_drops/ { print $2 }'; }
# busy jiffies (USER_HZ) of cpu N, or of all cpus for "cpu"
busy() { awk -v c="$1" '$1 == c { print $2 + $3 + $4 + $7 + $8 + $9 }' /proc/stat; }

# measure LABEL DESTINATION: one generator run; prints "LABEL pps core1_ns_per_pkt all_ns_per_pkt"
measure() {
  local label=$1 dst=$2 rx0 rx1 b10 b11 ba0 ba1 t0 t1
  rx0=$(rx); b10=$(busy cpu1); ba0=$(busy cpu); t0=$(date +%s.%N)
  in_ns "$CLIENT" "$PKTGEN" send --interface c0 --dst-mac "$N0_MAC" --src 198.18.0.1:10000 \
    --dst "$dst" --ports 1024 --size 60 --quiet --seconds "$SECONDS_PER_RUN" --core 0 --json > "$WORK/gen.json"
  sleep 0.2
  rx1=$(rx); b11=$(busy cpu1); ba1=$(busy cpu); t1=$(date +%s.%N)
  python3 - "$label" "$rx0" "$rx1" "$b10" "$b11" "$ba0" "$ba1" "$t0" "$t1" "$WORK/gen.json" <<'PY'
import json, sys
label, rx0, rx1, b10, b11, ba0, ba1, t0, t1, gen = sys.argv[1:]
gen = json.load(open(gen))
delivered = int(rx1) - int(rx0)
hz = 100  # USER_HZ
core1 = (int(b11) - int(b10)) / hz * 1e9 / max(delivered, 1)
total = (int(ba1) - int(ba0)) / hz * 1e9 / max(delivered, 1)
print(f"{label} {delivered / gen['seconds']:.0f} {core1:.0f} {total:.0f} {gen['pps']:.0f}")
PY
}

: > "$WORK/results"
for run in $(seq 1 "$RUNS"); do
  # Kernel forwarding: no xlb, the node forwards, RPS puts n0's receive on core 1.
  in_ns "$NODE" sysctl -qw net.ipv4.ip_forward=1
  in_ns "$NODE" sh -c 'echo 2 > /sys/class/net/n0/queues/rx-0/rps_cpus'
  measure kernel 198.18.129.1:5353 >> "$WORK/results"
  in_ns "$NODE" sh -c 'echo 0 > /sys/class/net/n0/queues/rx-0/rps_cpus'
  in_ns "$NODE" sysctl -qw net.ipv4.ip_forward=0

  cat > "$WORK/xlb.yaml" <<YAML
interfaces: [$IFACES]
cores: [1]
services:
  - name: bench
    vip: 198.18.64.1
    ports: [{ port: 53, protocol: udp, target_port: 5353 }]
    backends: [{ address: 198.18.129.1 }]
YAML
  ip netns exec "$NODE" "$XLB" run --config "$WORK/xlb.yaml" 2>"$WORK/xlb.log" &
  XLB_PID=$!
  for _ in $(seq 1 100); do in_ns "$NODE" "$XLB" status >/dev/null 2>&1 && break; sleep 0.1; done
  sleep 0.5
  measure xlb 198.18.64.1:53 >> "$WORK/results"
  kill -TERM "$XLB_PID"; wait "$XLB_PID" || true; XLB_PID=
done

python3 - "$WORK/results" <<'PY'
import statistics, sys
rows = [l.split() for l in open(sys.argv[1])]
def med(label, i):
    return statistics.median(float(r[i]) for r in rows if r[0] == label)
print(f"{'path':8} {'delivered pps':>14} {'core-1 ns/pkt':>14} {'all-cores ns/pkt':>17} {'offered pps':>12}   (medians of {len(rows)//2} runs)")
for label in ("kernel", "xlb"):
    print(f"{label:8} {med(label,1):14.0f} {med(label,2):14.0f} {med(label,3):17.0f} {med(label,4):12.0f}")
print(f"xlb/kernel delivered: {med('xlb',1)/med('kernel',1):.2f}x; core-1 ns per packet: {med('xlb',2)/med('kernel',2):.2f}x")
for r in rows:
    print("  run:", " ".join(r))
PY
