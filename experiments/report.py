#!/usr/bin/env python3
"""The report of a reproduction plan: results.json, results.md and two SVG
figures from the finished runs of a results directory.

    python3 experiments/report.py DIR       (DIR holds plan.json and runs/)

Each claim of the paper gets a table and a verdict that is computed from the
table: a difference counts only when it is larger than twice its standard
error over the seeds (with one seed there is no error bar, and the verdict
says so).
"""

import json
import math
import statistics
import sys
from pathlib import Path

# The baselines claim (a) compares LIFT with, in the order of the tables.
PEFT = ["lora", "dora", "pissa", "s2ft"]


# ----------------------------------------------------------------------------
# Reading the runs


def load_runs(results):
    """{label: [results.json of each finished seed]} at the learning rate
    the grid chose (a grid's losers have no results.json; a run at another
    learning rate, left from an earlier grid, is not counted)."""
    runs = {}
    for f in sorted((results / "runs").glob("*/*/results.json")):
        r = json.loads(f.read_text())
        runs.setdefault(r["label"], []).append(r)
    for label, rs in runs.items():
        chosen = [r["lr"] for r in rs if r.get("lr_choice")]
        if chosen:
            runs[label] = [r for r in rs if r["lr"] == chosen[0]]
    return runs


def stat(values):
    """(mean, standard deviation or None, n) of the values that exist."""
    v = [x for x in values if x is not None]
    if not v:
        return None
    return (statistics.fmean(v), statistics.stdev(v) if len(v) > 1 else None, len(v))


def set_values(runs, ev, key):
    """{set name: [value of each run]} for one evaluation."""
    out = {}
    for r in runs:
        for s in r["evals"][ev]["sets"]:
            out.setdefault(s["name"], []).append(s.get(key))
    return out


def summarize(plan, runs):
    """Per method: each evaluation's per-set and average statistics, and the
    cost of training."""
    table = {}
    for label, rs in runs.items():
        row = {"seeds": sorted(r["seed"] for r in rs), "lr": rs[0]["lr"], "lr_choice": None, "evals": {}}
        for r in rs:
            row["lr_choice"] = row["lr_choice"] or r.get("lr_choice")
        for ev in plan["evals"]:
            e = {"accuracy": stat([r["evals"][ev].get("accuracy") for r in rs])}
            e["loss"] = stat([r["evals"][ev].get("loss") for r in rs])
            e["sets"] = {
                name: {"accuracy": stat(a), "loss": stat(set_values(rs, ev, "loss")[name])}
                for name, a in set_values(rs, ev, "accuracy").items()
            }
            row["evals"][ev] = e
        trained = [r["train"] for r in rs if r["train"]]
        if trained:
            row["optimizer_state_bytes"] = trained[0]["optimizer_state_bytes"]
            row["trainable_values"] = trained[0]["trainable_values"]
            row["train_wall_s"] = stat([t["wall_s"] for t in trained])
            row["peak_rss_bytes"] = stat([t["peak_rss_bytes"] for t in trained])
        table[label] = row
    return table


# ----------------------------------------------------------------------------
# Formatting


def pm(s, scale=1.0, digits=1):
    """"mean ± sd" (or the mean alone with one seed; "-" for none)."""
    if s is None:
        return "-"
    mean, sd, _ = s
    if sd is None:
        return f"{mean * scale:.{digits}f}"
    return f"{mean * scale:.{digits}f} ± {sd * scale:.{digits}f}"


def delta(s, base, scale=1.0, digits=1):
    if s is None or base is None:
        return "-"
    return f"{(s[0] - base[0]) * scale:+.{digits}f}"


