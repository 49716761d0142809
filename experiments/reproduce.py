#!/usr/bin/env python3
"""The paper's comparison, run as a plan: fine-tune with every method and
several seeds, evaluate the target domain (math) and the source domain
(commonsense, general text), and write the report.

    python3 experiments/reproduce.py --plan experiments/plans/quick.json
    python3 experiments/reproduce.py --plan experiments/plans/cpu.json --only-seed 0

Every step is a call of ./lift (train, eval); this script only decides what
to run, skips what is done, and aggregates. A plan's results live in one
directory (the plan's "results", or --results):

    data/                 the training/validation split and the general text (not committed)
    runs/<method>/lr<lr>-s<seed>/
        train.log         lift's output
        options.json      the flags of the run
        metrics.jsonl     loss per step (lift's)
        loss.svg          the loss curve (lift's)
        summary.json      trainable values, optimizer-state bytes, wall time (lift's)
        val.json          the validation loss (the learning-rate choice reads it)
        eval_<name>.json  `lift eval --json` of each evaluation
        preds/<name>/     predictions per set (not committed)
        results.json      all of the above in one object: the run is finished
    results.json, results.md, *.svg   the report (experiments/report.py)

A run is finished when its results.json exists; a rerun skips it. A run cut
off during training continues from its state.bin (lift --resume). Ctrl-C
stops after lift has saved its state.
"""

import argparse
import hashlib
import json
import os
import random
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
import report  # noqa: E402

ROOT = Path(__file__).resolve().parent.parent


def file_sha(path):
    return hashlib.sha256(Path(path).read_bytes()).hexdigest()[:16]


# The binary that ran: a plan run in pieces may span commits, and results.json
# records both the commit and this.
LIFT_SHA = file_sha(ROOT / "lift") if (ROOT / "lift").exists() else None

# The methods a plan may name: lift's --method, and "base" (no training).
LIFT_METHODS = {"lift", "full", "lora", "dora", "pissa", "s2ft", "magnitude", "random"}


class PlanError(Exception):
    pass


# ----------------------------------------------------------------------------
# The plan


def load_plan(path, results_override=None):
    """Reads and checks a plan; every problem is found before any run starts."""
    try:
        plan = json.loads(Path(path).read_text())
    except (OSError, json.JSONDecodeError) as e:
        raise PlanError(f"{path}: {e}")
    for key in ["name", "model", "train_data", "train_examples", "val_examples", "seeds", "methods", "evals"]:
        if key not in plan:
            raise PlanError(f"{path}: no \"{key}\"")
    plan["results"] = Path(results_override or plan.get("results", f"out/reproduce-{plan['name']}"))
    check_files(plan, path)
    for label, m in plan["methods"].items():
        method = m.get("method", label)
        if method != "base" and method not in LIFT_METHODS:
            known = ", ".join(sorted(LIFT_METHODS | {"base"}))
            raise PlanError(f"{path}: method \"{label}\" is \"{method}\", not one of {known}")
        if method != "base" and not m.get("lr_grid"):
            raise PlanError(f"{path}: method \"{label}\" has no lr_grid")
    if "base" not in plan["methods"]:
        raise PlanError(f"{path}: the methods need \"base\" (the model before training): the gains are measured from it")
    return plan


def check_files(plan, path):
    """The model, the training data and every evaluation set exist."""
    for key in ["model", "train_data"]:
        if not (ROOT / plan[key]).exists():
            raise PlanError(f"{path}: {key} {plan[key]} does not exist")
    for name, ev in plan["evals"].items():
        if ev.get("source") == "pydoc":
            continue
        for f in ev["files"]:
            if not (ROOT / f).exists():
                raise PlanError(f"{path}: evaluation \"{name}\": data set {f} does not exist")


# ----------------------------------------------------------------------------
# Data: the split and the general text


def prepare_data(plan):
    """data/train.json and data/val.json: a seeded sample of the training
    file, the validation examples disjoint from the training ones; and the
    general text for the evals that ask for it."""
    d = plan["results"] / "data"
    d.mkdir(parents=True, exist_ok=True)
    examples = json.loads((ROOT / plan["train_data"]).read_text())
    n_train, n_val = plan["train_examples"], plan["val_examples"]
    if n_train + n_val > len(examples):
        raise PlanError(f"train_examples + val_examples = {n_train + n_val} > {len(examples)} in {plan['train_data']}")
    order = list(range(len(examples)))
    random.Random(plan.get("split_seed", 0)).shuffle(order)
    write_json(d / "val.json", [examples[i] for i in order[:n_val]])
    write_json(d / "train.json", [examples[i] for i in order[n_val : n_val + n_train]])
    for name, ev in plan["evals"].items():
        if ev.get("source") == "pydoc":
            write_general_text(d / f"{name}.jsonl", ev["examples"])


