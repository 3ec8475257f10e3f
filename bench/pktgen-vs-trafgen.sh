#!/usr/bin/env bash
# xlb-pktgen against netsniff-ng's trafgen: the same 60-byte UDP frames over 1024 flows, sent
# from the client namespace's veth on one core (core 0) as fast as each can, counted where the
# node's interface drops them in XDP (bench/sink.c). Packets per second per core, medians of
# RUNS runs, alternating, in one run of this script.
#
# Usage: bench/pktgen-vs-trafgen.sh [SECONDS] [RUNS]   (as root; installs netsniff-ng)
set -euo pipefail
cd "$(dirname "$0")/.."
SECS=${1:-4} RUNS=${2:-3}
command -v trafgen >/dev/null || DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends netsniff-ng >/dev/null
cargo build -q --release -p xlb-pktgen
source deploy/demo/topology.sh
P=xlbt$$ WORK=$(mktemp -d)
trap 'topology_down $P; rm -rf $WORK' EXIT
topology_up "$P" 1
clang -O2 -g -target bpf -I/usr/include/"$(uname -m)"-linux-gnu -c bench/sink.c -o "$WORK/sink.o"
gcc -O2 -shared -fPIC -o "$WORK/shim.so" bench/sndbuf-shim.c -ldl
in_ns "$P-node" ip link set dev n0 xdpdrv obj "$WORK/sink.o" sec xdp
N0=$(in_ns "$P-node" cat /sys/class/net/n0/address)
C0=$(in_ns "$P-client" cat /sys/class/net/c0/address)
# 14 + 20 + 8 + 18 = 60 bytes, source ports 10000..11023.
cat > "$WORK/udp.cfg" <<CFG
{ eth(da=$N0, sa=$C0, type=0x0800), ipv4(saddr=198.18.0.1, daddr=198.18.64.1, ttl=64),
  udp(sp=dinc(10000, 11023), dp=53), fill(0x78, 18) }
CFG
count() { in_ns "$P-node" ethtool -S n0 | awk '/rx_queue_0_xdp_drops/ { print $2 }'; }
measure() {  # NAME COMMAND...
  local name=$1; shift
  local c0 c1 t0 t1
  c0=$(count); t0=$(date +%s.%N)
  "$@" >/dev/null 2>"$WORK/$name.err" || true
  t1=$(date +%s.%N); c1=$(count)
  python3 -c "print('$name', round(($c1 - $c0) / ($t1 - $t0)))"
}
: > "$WORK/results"
for _ in $(seq 1 "$RUNS"); do
  measure xlb-pktgen in_ns "$P-client" target/release/xlb-pktgen send --interface c0 --dst-mac "$N0" \
    --src 198.18.0.1:10000 --dst 198.18.64.1:53 --ports 1024 --size 60 --seconds "$SECS" --cores 0 --quiet >> "$WORK/results"
  sleep 1
  measure trafgen in_ns "$P-client" env LD_PRELOAD="$WORK/shim.so" timeout -s INT "$SECS" \
    taskset -c 0 trafgen --dev c0 --conf "$WORK/udp.cfg" --cpus 1 >> "$WORK/results"
  sleep 1
done
python3 - "$WORK/results" <<'PY'
import statistics, sys
rows = [l.split() for l in open(sys.argv[1])]
med = {n: statistics.median(int(r[1]) for r in rows if r[0] == n) for n in ("xlb-pktgen", "trafgen")}
print(f"xlb-pktgen {med['xlb-pktgen']:,} pps, trafgen {med['trafgen']:,} pps on one core (medians of {len(rows)//2}): "
      f"{med['xlb-pktgen'] / max(med['trafgen'], 1):.2f}x")
for r in rows: print("  run:", *r)
PY
