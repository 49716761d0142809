#!/usr/bin/env python3
"""`make bench`: lift against PyTorch on the CPU, same model shape, same work,
same thread count, run alternately so that both see the same machine.

    python3 tests/bench/cpu_bench.py [--threads 2] [--rounds 3] [--steps 3]
                                     [--checkpoint models/smollm2-135m-instruct.bin] [--quick]

It prints, for SmolLM2-135M at seq 256, batch 1:
  1. a LIFT training step: ms per step (forward, backward, optimizer, amortized
     mask refresh), tokens/s and peak resident memory, lift and PyTorch, and
     their ratio (medians over the rounds);
  2. the same for the `full` method (dense AdamW);
  3. a forward-only pass (evaluation);
  4. scaling: lift's LIFT step time at seq 128/256/512/1024, on 1 and 2 threads;
  5. mask selection for all 210 linear matrices: exact SVD vs randomized;
  6. generation on the real SmolLM2-135M-Instruct (models/, `make model`):
     the same prompts (the first --gen-batch problems of GSM8K's test set from
     ../shared/datasets, the evaluation workload, or of data/math_test.json
     where that is missing; the alpaca template) as one batch, greedy and 4 beams, at most
     --gen-tokens new tokens, lift (`lift bench --generate`) against
     transformers' generate() (tests/bench/torch_generate.py, left padding, on
     lift's weights exported with `lift export --format hf`): milliseconds
     per batch, their ratio, lift's prefill and decode tokens/s, and whether
     both produced the same tokens. `--generation-only` runs just this.
PyTorch is transformers' LlamaForCausalLM in f32 with SDPA attention and the
same sparse AdamW (tests/bench/torch_lift.py). torch and transformers are
installed into .venv-bench/ on first use (a few minutes; not part of CI).
"""
import argparse
import json
import os
import statistics
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
VENV = ROOT / ".venv-bench"
PY = VENV / "bin" / "python"
LIFT = ROOT / "lift"


def ensure_torch():
    ok = PY.exists() and subprocess.run([str(PY), "-c", "import torch, transformers"],
                                        capture_output=True).returncode == 0
    if ok:
        return
    print("installing torch and transformers into .venv-bench (first run only)...", file=sys.stderr)
    subprocess.run([sys.executable, "-m", "venv", str(VENV)], check=True)
    subprocess.run([str(PY), "-m", "pip", "install", "--quiet", "torch", "transformers"], check=True)


def run_json(cmd, env=None):
    out = subprocess.run(cmd, capture_output=True, text=True, env=env)
    if out.returncode != 0:
        sys.exit(f"failed: {' '.join(map(str, cmd))}\n{out.stderr[-2000:]}")
    return json.loads(out.stdout.strip().splitlines()[-1])


def lift_bench(args, threads, extra):
    cmd = [str(LIFT), "bench", "--device", "cpu", "--threads", str(threads), *extra]
    if args.checkpoint:
        cmd += ["--checkpoint", args.checkpoint]
    return run_json(cmd)


def torch_bench(threads, extra):
    env = dict(os.environ, OMP_NUM_THREADS=str(threads), MKL_NUM_THREADS=str(threads))
    return run_json([str(PY), str(ROOT / "tests/bench/torch_lift.py"), "--device", "cpu",
                     "--threads", str(threads), *extra], env)


KEYS = [("step_ms", "step (ms)"), ("forward_ms", "forward (ms)"), ("backward_ms", "backward (ms)"),
        ("optimizer_ms", "optimizer (ms)"), ("mask_ms", "mask refresh (ms/step)"),
        ("tokens_per_s", "tokens/s"), ("peak_mem_bytes", "peak memory (MiB)")]


def table(title, lifts, torches):
    print(f"\n{title}")
    print(f"{'':26s} {'lift':>12s} {'pytorch':>12s} {'lift/pytorch':>13s}")
    for key, name in KEYS:
        a = [r[key] for r in lifts if r.get(key) is not None]
        b = [r[key] for r in torches if r.get(key) is not None]
        if not a or not b:
            continue
        ma, mb = statistics.median(a), statistics.median(b)
        if key == "peak_mem_bytes":
            ma, mb = ma / 2**20, mb / 2**20
        ratio = f"{ma / mb:13.2f}" if mb else f"{'-':>13s}"
        print(f"{name:26s} {ma:12.1f} {mb:12.1f} {ratio}")
    print(f"(medians of {len(lifts)} alternating runs each; {lifts[0]['device']})")


