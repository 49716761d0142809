#!/usr/bin/env python3
"""PyTorch reference for `lift bench`: the same model shape, method and batch,
timed the same way, printing the same JSON keys.

The model is transformers' LlamaForCausalLM (bf16 with SDPA attention on a
GPU, f32 on the CPU), randomly initialized with the shape of lift's --config.
Methods:
  lift  LIFT's sparse AdamW, in this project's own words: every linear weight
        of the blocks has a fixed set of k = density * out * in trainable
        entries (here the top |W| entries: the mask's choice does not change
        the cost of a step, and LIFT's rank-r filter is timed separately by
        `lift bench --mask-only`), with optimizer state (m, v and an f32
        master copy) for those k entries only. After backward, each weight's
        dense gradient is gathered at the k indices, AdamW updates the masters,
        and the new values are scattered back into the weight. Everything else
        is frozen. mask_ms is the mask selection time / update interval.
  full  torch.optim.AdamW on every linear weight of the blocks (fused, f32 state).
  lora  LoRA adapters (rank 16, alpha 32) on every linear layer, written here
        (no peft needed), AdamW on the adapters.
Medians over --steps timed steps after 2 warm-up steps.
"""
import argparse, json, math, statistics, time

import torch
import torch.nn as nn

CONFIGS = {
    # vocab, dim, layers, heads, kv heads, head dim, ffn, rope theta, llama3 scaling, tied
    "tiny": (512, 128, 2, 4, 2, 32, 320, 10000.0, False, True),
    "small": (512, 256, 4, 8, 4, 32, 768, 10000.0, True, False),
    "smollm2-135m": (49152, 576, 30, 9, 3, 64, 1536, 100000.0, False, True),
    "llama-3.2-1b": (128256, 2048, 16, 32, 8, 64, 8192, 500000.0, True, True),
    "llama-3.2-3b": (128256, 3072, 28, 24, 8, 128, 8192, 500000.0, True, True),
    "llama-3-8b": (128256, 4096, 32, 32, 8, 128, 14336, 500000.0, False, False),
}
PROJ = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]


def build(name, device, dtype):
    from transformers import LlamaConfig, LlamaForCausalLM
    v, d, l, h, kv, hs, f, theta, scaled, tied = CONFIGS[name]
    kw = dict(vocab_size=v, hidden_size=d, num_hidden_layers=l, num_attention_heads=h,
                      num_key_value_heads=kv, head_dim=hs, intermediate_size=f, rope_theta=theta,
                      rms_norm_eps=1e-5, tie_word_embeddings=tied, max_position_embeddings=131072,
                      rope_scaling={"rope_type": "llama3", "factor": 32.0, "low_freq_factor": 1.0,
                                    "high_freq_factor": 4.0, "original_max_position_embeddings": 8192} if scaled else None,
                      attn_implementation="sdpa", use_cache=False)
    try:
        cfg = LlamaConfig(**kw)
    except Exception:  # a transformers without llama3 rope_scaling: same cost without it
        kw.pop("rope_scaling")
        cfg = LlamaConfig(**kw)
    with torch.device(device):
        model = LlamaForCausalLM(cfg).to(dtype)
    return model


def linears(model):
    return [getattr(getattr(layer, "self_attn" if p in PROJ[:4] else "mlp"), p)
            for layer in model.model.layers for p in PROJ]


class SparseAdamW:
    """AdamW on k selected entries per weight; state only for those entries."""

    def __init__(self, weights, density, lr=1e-5, betas=(0.9, 0.95), eps=1e-6, filter_rank=0, svd="auto"):
        self.weights, self.lr, self.b1, self.b2, self.eps, self.t = weights, lr, betas[0], betas[1], eps, 0
        self.idx, self.m, self.v, self.master = [], [], [], []
        for w in weights:
            k = max(1, round(density * w.numel()))
            idx = torch.topk(self.scores(w, filter_rank, svd).flatten(), k).indices.sort().values
            self.idx.append(idx)
            self.master.append(w.detach().flatten()[idx].float().clone())
            self.m.append(torch.zeros(k, device=w.device))
            self.v.append(torch.zeros(k, device=w.device))

    @staticmethod
    @torch.no_grad()
    def scores(w, r, svd):
        """|W_r|, the principal-weight scores (filter_rank 0: |W|, for timing only).
        Exact SVD where the smaller side is at most 1024 (lift's --svd auto), else
        torch's randomized low-rank SVD with lift's sketch size (r + 128, 12 iterations)."""
        w = w.detach().float()
        if r <= 0:
            return w.abs()
        r = min(r, min(w.shape))
        if svd == "exact" or (svd == "auto" and min(w.shape) <= 1024):
            u, s, vh = torch.linalg.svd(w, full_matrices=False)
            u, s, vh = u[:, :r], s[:r], vh[:r]
        else:
            u, s, v = torch.svd_lowrank(w, q=min(r + 128, min(w.shape)), niter=12)
            u, s, vh = u[:, :r], s[:r], v[:, :r].t()
        return ((u * s) @ vh).abs()

    @torch.no_grad()
    def step(self):
        self.t += 1
        step = self.lr * math.sqrt(1 - self.b2 ** self.t) / (1 - self.b1 ** self.t)
        for w, idx, m, v, p in zip(self.weights, self.idx, self.m, self.v, self.master):
            g = w.grad.flatten()[idx].float()
            m.mul_(self.b1).add_(g, alpha=1 - self.b1)
            v.mul_(self.b2).addcmul_(g, g, value=1 - self.b2)
            p.addcdiv_(m, v.sqrt().add_(self.eps), value=-step)
            w.view(-1)[idx] = p.to(w.dtype)
            w.grad = None


