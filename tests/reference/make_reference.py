#!/usr/bin/env python3
"""PyTorch / Hugging Face reference data that `lift` is tested against.

Purpose
-------
`lift` is a from-scratch Rust Llama forward/backward + fine-tuning tool. In the
style of llm.c's test_gpt2.c, its tests load the files written here and check
that lift reproduces PyTorch's logits, loss, every parameter gradient, and
greedy KV-cache generation. This script produces that data; it is the only
place the reference numbers come from.

How to run (by hand; CI never runs this, CI only reads the committed outputs)
------------------------------------------------------------------------------
    PYTHONPATH=/path/to/accelerate-and-psutil /opt/refenv/bin/python \
        tests/reference/make_reference.py [--models-dir /work/main/models]

from the repository root. Needs torch (CPU), transformers 5.x, tokenizers,
safetensors, gguf, numpy, and -- only for the GGUF import in part 3 --
accelerate (+ psutil), which transformers insists on for `gguf_file=`; if the
environment lacks them:
    /opt/refenv/bin/python -m pip install --target /tmp/refextra accelerate psutil
and run with PYTHONPATH=/tmp/refextra. The outputs were made with torch 2.15.0,
transformers 5.24.0, tokenizers 0.23.3, accelerate 1.15.0 (see the notes in
the JSON files). `--skip-smollm2` skips part 3 (no GGUF / accelerate needed).
Takes about 30 s on 2 CPU cores; two runs give byte-identical files.
Everything is f32, CPU, `attn_implementation="eager"`, fixed seeds; rerunning
rewrites the same files (bit-identical up to the CPU's BLAS kernels).

What it writes (all under tests/reference/)
-------------------------------------------
1. tiny_gqa/ and tiny_tied/: two tiny random LlamaForCausalLM models as complete
   Hugging Face directories (config.json, model.safetensors f32,
   generation_config.json, tokenizer.json, tokenizer_config.json).
     tiny_gqa : C=64, F=176, L=2, NH=4, KVH=2, HS=16, eps 1e-5, theta 1e4,
                untied head, llama3 rope scaling (factor 8, low 1, high 4,
                original_max_position_embeddings 64). With HS=16 the 8 RoPE
                frequencies have wavelengths 2*pi*1e4^(i/8) =
                6.3 | 19.9, 62.8 | 199, 628, 1987, 6283, 19869 against the
                band edges 64/4=16 and 64/1=64, i.e. i=0 is high-frequency
                (kept), i=1,2 are medium (smoothly interpolated), i=3..7 are
                low-frequency (divided by 8): all three bands occur.
     tiny_tied: C=64, F=176, L=3, NH=4, KVH=4 (plain MHA), eps 1e-6,
                theta 5e5, tied head, no rope scaling.
   config.json is what transformers 5 writes (`rope_parameters`, which holds
   rope_theta and the scaling) plus the classic top-level `rope_theta` and
   `rope_scaling` keys that Llama-3.x checkpoints on the Hub carry, so a loader
   may read either form; the script checks that transformers reloads it to
   the same model. The tokenizer is a byte-level BPE trained here on
   tests/data/tokenizer_corpus.txt, vocab exactly 384, <s>=0 (BOS), </s>=1
   (EOS), BOS prepended (post-processor and add_bos_token).
2. <model>/reference.json and <model>/reference.safetensors: a fixed batch
   B=2, T=20 of random ids, targets[b,t] = id to predict at position t
   (input_ids shifted left, -100 = ignored), f32 logits (B,T,V), mean
   cross-entropy loss over non-ignored targets, and "grad.<hf name>" for every
   parameter after loss.backward(). The script also checks a few gradient
   coordinates against float64 central finite differences (printed only).
3. smollm2_generate.json, smollm2_logits.safetensors, smollm2_meta.json:
   SmolLM2-135M-Instruct loaded from the Q4_1 GGUF (transformers dequantizes
   and un-permutes q/k), greedy generation (40 new tokens, KV cache) for 5
   prompts with the min top-2 logit margin per generation, and the f32 logits
   at positions [0, 3, 7] of the first 8 tokens of the first prompt.
"""