def write_general_text(path, n):
    """General English prose the base model reads well and no method trains
    on: paragraphs of the Python documentation that ships with CPython
    (pydoc_data.topics), the first `n` prose paragraphs in topic order. Each
    becomes {"instruction": its first 8 words, "output": the rest}, read with
    --template plain: the loss is that of the continuation."""
    import pydoc_data.topics as t

    rows = []
    for key in sorted(t.topics):
        for para in t.topics[key].split("\n\n"):
            lines = para.split("\n")
            if any(l.startswith(" ") or l.startswith("*") or l.startswith("=") for l in lines):
                continue  # code, lists, headings
            words = " ".join(lines).split()
            if len(words) < 40 or len(words) > 160:
                continue
            rows.append({"instruction": " ".join(words[:8]), "output": " " + " ".join(words[8:])})
            if len(rows) == n:
                break
        if len(rows) == n:
            break
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))


def write_json(path, value):
    tmp = path.with_suffix(path.suffix + ".tmp")
    tmp.write_text(json.dumps(value, indent=1) + "\n")
    tmp.replace(path)


# ----------------------------------------------------------------------------
# Running lift


class Stop(Exception):
    pass


def lift(args, log):
    """Runs ./lift with `args`, its output appended to `log`; raises Stop on
    Ctrl-C (after lift has saved and exited) and RuntimeError on failure."""
    cmd = [str(ROOT / "lift")] + [str(a) for a in args]
    with open(log, "a") as f:
        f.write("$ " + " ".join(cmd) + "\n")
        f.flush()
        # Its own session: a Ctrl-C reaches this script only, which passes
        # it on once (a second one would make lift quit without saving).
        p = subprocess.Popen(cmd, cwd=ROOT, stdout=subprocess.PIPE, stderr=f, text=True, start_new_session=True, preexec_fn=default_sigint)
        try:
            out, _ = p.communicate()
        except KeyboardInterrupt:
            p.send_signal(signal.SIGINT)  # lift saves its state and exits
            p.wait()
            raise Stop()
    if p.returncode == 130 or p.returncode == -signal.SIGINT:
        raise Stop()
    if p.returncode != 0:
        tail = Path(log).read_text().strip().splitlines()[-1:]
        raise RuntimeError(f"lift {args[0] if args else ''} failed (exit {p.returncode}): {' '.join(tail)} (log: {log})")
    return out


def default_sigint():
    """In the child: SIGINT does what it does by default (a shell that
    starts a job in the background makes it ignored, and children inherit
    that); lift train installs its own handler over it."""
    signal.signal(signal.SIGINT, signal.SIG_DFL)


def stop_on_signals():
    """Ctrl-C, `kill -INT` and `kill` (TERM) all stop the plan cleanly,
    even when the shell started this script with SIGINT ignored."""
    signal.signal(signal.SIGINT, signal.default_int_handler)
    signal.signal(signal.SIGTERM, signal.default_int_handler)


def threads_args(plan):
    return ["--threads", plan["threads"]] if plan.get("threads") else []


def trained(rundir):
    """A run's training is done when its summary says so and its model.bin is
    still there (the weights are not committed: a fresh clone that has a
    finished run's summary but not its evaluations trains it again)."""
    summary = rundir / "summary.json"
    if not summary.exists() or not (rundir / "model.bin").exists():
        return False
    return not json.loads(summary.read_text())["interrupted"]


