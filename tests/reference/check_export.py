"""Checks, by hand, that `lift export` writes models that Hugging Face reads.

Not run by CI (it needs torch and transformers). Run from the repository root
after `make` and `make model`:

    /opt/refenv/bin/python tests/reference/check_export.py [model.bin] [data.json]

model.bin defaults to models/smollm2-135m-instruct.bin (what `make model`
writes), data.json to data/math_test.json. It
1. exports the model with `lift export --format hf` and loads it with
   transformers (AutoModelForCausalLM, AutoTokenizer);
2. compares the tokenization of the test corpus with `lift tokenize`;
3. computes the mean target-token loss of the first 32 examples of data.json
   under the training template, in transformers, and compares it with
   `lift eval --no-generate --json --limit 32`;
4. exports `--format gguf` and loads that in transformers too (same loss);
and prints every figure. It exits non-zero when something disagrees.
"""
import json
import subprocess
import sys
import tempfile
from pathlib import Path

import torch
from transformers import AutoModelForCausalLM, AutoTokenizer

ROOT = Path(__file__).resolve().parents[2]
LIFT = str(ROOT / "lift")
N = 32

PREAMBLE = ("Below is an instruction that describes a task. Write a response that "
            "appropriately completes the request.\n\n")


def prompt_of(ex):
    inp = (ex.get("input") or "").strip()
    text = PREAMBLE + f"### Instruction:\n{ex['instruction']}\n\n"
    if inp:
        text += f"### Input:\n{inp}\n\n"
    return text + "### Response:\n"


def hf_loss(model, tok, examples, bos):
    """Mean cross-entropy over target tokens + EOS, prompt and target encoded apart."""
    total, count = 0.0, 0
    for ex in examples:
        p = tok(prompt_of(ex), add_special_tokens=False).input_ids
        t = tok(ex["output"], add_special_tokens=False).input_ids
        ids = ([bos] if bos is not None else []) + p + t + [tok.eos_token_id]
        n_prompt = len(ids) - len(t) - 1
        x = torch.tensor([ids])
        with torch.no_grad():
            logits = model(x).logits[0].double()
        logp = torch.log_softmax(logits[:-1], dim=-1)
        tgt = x[0, 1:]
        lp = logp[torch.arange(len(tgt)), tgt]
        sel = torch.arange(1, len(ids)) >= n_prompt
        total += float(-lp[sel].sum())
        count += int(sel.sum())
    return total / count


def run(*args):
    return subprocess.run([LIFT, *args], check=True, capture_output=True, text=True).stdout


def main():
    model_bin = sys.argv[1] if len(sys.argv) > 1 else str(ROOT / "models/smollm2-135m-instruct.bin")
    data = sys.argv[2] if len(sys.argv) > 2 else str(ROOT / "data/math_test.json")
    examples = json.load(open(data))[:N]
    ok = True
    with tempfile.TemporaryDirectory() as tmp:
        hf = Path(tmp) / "hf"
        run("export", "--checkpoint", model_bin, "--format", "hf", "-o", str(hf))
        model = AutoModelForCausalLM.from_pretrained(hf, dtype=torch.float32, attn_implementation="eager")
        tok = AutoTokenizer.from_pretrained(hf)
        bos = tok.bos_token_id if json.load(open(hf / "tokenizer_config.json")).get("add_bos_token") else None

        corpus = (ROOT / "tests/data/tokenizer_corpus.txt").read_text()
        lines = [l for l in corpus.split("\n") if l] + [corpus]
        same = sum(json.loads(run("tokenize", "--checkpoint", model_bin, "--text", s)) ==
                   tok(s, add_special_tokens=False).input_ids for s in lines)
        print(f"tokenizer.json: {same}/{len(lines)} corpus strings tokenized as lift does")
        ok &= same == len(lines)

        lift_eval = json.loads(run("eval", "--checkpoint", model_bin, "--data", data, "--limit", str(N),
                                   "--no-generate", "--json"))
        loss_hf = hf_loss(model, tok, examples, bos)
        print(f"loss on {N} examples of {Path(data).name}: lift eval {lift_eval['loss']:.6f}, "
              f"transformers (hf export) {loss_hf:.6f}, rel diff {abs(loss_hf - lift_eval['loss']) / loss_hf:.2e}")
        ok &= abs(loss_hf - lift_eval["loss"]) / loss_hf < 1e-4

        gguf = Path(tmp) / "m.gguf"
        run("export", "--checkpoint", model_bin, "--format", "gguf", "-o", str(gguf))
        model_g = AutoModelForCausalLM.from_pretrained(tmp, gguf_file="m.gguf", dtype=torch.float32,
                                                       attn_implementation="eager")
        loss_g = hf_loss(model_g, tok, examples, bos)
        print(f"transformers (gguf export) loss {loss_g:.6f}, rel diff {abs(loss_g - lift_eval['loss']) / loss_g:.2e}")
        ok &= abs(loss_g - lift_eval["loss"]) / loss_g < 1e-4
    print("OK" if ok else "MISMATCH")
    sys.exit(0 if ok else 1)


if __name__ == "__main__":
    main()
