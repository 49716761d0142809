#!/usr/bin/env python3
"""The checks of tests/gpu/run_all.sh that read what `lift train` and
`lift bench` wrote. Each prints its numbers and a PASS or FAIL line (exit
status 1 on FAIL).

  lora-rank BASE_HF TRAINED_HF R
      Two `lift export --format hf` directories (f32): every linear weight of
      the trained model must differ from the base by a matrix of rank <= R
      (sigma_{R+1} / sigma_1 < 1e-3, the merge being f32: W + (alpha/r) B A)
      that is not zero (the adapters were merged), and every other tensor must
      be bit-identical. Singular values by numpy, else torch (float64).

  interrupt AT -- CMD...
      Runs CMD, and sends SIGINT (Ctrl-C) once it reports step AT ("step AT/"
      on stderr), as tests/train.rs does; passes when the run says
      "interrupted at step N" with AT <= N and exits 0.

  compare WHOLE_DIR CUT_DIR TOL [KEYS]
      metrics.jsonl of an uninterrupted run and of the interrupted-and-resumed
      one: the same steps, and KEYS (default loss,grad_norm,val_loss,lr,tokens)
      equal within a relative TOL; says whether they are bit-identical, and
      whether the two model.bin files are.

  recompute RESULTS
      The last two `lift bench` JSON lines in RESULTS with recompute false
      and true: peak memory and step time of each, and their ratio.
"""
import json, os, signal, struct, subprocess, sys


def fail(msg):
    print(f"FAIL: {msg}")
    sys.exit(1)


def read_safetensors(path):
    b = open(path, "rb").read()
    n = struct.unpack("<Q", b[:8])[0]
    header = json.loads(b[8 : 8 + n])
    out = {}
    for name, t in header.items():
        if name == "__metadata__":
            continue
        if t["dtype"] != "F32":
            fail(f"{path}: {name} is {t['dtype']}, export with --dtype f32")
        s, e = t["data_offsets"]
        out[name] = (t["shape"], b[8 + n + s : 8 + n + e])
    return out


def singular_values(rows, cols, base, trained):
    """sigma of (trained - base) as f64, (rows, cols) row-major f32 bytes."""
    try:
        import numpy as np

        d = np.frombuffer(trained, dtype="<f4").astype(np.float64) - np.frombuffer(base, dtype="<f4").astype(np.float64)
        return list(np.linalg.svd(d.reshape(rows, cols), compute_uv=False))
    except ImportError:
        import torch

        t = lambda x: torch.frombuffer(bytearray(x), dtype=torch.float32).to(torch.float64)
        return torch.linalg.svdvals((t(trained) - t(base)).reshape(rows, cols)).tolist()


def lora_rank(base_dir, trained_dir, r):
    base = read_safetensors(os.path.join(base_dir, "model.safetensors"))
    trained = read_safetensors(os.path.join(trained_dir, "model.safetensors"))
    worst, weakest, n_linear = 0.0, float("inf"), 0
    for name, (shape, b) in base.items():
        t = trained[name][1]
        if not name.endswith("_proj.weight"):
            if b != t:
                fail(f"{name}: a frozen tensor changed")
            continue
        s = singular_values(shape[0], shape[1], b, t)
        if s[0] == 0.0:
            fail(f"{name}: model.bin holds the base weight (the adapters were not merged)")
        worst, weakest, n_linear = max(worst, s[r] / s[0]), min(weakest, s[0]), n_linear + 1
        if n_linear <= 2:
            print(f"{name}: sigma_1 {s[0]:.3e}, sigma_{r} {s[r - 1]:.3e}, sigma_{r + 1} {s[r]:.3e}")
    print(f"{n_linear} linear weights: W' - W has sigma_1 >= {weakest:.3e}, worst sigma_{r + 1} / sigma_1 = {worst:.2e}")
    if worst >= 1e-3:
        fail(f"an update has rank above {r}")
    print(f"PASS: every merged update has rank <= {r}; every other tensor is bit-identical")