def train(plan, label, lr, seed, rundir):
    """Trains one run (or continues it from its state.bin); returns its
    summary.json."""
    m = plan["methods"][label]
    summary = rundir / "summary.json"
    if trained(rundir):
        return json.loads(summary.read_text())
    rundir.mkdir(parents=True, exist_ok=True)
    d = plan["results"] / "data"
    args = ["train", "--checkpoint", plan["model"], "--data", d / "train.json", "--out", rundir]
    args += ["--method", m.get("method", label), "--lr", lr, "--seed", seed, "--val-size", "0"]
    args += plan.get("train_flags", []) + m.get("flags", []) + threads_args(plan)
    same_as_before(rundir / "options.json", args)
    write_json(rundir / "options.json", {"lift_args": [str(a) for a in args]})
    if (rundir / "state.bin").exists():
        args += ["--resume", rundir]
    lift(args, rundir / "train.log")
    result = json.loads(summary.read_text())
    if result["interrupted"]:
        raise Stop()
    return result


def val_loss(plan, rundir):
    """The mean target loss on the validation split (cached in val.json)."""
    path = rundir / "val.json"
    if not path.exists():
        args = ["eval", "--checkpoint", rundir / "model.bin", "--data", plan["results"] / "data" / "val.json"]
        args += ["--no-generate", "--json"] + threads_args(plan)
        write_json(path, json.loads(lift(args, rundir / "eval.log")))
    return json.loads(path.read_text())["loss"]


def evaluate(plan, checkpoint, rundir):
    """Every evaluation of the plan on one model; eval_<name>.json each."""
    out = {}
    for name, ev in plan["evals"].items():
        path = rundir / f"eval_{name}.json"
        args = ["eval", "--checkpoint", checkpoint, "--json", "--out", rundir / "preds" / name]
        if ev.get("source") == "pydoc":
            args += ["--data", plan["results"] / "data" / f"{name}.jsonl"]
        else:
            args += ["--data"] + ev["files"]
        args += ev.get("flags", []) + threads_args(plan)
        # An evaluation made with other flags (the plan was edited) is redone.
        if not path.exists() or json.loads(path.read_text()).get("lift_args") != [str(a) for a in args]:
            result = json.loads(lift(args, rundir / "eval.log"))
            write_json(path, {**result, "lift_args": [str(a) for a in args]})
        out[name] = json.loads(path.read_text())
    return out


def same_as_before(options, args):
    """A run directory continued or reused must come from the same flags:
    a plan edited after some of its runs finished would mix two protocols."""
    if options.exists():
        before = json.loads(options.read_text())["lift_args"]
        if before != [str(a) for a in args]:
            raise PlanError(f"{options.parent} was trained with other flags ({' '.join(before)}); delete it to rerun with the plan's")


def finish_run(plan, label, lr, seed, rundir, summary, chosen):
    """results.json: the run in one object; weights and state are removed
    (unless the plan keeps them)."""
    result = {
        "plan": plan["name"],
        "label": label,
        "method": plan["methods"][label].get("method", label),
        "flags": plan["methods"][label].get("flags", []),
        "lr": lr,
        "seed": seed,
        "lr_choice": chosen,
        "train": summary,
        "evals": evaluate(plan, rundir / "model.bin" if summary else plan["model"], rundir),
        "commit": git_commit(),
        "lift_sha256": LIFT_SHA,
        "protocol": protocol(plan, label),
    }
    write_json(rundir / "results.json", result)
    drop_weights(plan, rundir)


def protocol(plan, label, grid=None):
    """A digest of everything a run's numbers depend on besides its lr and
    seed: a finished run from an edited plan is not silently reused. The
    lr grid is not part of it (a run's numbers depend on its own lr), so a
    grid can be extended and its finished runs kept. `grid` gives the
    digest of runs made before that rule (it then included the grid)."""
    m = dict(plan["methods"][label])
    if grid is None:
        m.pop("lr_grid", None)
    else:
        m["lr_grid"] = grid
    keys = ["model", "evals"] if m.get("method", label) == "base" else ["model", "evals", "train_data", "train_examples", "val_examples", "split_seed", "train_flags"]
    what = {k: plan.get(k) for k in keys} | {"method": m}
    return hashlib.sha256(json.dumps(what, sort_keys=True).encode()).hexdigest()[:16]


def finished(plan, label, rundir):
    """Whether the run's results.json exists (and comes from this plan)."""
    f = rundir / "results.json"
    if not f.exists():
        return False
    r = json.loads(f.read_text())
    ok = r.get("protocol") == protocol(plan, label)
    if not ok:  # made before the grid left the digest: its own grid, or the plan's
        grids = [(r.get("lr_choice") or {}).get("grid"), plan["methods"][label].get("lr_grid")]
        ok = any(g is not None and r.get("protocol") == protocol(plan, label, g) for g in grids)
    if not ok:
        raise PlanError(f"{rundir} comes from another version of the plan (its flags or sizes differ); delete it to rerun it")
    return True


