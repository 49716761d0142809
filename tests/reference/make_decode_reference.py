#!/usr/bin/env python3
"""Hugging Face generate() outputs that lift's decoding is tested against
(tests/decode.rs): beam search and batched, left-padded generation on
SmolLM2-135M-Instruct.

    .venv-bench/bin/python tests/reference/make_decode_reference.py [--models-dir models]

Needs torch, transformers, gguf and accelerate (`make bench` installs the
first two into .venv-bench/; add the others with
`.venv-bench/bin/pip install gguf accelerate`). About a minute on 2 cores.

The model is the Q4_1 GGUF that `make model` fetches, dequantized to f32 by
transformers (as in make_reference.py), eager attention, CPU. Each case is
one generate() call:
- one or several prompts; several are padded on the left with the EOS id
  and masked (the LIFT evaluation script's setting: padding_side="left");
- greedy (do_sample=False, num_beams=1) or beam search (num_beams=N,
  do_sample=False, early_stopping=False, length_penalty=L);
- new_ids[i] are the tokens after prompt i up to and including the first EOS,
  without padding.
Writes tests/reference/smollm2_decode.json.
"""

import argparse
import json
import os
import sys

import torch

HERE = os.path.dirname(os.path.abspath(__file__))
SMOL_GGUF = "SmolLM2-135M-Instruct.Q4_1.gguf"
ALPACA = (
    "Below is an instruction that describes a task. Write a response that "
    "appropriately completes the request.\n\n### Instruction:\n{q}\n\n### Response:\n"
)
def chat(q):
    return f"<|im_start|>user\n{q}<|im_end|>\n<|im_start|>assistant\n"


PROMPTS = [
    ALPACA.format(q="A farmer has 15 cows and buys 7 more. Then he sells 4 of them. How many cows does he have now?"),
    chat("What is 2+2? Answer with one number."),
    chat("Is the sun a star? Answer yes or no."),
    chat("Translate 'cat' into Spanish."),
    chat("Say hello in French."),
    "The three most common states of matter are",
    "def is_prime(n):\n",
]
# (name, prompt indices, num_beams, length_penalty, max_new_tokens). Most
# beam cases end with EOS before the limit, where the length penalty decides
# between finished hypotheses of different lengths.
CASES = [
    ("beam4", [0], 4, 1.0, 40),
    ("beam4", [1], 4, 1.0, 48),
    ("beam4", [2], 4, 1.0, 48),
    ("beam4", [3], 4, 1.0, 48),
    ("beam4", [6], 4, 1.0, 32),
    ("beam4 length_penalty 2", [1], 4, 2.0, 48),
    ("beam4 length_penalty 2", [2], 4, 2.0, 48),
    ("beam4 length_penalty 2", [3], 4, 2.0, 48),
    ("beam4 length_penalty -1", [2], 4, -1.0, 48),
    ("beam4 length_penalty -1", [4], 4, -1.0, 48),
    ("beam3 batch, left padded", [5, 1, 4], 3, 1.0, 32),
    ("beam4 batch, left padded", [0, 2, 3, 6], 4, 1.0, 40),
    ("greedy batch, left padded", [6, 0, 1, 5], 1, 1.0, 40),
]


def run_case(model, tok, eos, prompt_ids, num_beams, length_penalty, max_new):
    longest = max(len(p) for p in prompt_ids)
    ids = torch.tensor([[eos] * (longest - len(p)) + p for p in prompt_ids])
    mask = torch.tensor([[0] * (longest - len(p)) + [1] * len(p) for p in prompt_ids])
    kw = dict(num_beams=num_beams, length_penalty=length_penalty) if num_beams > 1 else {}
    out = model.generate(
        input_ids=ids,
        attention_mask=mask,
        do_sample=False,
        max_new_tokens=max_new,
        eos_token_id=eos,
        pad_token_id=eos,
        **kw,
    )
    news = []
    for row in out[:, longest:].tolist():
        news.append(row[: row.index(eos) + 1] if eos in row else row)
    return news


def main():
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--models-dir", default=os.path.join(HERE, "..", "..", "models"))
    a = ap.parse_args()
    from transformers import AutoModelForCausalLM, AutoTokenizer
    import transformers

    torch.manual_seed(0)
    torch.set_num_threads(2)
    tok = AutoTokenizer.from_pretrained(a.models_dir, gguf_file=SMOL_GGUF)
    model = AutoModelForCausalLM.from_pretrained(
        a.models_dir, gguf_file=SMOL_GGUF, dtype=torch.float32, attn_implementation="eager"
    )
    model.eval()
    eos = tok.eos_token_id
    print(f"generation_config: {model.generation_config.to_diff_dict()}")
    prompt_ids = [tok(p).input_ids for p in PROMPTS]
    cases = []
    with torch.no_grad():
        for name, which, nb, lp, max_new in CASES:
            batch = [prompt_ids[i] for i in which]
            news = run_case(model, tok, eos, batch, nb, lp, max_new)
            for i, n in zip(which, news):
                print(f"{name} (prompt {i}): {len(n)} new, eos {eos in n}: {tok.decode(n)!r}")
            cases.append(
                {
                    "name": name,
                    "prompts": [PROMPTS[i] for i in which],
                    "input_ids": batch,
                    "num_beams": nb,
                    "length_penalty": lp,
                    "max_new_tokens": max_new,
                    "new_ids": news,
                }
            )
    doc = {
        "note": f"transformers {transformers.__version__}, torch {torch.__version__}: "
        f"SmolLM2-135M-Instruct from {SMOL_GGUF} dequantized to f32, eager attention, CPU. "
        "generate(input_ids, attention_mask, do_sample=False, max_new_tokens, eos_token_id, pad_token_id=eos"
        "[, num_beams, length_penalty]); batches left-padded with eos and masked; new_ids up to and "
        "including the first EOS.",
        "eos_token_id": eos,
        "cases": cases,
    }
    with open(os.path.join(HERE, "smollm2_decode.json"), "w", encoding="utf-8") as f:
        json.dump(doc, f, ensure_ascii=False, indent=1)
        f.write("\n")


if __name__ == "__main__":
    sys.exit(main())
