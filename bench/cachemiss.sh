#!/usr/bin/env bash
# Instructions and cache misses per packet of the decide benchmarks (bench/benches/path.rs),
# from callgrind's cache simulation: this VM exposes no hardware counters to `perf stat`, and
# a simulation is repeatable where the machine is noisy. Usage: bench/cachemiss.sh [REV ...]
# (`.` or nothing: the working tree; a REV is built in a temporary worktree, so that the
# figures of an older commit and of now come from the same script, the same simulated caches
# and the benchmark as each commit had it).
#
# Simulated caches: D1 as this machine's L1d (48 KiB, 12-way) and the last level as its L2
# (4 MiB, 16-way): its 480 MiB L3 would hide every miss, where a usual server's L3 share per
# core is a few MiB. The simulation ignores prefetch instructions, so a prefetched line still
# counts as a miss where it is first loaded: the counts are the cold lines a packet touches
# (which the batch's prefetch stages overlap), not the stalls that are left. Each figure is
# the difference of a 5 s and a 20 s run, divided by the packets between them: the steady
# state (a new-flow table fills during the first seconds, when inserts evict nothing yet).
set -euo pipefail
cd "$(dirname "$0")/.."
root=$PWD
benches=('^decide/new-flow$' '^decide/established/100000$')
printf "| commit | benchmark | instructions | D1 misses | LL misses |\n|---|---|---|---|---|\n"
for rev in "${@:-.}"; do
  if [ "$rev" = "." ]; then
    dir=$root
    label="$(git rev-parse --short HEAD)$(git diff --quiet HEAD || echo +)"
  else
    dir=$(mktemp -d)
    git worktree add -q --detach "$dir" "$rev"
    trap 'git -C "$root" worktree remove --force "$dir"' EXIT
    label=$(git rev-parse --short "$rev")
  fi
  bin=$(cd "$dir" && cargo bench --no-run -p xlb-bench --bench path 2>&1 |
    sed -n 's/.*Executable benches\/path.rs (\(.*\))/\1/p')
  case $bin in /*) ;; *) bin="$dir/$bin" ;; esac
  for bench in "${benches[@]}"; do
    outs=()
    for seconds in 5 20; do
      out=$(mktemp)
      valgrind --tool=callgrind --cache-sim=yes --D1=49152,12,64 --LL=4194304,16,64 \
        --callgrind-out-file="$out" --toggle-collect='criterion::bencher::Bencher<M>::iter*' \
        "$bin" --bench --profile-time "$seconds" "$bench" > /dev/null 2>&1
      outs+=("$out")
    done
    python3 "$root/bench/cachemiss.py" "$label" "$bench" "${outs[@]}"
    rm -f "${outs[@]}"
  done
  if [ "$dir" != "$root" ]; then
    git -C "$root" worktree remove --force "$dir"
    trap - EXIT
  fi
done
