#!/usr/bin/env python3
"""Where a packet's time goes (`make bench-budget`): the budget of each stage per packet, for
an established packet and for a new flow's, drawn as stacked bars so that the next
bottleneck is visible at a glance. Writes bench/results/budget.{md,svg,json}.

The whole of each bar is what the end-to-end benchmark measured on the node's core for one
delivered packet (core-1 CPU ns, median of its repetitions, read from --e2e: 1 Service, dnat,
xlb and the bare AF_XDP forwarder). It is split by:

  filter     the XDP filter's run per packet, timed by the kernel itself (BPF_PROG_TEST_RUN,
             a million runs of one frame: its map entries stay in cache), from
             target/release/filter-cost, run here (needs root; without it the row says so).
  stages     xlb's worker, from criterion's medians of one run (`cargo bench --bench path --
             'stages|worker|decide/new-flow$'`, which `make bench-budget` runs first; 64-frame
             batches over 100 000 flows, one Service):
             parse and hash; both prefetch stages; the flow lookup; the rest of decide()
             (snapshot, state; for a new flow: the pick and both inserts); the rewrite; the
             worker's own loop around them (rings, next hop, counters). Each is the difference
             of two cumulative benchmarks (stages/1-copy .. 6-rewrite, worker/established).
  the rest   what is left of the end-to-end figure: the AF_XDP receive (copy mode: the
             kernel copies each frame into the UMEM), the copy-mode transmit (an skb a frame),
             the veth pair and the softirq around them - on veth the floor the bare forwarder
             shows, which a NIC in zero-copy mode removes most of - and whatever the stage
             benchmarks do not see (a bigger, colder flow table end to end; for new flows,
             the end-to-end table holds millions of flows where criterion's holds 256 Ki).

The criterion frames are TCP, the end-to-end traffic UDP; the end-to-end figures come from
the run recorded in --e2e (its commit is in its .md), the rest is measured now.

Usage: bench/budget.py [--e2e bench/results/e2e.json] [--criterion target/criterion]
                       [--out bench/results]
"""

import argparse
import glob
import json
import os
import statistics
import subprocess
import sys

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
FILTER_COST = os.path.join(ROOT, "target/release/filter-cost")

# Colours of the segments, in stacking order.
SEGMENTS = [
    ("filter", "XDP filter", "#8172b2"),
    ("parse", "parse + hash", "#64b5cd"),
    ("prefetch", "prefetch stages", "#ccb974"),
    ("lookup", "flow lookup", "#55a868"),
    ("decide", "decide (rest)", "#c44e52"),
    ("rewrite", "rewrite", "#dd8452"),
    ("loop", "worker loop (rings, next hop)", "#937860"),
    ("kernel", "the rest: kernel (AF_XDP rx copy, tx skb, veth) and what the stage benchmarks miss", "#bbbbbb"),
]


# The criterion results the budget is made of.
NEEDED = ["stages/1-copy", "stages/2-parse", "stages/3-prefetch", "stages/4-lookup",
          "stages/5-decide", "stages/6-rewrite", "worker/established/100000", "decide/new-flow"]


def criterion_medians(root):
    """full_id -> (median ns per iteration, elements per iteration) of every criterion result."""
    out = {}
    for meta_path in glob.glob(os.path.join(root, "**", "new", "benchmark.json"), recursive=True):
        base = os.path.dirname(meta_path)
        try:
            with open(meta_path) as f:
                meta = json.load(f)
            with open(os.path.join(base, "estimates.json")) as f:
                est = json.load(f)
        except (OSError, ValueError):
            continue
        elements = (meta.get("throughput") or {}).get("Elements") or 1
        out[meta["full_id"]] = est["median"]["point_estimate"] / elements
    return out


def filter_costs():
    """{(services, frame): median ns} from filter-cost, or the reason it could not run."""
    if os.geteuid() != 0:
        return "not measured: loading the XDP filter needs root"
    if not os.path.exists(FILTER_COST):
        return f"not measured: {FILTER_COST} is not built"
    run = subprocess.run([FILTER_COST, "1", "100000"], capture_output=True, text=True, timeout=300)
    if run.returncode != 0:
        return f"not measured: filter-cost failed: {run.stderr.strip()}"
    out = {}
    for line in run.stdout.splitlines():
        row = json.loads(line)
        out[(row["services"], row["frame"])] = statistics.median(row["ns"])
    return out


