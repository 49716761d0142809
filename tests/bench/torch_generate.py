#!/usr/bin/env python3
"""The PyTorch side of `make bench`'s generation rows: transformers'
generate() on a Hugging Face directory (lift's model exported with
`lift export --format hf`, so both run the same f32 weights), for the prompts
`lift bench --generate` used (their token ids, in a JSON file), as one batch,
left-padded with EOS and masked as the LIFT evaluation script does.

    torch_generate.py --model DIR --prompts FILE.json --num-beams N
                      --max-new-tokens M [--threads 2] [--steps 1] [--warmup 1]

Prints one JSON object: total_ms (median over --steps timed calls after
--warmup), generated_tokens and new_ids (up to and including EOS).
"""
import argparse
import json
import statistics
import time

import torch


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--model", required=True)
    ap.add_argument("--prompts", required=True)
    ap.add_argument("--num-beams", type=int, default=1)
    ap.add_argument("--max-new-tokens", type=int, default=64)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--steps", type=int, default=1)
    ap.add_argument("--warmup", type=int, default=1)
    a = ap.parse_args()
    torch.set_num_threads(a.threads)
    from transformers import AutoModelForCausalLM, GenerationConfig

    model = AutoModelForCausalLM.from_pretrained(a.model, dtype=torch.float32)
    model.eval()
    eos = model.config.eos_token_id
    eos = eos[0] if isinstance(eos, list) else eos
    prompts = json.load(open(a.prompts))
    longest = max(len(p) for p in prompts)
    ids = torch.tensor([[eos] * (longest - len(p)) + p for p in prompts])
    mask = torch.tensor([[0] * (longest - len(p)) + [1] * len(p) for p in prompts])
    config = GenerationConfig(
        do_sample=False, num_beams=a.num_beams, max_new_tokens=a.max_new_tokens, eos_token_id=eos, pad_token_id=eos
    )
    times, out = [], None
    with torch.no_grad():
        for i in range(a.warmup + a.steps):
            t0 = time.perf_counter()
            out = model.generate(input_ids=ids, attention_mask=mask, generation_config=config)
            if i >= a.warmup:
                times.append((time.perf_counter() - t0) * 1e3)
    news = []
    for row in out[:, longest:].tolist():
        news.append(row[: row.index(eos) + 1] if eos in row else row)
    print(json.dumps({
        "total_ms": statistics.median(times),
        "generated_tokens": sum(len(n) for n in news),
        "new_ids": news,
        "batch": len(prompts),
        "num_beams": a.num_beams,
        "impl": "pytorch",
    }))


if __name__ == "__main__":
    main()
