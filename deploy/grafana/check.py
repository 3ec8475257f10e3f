#!/usr/bin/env python3
"""Checks xlb's Grafana dashboard offline.

    check.py DASHBOARD [METRICS]   the dashboard's shape; with METRICS (the text of a running
                                   xlb's /metrics, `xlb metrics`), also that every metric it
                                   queries is there
    check.py --self-test DASHBOARD the checks catch what they are meant to (broken copies of
                                   the dashboard must fail), then the dashboard's shape

Shape: what Grafana's import needs (a Prometheus datasource input, a title, uid and schema
version, panels with unique ids, a type this dashboard uses, a grid position inside 24 columns
that overlaps no other panel, targets with unique refIds, each with a PromQL expression whose
brackets balance, on the input's datasource), and the instance variable.
"""
import copy
import json
import re
import sys

PANEL_TYPES = {"row", "timeseries", "stat"}
DATASOURCE = {"type": "prometheus", "uid": "${DS_PROMETHEUS}"}
METRIC = re.compile(r"\bxlb_[a-z0-9_]+")
HISTOGRAM_SUFFIXES = ("_bucket", "_sum", "_count")


def shape_errors(d):
    """Everything wrong with the dashboard's shape, as messages."""
    errors = []
    need = lambda cond, msg: None if cond else errors.append(msg)
    inputs = d.get("__inputs", [])
    need(any(i.get("name") == "DS_PROMETHEUS" and i.get("pluginId") == "prometheus" for i in inputs),
         "__inputs: no Prometheus datasource input DS_PROMETHEUS")
    for key, kind in [("title", str), ("uid", str), ("schemaVersion", int), ("panels", list)]:
        need(isinstance(d.get(key), kind), f"{key}: missing or not a {kind.__name__}")
    need(isinstance(d.get("schemaVersion"), int) and d["schemaVersion"] >= 36,
         "schemaVersion: below 36 (Grafana 9)")
    variables = {v.get("name") for v in d.get("templating", {}).get("list", [])}
    need("instance" in variables, "templating: no instance variable")
    ids, cells = set(), {}
    for p in d.get("panels", []):
        name = f"panel {p.get('id')} ({p.get('title')!r})"
        need(isinstance(p.get("id"), int) and p["id"] not in ids, f"{name}: id missing or not unique")
        ids.add(p.get("id"))
        need(p.get("type") in PANEL_TYPES, f"{name}: type {p.get('type')!r} not one of {sorted(PANEL_TYPES)}")
        need(bool(p.get("title")), f"{name}: no title")
        g = p.get("gridPos", {})
        if not all(isinstance(g.get(k), int) for k in "xywh"):
            errors.append(f"{name}: gridPos needs integer x, y, w, h")
            continue
        need(g["x"] >= 0 and g["w"] > 0 and g["x"] + g["w"] <= 24 and g["h"] > 0,
             f"{name}: gridPos {g} outside the 24 columns")
        for x in range(g["x"], g["x"] + g["w"]):
            for y in range(g["y"], g["y"] + g["h"]):
                if (x, y) in cells:
                    errors.append(f"{name}: overlaps {cells[(x, y)]} at column {x}, row {y}")
                    break
                cells[(x, y)] = name
            else:
                continue
            break
        if p.get("type") == "row":
            continue
        need(p.get("datasource") == DATASOURCE, f"{name}: datasource is not the DS_PROMETHEUS input")
        targets = p.get("targets", [])
        need(bool(targets), f"{name}: no targets")
        refs = [t.get("refId") for t in targets]
        need(len(set(refs)) == len(refs) and all(refs), f"{name}: refIds missing or repeated")
        for t in targets:
            expr = t.get("expr", "")
            need(bool(METRIC.search(expr)), f"{name}: {expr!r} queries no xlb metric")
            need(balanced(expr), f"{name}: brackets do not balance in {expr!r}")
    return errors


def balanced(expr):
    """Whether (), [] and {} nest properly outside quoted strings."""
    stack, quoted = [], False
    pairs = {")": "(", "]": "[", "}": "{"}
    for c in expr:
        if c == '"':
            quoted = not quoted
        elif quoted:
            continue
        elif c in "([{":
            stack.append(c)
        elif c in pairs and (not stack or stack.pop() != pairs[c]):
            return False
    return not stack and not quoted


def queried(d):
    """Every xlb metric name the dashboard's targets and variables query."""
    texts = [t.get("expr", "") for p in d.get("panels", []) for t in p.get("targets", [])]
    texts += [json.dumps(v.get("query")) for v in d.get("templating", {}).get("list", [])]
    return {m for text in texts for m in METRIC.findall(text)}


def missing_metrics(d, metrics_text):
    """The queried metrics that the /metrics text has no sample of."""
    samples = set()
    for line in metrics_text.splitlines():
        if line and not line.startswith("#"):
            samples.add(re.split(r"[{ ]", line, maxsplit=1)[0])
    return sorted(m for m in queried(d) if m not in samples)


def self_test(d):
    """Broken copies of the dashboard must each fail the check they break."""
    def broken(change):
        c = copy.deepcopy(d)
        change(c)
        return c
    graphs = [p for p in d["panels"] if p["type"] != "row"]
    first, second = graphs[0]["id"], graphs[1]["id"]
    def panel(c, pid):
        return next(p for p in c["panels"] if p["id"] == pid)
    cases = {
        "an overlap": lambda c: panel(c, second)["gridPos"].update(panel(c, first)["gridPos"]),
        "a repeated id": lambda c: panel(c, second).update(id=first),
        "an unbalanced expression": lambda c: panel(c, first)["targets"][0].update(
            expr=panel(c, first)["targets"][0]["expr"] + ")"),
        "a panel too wide": lambda c: panel(c, first)["gridPos"].update(w=25),
        "no datasource input": lambda c: c.update(__inputs=[]),
        "an unknown panel type": lambda c: panel(c, first).update(type="graph"),
    }
    for what, change in cases.items():
        assert shape_errors(broken(change)), f"self-test: {what} was not caught"
    metrics = "\n".join(f"{m} 1" for m in queried(d))
    assert not missing_metrics(d, metrics), "self-test: present metrics reported missing"
    gone = sorted(queried(d))[0]
    assert missing_metrics(d, metrics.replace(f"{gone} 1", "")) == [gone], \
        "self-test: a missing metric was not caught"
    print(f"self-test: {len(cases) + 1} broken dashboards caught")


def main(argv):
    test = "--self-test" in argv
    args = [a for a in argv if a != "--self-test"]
    if len(args) not in (1, 2):
        print(__doc__, file=sys.stderr)
        return 2
    with open(args[0]) as f:
        d = json.load(f)
    if test:
        self_test(d)
    errors = shape_errors(d)
    if len(args) == 2:
        with open(args[1]) as f:
            errors += [f"{m}: queried but not in {args[1]}" for m in missing_metrics(d, f.read())]
    for e in errors:
        print(f"{args[0]}: {e}", file=sys.stderr)
    if errors:
        return 1
    panels = sum(p["type"] != "row" for p in d["panels"])
    checked = f", all {len(queried(d))} queried metrics present" if len(args) == 2 else ""
    print(f"{args[0]}: {panels} panels, shape ok{checked}")
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