import argparse
import copy
import importlib.metadata
import json
import math
import os
import sys

import numpy as np
import torch
import torch.nn.functional as F
from safetensors.torch import save_file

HERE = os.path.dirname(os.path.abspath(__file__))
REPO = os.path.dirname(os.path.dirname(HERE))
CORPUS = os.path.join(REPO, "tests", "data", "tokenizer_corpus.txt")

VOCAB = 384
B, T = 2, 20
IGNORE = -100

TINY_MODELS = {
    "tiny_gqa": dict(
        hidden_size=64,
        intermediate_size=176,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        head_dim=16,
        rms_norm_eps=1e-5,
        rope_theta=10000.0,
        tie_word_embeddings=False,
        max_position_embeddings=512,
        rope_scaling={
            "rope_type": "llama3",
            "factor": 8.0,
            "low_freq_factor": 1.0,
            "high_freq_factor": 4.0,
            "original_max_position_embeddings": 64,
        },
        seed=1234,
    ),
    "tiny_tied": dict(
        hidden_size=64,
        intermediate_size=176,
        num_hidden_layers=3,
        num_attention_heads=4,
        num_key_value_heads=4,
        head_dim=16,
        rms_norm_eps=1e-6,
        rope_theta=500000.0,
        tie_word_embeddings=True,
        max_position_embeddings=128,
        rope_scaling=None,
        seed=5678,
    ),
}

SMOL_GGUF = "SmolLM2-135M-Instruct.Q4_1.gguf"
ALPACA = (
    "Below is an instruction that describes a task. Write a response that "
    "appropriately completes the request.\n\n### Instruction:\n{q}\n\n### Response:\n"
)
SMOL_PROMPTS = [
    ALPACA.format(
        q="A baker made 24 muffins in the morning and 18 in the afternoon. "
        "He sold 29 of them. How many muffins does he have left?"
    ),
    "<|im_start|>user\nWhat is the capital of France? Answer in one sentence.<|im_end|>\n"
    "<|im_start|>assistant\n",
    # Plain sentence. Chosen among a few candidates for a comfortable greedy
    # margin (e.g. "The old lighthouse keeper climbed the stairs every evening to"
    # hits a near-tie of 0.0009 within 40 tokens, too close for an f32 re-implementation).
    "Water boils at 100 degrees Celsius at sea level, but at higher altitudes",
    "def fibonacci(n):\n    \"\"\"Return the n-th Fibonacci number.\"\"\"\n",
    "Three things to pack for a beach trip:\n1.",
]
SMOL_LOGIT_TOKENS = 8
SMOL_LOGIT_POSITIONS = [0, 3, 7]
SMOL_MAX_NEW = 40


def dump_json(obj):
    """Indented JSON, but with lists of numbers kept on one line."""

    def enc(o, ind):
        pad = " " * ind
        if isinstance(o, dict):
            items = [f'{pad} {json.dumps(k)}: {enc(v, ind + 1)}' for k, v in o.items()]
            return "{\n" + ",\n".join(items) + "\n" + pad + "}"
        if isinstance(o, list) and o and all(isinstance(v, (dict, list)) for v in o):
            return "[\n" + ",\n".join(pad + " " + enc(v, ind + 1) for v in o) + "\n" + pad + "]"
        return json.dumps(o, ensure_ascii=False)

    return enc(obj, 0) + "\n"


# --------------------------------------------------------------------------
# Tokenizer for the tiny models
# --------------------------------------------------------------------------