class LoRA(nn.Module):
    def __init__(self, base, r, alpha):
        super().__init__()
        self.base, self.scale = base, alpha / r
        dev, dt = base.weight.device, base.weight.dtype
        self.a = nn.Parameter(torch.empty(r, base.in_features, device=dev, dtype=dt).uniform_(-1, 1) / math.sqrt(base.in_features))
        self.b = nn.Parameter(torch.zeros(base.out_features, r, device=dev, dtype=dt))

    def forward(self, x):
        return self.base(x) + self.scale * ((x @ self.a.t()) @ self.b.t())


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--device", default="cuda", choices=["cpu", "cuda"])
    ap.add_argument("--config", default="smollm2-135m", choices=sorted(CONFIGS))
    ap.add_argument("--method", default="lift", choices=["lift", "full", "lora"])
    ap.add_argument("--seq", type=int, default=256)
    ap.add_argument("--batch", type=int, default=1)
    ap.add_argument("--steps", type=int, default=10)
    ap.add_argument("--warmup", type=int, default=2)
    ap.add_argument("--threads", type=int, default=0)
    ap.add_argument("--density", type=float, default=0.05)
    ap.add_argument("--lora-rank", type=int, default=16)
    ap.add_argument("--update-interval", type=int, default=400)
    ap.add_argument("--filter-rank", type=int, default=128,
                    help="LIFT's rank r for the mask scores (0: top-|W| masks, which cost the same per step)")
    ap.add_argument("--svd", default="auto", choices=["auto", "exact", "lowrank"])
    ap.add_argument("--forward-only", action="store_true", help="time evaluation: the forward pass and loss only")
    ap.add_argument("--examples", help="JSONL of {ids, n_prompt} (lift bench --data ... --save-examples): one pass "
                    "over them in order, batches of --batch padded to their longest as Hugging Face's collators do")
    a = ap.parse_args()
    if a.threads:
        torch.set_num_threads(a.threads)
    cuda = a.device == "cuda"
    dtype = torch.bfloat16 if cuda else torch.float32
    torch.manual_seed(0)
    model = build(a.config, a.device, dtype)
    model.requires_grad_(False)
    sync = torch.cuda.synchronize if cuda else (lambda: None)
    mask_s = 0.0
    if a.method == "lift":
        ws = [m.weight for m in linears(model)]
        for w in ws:
            w.requires_grad_(True)
        sync(); t0 = time.perf_counter()
        opt = SparseAdamW(ws, a.density, filter_rank=a.filter_rank, svd=a.svd)
        sync(); mask_s = time.perf_counter() - t0
    elif a.method == "full":
        ws = [m.weight for m in linears(model)]
        for w in ws:
            w.requires_grad_(True)
        opt = torch.optim.AdamW(ws, lr=1e-5, betas=(0.9, 0.95), eps=1e-6, weight_decay=0.0, fused=cuda)
    else:
        params = []
        for layer in model.model.layers:
            for p in PROJ:
                parent = layer.self_attn if p in PROJ[:4] else layer.mlp
                ad = LoRA(getattr(parent, p), a.lora_rank, 2 * a.lora_rank)
                setattr(parent, p, ad)
                params += [ad.a, ad.b]
        opt = torch.optim.AdamW(params, lr=1e-5, betas=(0.9, 0.95), eps=1e-6, weight_decay=0.0, fused=cuda)
    model.train()
    if a.examples:
        return real_data(a, model, opt, sync, mask_s)
    v = CONFIGS[a.config][0]
    tokens = torch.randint(0, v, (a.batch, a.seq), device=a.device)
    if a.forward_only:
        model.eval()
        fw = []
        with torch.no_grad():
            for i in range(a.warmup + a.steps):
                sync(); t0 = time.perf_counter()
                model(input_ids=tokens, labels=tokens)
                sync()
                if i >= a.warmup:
                    fw.append((time.perf_counter() - t0) * 1e3)
        ms = statistics.median(fw)
        name = torch.cuda.get_device_name() if cuda else "cpu (%d threads)" % torch.get_num_threads()
        import resource
        mem = torch.cuda.max_memory_allocated() if cuda else resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
        print(json.dumps({"tokens_per_s": a.batch * a.seq / (ms / 1e3), "step_ms": ms, "forward_ms": ms,
                          "peak_mem_bytes": mem, "device": name, "config": a.config, "method": "forward",
                          "seq": a.seq, "batch": a.batch, "steps": a.steps, "impl": "torch"}))
        return
    if cuda:
        torch.cuda.reset_peak_memory_stats()
    fw, bw, op, st = [], [], [], []
    for i in range(a.warmup + a.steps):
        sync(); t0 = time.perf_counter()
        loss = model(input_ids=tokens, labels=tokens).loss
        sync(); t1 = time.perf_counter()
        loss.backward()
        sync(); t2 = time.perf_counter()
        opt.step()
        if a.method != "lift":
            opt.zero_grad(set_to_none=True)
        sync(); t3 = time.perf_counter()
        if i >= a.warmup:
            fw.append((t1 - t0) * 1e3); bw.append((t2 - t1) * 1e3); op.append((t3 - t2) * 1e3); st.append((t3 - t0) * 1e3)
    step_ms = statistics.median(st)
    tps = a.batch * a.seq / (step_ms / 1e3)
    vv, d, l, h, kv, hs, f, *_ = CONFIGS[a.config]
    lin = l * (2 * h * hs * d + 2 * kv * hs * d + 3 * d * f)
    flops = 6 * (lin + vv * d) + 6 * l * a.seq * h * hs
    name = torch.cuda.get_device_name() if cuda else "cpu (%d threads)" % torch.get_num_threads()
    peak = {"H100": 989.4e12, "H200": 989.4e12, "A100": 312e12}
    pk = next((p for k, p in peak.items() if k in name.upper()), None) if cuda else None
    if cuda:
        mem = torch.cuda.max_memory_allocated()
    else:
        import resource
        mem = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
    print(json.dumps({
        "tokens_per_s": tps, "step_ms": step_ms, "forward_ms": statistics.median(fw),
        "backward_ms": statistics.median(bw), "optimizer_ms": statistics.median(op),
        "mask_ms": mask_s * 1e3 / a.update_interval if a.method == "lift" else 0.0,
        "peak_mem_bytes": mem, "mfu": flops * tps / pk if pk else None, "device": name,
        "config": a.config, "method": a.method, "seq": a.seq, "batch": a.batch, "steps": a.steps,
        "impl": "torch",
    }))


