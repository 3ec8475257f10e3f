#!/usr/bin/env bash
# Instructions per packet of the packet-layer workload under callgrind: repeatable on a shared,
# noisy machine (wall-clock figures come from `make bench`). Usage: bench/callgrind.sh [ROUNDS]
set -euo pipefail
cd "$(dirname "$0")/.."
rounds=${1:-2000}
cargo build -q --release -p xlb-bench --bin packet-workload
bin=target/release/packet-workload
count() { # stage kind rounds -> total instructions
  valgrind --tool=callgrind --callgrind-out-file=/dev/null "$bin" "$1" "$2" "$3" 2>&1 |
    sed -n 's/.*Collected : \([0-9]*\).*/\1/p'
}
printf "%-9s %-5s %s\n" stage kind "instructions/packet"
for stage in parse pipeline; do
  for kind in tcp4 udp4 tcp6 udp6; do
    # The difference between two round counts removes start-up and frame building.
    base=$(count "$stage" "$kind" 0)
    total=$(count "$stage" "$kind" "$rounds")
    echo "$stage $kind $(( (total - base) * 10 / (rounds * 64) ))" |
      awk '{printf "%-9s %-5s %d.%d\n", $1, $2, $3 / 10, $3 % 10}'
  done
done