def compare(a, b, higher_is_better=True):
    """How `a` stands against `b`: 'better', 'worse' or 'within noise'
    (|difference| <= 2 standard errors), or 'one seed' when there is no
    error bar."""
    if a is None or b is None:
        return "not measured"
    diff = a[0] - b[0] if higher_is_better else b[0] - a[0]
    if abs(diff) <= 1e-9 * max(abs(a[0]), abs(b[0]), 1.0):
        diff = 0.0  # the same counts, averaged in another order
    if a[1] is None or b[1] is None:
        return ("better" if diff > 0 else "worse" if diff < 0 else "equal") + " (one seed: no error bar)"
    se = math.sqrt(a[1] ** 2 / a[2] + b[1] ** 2 / b[2])
    if abs(diff) <= 2 * se:
        return "within noise"
    return "better" if diff > 0 else "worse"


def methods_in_order(plan, table):
    return [label for label in plan["methods"] if label in table]


def target_table(plan, table, target):
    sets = sorted({s for row in table.values() for s in row["evals"][target]["sets"]}, key=str.lower)
    head = "| method | lr | seeds | " + " | ".join(sets) + " | average | Δ vs base | trained values | optimizer state | train time |"
    lines = [head, "|" + "---|" * (head.count("|") - 1)]
    base = table.get("base", {}).get("evals", {}).get(target, {}).get("accuracy")
    for label in methods_in_order(plan, table):
        row = table[label]
        e = row["evals"][target]
        cells = [pm(e["sets"].get(s, {}).get("accuracy"), 100) for s in sets]
        cost = ["-", "-", "-"]
        if "trainable_values" in row:
            cost = [
                f"{row['trainable_values'] / 1e6:.2f} M",
                f"{row['optimizer_state_bytes'] / 2**20:.1f} MiB",
                pm(row["train_wall_s"], 1 / 60, 1) + " min",
            ]
        lr = "-" if row["lr"] is None else f"{row['lr']:g}"
        lines.append(f"| {label} | {lr} | {len(row['seeds'])} | " + " | ".join(cells) + f" | **{pm(e['accuracy'], 100)}** | {delta(e['accuracy'], base, 100)} | " + " | ".join(cost) + " |")
    return "\n".join(lines)


def retention_table(plan, table, retention):
    cols = []
    for ev in retention:
        if plan["evals"][ev].get("generate", True):
            cols.append((ev, "accuracy", f"{ev} accuracy %", 100, True))
        cols.append((ev, "loss", f"{ev} loss", 1, False))
    head = "| method | " + " | ".join(f"{c[2]} | Δ" for c in cols) + " |"
    lines = [head, "|" + "---|" * (head.count("|") - 1)]
    base = table.get("base")
    for label in methods_in_order(plan, table):
        cells = []
        for ev, key, _, scale, _ in cols:
            s = table[label]["evals"][ev][key]
            b = base["evals"][ev][key] if base else None
            digits = 1 if key == "accuracy" else 4
            cells.append(f"{pm(s, scale, digits)} | {delta(s, b, scale, digits)}")
        lines.append(f"| {label} | " + " | ".join(cells) + " |")
    return "\n".join(lines)


def ablation_table(plan, table, target, retention):
    """Claim (c) in one place: the sparse methods that differ only in which
    entries they train, with the target average and the retention losses."""
    rows = [l for l in ["base", "lift", "lift-smallest", "magnitude", "random", "full"] if l in table]
    head = f"| method | {target} average % | Δ vs base | " + " | ".join(f"{ev} loss Δ" for ev in retention) + " |"
    lines = [head, "|" + "---|" * (head.count("|") - 1)]
    base = table.get("base")
    for label in rows:
        e = table[label]["evals"]
        b = base["evals"] if base else None
        cells = [delta(e[ev]["loss"], b[ev]["loss"] if b else None, 1, 4) for ev in retention]
        lines.append(f"| {label} | {pm(e[target]['accuracy'], 100)} | {delta(e[target]['accuracy'], b[target]['accuracy'] if b else None, 100)} | " + " | ".join(cells) + " |")
    return "\n".join(lines)


