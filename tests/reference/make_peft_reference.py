#!/usr/bin/env python3
"""PEFT reference data for lift's DoRA and PiSSA (tests/methods.rs reads it).

Run by hand from the repository root, with torch, transformers and peft:

    python tests/reference/make_peft_reference.py

CI never runs it; it only reads the committed outputs. Everything is f32 on
the CPU, eager attention, on the tiny_gqa model of make_reference.py
(tests/reference/tiny_gqa/, GQA, untied head) and its fixed batch
(reference.json). It writes tests/reference/peft/:

1. dora.json + dora.safetensors: PEFT's DoRA (use_dora=True) on all seven
   linear kinds of every layer, r = 4, alpha = 8. The adapters are set to
   committed random values (B is not zero, so every gradient path is live)
   and the magnitudes to the PEFT init (row norms of W) times 1 + 0.1 u,
   u ~ U(-1, 1), so m / ||W + s B A|| is not 1. Saved: the values
   ("A.<l>.<kind>", "B.<l>.<kind>", "m.<l>.<kind>"), the loss, the logits,
   and the gradients of every A, B and magnitude ("grad.A...", ...).
2. pissa.json + pissa.safetensors: PEFT's PiSSA init (init_lora_weights=
   "pissa", exact torch SVD), r = 4, alpha = 4 (the paper's r = alpha),
   then one optimizer step of torch.optim.AdamW(lr=1e-3, betas=(0.9, 0.95),
   eps=1e-6, weight_decay=0) on the loss of the fixed batch, no clipping.
   Saved: the residual base weights after init ("residual.<l>.<kind>"), the
   merged weights after the step ("merged.<l>.<kind>" = residual + s B' A'),
   and the loss before the step. lift's step with `--adamw torch` must give
   the same merged weights to float rounding, whatever the signs its SVD
   picks for the singular vectors (s B A does not depend on them).
"""

import json
import os
import sys

import torch
from peft import LoraConfig, get_peft_model
from safetensors.torch import save_file
from transformers import LlamaForCausalLM

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
TINY = os.path.join(ROOT, "tests", "reference", "tiny_gqa")
OUT = os.path.join(ROOT, "tests", "reference", "peft")
KINDS = {
    "q": "self_attn.q_proj",
    "k": "self_attn.k_proj",
    "v": "self_attn.v_proj",
    "o": "self_attn.o_proj",
    "gate": "mlp.gate_proj",
    "up": "mlp.up_proj",
    "down": "mlp.down_proj",
}


def batch():
    ref = json.load(open(os.path.join(TINY, "reference.json")))
    return torch.tensor(ref["input_ids"]), torch.tensor(ref["targets"])


def loss_of(model, ids, targets):
    logits = model(input_ids=ids).logits
    v = logits.shape[-1]
    return torch.nn.functional.cross_entropy(logits.view(-1, v), targets.view(-1), ignore_index=-100), logits


def base_model():
    torch.manual_seed(0)
    m = LlamaForCausalLM.from_pretrained(TINY, torch_dtype=torch.float32, attn_implementation="eager")
    m.eval()  # no dropout anywhere; eval() does not change gradients
    return m


def lora_modules(model, n_layers):
    """(layer, kind, peft LoRA layer) for every adapted linear weight."""
    out = []
    for l in range(n_layers):
        layer = model.base_model.model.model.layers[l]
        for kind, path in KINDS.items():
            mod = layer
            for part in path.split("."):
                mod = getattr(mod, part)
            out.append((l, kind, mod))
    return out


def dora():
    model = base_model()
    n_layers = model.config.num_hidden_layers
    cfg = LoraConfig(r=4, lora_alpha=8, lora_dropout=0.0, target_modules=list(v.split(".")[1] for v in KINDS.values()),
                     use_dora=True, init_lora_weights=True)
    model = get_peft_model(model, cfg)
    g = torch.Generator().manual_seed(1234)
    tensors = {}
    with torch.no_grad():
        for l, kind, mod in lora_modules(model, n_layers):
            a, b = mod.lora_A["default"].weight, mod.lora_B["default"].weight
            a.copy_((torch.rand(a.shape, generator=g) * 2 - 1) * 0.2)
            b.copy_((torch.rand(b.shape, generator=g) * 2 - 1) * 0.2)
            m = mod.lora_magnitude_vector["default"].weight
            m.mul_(1 + 0.1 * (torch.rand(m.shape, generator=g) * 2 - 1))
            tensors[f"A.{l}.{kind}"] = a.clone()
            tensors[f"B.{l}.{kind}"] = b.clone()
            tensors[f"m.{l}.{kind}"] = m.clone()
    ids, targets = batch()
    loss, logits = loss_of(model, ids, targets)
    loss.backward()
    for l, kind, mod in lora_modules(model, n_layers):
        tensors[f"grad.A.{l}.{kind}"] = mod.lora_A["default"].weight.grad.clone()
        tensors[f"grad.B.{l}.{kind}"] = mod.lora_B["default"].weight.grad.clone()
        tensors[f"grad.m.{l}.{kind}"] = mod.lora_magnitude_vector["default"].weight.grad.clone()
    tensors["logits"] = logits.detach().clone()
    save_file({k: v.contiguous() for k, v in tensors.items()}, os.path.join(OUT, "dora.safetensors"))
    meta = {"loss": loss.item(), "r": 4, "alpha": 8, "n_layers": n_layers,
            "note": "PEFT DoRA, committed adapter and magnitude values, gradients of the fixed tiny_gqa batch"}
    json.dump(meta, open(os.path.join(OUT, "dora.json"), "w"), indent=1)
    print("dora: loss", loss.item())


def pissa():
    model = base_model()
    n_layers = model.config.num_hidden_layers
    cfg = LoraConfig(r=4, lora_alpha=4, lora_dropout=0.0, target_modules=list(v.split(".")[1] for v in KINDS.values()),
                     init_lora_weights="pissa")
    model = get_peft_model(model, cfg)
    tensors = {}
    mods = lora_modules(model, n_layers)
    for l, kind, mod in mods:
        tensors[f"residual.{l}.{kind}"] = mod.base_layer.weight.detach().clone()
    ids, targets = batch()
    params = [p for p in model.parameters() if p.requires_grad]
    opt = torch.optim.AdamW(params, lr=1e-3, betas=(0.9, 0.95), eps=1e-6, weight_decay=0.0)
    loss, _ = loss_of(model, ids, targets)
    loss.backward()
    opt.step()
    with torch.no_grad():
        for l, kind, mod in mods:
            a, b = mod.lora_A["default"].weight, mod.lora_B["default"].weight
            s = mod.scaling["default"]
            tensors[f"merged.{l}.{kind}"] = mod.base_layer.weight + s * (b @ a)
    save_file({k: v.contiguous() for k, v in tensors.items()}, os.path.join(OUT, "pissa.safetensors"))
    meta = {"loss_before": loss.item(), "r": 4, "alpha": 4, "lr": 1e-3, "n_layers": n_layers,
            "note": "PEFT PiSSA (exact SVD) residuals, and the merged weights after one torch.optim.AdamW step"}
    json.dump(meta, open(os.path.join(OUT, "pissa.json"), "w"), indent=1)
    print("pissa: loss before the step", loss.item())


def main():
    os.makedirs(OUT, exist_ok=True)
    torch.set_num_threads(2)
    dora()
    pissa()
    import peft
    import transformers
    print("torch", torch.__version__, "transformers", transformers.__version__, "peft", peft.__version__, file=sys.stderr)


if __name__ == "__main__":
    main()