def train_tiny_tokenizer():
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors, trainers

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=VOCAB,
        min_frequency=1,
        special_tokens=["<s>", "</s>"],
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    with open(CORPUS, encoding="utf-8") as f:
        lines = f.read().splitlines(keepends=True)
    # The corpus is small; the SmolLM2 prompts are added to it so that there are
    # enough distinct pairs to reach exactly VOCAB entries (asserted below).
    tok.train_from_iterator(lines + SMOL_PROMPTS, trainer=trainer)
    assert tok.get_vocab_size() == VOCAB, tok.get_vocab_size()
    assert tok.token_to_id("<s>") == 0 and tok.token_to_id("</s>") == 1
    tok.post_processor = processors.TemplateProcessing(
        single="<s> $A", pair="<s> $A <s> $B", special_tokens=[("<s>", 0)]
    )
    return tok


def save_tiny_tokenizer(tok, out_dir):
    from transformers import AutoTokenizer, PreTrainedTokenizerFast

    hf = PreTrainedTokenizerFast(tokenizer_object=tok, bos_token="<s>", eos_token="</s>")
    hf.save_pretrained(out_dir)
    cfg_path = os.path.join(out_dir, "tokenizer_config.json")
    with open(cfg_path) as f:
        cfg = json.load(f)
    cfg["tokenizer_class"] = "PreTrainedTokenizerFast"  # what 4.x readers know; 5.x maps it
    cfg["add_bos_token"] = True
    cfg["add_eos_token"] = False
    cfg["bos_token"] = "<s>"
    cfg["eos_token"] = "</s>"
    with open(cfg_path, "w") as f:
        json.dump(cfg, f, indent=2, sort_keys=True)
        f.write("\n")
    # Drop files we do not need (keep the directory small and two-file).
    for extra in ("special_tokens_map.json",):
        p = os.path.join(out_dir, extra)
        if os.path.exists(p):
            os.remove(p)
    back = AutoTokenizer.from_pretrained(out_dir)
    ids = back("Hello, world!").input_ids
    assert ids[0] == 0, ids
    assert back.decode(ids[1:]) == "Hello, world!", back.decode(ids[1:])


# --------------------------------------------------------------------------
# Tiny models: build, init, save, reload, forward/backward, dump
# --------------------------------------------------------------------------


def build_tiny(name, spec):
    from transformers import LlamaConfig, LlamaForCausalLM

    kw = dict(spec)
    seed = kw.pop("seed")
    rope_scaling = kw.pop("rope_scaling")
    rope_theta = kw.pop("rope_theta")
    rope_parameters = {"rope_type": "default", "rope_theta": rope_theta}
    if rope_scaling is not None:
        rope_parameters = dict(rope_scaling, rope_theta=rope_theta)
    cfg = LlamaConfig(
        vocab_size=VOCAB,
        hidden_act="silu",
        attention_bias=False,
        mlp_bias=False,
        bos_token_id=0,
        eos_token_id=1,
        pad_token_id=None,
        rope_parameters=rope_parameters,
        attn_implementation="eager",
        **kw,
    )
    torch.manual_seed(seed)
    model = LlamaForCausalLM(cfg).float()
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        # named_parameters() lists a tied lm_head once, as model.embed_tokens.weight.
        for pname, p in sorted(model.named_parameters()):
            noise = torch.randn(p.shape, generator=gen, dtype=torch.float32)
            if p.ndim == 1:  # RMSNorm gains
                p.copy_(1.0 + 0.1 * noise)
            else:  # embeddings and linears
                p.copy_(0.08 * noise)
    if spec["tie_word_embeddings"]:
        assert model.lm_head.weight is model.model.embed_tokens.weight
    return model, seed, rope_scaling, rope_theta


def patch_config_json(out_dir, rope_scaling, rope_theta):
    """Add the classic top-level rope keys next to transformers 5's rope_parameters."""
    p = os.path.join(out_dir, "config.json")
    with open(p) as f:
        cfg = json.load(f)
    cfg["rope_theta"] = rope_theta
    cfg["rope_scaling"] = rope_scaling
    cfg["torch_dtype"] = "float32"
    with open(p, "w") as f:
        json.dump(cfg, f, indent=2, sort_keys=True)
        f.write("\n")