def e2e_core1(path):
    """{(contender, pattern): median core-1 ns per delivered packet} at 1 Service, dnat."""
    with open(path) as f:
        data = json.load(f)
    out = {}
    for row in data["summary"]:
        if row["services"] == 1 and row["mode"] == "dnat":
            out[(row["contender"], row["pattern"])] = row["core1_ns"][0]
    return out, data.get("machine", "")


def budget(stages, filt, e2e):
    """The bars: name -> {segment: ns}, and the notes on what was missing."""
    notes = []
    missing = [n for n in NEEDED if n not in stages]
    if missing:
        sys.exit(f"budget: criterion results missing ({', '.join(missing)}): run make bench-budget")
    s = stages
    worker = {
        "parse": s["stages/2-parse"] - s["stages/1-copy"],
        "prefetch": s["stages/3-prefetch"] - s["stages/2-parse"],
        "lookup": s["stages/4-lookup"] - s["stages/3-prefetch"],
        "decide": s["stages/5-decide"] - s["stages/4-lookup"],
        "rewrite": s["stages/6-rewrite"] - s["stages/5-decide"],
        "loop": s["worker/established/100000"] - s["stages/6-rewrite"],
    }
    # decide/new-flow is receive + decide + rewrite + the batch's reverse entries: its decide
    # is what is left after the stages it shares with the established path.
    new = dict(worker)
    new["decide"] = s["decide/new-flow"] - s["stages/3-prefetch"] - worker["lookup"] - worker["rewrite"]
    if isinstance(filt, str):
        notes.append(f"XDP filter {filt}")
        f_service = 0.0
    else:
        f_service = filt[(1, "service")]
    bars = {}
    for name, contender, pattern, parts in [
        ("xlb, established", "xlb", "established", worker),
        ("xlb, new flow a packet", "xlb", "new-flow", new),
        # The bare forwarder parses and rewrites with the same functions, without a lookup.
        ("bare forwarder", "bare", "established",
         {"parse": worker["parse"], "rewrite": worker["rewrite"]}),
    ]:
        total = e2e.get((contender, pattern))
        if total is None:
            notes.append(f"{name}: no end-to-end figure in the results (contender {contender}, {pattern})")
            continue
        bar = {"filter": f_service, **parts}
        bar["kernel"] = total - sum(bar.values())
        if bar["kernel"] < 0:
            notes.append(f"{name}: the stages add up to more than the end-to-end figure "
                         f"({total:.0f} ns): different runs, or the stage benchmarks' cache is colder")
        bars[name] = {"total": total, "segments": bar}
    return bars, notes