def drop_weights(plan, rundir):
    if plan.get("keep_models"):
        return
    for f in ["model.bin", "state.bin"]:
        (rundir / f).unlink(missing_ok=True)


def git_commit():
    """HEAD when the run finished (the binary may be older: see LIFT_SHA)."""
    try:
        return subprocess.run(["git", "rev-parse", "--short", "HEAD"], cwd=ROOT, capture_output=True, text=True).stdout.strip()
    except OSError:
        return "unknown"


# ----------------------------------------------------------------------------
# The plan's steps, in order


def run_dir(plan, label, lr, seed):
    return plan["results"] / "runs" / label / (f"lr{lr:g}-s{seed}" if lr is not None else "untrained")


def steps(plan, only_seed=None, only_method=None):
    """The plan as a list of (what, label, seed): seed by seed, and within a
    seed method by method, so that a plan cut short has whole seeds."""
    out = []
    for seed in plan["seeds"]:
        if only_seed is not None and seed != only_seed:
            continue
        for label, m in plan["methods"].items():
            if only_method is not None and label != only_method:
                continue
            if m.get("method", label) == "base":
                if seed == plan["seeds"][0]:
                    out.append(("base", label, seed))
            elif seed == plan["seeds"][0]:
                out.append(("grid", label, seed))
            else:
                out.append(("seed", label, seed))
    return out


def choose_lr(plan, label, progress):
    """Trains the grid at the first seed, picks the learning rate with the
    lowest validation loss (the smaller on a tie); the losers' weights are
    removed. Returns (lr, {lr: val loss})."""
    m, seed = plan["methods"][label], plan["seeds"][0]
    losses = {}
    for lr in m["lr_grid"]:
        rundir = run_dir(plan, label, lr, seed)
        done = rundir / "val.json"
        if not done.exists():
            progress.say(f"train {label} lr {lr:g} seed {seed} (grid)")
            train(plan, label, lr, seed, rundir)
            losses[lr] = val_loss(plan, rundir)
            progress.done += 1
        losses[lr] = val_loss(plan, rundir)
    best = min(m["lr_grid"], key=lambda lr: (losses[lr], lr))
    for lr in m["lr_grid"]:
        if lr != best:
            drop_weights(plan, run_dir(plan, label, lr, seed))
    return best, {f"{lr:g}": losses[lr] for lr in m["lr_grid"]}


def chosen_lr(plan, label):
    """The learning rate the grid chose: the lowest validation loss over
    every lr of the grid (the smaller on a tie), once each has its val.json
    and the chosen one its results. None while any of that is missing (a
    grid extended by the plan is then trained further)."""
    seed, grid = plan["seeds"][0], plan["methods"][label]["lr_grid"]
    if not all((run_dir(plan, label, lr, seed) / "val.json").exists() for lr in grid):
        return None
    best = min(grid, key=lambda lr: (val_loss(plan, run_dir(plan, label, lr, seed)), lr))
    return best if finished(plan, label, run_dir(plan, label, best, seed)) else None


def supersede(plan, label, best):
    """Earlier choices of an extended grid: their results.json is renamed
    (results-superseded.json), so the report and the later seeds see only
    the new choice; a still-chosen run gets the extended grid's record."""
    seed, grid = plan["seeds"][0], plan["methods"][label]["lr_grid"]
    for lr in grid:
        f = run_dir(plan, label, lr, seed) / "results.json"
        if lr != best and f.exists():
            f.rename(f.with_name("results-superseded.json"))