def make_batch(seed):
    gen = torch.Generator().manual_seed(seed + 1)
    input_ids = torch.randint(0, VOCAB, (B, T), generator=gen, dtype=torch.int64)
    targets = torch.full((B, T), IGNORE, dtype=torch.int64)
    targets[:, :-1] = input_ids[:, 1:]
    targets[0, :5] = IGNORE  # row 0: first 5 "prompt" positions
    targets[1, -4:] = IGNORE  # row 1: last 4 "padding" positions
    return input_ids, targets


def loss_fn(model, input_ids, targets):
    logits = model(input_ids=input_ids, use_cache=False).logits
    V = logits.shape[-1]
    loss = F.cross_entropy(logits.reshape(-1, V), targets.reshape(-1), ignore_index=IGNORE)
    return logits, loss


class float64_clean:
    """Within this context, LlamaRMSNorm and eager attention keep their input dtype.

    transformers' LlamaRMSNorm casts its input to float32 and eager attention runs
    its softmax in float32, whatever the model dtype; in a model.double() copy
    that rounds the activations to f32 and swamps a finite difference. Swapping in
    the same math without the casts makes the float64 copy truly float64 (for f32
    inputs the casts are no-ops anyway, so the f32 dump is not affected).
    """

    def __enter__(self):
        from transformers.models.llama import modeling_llama as ml

        self.ml = ml
        self.saved = (ml.LlamaRMSNorm.forward, ml.eager_attention_forward)

        def rms_forward(mod, x):
            var = x.pow(2).mean(-1, keepdim=True)
            return mod.weight * (x * torch.rsqrt(var + mod.variance_epsilon))

        def eager(module, query, key, value, attention_mask, scaling, dropout=0.0, **kwargs):
            k = ml.repeat_kv(key, module.num_key_value_groups)
            v = ml.repeat_kv(value, module.num_key_value_groups)
            w = torch.matmul(query, k.transpose(2, 3)) * scaling
            if attention_mask is not None:
                w = w + attention_mask
            w = torch.softmax(w, dim=-1)
            return torch.matmul(w, v).transpose(1, 2).contiguous(), w

        ml.LlamaRMSNorm.forward = rms_forward
        ml.eager_attention_forward = eager
        return self

    def __exit__(self, *exc):
        self.ml.LlamaRMSNorm.forward, self.ml.eager_attention_forward = self.saved
        return False


def finite_difference_check(model64, input_ids, targets, grads32, picks, eps=1e-5):
    """Central differences in float64 vs float64 autograd and the f32 dump."""
    model64.zero_grad(set_to_none=True)
    _, loss = loss_fn(model64, input_ids, targets)
    loss.backward()
    params = dict(model64.named_parameters())
    worst = max(
        ((grads32[n].double() - p.grad).abs().max() / p.grad.abs().max()).item() for n, p in params.items()
    )
    print(f"    whole tensors: max |dump32 - autograd64| / max|autograd64| over all params {worst:.2e}")
    rows = []
    with torch.no_grad():
        for pname, idx in picks:
            p = params[pname]
            g64 = p.grad[idx].item()
            g32 = grads32[pname][idx].item()
            orig = p[idx].item()
            p[idx] = orig + eps
            lp = loss_fn(model64, input_ids, targets)[1].item()
            p[idx] = orig - eps
            lm = loss_fn(model64, input_ids, targets)[1].item()
            p[idx] = orig
            fd = (lp - lm) / (2 * eps)
            rows.append((pname, idx, fd, g64, g32))
    worst64 = max(abs(fd - g64) / max(abs(fd), 1e-12) for _, _, fd, g64, _ in rows)
    worst32 = max(abs(fd - g32) / max(abs(fd), 1e-12) for _, _, fd, _, g32 in rows)
    for pname, idx, fd, g64, g32 in rows:
        print(
            f"    {pname}{list(idx)}: fd64 {fd:+.10e}  autograd64 {g64:+.10e}  "
            f"dump32 {g32:+.10e}  rel(dump32) {abs(fd - g32) / max(abs(fd), 1e-12):.2e}"
        )
    print(f"    max rel err: autograd64 vs fd {worst64:.2e}, f32 dump vs fd {worst32:.2e}")
    return worst64, worst32