DATA = ROOT.parent / "shared" / "datasets" / "math" / "math_train_3k.json"
SMOL = ROOT / "models" / "smollm2-135m-instruct.bin"


def real_data(a):
    """LIFT on the first 256 examples of math_train_3k (batch 8): lift packed
    and padded against PyTorch padded to the longest in each batch, on the
    same token ids (lift writes them), in the same run."""
    if not DATA.exists() or not SMOL.exists():
        print(f"\n== real data: skipped ({DATA} or {SMOL} missing; make model)")
        return
    ex = Path("/tmp/lift-bench-examples.jsonl")
    base = ["--data", str(DATA), "--limit", str(a.real_limit), "--batch", "8", "--seq", "512", "--method", "lift"]
    rows = {"lift packed": [], "lift --no-pack": [], "pytorch padded": []}
    for _ in range(1 if a.quick else 2):
        rows["lift packed"].append(run_json([str(LIFT), "bench", "--device", "cpu", "--threads", str(a.threads),
                                             "--checkpoint", str(SMOL), *base, "--save-examples", str(ex)]))
        rows["lift --no-pack"].append(run_json([str(LIFT), "bench", "--device", "cpu", "--threads", str(a.threads),
                                                "--checkpoint", str(SMOL), *base, "--no-pack"]))
        rows["pytorch padded"].append(torch_bench(a.threads, ["--config", "smollm2-135m", "--method", "lift",
                                                              "--batch", "8", "--examples", str(ex)]))
    ref = statistics.median(r["examples_per_s"] for r in rows["pytorch padded"])
    print(f"\n== real data: LIFT on the first {a.real_limit} examples of math_train_3k.json, batch 8, "
          f"{a.threads} threads")
    print(f"{'':18s} {'examples/s':>11s} {'target tok/s':>13s} {'positions':>10s} {'steps':>6s} {'vs pytorch':>11s}")
    for name, rs in rows.items():
        eps = statistics.median(r["examples_per_s"] for r in rs)
        tts = statistics.median(r["target_tokens_per_s"] for r in rs)
        print(f"{name:18s} {eps:11.2f} {tts:13.1f} {rs[0]['positions']:10d} {rs[0]['steps']:6d} {eps / ref:11.2f}")


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--rounds", type=int, default=3, help="alternating lift/pytorch runs per table")
    ap.add_argument("--steps", type=int, default=3, help="timed steps per run (after 1 warm-up)")
    ap.add_argument("--checkpoint", help="a real model.bin for lift (PyTorch uses a random model of its shape)")
    ap.add_argument("--quick", action="store_true", help="one round, and no scaling or mask tables")
    ap.add_argument("--real-limit", type=int, default=256, help="examples of math_train_3k in the real-data row")
    ap.add_argument("--generation-only", action="store_true", help="only the generation table")
    ap.add_argument("--real-data-only", action="store_true", help="only the real-data table")
    ap.add_argument("--gen-batch", type=int, default=16, help="prompts per generation batch")
    ap.add_argument("--gen-tokens", type=int, default=128, help="new tokens per prompt at most")
    a = ap.parse_args()
    if not LIFT.exists():
        sys.exit("./lift is missing: run make first")
    ensure_torch()
    rounds = 1 if a.quick else a.rounds
    if a.generation_only:
        generation(a, rounds)
        return
    if a.real_data_only:
        real_data(a)
        return
    shape = ["--config", "smollm2-135m", "--seq", "256", "--batch", "1",
             "--steps", str(a.steps), "--warmup", "1"]
    for method in ["lift", "full"]:
        lifts, torches = [], []
        for _ in range(rounds):
            lifts.append(lift_bench(a, a.threads, shape + ["--method", method]))
            torches.append(torch_bench(a.threads, shape + ["--method", method]))
        table(f"== {method} training step, SmolLM2-135M, seq 256, batch 1, {a.threads} threads", lifts, torches)

    real_data(a)

    lifts, torches = [], []
    for _ in range(rounds):
        lifts.append(lift_bench(a, a.threads, shape + ["--forward-only"]))
        torches.append(torch_bench(a.threads, shape + ["--forward-only"]))
    table(f"== forward only (evaluation), SmolLM2-135M, seq 256, batch 1, {a.threads} threads", lifts, torches)
    if a.quick:
        return

    print("\n== scaling: lift's LIFT step (ms) by sequence length and threads")
    print(f"{'seq':>6s} {'1 thread':>10s} {'2 threads':>10s} {'speed-up':>9s}")
    for seq in [128, 256, 512, 1024]:
        ms = []
        for th in [1, 2]:
            r = lift_bench(a, th, ["--config", "smollm2-135m", "--seq", str(seq), "--batch", "1",
                                   "--steps", "2", "--warmup", "1", "--method", "lift"])
            ms.append(r["step_ms"])
        print(f"{seq:6d} {ms[0]:10.0f} {ms[1]:10.0f} {ms[0] / ms[1]:9.2f}")

    print("\n== mask selection, all 210 linear matrices of SmolLM2-135M (filter rank 128, density 5%)")
    for svd in ["exact", "randomized"]:
        r = lift_bench(a, a.threads, ["--config", "smollm2-135m", "--method", "lift", "--mask-only", "--svd", svd])
        print(f"{svd:11s} {r['mask_total_ms'] / 1e3:7.1f} s")
    generation(a, rounds)