def interrupt(at, cmd):
    p = subprocess.Popen(cmd, stderr=subprocess.PIPE, stdout=subprocess.DEVNULL, text=True, bufsize=1)
    sent, stopped = False, None
    for line in p.stderr:
        sys.stdout.write(line)
        if not sent and line.startswith(f"step {at}/"):
            p.send_signal(signal.SIGINT)
            sent = True
        if line.startswith("interrupted at step "):
            stopped = int(line.split()[3].rstrip(":"))
    rc = p.wait()
    if not sent:
        fail(f"the run never reported step {at}")
    if rc != 0 or stopped is None:
        fail(f"the run was not interrupted cleanly (exit {rc}; finished before the signal arrived?)")
    print(f"PASS: SIGINT at step {at}, the run saved its state and stopped at step {stopped}")


def metrics(d):
    return {r["step"]: r for r in map(json.loads, open(os.path.join(d, "metrics.jsonl")))}


def compare(whole, cut, tol, keys):
    a, b = metrics(whole), metrics(cut)
    if sorted(a) != sorted(b):
        fail(f"steps differ: {sorted(a)} vs {sorted(b)}")
    worst, exact, n = 0.0, True, 0
    for s in sorted(a):
        for k in keys:
            x, y = a[s].get(k), b[s].get(k)
            if x is None and y is None:
                continue
            if x is None or y is None:
                fail(f"step {s}: {k} only in one run")
            n += 1
            exact &= x == y
            worst = max(worst, abs(x - y) / max(abs(x), 1e-30))
        if "loss" in a[s] and (s % 5 == 0 or s == 1):
            print(f"step {s:3d}  uninterrupted loss {a[s]['loss']:.6f}  resumed {b[s]['loss']:.6f}")
    same_bin = open(os.path.join(whole, "model.bin"), "rb").read() == open(os.path.join(cut, "model.bin"), "rb").read()
    print(f"{n} values over {len(a)} steps: worst relative difference {worst:.2e}; bit-identical: {'yes' if exact else 'no'}; model.bin identical: {'yes' if same_bin else 'no'}")
    if worst > tol:
        fail(f"the resumed run differs from the uninterrupted one by more than {tol}")
    print(f"PASS: resumed = uninterrupted within {tol}")


def recompute(results):
    rows = [json.loads(l) for l in open(results) if l.startswith("{")]
    keep = [r for r in rows if r.get("impl") == "lift" and "recompute" in r and not r["recompute"] and "profile" not in r]
    rec = [r for r in rows if r.get("impl") == "lift" and r.get("recompute")]
    if not keep or not rec:
        fail("no pair of benchmarks with and without --recompute")
    k, r = keep[-1], rec[-1]
    gib = 2**30
    print(f"{k['config']} seq {k['seq']} batch {k['batch']} {k['method']}:")
    print(f"  activations kept:   peak {k['peak_mem_bytes'] / gib:6.2f} GiB, step {k['step_ms']:7.1f} ms")
    print(f"  --recompute:        peak {r['peak_mem_bytes'] / gib:6.2f} GiB, step {r['step_ms']:7.1f} ms")
    print(f"  saved {(k['peak_mem_bytes'] - r['peak_mem_bytes']) / gib:.2f} GiB ({100 * (1 - r['peak_mem_bytes'] / k['peak_mem_bytes']):.0f}% of the peak) for {100 * (r['step_ms'] / k['step_ms'] - 1):.0f}% more time per step")
    if r["peak_mem_bytes"] >= k["peak_mem_bytes"]:
        fail("--recompute did not lower the peak memory")
    print("PASS: --recompute lowers the peak memory")


if __name__ == "__main__":
    a = sys.argv[1:]
    if not a:
        sys.exit(__doc__)
    if a[0] == "lora-rank":
        lora_rank(a[1], a[2], int(a[3]))
    elif a[0] == "interrupt":
        interrupt(int(a[1]), a[a.index("--") + 1 :])
    elif a[0] == "compare":
        keys = a[4] if len(a) > 4 else "loss,grad_norm,val_loss,lr,tokens"
        compare(a[1], a[2], float(a[3]), keys.split(","))
    elif a[0] == "recompute":
        recompute(a[1])
    else:
        sys.exit(__doc__)