def lr_table(plan, table):
    lines = ["| method | grid | validation loss per lr | chosen |", "|---|---|---|---|"]
    for label in methods_in_order(plan, table):
        c = table[label]["lr_choice"]
        if c:
            losses = ", ".join(f"{lr}: {v:.4f}" for lr, v in c["val_loss"].items())
            edge = " (the grid's edge)" if c["chosen"] in (min(c["grid"]), max(c["grid"])) else ""
            lines.append(f"| {label} | {', '.join(f'{x:g}' for x in c['grid'])} | {losses} | {c['chosen']:g}{edge} |")
    return "\n".join(lines)


# ----------------------------------------------------------------------------
# Verdicts


def acc(table, label, ev):
    return table.get(label, {}).get("evals", {}).get(ev, {}).get("accuracy")


def loss(table, label, ev):
    return table.get(label, {}).get("evals", {}).get(ev, {}).get("loss")


def verdicts(table, target, retention):
    v = []
    lift = acc(table, "lift", target)
    a = [f"LIFT vs Full FT on {target}: {compare(lift, acc(table, 'full', target))}"]
    a += [f"vs {p}: {compare(lift, acc(table, p, target))}" for p in PEFT if p in table]
    v.append(("(a) LIFT matches or beats Full FT on arithmetic reasoning, and beats LoRA, DoRA, PiSSA, S2FT", a))
    b = []
    for ev in retention:
        for other in ["full", "lora"]:
            if other in table:
                b.append(f"{ev} loss, LIFT vs {other}: {compare(loss(table, 'lift', ev), loss(table, other, ev), higher_is_better=False)}")
            if other in table and acc(table, "lift", ev) is not None:
                b.append(f"{ev} accuracy, LIFT vs {other}: {compare(acc(table, 'lift', ev), acc(table, other, ev))}")
    v.append(("(b) LIFT retains more source-domain knowledge than Full FT and LoRA", b))
    c = [f"LIFT vs {o} on {target}: {compare(lift, acc(table, o, target))}" for o in ["magnitude", "random", "lift-smallest"] if o in table]
    v.append(("(c) magnitude-based sparse fine-tuning is poor; rank reduction (LIFT) makes it good", c))
    return v


# ----------------------------------------------------------------------------
# Figures (SVG by hand: no plotting library)