def generation(a, rounds):
    """Table 6: lift and transformers generating for the same batch, alternately."""
    model = Path(a.checkpoint) if a.checkpoint else ROOT / "models" / "smollm2-135m-instruct.bin"
    if not model.exists():
        print(f"\n== generation: skipped, {model} is missing (make model)")
        return
    hf = ROOT / "target" / "bench-hf"
    if not (hf / "model.safetensors").exists() or hf.stat().st_mtime < model.stat().st_mtime:
        subprocess.run([str(LIFT), "export", "--checkpoint", str(model), "--format", "hf", "-o", str(hf)],
                       check=True, capture_output=True)
    prompts = ROOT / "target" / "bench-prompts.json"
    data = ROOT.parent / "shared" / "datasets" / "math" / "gsm8k_test.json"
    if not data.exists():
        data = ROOT / "data" / "math_test.json"
    print(f"\n== generation, {model.name}, {a.gen_batch} prompts of {data.name} as one batch, "
          f"at most {a.gen_tokens} new tokens, {a.threads} threads (ms per batch, medians of {rounds} alternating runs)")
    print(f"{'':10s} {'lift':>9s} {'pytorch':>9s} {'lift/pytorch':>13s} {'prefill tok/s':>14s} "
          f"{'decode tok/s':>13s} {'new tokens':>11s} {'same tokens':>12s}")
    for label, beams in [("greedy", 1), ("4 beams", 4)]:
        lifts, torches = [], []
        for _ in range(rounds):
            lifts.append(run_json([str(LIFT), "bench", "--generate", "--threads", str(a.threads), "--checkpoint",
                                   str(model), "--data", str(data), "--batch",
                                   str(a.gen_batch), "--max-new-tokens", str(a.gen_tokens), "--num-beams",
                                   str(beams), "--warmup", "0", "--steps", "1"]))
            prompts.write_text(json.dumps(lifts[-1]["prompt_ids"]))
            env = dict(os.environ, OMP_NUM_THREADS=str(a.threads), MKL_NUM_THREADS=str(a.threads))
            torches.append(run_json([str(PY), str(ROOT / "tests/bench/torch_generate.py"), "--model", str(hf),
                                     "--prompts", str(prompts), "--num-beams", str(beams), "--max-new-tokens",
                                     str(a.gen_tokens), "--threads", str(a.threads), "--warmup", "0",
                                     "--steps", "1"], env))
        ml = statistics.median(r["total_ms"] for r in lifts)
        mt = statistics.median(r["total_ms"] for r in torches)
        same = sum(x == y for x, y in zip(lifts[-1]["new_ids"], torches[-1]["new_ids"]))
        pre = statistics.median(r["prefill_tokens_per_s"] for r in lifts)
        dec = statistics.median(r["decode_tokens_per_s"] for r in lifts)
        print(f"{label:10s} {ml:9.0f} {mt:9.0f} {ml / mt:13.2f} {pre:14.0f} {dec:13.1f} "
              f"{lifts[-1]['generated_tokens']:11d} {same:>5d}/{a.gen_batch:<6d}")
    print(f"(prompt tokens: {lifts[-1]['prefill_tokens']} in all; decode tok/s counts every beam's row)")


if __name__ == "__main__":
    main()