def do_tiny(name, spec, tok):
    from transformers import LlamaForCausalLM

    out_dir = os.path.join(HERE, name)
    os.makedirs(out_dir, exist_ok=True)
    model, seed, rope_scaling, rope_theta = build_tiny(name, spec)
    model.save_pretrained(out_dir)
    patch_config_json(out_dir, rope_scaling, rope_theta)
    save_tiny_tokenizer(tok, out_dir)

    # Reload from disk so the dump is exactly what a reader of the directory gets.
    ref = LlamaForCausalLM.from_pretrained(out_dir, dtype=torch.float32, attn_implementation="eager")
    ref.eval()
    with torch.no_grad():
        for (n1, p1), (n2, p2) in zip(model.state_dict().items(), ref.state_dict().items()):
            assert n1 == n2 and torch.equal(p1, p2), n1
    inv_a = model.model.rotary_emb.inv_freq
    inv_b = ref.model.rotary_emb.inv_freq
    assert torch.equal(inv_a, inv_b), (inv_a, inv_b)
    print(f"  inv_freq: {[f'{x:.6g}' for x in inv_b.tolist()]}")
    if rope_scaling is not None:
        hd = spec["head_dim"]
        base = 1.0 / (rope_theta ** (torch.arange(0, hd, 2, dtype=torch.float32) / hd))
        wl = (2 * math.pi / base).tolist()
        omax = rope_scaling["original_max_position_embeddings"]
        hi, lo = omax / rope_scaling["high_freq_factor"], omax / rope_scaling["low_freq_factor"]
        bands = ["high" if w < hi else ("low" if w > lo else "medium") for w in wl]
        print(f"  wavelengths {[round(w, 1) for w in wl]} vs edges {hi}, {lo}: {bands}")
        assert {"high", "medium", "low"} <= set(bands)

    input_ids, targets = make_batch(seed)
    ref.zero_grad(set_to_none=True)
    logits, loss = loss_fn(ref, input_ids, targets)
    loss.backward()
    tied = bool(spec["tie_word_embeddings"])
    tensors = {"logits": logits.detach().float().contiguous()}
    grads32 = {}
    for pname, p in ref.named_parameters():
        assert p.grad is not None, pname
        grads32[pname] = p.grad.detach().clone()
        tensors["grad." + pname] = p.grad.detach().float().contiguous()
    n_params = sum(p.numel() for p in ref.parameters())
    save_file(tensors, os.path.join(out_dir, "reference.safetensors"), metadata={"format": "pt"})

    note = (
        f"{name}: random LlamaForCausalLM (transformers {__import__('transformers').__version__}, "
        f"torch {torch.__version__}), f32, CPU, eager attention, no attention mask (plain causal). "
        "logits = model(input_ids).logits, shape (B,T,V). loss = F.cross_entropy(logits.view(-1,V), "
        "targets.view(-1), ignore_index=-100), the mean over non-ignored targets. targets[b,t] is the "
        "id to predict at position t (input_ids shifted left by one); -100 at each row's last "
        "position, row 0 positions 0..4 and row 1 positions 16..19. "
        "grad.<name> is d loss / d parameter for every parameter of model.named_parameters()."
    )
    if tied:
        note += (
            " Tied head: lm_head.weight IS model.embed_tokens.weight, so there is no lm_head "
            "tensor in model.safetensors nor a grad.lm_head.weight; grad.model.embed_tokens.weight "
            "is the SUM of the embedding-lookup gradient and the LM-head gradient."
        )
    n_valid = int((targets != IGNORE).sum())
    ref_json = {
        "input_ids": input_ids.tolist(),
        "targets": targets.tolist(),
        "loss": loss.item(),
        "n_valid_targets": n_valid,
        "n_params": n_params,
        "tied_embeddings": tied,
        "config_note": note,
    }
    with open(os.path.join(out_dir, "reference.json"), "w") as f:
        f.write(dump_json(ref_json))
    print(f"  params {n_params}, loss {loss.item():.8f}, valid targets {n_valid}")

    # Sanity check of this script (not committed): float64 finite differences.
    model64 = copy.deepcopy(ref).double()
    g = torch.Generator().manual_seed(seed + 2)
    picks = []
    L = spec["num_hidden_layers"]
    for pname in [
        "model.embed_tokens.weight",
        "model.layers.0.self_attn.q_proj.weight",
        "model.layers.0.self_attn.k_proj.weight",
        "model.layers.0.self_attn.v_proj.weight",
        f"model.layers.{L - 1}.self_attn.o_proj.weight",
        f"model.layers.{L - 1}.mlp.gate_proj.weight",
        "model.layers.0.mlp.up_proj.weight",
        f"model.layers.{L - 1}.mlp.down_proj.weight",
        "model.layers.0.input_layernorm.weight",
        f"model.layers.{L - 1}.post_attention_layernorm.weight",
        "model.norm.weight",
    ] + ([] if tied else ["lm_head.weight"]):
        gr = grads32[pname]
        # The coordinate with the largest gradient (well above round-off) and a random one.
        big = np.unravel_index(int(gr.abs().argmax()), tuple(gr.shape))
        rnd = tuple(int(torch.randint(0, s, (1,), generator=g)) for s in gr.shape)
        picks += [(pname, tuple(int(i) for i in big)), (pname, rnd)]
    print("  finite-difference check (float64, central, eps 1e-5):")
    with float64_clean():
        # The patched forward must reproduce the committed f32 logits.
        same = torch.equal(ref(input_ids=input_ids, use_cache=False).logits, logits)
        print(f"    patched f32 forward reproduces dumped logits bit-for-bit: {same}")
        finite_difference_check(model64, input_ids, targets, grads32, picks)
    return n_params