def svg_scatter(path, table, plan, target, retention_ev):
    """Target gain (accuracy points over the base model) against forgetting
    (the rise of a retention loss over the base model), one point per
    method with ±1 sd bars."""
    base = table.get("base")
    if not base:
        return
    pts = []
    for label in methods_in_order(plan, table):
        if label == "base":
            continue
        a, l = acc(table, label, target), loss(table, label, retention_ev)
        if a is None or l is None:
            continue
        pts.append((label, (l[0] - loss(table, "base", retention_ev)[0]), l[1] or 0, (a[0] - acc(table, "base", target)[0]) * 100, (a[1] or 0) * 100))
    if not pts:
        return
    W, H, m = 640, 440, 60
    xs = [p[1] - p[2] for p in pts] + [p[1] + p[2] for p in pts] + [0]
    ys = [p[3] - p[4] for p in pts] + [p[3] + p[4] for p in pts] + [0]
    x0, x1, y0, y1 = min(xs), max(xs), min(ys), max(ys)
    padx, pady = (x1 - x0) * 0.1 or 0.01, (y1 - y0) * 0.1 or 1
    x0, x1, y0, y1 = x0 - padx, x1 + padx, y0 - pady, y1 + pady
    X = lambda x: m + (x - x0) / (x1 - x0) * (W - 2 * m)
    Y = lambda y: H - m - (y - y0) / (y1 - y0) * (H - 2 * m)
    s = [f'<svg xmlns="http://www.w3.org/2000/svg" width="{W}" height="{H}" font-family="sans-serif" font-size="12">']
    s.append(f'<rect width="{W}" height="{H}" fill="white"/>')
    s.append(f'<line x1="{X(x0)}" y1="{Y(0)}" x2="{X(x1)}" y2="{Y(0)}" stroke="#bbb"/><line x1="{X(0)}" y1="{Y(y0)}" x2="{X(0)}" y2="{Y(y1)}" stroke="#bbb"/>')
    s.append(f'<rect x="{m}" y="{m}" width="{W - 2 * m}" height="{H - 2 * m}" fill="none" stroke="#333"/>')
    for i in range(5):
        xv, yv = x0 + (x1 - x0) * i / 4, y0 + (y1 - y0) * i / 4
        s.append(f'<text x="{X(xv)}" y="{H - m + 16}" text-anchor="middle">{xv:.3f}</text>')
        s.append(f'<text x="{m - 6}" y="{Y(yv) + 4}" text-anchor="end">{yv:.1f}</text>')
    s.append(f'<text x="{W / 2}" y="{H - 14}" text-anchor="middle">rise of the {retention_ev} loss over the base model (forgetting; left is better)</text>')
    s.append(f'<text x="16" y="{H / 2}" text-anchor="middle" transform="rotate(-90 16 {H / 2})">{target} accuracy gain over the base model (points)</text>')
    s.append(f'<text x="{W / 2}" y="30" text-anchor="middle" font-size="14">Target gain vs retention loss ({plan["name"]} plan, ±1 sd over seeds)</text>')
    for label, x, sx, y, sy in pts:
        color = "#c0392b" if label.startswith("lift") else "#2c3e50"
        s.append(f'<line x1="{X(x - sx)}" y1="{Y(y)}" x2="{X(x + sx)}" y2="{Y(y)}" stroke="{color}"/>')
        s.append(f'<line x1="{X(x)}" y1="{Y(y - sy)}" x2="{X(x)}" y2="{Y(y + sy)}" stroke="{color}"/>')
        s.append(f'<circle cx="{X(x)}" cy="{Y(y)}" r="4" fill="{color}"/><text x="{X(x) + 6}" y="{Y(y) - 6}" fill="{color}">{label}</text>')
    s.append("</svg>")
    Path(path).write_text("\n".join(s) + "\n")


def svg_bars(path, table, plan, target):
    """Accuracy per set of the target evaluation, one bar per method."""
    labels = methods_in_order(plan, table)
    sets = sorted({s for row in table.values() for s in row["evals"][target]["sets"]}, key=str.lower) + ["average"]
    if not labels or len(sets) == 1:
        return
    W, H, m = 900, 420, 50
    group = (W - 2 * m) / len(sets)
    bw = group * 0.8 / len(labels)
    top = max((v["accuracy"][0] + (v["accuracy"][1] or 0)) for row in table.values() for v in list(row["evals"][target]["sets"].values()) if v["accuracy"]) or 1
    top = min(1.0, top * 1.15)
    Y = lambda a: H - m - a / top * (H - 2 * m - 20)
    palette = ["#7f8c8d", "#c0392b", "#2c3e50", "#2980b9", "#8e44ad", "#16a085", "#d35400", "#27ae60", "#f39c12", "#e74c3c"]
    s = [f'<svg xmlns="http://www.w3.org/2000/svg" width="{W}" height="{H + 30}" font-family="sans-serif" font-size="11">', f'<rect width="{W}" height="{H + 30}" fill="white"/>']
    s.append(f'<text x="{W / 2}" y="18" text-anchor="middle" font-size="14">{target} accuracy per set ({plan["name"]} plan, mean ± 1 sd over seeds)</text>')
    for i in range(5):
        a = top * i / 4
        s.append(f'<line x1="{m}" y1="{Y(a)}" x2="{W - m}" y2="{Y(a)}" stroke="#eee"/><text x="{m - 4}" y="{Y(a) + 4}" text-anchor="end">{a * 100:.0f}%</text>')
    for g, name in enumerate(sets):
        gx = m + g * group + group * 0.1
        s.append(f'<text x="{m + g * group + group / 2}" y="{H - m + 14}" text-anchor="middle">{name}</text>')
        for j, label in enumerate(labels):
            e = table[label]["evals"][target]
            v = e["accuracy"] if name == "average" else e["sets"].get(name, {}).get("accuracy")
            if v is None:
                continue
            x = gx + j * bw
            s.append(f'<rect x="{x:.1f}" y="{Y(v[0]):.1f}" width="{bw * 0.9:.1f}" height="{Y(0) - Y(v[0]):.1f}" fill="{palette[j % len(palette)]}"/>')
            if v[1]:
                cx = x + bw * 0.45
                s.append(f'<line x1="{cx:.1f}" y1="{Y(v[0] - v[1]):.1f}" x2="{cx:.1f}" y2="{Y(min(top, v[0] + v[1])):.1f}" stroke="black"/>')
    for j, label in enumerate(labels):
        x = m + j * (W - 2 * m) / len(labels)
        s.append(f'<rect x="{x:.1f}" y="{H - 8}" width="10" height="10" fill="{palette[j % len(palette)]}"/><text x="{x + 14:.1f}" y="{H + 1}">{label}</text>')
    s.append("</svg>")
    Path(path).write_text("\n".join(s) + "\n")