def real_data(a, model, opt, sync, mask_s):
    """One pass over real examples: padded batches with an attention mask and
    labels -100 on the prompt and the padding (the loss on the target tokens
    and the EOS, as lift's), timed from the first step to the last."""
    exs = [json.loads(l) for l in open(a.examples)]
    batches = []
    for i in range(0, len(exs), a.batch):
        chunk = exs[i:i + a.batch]
        t = max(len(e["ids"]) for e in chunk)
        ids = torch.zeros((len(chunk), t), dtype=torch.long)
        labels = torch.full((len(chunk), t), -100, dtype=torch.long)
        mask = torch.zeros((len(chunk), t), dtype=torch.long)
        for r, e in enumerate(chunk):
            n, first = len(e["ids"]), max(e["n_prompt"], 1)
            ids[r, :n] = torch.tensor(e["ids"])
            labels[r, first:n] = ids[r, first:n]
            mask[r, :n] = 1
        batches.append((ids.to(a.device), labels.to(a.device), mask.to(a.device)))
    target_tokens = sum(int((lb != -100).sum()) for _, lb, _ in batches)
    sync(); t0 = time.perf_counter()
    for ids, labels, mask in batches:
        loss = model(input_ids=ids, labels=labels, attention_mask=mask).loss
        loss.backward()
        opt.step()
        if a.method != "lift":
            opt.zero_grad(set_to_none=True)
    sync(); secs = time.perf_counter() - t0
    import resource
    name = torch.cuda.get_device_name() if a.device == "cuda" else "cpu (%d threads)" % torch.get_num_threads()
    mem = torch.cuda.max_memory_allocated() if a.device == "cuda" else resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
    real = sum(len(e["ids"]) for e in exs)
    print(json.dumps({"examples_per_s": len(exs) / secs, "target_tokens_per_s": target_tokens / secs,
                      "tokens_per_s": real / secs, "positions": sum(b[0].numel() for b in batches), "real_tokens": real,
                      "steps": len(batches), "seconds": secs, "mask_s": mask_s, "packed": False, "examples": len(exs),
                      "method": a.method, "peak_mem_bytes": mem, "device": name, "impl": "torch"}))


if __name__ == "__main__":
    main()
