#!/usr/bin/env python3
"""The PyTorch side of the generation benchmarks: transformers' generate()
on a Hugging Face directory (lift's model exported with `lift export
--format hf`, so both run the same weights), for the prompts `lift bench
--generate` used (their token ids, in a JSON file: a list of lists, or lift
bench's JSON with "prompt_ids"), as one batch, left-padded with EOS and
masked as the LIFT evaluation script does.

    torch_generate.py --model DIR --prompts FILE.json --num-beams N
                      --max-new-tokens M [--threads 2] [--steps 1] [--warmup 1]
                      [--device cpu|cuda] [--dtype float32|bfloat16]
                      [--attn sdpa|eager] [--ignore-eos]

make bench runs it on the CPU in f32; the GPU script (tests/gpu/run_all.sh)
with --device cuda --dtype bfloat16 --attn sdpa, lift's settings there.
--ignore-eos makes every row run --max-new-tokens (min_new_tokens), as
lift bench --ignore-eos does, so that both time the same number of steps.

Prints one JSON object: total_ms (median over --steps timed calls after
--warmup), prefill_ms (the same for one new token), decode_tokens_per_s
(rows x (new tokens - 1) over total - prefill, every beam a row, as lift
counts) and prefill_tokens_per_s (these three with --prefill), generated_tokens and new_ids (up to and
including EOS).
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
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--dtype", default="float32", choices=["float32", "bfloat16"])
    ap.add_argument("--attn", default="sdpa", choices=["sdpa", "eager"])
    ap.add_argument("--ignore-eos", action="store_true")
    ap.add_argument("--prefill", action="store_true", help="also time the prefill (a call for one new token)")
    a = ap.parse_args()
    torch.set_num_threads(a.threads)
    from transformers import AutoModelForCausalLM, GenerationConfig

    model = AutoModelForCausalLM.from_pretrained(a.model, dtype=getattr(torch, a.dtype), attn_implementation=a.attn)
    model.to(a.device)
    model.eval()
    eos = model.config.eos_token_id
    eos = eos[0] if isinstance(eos, list) else eos
    prompts = json.load(open(a.prompts))
    if isinstance(prompts, dict):
        prompts = prompts["prompt_ids"]
    longest = max(len(p) for p in prompts)
    ids = torch.tensor([[eos] * (longest - len(p)) + p for p in prompts], device=a.device)
    mask = torch.tensor([[0] * (longest - len(p)) + [1] * len(p) for p in prompts], device=a.device)

    def config(new):
        return GenerationConfig(
            do_sample=False, num_beams=a.num_beams, max_new_tokens=new, eos_token_id=eos, pad_token_id=eos,
            min_new_tokens=new if a.ignore_eos else None,
        )

    def timed(new):
        times, out = [], None
        with torch.no_grad():
            for i in range(a.warmup + a.steps):
                if a.device != "cpu":
                    torch.cuda.synchronize()
                t0 = time.perf_counter()
                out = model.generate(input_ids=ids, attention_mask=mask, generation_config=config(new))
                if a.device != "cpu":
                    torch.cuda.synchronize()
                if i >= a.warmup:
                    times.append((time.perf_counter() - t0) * 1e3)
        return statistics.median(times), out

    prefill_ms = timed(1)[0] if a.prefill else None
    total_ms, out = timed(a.max_new_tokens)
    news = []
    for row in out[:, longest:].tolist():
        news.append(row[: row.index(eos) + 1] if eos in row else row)
    rows = len(prompts) * a.num_beams
    timed_prefill = prefill_ms is not None
    decode_s = max(total_ms - prefill_ms, 1e-6) / 1e3 if timed_prefill else None
    print(json.dumps({
        "total_ms": total_ms,
        "prefill_ms": prefill_ms,
        "prefill_tokens_per_s": sum(len(p) for p in prompts) / (prefill_ms / 1e3) if timed_prefill else None,
        "decode_tokens_per_s": rows * (a.max_new_tokens - 1) / decode_s if timed_prefill else None,
        "generated_tokens": sum(len(n) for n in news),
        "new_ids": news,
        "batch": len(prompts),
        "num_beams": a.num_beams,
        "max_new_tokens": a.max_new_tokens,
        "device": torch.cuda.get_device_name() if a.device != "cpu" else "cpu",
        "dtype": a.dtype,
        "attn": a.attn,
        "impl": "pytorch",
    }))


if __name__ == "__main__":
    main()