# ----------------------------------------------------------------------------
# The report


def roles(plan):
    target = [n for n, e in plan["evals"].items() if e.get("role") == "target"]
    retention = [n for n, e in plan["evals"].items() if e.get("role") == "retention"]
    return target[0], retention


def write(plan, data_info):
    results = Path(plan["results"])
    runs = load_runs(results)
    table = summarize(plan, runs)
    target, retention = roles(plan)
    commits = sorted({r["commit"] for rs in runs.values() for r in rs})
    v = verdicts(table, target, retention)
    json_out = {"plan": plan["name"], "commits": commits, "data": data_info, "methods": table, "verdicts": {k: lines for k, lines in v}}
    (results / "results.json").write_text(json.dumps(json_out, indent=1) + "\n")
    svg_scatter(results / "gain_vs_retention.svg", table, plan, target, retention[-1])
    svg_bars(results / "accuracy_per_set.svg", table, plan, target)
    md = [f"# Reproduction: the {plan['name']} plan", ""]
    md.append(f"Model {plan['model']}; trained on {plan['train_examples']} examples of {plan['train_data']} "
              f"(validation: {plan['val_examples']} others); seeds {plan['seeds']}; lift commit(s) {', '.join(commits) or '-'}.")
    for name, ev in plan["evals"].items():
        md.append(f"- {name} ({ev['role']}): {ev.get('describe', '')}")
    md.append(f"- training flags: `{' '.join(plan.get('train_flags', []))}`")
    md += ["", "Cells are mean ± standard deviation over the seeds that finished (the `seeds` column); the base model is "
           "deterministic (one run). A verdict calls a difference real only when it exceeds two standard errors.", ""]
    md += [f"## Claim (a): target domain ({target} accuracy %)", "", target_table(plan, table, target), ""]
    md += ["## Claim (b): retention of the source domain", "", retention_table(plan, table, retention), ""]
    md += ["## Claim (c): which entries a sparse method trains", "", "Same budget (5% of every linear layer), different masks: LIFT's (largest entries of the rank-r approximation), "
           "the released code's (`--select smallest`), the largest |W| (magnitude), uniformly random.", "", ablation_table(plan, table, target, retention), ""]
    md += ["## Verdicts, computed from the tables", ""]
    for claim, lines in v:
        md.append(f"- {claim}:")
        md += [f"  - {line}" for line in lines]
    md += ["", "## Learning rates (chosen on the validation split, first seed)", "", lr_table(plan, table), ""]
    md += ["## Figures", "", "![gain vs retention](gain_vs_retention.svg)", "", "![accuracy per set](accuracy_per_set.svg)", ""]
    (results / "results.md").write_text("\n".join(md))


if __name__ == "__main__":
    d = Path(sys.argv[1])
    p = json.loads((d / "plan.json").read_text())
    p["results"] = d
    write(p, {})