# --------------------------------------------------------------------------
# SmolLM2-135M-Instruct from GGUF
# --------------------------------------------------------------------------


def do_smollm2(models_dir):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    tok = AutoTokenizer.from_pretrained(models_dir, gguf_file=SMOL_GGUF)
    model = AutoModelForCausalLM.from_pretrained(
        models_dir, gguf_file=SMOL_GGUF, dtype=torch.float32, attn_implementation="eager"
    )
    model.eval()
    eos = tok.eos_token_id
    add_bos = bool(getattr(tok, "add_bos_token", False))
    print(f"  tokenizer: bos {tok.bos_token!r}={tok.bos_token_id} eos {tok.eos_token!r}={eos} add_bos {add_bos}")

    results = []
    with torch.no_grad():
        for prompt in SMOL_PROMPTS:
            ids = tok(prompt).input_ids  # default encoding, exactly as the tokenizer does it
            starts_with_bos = len(ids) > 0 and ids[0] == tok.bos_token_id
            x = torch.tensor([ids], dtype=torch.int64)
            out = model.generate(
                input_ids=x,
                attention_mask=torch.ones_like(x),
                do_sample=False,
                max_new_tokens=SMOL_MAX_NEW,
                eos_token_id=eos,
                pad_token_id=eos,
                use_cache=True,
                output_logits=True,
                return_dict_in_generate=True,
            )
            new = out.sequences[0, len(ids):].tolist()
            if eos in new:
                new = new[: new.index(eos) + 1]
            step_logits = torch.cat(out.logits, dim=0)[: len(new)].float()  # (steps, V), raw
            top2 = step_logits.topk(2, dim=-1).values
            margins = (top2[:, 0] - top2[:, 1]).tolist()
            assert step_logits.argmax(-1).tolist() == new
            # Cross-check the cached logits against one uncached forward pass.
            full = model(input_ids=torch.tensor([ids + new]), use_cache=False).logits[0]
            full_steps = full[len(ids) - 1 : len(ids) - 1 + len(new)]
            diff = (full_steps - step_logits).abs().max().item()
            same = full_steps.argmax(-1).tolist() == new
            text = tok.decode(new, skip_special_tokens=False)
            print(
                f"  prompt {len(results)}: {len(ids)} ids, {len(new)} new, eos {eos in new}, "
                f"min margin {min(margins):.4f}, cache-vs-full max|dlogit| {diff:.2e} argmax same {same}"
            )
            print(f"    -> {text!r}")
            results.append(
                {
                    "prompt": prompt,
                    "add_bos": add_bos,
                    "starts_with_bos": starts_with_bos,
                    "input_ids": ids,
                    "new_ids": new,
                    "text": text,
                    "ends_with_eos": eos in new,
                    "min_top2_margin": min(margins),
                    "top2_margins": [round(m, 5) for m in margins],
                }
            )

        # Logits at a few positions of the first 8 tokens of the first prompt.
        ids8 = results[0]["input_ids"][:SMOL_LOGIT_TOKENS]
        logits8 = model(input_ids=torch.tensor([ids8]), use_cache=False).logits[0]
        sel = logits8[SMOL_LOGIT_POSITIONS].float().contiguous()

    with open(os.path.join(HERE, "smollm2_generate.json"), "w", encoding="utf-8") as f:
        f.write(dump_json(results))
    save_file(
        {
            "logits": sel,
            "input_ids": torch.tensor(ids8, dtype=torch.float32),
            "positions": torch.tensor(SMOL_LOGIT_POSITIONS, dtype=torch.float32),
        },
        os.path.join(HERE, "smollm2_logits.safetensors"),
        metadata={"positions": json.dumps(SMOL_LOGIT_POSITIONS)},  # one key: a 2-key header is written in random order
    )
    meta = {
        "model": f"SmolLM2-135M-Instruct from {SMOL_GGUF} (not in git), dequantized to f32 by "
        f"transformers {__import__('transformers').__version__} (gguf {importlib.metadata.version('gguf')}, accelerate {importlib.metadata.version('accelerate')}), "
        f"torch {torch.__version__}, CPU, eager attention",
        "tokenizer": "AutoTokenizer.from_pretrained(dir, gguf_file=...), tok(prompt).input_ids (default encoding)",
        "add_bos": add_bos,
        "bos_token_id": tok.bos_token_id,
        "eos_token_id": eos,
        "generation": f"generate(do_sample=False, max_new_tokens={SMOL_MAX_NEW}, eos_token_id={eos}), KV cache; "
        "new_ids are the generated tokens only, up to and including EOS if produced; text is "
        "tok.decode(new_ids, skip_special_tokens=False); top2_margins[i] = top1 - top2 raw logit at step i",
        "logits_file": "smollm2_logits.safetensors",
        "logits_input": f"the first {SMOL_LOGIT_TOKENS} input_ids of prompt 0, run alone (one uncached forward)",
        "logits_positions": SMOL_LOGIT_POSITIONS,
        "logits_shape": list(sel.shape),
    }
    with open(os.path.join(HERE, "smollm2_meta.json"), "w") as f:
        f.write(dump_json(meta))
    return results


def main():
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--models-dir", default="/work/main/models")
    ap.add_argument("--skip-smollm2", action="store_true")
    args = ap.parse_args()

    torch.set_default_dtype(torch.float32)
    torch.use_deterministic_algorithms(True)
    tok = train_tiny_tokenizer()
    for name, spec in TINY_MODELS.items():
        print(f"== {name}")
        do_tiny(name, spec, tok)
    if not args.skip_smollm2:
        print("== SmolLM2-135M-Instruct")
        do_smollm2(args.models_dir)


if __name__ == "__main__":
    sys.exit(main())