def do_step(plan, what, label, seed, progress):
    if what == "base":
        rundir = run_dir(plan, label, None, seed)
        if not finished(plan, label, rundir):
            progress.say(f"evaluate {label} (untrained)")
            rundir.mkdir(parents=True, exist_ok=True)
            finish_run(plan, label, None, seed, rundir, None, None)
        return
    if what == "grid":
        if chosen_lr(plan, label) is not None:
            return
        lr, losses = choose_lr(plan, label, progress)
        chosen = {"grid": plan["methods"][label]["lr_grid"], "val_loss": losses, "chosen": lr}
        supersede(plan, label, lr)
        f = run_dir(plan, label, lr, seed) / "results.json"
        if f.exists():  # chosen before the grid was extended, and still chosen
            r = json.loads(f.read_text())
            write_json(f, r | {"lr_choice": chosen, "protocol": protocol(plan, label)})
            return
    else:
        lr = chosen_lr(plan, label)
        if lr is None:
            progress.say(f"skip {label} seed {seed}: its learning rate is not chosen yet (run seed {plan['seeds'][0]} first)")
            return
        chosen = None
    rundir = run_dir(plan, label, lr, seed)
    if finished(plan, label, rundir):
        return
    if not trained(rundir):
        progress.say(f"train {label} lr {lr:g} seed {seed}")
    summary = train(plan, label, lr, seed, rundir)
    progress.say(f"evaluate {label} lr {lr:g} seed {seed}")
    finish_run(plan, label, lr, seed, rundir, summary, chosen)


class Progress:
    """One line per step, with the plan's progress and an ETA from the
    speed so far (runs already finished before this start count as done)."""

    def __init__(self, total_runs, done_runs):
        self.total, self.done0, self.start = total_runs, done_runs, time.time()
        self.done = done_runs

    def say(self, what):
        el = time.time() - self.start
        new = self.done - self.done0
        eta = "ETA unknown" if new == 0 else "ETA " + hms(el / new * (self.total - self.done))
        print(f"[{self.done}/{self.total} runs | {hms(el)} elapsed | {eta}] {what}", flush=True)


def hms(s):
    s = int(s)
    return f"{s // 3600}h{s % 3600 // 60:02d}m" if s >= 3600 else f"{s // 60}m{s % 60:02d}s"


def count_runs(plan, step_list):
    """(all runs, finished runs) of the steps: a grid counts its lr values."""
    total = done = 0
    for what, label, seed in step_list:
        m = plan["methods"][label]
        n = len(m["lr_grid"]) if what == "grid" else 1
        total += n
        if what == "grid":
            done += sum((run_dir(plan, label, lr, seed) / "val.json").exists() for lr in m["lr_grid"])
        elif what == "base":
            done += finished(plan, label, run_dir(plan, label, None, seed))
        else:
            lr = chosen_lr(plan, label)
            done += lr is not None and finished(plan, label, run_dir(plan, label, lr, seed))
    return total, done


def main():
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--plan", required=True, help="a plan file (experiments/plans/*.json)")
    ap.add_argument("--results", help="the results directory (default: the plan's \"results\")")
    ap.add_argument("--only-seed", type=int, help="run only this seed's runs (a piece of the plan)")
    ap.add_argument("--only-method", help="run only this method's runs")
    ap.add_argument("--report-only", action="store_true", help="write the report from the finished runs; train nothing")
    a = ap.parse_args()
    stop_on_signals()
    try:
        plan = load_plan(a.plan, a.results)
        if a.only_method is not None and a.only_method not in plan["methods"]:
            raise PlanError(f"--only-method {a.only_method}: not a method of the plan ({', '.join(plan['methods'])})")
        if not (ROOT / "lift").exists():
            raise PlanError("no ./lift: run `make` first")
    except PlanError as e:
        sys.exit(f"error: {e}")
    plan["results"].mkdir(parents=True, exist_ok=True)
    shutil.copy(a.plan, plan["results"] / "plan.json")
    if not a.report_only:
        step_list = steps(plan, a.only_seed, a.only_method)
        try:
            prepare_data(plan)
            progress = Progress(*count_runs(plan, step_list))
            for what, label, seed in step_list:
                do_step(plan, what, label, seed, progress)
                progress.done = count_runs(plan, step_list)[1]
        except (Stop, KeyboardInterrupt):
            print("stopped; run the same command again to continue", flush=True)
            sys.exit(130)
        except (RuntimeError, PlanError) as e:
            sys.exit(f"error: {e}")
        progress.say("all runs finished")
    data_info = {"general_text_sha256": {}, "python": sys.version.split()[0]}
    for name, ev in plan["evals"].items():
        f = plan["results"] / "data" / f"{name}.jsonl"
        if ev.get("source") == "pydoc" and f.exists():
            data_info["general_text_sha256"][name] = file_sha(f)
    report.write(plan, data_info)
    print(f"report: {plan['results'] / 'results.md'}")


if __name__ == "__main__":
    main()