def svg(bars):
    top = max(b["total"] for b in bars.values())
    left, width, row_h, bar_h = 160, 560, 44, 26
    height = 70 + row_h * len(bars) + 18 * ((len(SEGMENTS) + 1) // 2)
    out = [f'<svg xmlns="http://www.w3.org/2000/svg" width="{left + width + 60}" height="{height}" '
           f'font-family="sans-serif" font-size="10">',
           f'<text x="10" y="16" font-size="13">Core-1 nanoseconds per delivered packet, by stage '
           f'(1 Service, dnat, 60-byte UDP)</text>']
    for k in range(5):
        x = left + width * k / 4
        out.append(f'<line x1="{x:.0f}" x2="{x:.0f}" y1="28" y2="{40 + row_h * len(bars)}" stroke="#ddd"/>')
        out.append(f'<text x="{x:.0f}" y="{52 + row_h * len(bars)}" text-anchor="middle">{top * k / 4:.0f} ns</text>')
    for i, (name, bar) in enumerate(bars.items()):
        y = 34 + row_h * i
        out.append(f'<text x="{left - 6}" y="{y + bar_h / 2 + 4:.0f}" text-anchor="end">{name}</text>')
        x = left
        for key, _, colour in SEGMENTS:
            ns = max(bar["segments"].get(key, 0.0), 0.0)
            w = width * ns / top
            if w <= 0:
                continue
            out.append(f'<rect x="{x:.1f}" y="{y}" width="{w:.1f}" height="{bar_h}" fill="{colour}">'
                       f'<title>{key}: {ns:.1f} ns</title></rect>')
            x += w
        out.append(f'<text x="{x + 4:.0f}" y="{y + bar_h / 2 + 4:.0f}">{bar["total"]:.0f}</text>')
    ly = 64 + row_h * len(bars)
    for k, (_, label, colour) in enumerate(SEGMENTS):
        lx, yy = 10 + (k % 2) * 200, ly + 18 * (k // 2)
        out.append(f'<rect x="{lx}" y="{yy}" width="10" height="10" fill="{colour}"/>'
                   f'<text x="{lx + 14}" y="{yy + 9}">{label}</text>')
    out.append("</svg>")
    return "\n".join(out) + "\n"


def markdown(bars, filt, stages, notes, machine, e2e_path):
    lines = ["# Stage budget", "",
             f"Machine: {machine}. `make bench-budget` (bench/budget.py): end-to-end totals from "
             f"`{os.path.relpath(e2e_path, ROOT)}` (core-1 ns per delivered packet, median), the XDP "
             "filter timed by the kernel, xlb's stages from criterion medians of one run. See the "
             "script's documentation for what each segment holds.", "",
             "![stage budget](budget.svg)", ""]
    names = list(bars)
    lines.append("| stage (ns per packet) | " + " | ".join(names) + " |")
    lines.append("|---|" + "---|" * len(names))
    for key, label, _ in SEGMENTS:
        cells = [f"{bars[n]['segments'].get(key, 0.0):.1f}" if key in bars[n]["segments"] else "-" for n in names]
        lines.append(f"| {label} | " + " | ".join(cells) + " |")
    lines.append("| **end to end (core 1)** | " + " | ".join(f"**{bars[n]['total']:.0f}**" for n in names) + " |")
    lines += ["", "XDP filter alone (kernel-timed mean per run, median of 5; one frame repeated, so its "
              "map entries are in cache):", ""]
    if isinstance(filt, str):
        lines.append(f"- {filt}")
    else:
        lines += ["| Services loaded | to a Service | a backend's reply | not xlb's |", "|---|---|---|---|"]
        for n in sorted({k[0] for k in filt}):
            lines.append(f"| {n} | {filt[(n, 'service')]:.0f} ns | {filt[(n, 'reply')]:.0f} ns | {filt[(n, 'other')]:.0f} ns |")
    lines += ["", "Criterion medians used (ns per packet):", ""]
    for k in NEEDED:
        lines.append(f"- `{k}`: {stages[k]:.1f}")
    if notes:
        lines += ["", "Notes:", ""] + [f"- {n}" for n in notes]
    return "\n".join(lines) + "\n"


def main():
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--e2e", default=os.path.join(ROOT, "bench/results/e2e.json"))
    ap.add_argument("--criterion", default=os.path.join(ROOT, "target/criterion"))
    ap.add_argument("--out", default=os.path.join(ROOT, "bench/results"))
    args = ap.parse_args()
    stages = criterion_medians(args.criterion)
    filt = filter_costs()
    e2e, machine = e2e_core1(args.e2e)
    bars, notes = budget(stages, filt, e2e)
    os.makedirs(args.out, exist_ok=True)
    with open(os.path.join(args.out, "budget.svg"), "w") as f:
        f.write(svg(bars))
    with open(os.path.join(args.out, "budget.md"), "w") as f:
        f.write(markdown(bars, filt, stages, notes, machine, args.e2e))
    with open(os.path.join(args.out, "budget.json"), "w") as f:
        json.dump({"bars": bars, "notes": notes,
                   "filter": filt if isinstance(filt, str) else
                   [{"services": k[0], "frame": k[1], "ns": v} for k, v in sorted(filt.items())]},
                  f, indent=1)
    print(open(os.path.join(args.out, "budget.md")).read())


if __name__ == "__main__":
    main()
