"""One row of bench/cachemiss.sh: the events per packet between two callgrind profiles of one
benchmark (a short and a long run). Every packet goes through one `decide_packet` call, so
its calls count the packets. Usage: cachemiss.py LABEL BENCH SHORT_PROFILE LONG_PROFILE"""

import re
import sys


def read(path):
    """(packets, {event: total}) of a callgrind profile."""
    names, packets, want, totals, events = {}, 0, False, None, None
    for line in open(path):
        if line.startswith("events:"):
            events = line.split()[1:]
        elif line.startswith("totals:"):
            totals = [int(x) for x in line.split()[1:]]
        m = re.match(r"(c?fn)=\((\d+)\)(?: (.*))?", line)
        if m:
            kind, i, name = m.groups()
            if name:
                names[i] = name.strip()
            if kind == "cfn":
                want = "decide::decide_packet" in names.get(i, "")
        elif line.startswith("calls=") and want:
            packets += int(line.split("=")[1].split()[0])
            want = False
    return packets, dict(zip(events, totals))


def main():
    label, bench, short, long = sys.argv[1:]
    (p0, e0), (p1, e1) = read(short), read(long)
    if p1 <= p0:
        sys.exit(f"{bench}: the long run saw no more packets than the short one")

    def per(*keys):
        return sum(e1[k] - e0[k] for k in keys) / (p1 - p0)

    print(f"| {label} | {bench.strip('^$')} | {per('Ir'):,.0f} | {per('D1mr', 'D1mw'):.2f} | "
          f"{per('DLmr', 'DLmw'):.2f} |")


if __name__ == "__main__":
    main()
