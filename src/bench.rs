//! `lift bench`: times training steps of a model shape on either device and
//! prints one JSON object (medians over the timed steps, after warm-up):
//!   tokens_per_s, step_ms, forward_ms, backward_ms, optimizer_ms,
//!   mask_ms (mask selection time / --update-interval: its amortized cost per
//!   step), peak_mem_bytes, mfu, device
//! plus the run's parameters. The model is random (`lift init`'s), made in
//! memory (on the GPU for --device cuda), so no file is needed; tokens are
//! random and every position counts in the loss.
//!
//! `--recompute` keeps only each layer's input through the forward
//! pass and recomputes the rest in the backward pass; peak_mem_bytes shows
//! what it saves, step_ms what it costs.
//!
//! `--profile` (CUDA) times every op class with CUDA events during the timed
//! steps (or the timed selection, with --mask-only) and prints a table of
//! milliseconds per step and share, also added to the JSON as "profile".
//! Events cost a little host time per op, so the step time of a profiled
//! run is a little longer than that of a plain one.

use std::time::Instant;

use anyhow::{Result, bail};
use clap::Args;

use crate::cpu_trainer::{self, CpuTrainer};
use crate::cuda::gpu::Attention;
use crate::data::Batch;
use crate::model::{Config, Linear, Model};
use crate::options::{Device, MethodOptions, Schedule, TrainOptions};
use crate::rng::Rng;
use crate::train::peak_rss_bytes;
use crate::trainer::Trainer;

#[derive(Args, Clone)]
pub struct BenchArgs {
    /// Model shape (see `lift init`).
    #[arg(long, default_value = "smollm2-135m")]
    pub config: String,
    #[command(flatten)]
    pub method: MethodOptions,
    /// Sequence length T.
    #[arg(long, default_value_t = 256)]
    pub seq: usize,
    /// Batch size B.
    #[arg(long, default_value_t = 1)]
    pub batch: usize,
    /// Timed steps (after the warm-up).
    #[arg(long, default_value_t = 10)]
    pub steps: usize,
    /// Untimed steps first.
    #[arg(long, default_value_t = 2)]
    pub warmup: usize,
    #[arg(long, value_enum, default_value = "auto")]
    pub device: Device,
    /// Only time the mask selection of every linear layer (no training step).
    #[arg(long)]
    pub mask_only: bool,
    /// Benchmark this model.bin instead of a random model of --config's shape (CPU).
    #[arg(long)]
    pub checkpoint: Option<std::path::PathBuf>,
    /// Only time the forward pass with the loss (evaluation), on the CPU.
    #[arg(long, conflicts_with = "mask_only")]
    pub forward_only: bool,
    /// Time each op class with CUDA events and print a table (CUDA only).
    #[arg(long)]
    pub profile: bool,
    /// Attention kernels (CUDA): tensor cores (tc), CUDA cores (plain), or
    /// tc after a quick check against plain, falling back to plain (auto).
    #[arg(long, value_enum, default_value = "auto")]
    pub attention: Attention,
    /// Precision of the mask selection's sketch products (CUDA): f32, or
    /// tf32 on the tensor cores.
    #[arg(long, value_enum, default_value = "f32")]
    pub sketch: Sketch,
    /// Recompute each layer's activations in the backward pass instead of
    /// keeping them.
    #[arg(long)]
    pub recompute: bool,
    #[arg(long, default_value_t = 0)]
    pub seed: u64,
    /// Time generation instead of training (CPU or CUDA): --batch prompts
    /// decoded as one batch, prefill and decode tokens/s (see `bench_generate`).
    #[arg(long, conflicts_with_all = ["mask_only", "forward_only"])]
    pub generate: bool,
    /// --generate: beams per prompt (1 = greedy).
    #[arg(long, default_value_t = 1)]
    pub num_beams: usize,
    /// --generate: new tokens per prompt at most (EOS ends a row earlier).
    #[arg(long, default_value_t = 64)]
    pub max_new_tokens: usize,
    /// --generate: never stop at EOS, so every row runs --max-new-tokens
    /// (for timings against a reference that does the same).
    #[arg(long)]
    pub ignore_eos: bool,
    /// A data set (LLM-Adapters JSON). With --generate: the prompts of its
    /// first --batch examples (the alpaca template) instead of random ids of
    /// length --seq. Otherwise: one training pass over its first --limit
    /// examples with --checkpoint's weights and tokenizer, in file order,
    /// batches of --batch examples: examples/s and target tokens/s on real,
    /// ragged lengths (either device).
    #[arg(long)]
    pub data: Option<std::path::PathBuf>,
    /// Examples taken from --data.
    #[arg(long, default_value_t = 256)]
    pub limit: usize,
    /// With --data: pad each batch to its longest example instead of packing.
    #[arg(long)]
    pub no_pack: bool,
    /// With --data: write the tokenized examples ({"ids", "n_prompt"} per
    /// line) here, for the PyTorch reference to train on the same tokens.
    #[arg(long)]
    pub save_examples: Option<std::path::PathBuf>,
}

impl BenchArgs {
    /// The training options of the benchmarked steps: the method's flags,
    /// a small constant learning rate, no validation or saving.
    pub fn options(&self) -> TrainOptions {
        TrainOptions {
            method: self.method.clone(),
            lr: 1e-5,
            epochs: 1,
            batch_size: self.batch,
            max_seq_len: self.seq,
            warmup: 0.0,
            schedule: Schedule::Constant,
            seed: self.seed,
            val_size: 0,
            eval_every: 0,
            save_every: 0,
            recompute: self.recompute,
            ..TrainOptions::default()
        }
    }
}

/// `--sketch`.
#[derive(Clone, Copy, Debug, PartialEq, Eq, clap::ValueEnum)]
pub enum Sketch {
    F32,
    Tf32,
}

fn median(mut v: Vec<f64>) -> f64 {
    if v.is_empty() {
        return f64::NAN;
    }
    v.sort_by(|a, b| a.total_cmp(b));
    let n = v.len();
    if n % 2 == 1 { v[n / 2] } else { 0.5 * (v[n / 2 - 1] + v[n / 2]) }
}

/// Model FLOPs of one training token (forward + backward, the usual 6N plus
/// causal attention), for the MFU: every linear weight and the LM head.
pub fn flops_per_token(c: &Config, t: usize) -> f64 {
    let linear: usize = Linear::ALL.iter().map(|w| w.shape(c).0 * w.shape(c).1).sum::<usize>() * c.n_layers;
    let head = c.vocab_size * c.dim;
    6.0 * (linear + head) as f64 + 6.0 * (c.n_layers * t * c.q_dim()) as f64
}

/// Dense bf16 tensor-core peak of a GPU by name, if known.
fn peak_flops(name: &str) -> Option<f64> {
    let n = name.to_uppercase();
    if n.contains("H100") || n.contains("H200") || n.contains("GH200") {
        Some(989.4e12)
    } else if n.contains("A100") {
        Some(312e12)
    } else if n.contains("L40") {
        Some(181e12)
    } else {
        None
    }
}

/// Random tokens (B, T) and their next-token targets (every position counted).
fn random_batch(c: &Config, b: usize, t: usize, seed: u64) -> Batch {
    let mut rng = Rng::new(seed);
    let tokens: Vec<u32> = (0..b * t).map(|_| rng.below(c.vocab_size) as u32).collect();
    let mut targets = vec![0i32; b * t];
    for i in 0..b * t {
        targets[i] = if (i + 1) % t == 0 { rng.below(c.vocab_size) as i32 } else { tokens[i + 1] as i32 };
    }
    Batch { b, t, tokens, targets, n_loss: b * t, segments: Vec::new() }
}

pub fn run(a: &BenchArgs) -> Result<()> {
    let c = match &a.checkpoint {
        Some(p) => crate::formats::checkpoint::Checkpoint::open(p)?.config,
        None => crate::init::named_config(&a.config)?,
    };
    if a.seq == 0 || a.batch == 0 {
        bail!("--seq and --batch must be at least 1");
    }
    let json = match (crate::cuda::resolve(a.device), &a.data) {
        _ if a.generate => bench_generate(a, &c)?,
        (Device::Cuda, None) => bench_gpu(a, &c)?,
        (_, Some(data)) => bench_data(a, data)?, // either device
        _ => bench_cpu(a, &c)?,
    };
    println!("{json}");
    Ok(())
}

struct Timings {
    step: Vec<f64>,
    fwd: Vec<f64>,
    bwd: Vec<f64>,
    opt: Vec<f64>,
}

fn report(
    a: &BenchArgs,
    c: &Config,
    t: Timings,
    mask_total_s: f64,
    peak: u64,
    device: &str,
    peak_flops: Option<f64>,
) -> serde_json::Value {
    let tokens = (a.batch * a.seq) as f64;
    let step_ms = median(t.step);
    let tps = tokens / (step_ms / 1e3);
    let mask_ms = if a.method.kind.is_sparse() && a.method.update_interval > 0 {
        mask_total_s * 1e3 / a.method.update_interval as f64
    } else {
        0.0
    };
    let mfu = peak_flops.map(|p| flops_per_token(c, a.seq) * tps / p);
    serde_json::json!({
        "tokens_per_s": tps,
        "step_ms": step_ms,
        "forward_ms": median(t.fwd),
        "backward_ms": median(t.bwd),
        "optimizer_ms": median(t.opt),
        "mask_ms": mask_ms,
        "peak_mem_bytes": peak,
        "mfu": mfu,
        "device": device,
        "config": a.config,
        "method": format!("{:?}", a.method.kind).to_lowercase(),
        "seq": a.seq,
        "batch": a.batch,
        "steps": a.steps,
        "mask_total_ms": mask_total_s * 1e3,
        "recompute": a.recompute,
        "impl": "lift",
    })
}

/// The profile table: op classes by time, ms per step and share of the sum
/// of GPU spans; host-timed rows (the selection's eigenproblems) apart.
fn print_profile(
    title: &str,
    rows: &std::collections::BTreeMap<&'static str, crate::cuda::gpu::ProfileRow>,
    per: f64,
    total_ms: f64,
) -> serde_json::Value {
    let mut v: Vec<_> = rows.iter().collect();
    v.sort_by(|a, b| b.1.ms.total_cmp(&a.1.ms));
    let gpu_sum: f64 = v.iter().filter(|r| !r.1.host).map(|r| r.1.ms).sum::<f64>() / per;
    eprintln!("profile: {title}");
    eprintln!("  {:<28} {:>10} {:>7} {:>8}", "op class", "ms", "share", "calls");
    let mut json = serde_json::Map::new();
    for (name, r) in &v {
        let ms = r.ms / per;
        if r.host {
            eprintln!("  {:<28} {:>10.2} {:>7} {:>8}", format!("{name} [host]"), ms, "-", "-");
        } else {
            eprintln!(
                "  {:<28} {:>10.2} {:>6.1}% {:>8.0}",
                name,
                ms,
                100.0 * ms / gpu_sum.max(1e-12),
                r.calls as f64 / per
            );
        }
        json.insert(name.to_string(), serde_json::json!(ms));
    }
    eprintln!("  {:<28} {:>10.2}", "sum of GPU spans", gpu_sum);
    eprintln!(
        "  {:<28} {:>10.2}   (wall clock; the rest is launch gaps, syncs and host work)",
        "measured total", total_ms
    );
    json.insert("sum_gpu_spans".into(), serde_json::json!(gpu_sum));
    serde_json::Value::Object(json)
}

fn bench_gpu(a: &BenchArgs, c: &Config) -> Result<serde_json::Value> {
    use crate::cuda::{gpu, model::GpuModel, trainer as gt};
    let (g, attention) = crate::cuda::open_with_attention(a.attention)?;
    let o = a.options();
    let t0 = Instant::now();
    let model = GpuModel::random(&g, c, a.seed, a.seq)?;
    eprintln!("random {} on the GPU in {:.1}s", a.config, t0.elapsed().as_secs_f64());
    if a.mask_only {
        if !a.method.kind.is_sparse() {
            bail!("--mask-only needs a sparse --method (lift, magnitude, random)");
        }
        let tf32 = a.sketch == Sketch::Tf32;
        let plan = |round| crate::method::mask_plans(c, &o.method, o.seed, round, 0);
        let _ = gt::select_masks(&g, &model, &plan(0)?, tf32)?; // warm-up: cuBLAS heuristics, allocations
        if a.profile {
            g.enable_profiling();
        }
        let t0 = Instant::now();
        let masks = gt::select_masks(&g, &model, &plan(1)?, tf32)?;
        let s = t0.elapsed().as_secs_f64();
        let profile =
            if a.profile { Some(print_profile("mask selection", &g.take_profile()?, 1.0, s * 1e3)) } else { None };
        let k: usize = masks.iter().map(|m| m.len()).sum();
        return Ok(serde_json::json!({
            "mask_total_ms": s * 1e3, "matrices": masks.len(), "selected": k, "config": a.config,
            "filter_rank": a.method.filter_rank, "oversample": a.method.oversample, "power_iters": a.method.power_iters,
            "sketch": format!("{:?}", a.sketch).to_lowercase(),
            "peak_mem_bytes": gpu::mem_peak(), "device": g.name, "impl": "lift", "profile": profile,
        }));
    }
    let mut tr = gt::GpuTrainer::with_sketch(&g, model, &o, a.batch, a.seq, a.sketch == Sketch::Tf32)?;
    let batch = random_batch(c, a.batch, a.seq, a.seed ^ 1);
    let mut t = Timings { step: vec![], fwd: vec![], bwd: vec![], opt: vec![] };
    let mut prof = std::collections::BTreeMap::new();
    for i in 0..a.warmup + a.steps {
        if a.profile && i == a.warmup {
            g.enable_profiling();
        }
        let t0 = Instant::now();
        let st = tr.step(std::slice::from_ref(&batch), o.lr, i as u64 + 1)?;
        let dt = t0.elapsed().as_secs_f64() * 1e3;
        if i >= a.warmup {
            t.step.push(dt);
            t.fwd.push(st.forward_ms);
            t.bwd.push(st.backward_ms);
            t.opt.push(st.optimizer_ms);
        }
        eprintln!("step {}: loss {:.4}, {dt:.1} ms", i + 1, st.loss);
        // read this step's events outside the timed region (the pool is reused)
        for (name, r) in if a.profile { g.take_profile()? } else { Default::default() } {
            let acc: &mut gpu::ProfileRow = prof.entry(name).or_default();
            acc.ms += r.ms;
            acc.calls += r.calls;
            acc.host |= r.host;
        }
    }
    let profile = if a.profile {
        let total: f64 = t.step.iter().sum::<f64>() / a.steps.max(1) as f64;
        let title = format!(
            "{} {} (B={}, T={}), attention {:?}, per step",
            a.config,
            format!("{:?}", a.method.kind).to_lowercase(),
            a.batch,
            a.seq,
            attention
        );
        Some(print_profile(&title, &prof, a.steps.max(1) as f64, total))
    } else {
        None
    };
    let mut json = report(a, c, t, tr.mask_s, gpu::mem_peak() as u64, &g.name, peak_flops(&g.name));
    json["attention"] = serde_json::json!(format!("{attention:?}").to_lowercase());
    json["dkdv"] = serde_json::json!(if g.dkdv_per_head() { "per head" } else { "group" });
    if let Some(p) = profile {
        json["profile"] = p;
    }
    Ok(json)
}

/// The CPU benchmark times `CpuTrainer::step`, the very step `lift train` runs.
fn bench_cpu(a: &BenchArgs, c: &Config) -> Result<serde_json::Value> {
    let t0 = Instant::now();
    let weights = match &a.checkpoint {
        Some(p) => crate::formats::checkpoint::Checkpoint::open(p)?.load_weights()?,
        None => crate::init::random_weights(c, a.seed),
    };
    let mut model = Model::new(c.clone(), weights);
    match &a.checkpoint {
        Some(p) => eprintln!("loaded {} in {:.1}s", p.display(), t0.elapsed().as_secs_f64()),
        None => eprintln!("random {} in {:.1}s", a.config, t0.elapsed().as_secs_f64()),
    }
    let o = a.options();
    let device = format!("cpu ({} threads)", rayon::current_num_threads());
    if a.mask_only {
        if !a.method.kind.is_sparse() {
            bail!("--mask-only needs a sparse --method (lift, magnitude, random)");
        }
        let t0 = Instant::now();
        let masks = cpu_trainer::masks_for(&model, &o, 0)?;
        let s = t0.elapsed().as_secs_f64();
        return Ok(serde_json::json!({
            "mask_total_ms": s * 1e3, "matrices": masks.len(), "selected": masks.iter().map(Vec::len).sum::<usize>(),
            "config": a.config, "filter_rank": a.method.filter_rank, "svd": format!("{:?}", a.method.svd).to_lowercase(),
            "oversample": a.method.oversample, "power_iters": a.method.power_iters, "device": device, "impl": "lift",
        }));
    }
    if a.forward_only {
        model.ensure_rope(a.seq);
        let batch = random_batch(c, a.batch, a.seq, a.seed ^ 1);
        let mut acts = crate::model::Activations::with(c, a.batch, a.seq, crate::model::Head::Loss, false);
        let mut fwd = Vec::new();
        for i in 0..a.warmup + a.steps {
            let t0 = Instant::now();
            let loss = model.forward(&mut acts, &batch.tokens, Some(&batch.targets))?;
            let dt = t0.elapsed().as_secs_f64() * 1e3;
            if i >= a.warmup {
                fwd.push(dt);
            }
            eprintln!("forward {}: loss {loss:.4}, {dt:.1} ms", i + 1);
        }
        let ms = median(fwd);
        return Ok(serde_json::json!({
            "tokens_per_s": (a.batch * a.seq) as f64 / (ms / 1e3), "step_ms": ms, "forward_ms": ms,
            "peak_mem_bytes": peak_rss_bytes().unwrap_or(0), "device": device,
            "config": a.config, "method": "forward", "seq": a.seq, "batch": a.batch, "steps": a.steps, "impl": "lift",
        }));
    }
    let t_mask = Instant::now();
    let mut tr = CpuTrainer::start(model, &o, a.seq, a.batch * a.seq, None)?;
    let mask_s = if a.method.kind.is_sparse() { t_mask.elapsed().as_secs_f64() } else { 0.0 };
    let batch = random_batch(c, a.batch, a.seq, a.seed ^ 1);
    let mut t = Timings { step: vec![], fwd: vec![], bwd: vec![], opt: vec![] };
    for i in 0..a.warmup + a.steps {
        let t0 = Instant::now();
        let st = tr.step(std::slice::from_ref(&batch), o.lr, i as u64 + 1)?;
        let dt = t0.elapsed().as_secs_f64() * 1e3;
        if i >= a.warmup {
            t.step.push(dt);
            t.fwd.push(st.forward_ms);
            t.bwd.push(st.backward_ms);
            t.opt.push(st.optimizer_ms);
        }
        eprintln!("step {}: loss {:.4}, {dt:.1} ms", i + 1, st.loss);
    }
    let peak = peak_rss_bytes().unwrap_or(0);
    Ok(report(a, c, t, mask_s, peak, &device, None))
}

/// `--data`: one pass of LIFT training steps over real examples (the first
/// --limit of the file, in its order), packed or padded, on either device,
/// timed from the first step to the last (mask selection excluded, reported
/// apart).
fn bench_data(a: &BenchArgs, path: &std::path::Path) -> Result<serde_json::Value> {
    use crate::data::{self, Purpose};
    let Some(checkpoint) = &a.checkpoint else { bail!("--data trains a real model: give --checkpoint MODEL.bin") };
    let ck = crate::formats::checkpoint::Checkpoint::open(checkpoint)?;
    let (c, tok) = (ck.config.clone(), ck.tokenizer.clone());
    let model = Model::new(c.clone(), ck.load_weights()?);
    drop(ck);
    let mut loaded = data::load(path, Purpose::Train, true)?.examples;
    loaded.truncate(a.limit);
    let eos = tok.eos_id().ok_or_else(|| anyhow::anyhow!("the tokenizer has no EOS token"))?;
    let bos = if tok.add_bos() { tok.bos_id() } else { None };
    let encode = |s: &str| tok.encode(s);
    let examples: Vec<_> = loaded.iter().map(|e| data::tokenize_example(e, &encode, bos, eos, a.seq)).collect();
    if let Some(out) = &a.save_examples {
        let lines: String = examples
            .iter()
            .map(|e| format!("{}\n", serde_json::json!({"ids": e.ids, "n_prompt": e.n_prompt})))
            .collect();
        std::fs::write(out, lines)?;
    }
    let lens: Vec<usize> = examples.iter().map(|e| e.ids.len()).collect();
    let batches: Vec<Batch> = if a.no_pack {
        examples.chunks(a.batch).map(|ch| data::make_batch(&ch.iter().collect::<Vec<_>>(), eos)).collect()
    } else {
        let order: Vec<usize> = (0..examples.len()).collect();
        let budget = a.batch * lens.iter().sum::<usize>().div_ceil(lens.len().max(1));
        let packed = crate::pack::pack_epoch(&lens, &order, a.seq, budget);
        packed.iter().map(|p| crate::pack::make_packed_batch(&examples, p)).collect()
    };
    let longest = lens.iter().copied().max().unwrap_or(1);
    let rows = batches.iter().map(|b| b.b * b.t).max().unwrap_or(0);
    let o = a.options();
    let gpu = match crate::cuda::resolve(a.device) {
        Device::Cuda => Some(crate::cuda::open_with_attention(a.attention)?.0),
        _ => None,
    };
    let t0 = Instant::now();
    let mut tr: Box<dyn Trainer + '_> = match &gpu {
        // activations for the most positions of any batch, RoPE for as many
        Some(g) => Box::new(crate::cuda::trainer::GpuTrainer::start(g, model, &o, 1, rows.max(longest), None)?),
        None => Box::new(CpuTrainer::start(model, &o, longest, rows, None)?),
    };
    let mask_s = t0.elapsed().as_secs_f64();
    let t0 = Instant::now();
    for (i, b) in batches.iter().enumerate() {
        let st = tr.step(std::slice::from_ref(b), o.lr, i as u64 + 1)?;
        eprintln!("step {}/{}: {} x {} positions, loss {:.4}", i + 1, batches.len(), b.b, b.t, st.loss);
    }
    let secs = t0.elapsed().as_secs_f64();
    let target_tokens: usize = batches.iter().map(|b| b.n_loss).sum();
    let positions: usize = batches.iter().map(|b| b.b * b.t).sum();
    Ok(serde_json::json!({
        "examples_per_s": examples.len() as f64 / secs, "target_tokens_per_s": target_tokens as f64 / secs,
        "tokens_per_s": lens.iter().sum::<usize>() as f64 / secs, "positions": positions,
        "real_tokens": lens.iter().sum::<usize>(), "steps": batches.len(), "seconds": secs, "mask_s": mask_s,
        "packed": !a.no_pack, "examples": examples.len(), "method": format!("{:?}", a.method.kind).to_lowercase(),
        "peak_mem_bytes": match &gpu { Some(_) => crate::cuda::gpu::mem_peak() as u64, None => peak_rss_bytes().unwrap_or(0) },
        "device": match &gpu { Some(g) => g.name.clone(), None => format!("cpu ({} threads)", rayon::current_num_threads()) },
        "impl": "lift",
    }))
}

/// `--generate`: decodes the same batch of prompts --warmup + --steps times
/// with `lift eval`'s path (`decode::decode` over the CPU model) and reports
/// medians: prefill tokens/s (prompt tokens over the prefill time), decode
/// tokens/s (rows stepped, every beam counted, over the decode time), and
/// the whole call. The prompts and the new tokens are in the JSON, so that a
/// reference can run the same prompts and compare the outputs.
fn bench_generate(a: &BenchArgs, c: &Config) -> Result<serde_json::Value> {
    use crate::decode::{self, DecodeOptions, Strategy};
    let gpu = crate::cuda::resolve(a.device) == Device::Cuda;
    if gpu {
        crate::cuda::gpu::probe()?;
    }
    let (model, tok) = bench_model(a, c, gpu)?;
    let prompts = match (&a.data, &tok) {
        (Some(path), Some(tok)) => data_prompts(path, tok, a.batch)?,
        (Some(_), None) => bail!("--data needs --checkpoint (its tokenizer encodes the prompts)"),
        (None, _) => {
            let mut rng = Rng::new(a.seed);
            (0..a.batch).map(|_| (0..a.seq).map(|_| rng.below(c.vocab_size) as u32).collect()).collect()
        }
    };
    let strategy = match a.num_beams {
        0 => bail!("--num-beams must be at least 1"),
        1 => Strategy::Greedy,
        n => Strategy::Beam { num_beams: n, length_penalty: 1.0 },
    };
    let eos = if a.ignore_eos { None } else { tok.as_ref().and_then(|t| t.eos_id()) };
    let o = DecodeOptions { strategy, max_new_tokens: a.max_new_tokens, eos };
    let timed = |source: &mut dyn decode::LogitSource| -> Result<GenRuns> {
        let (mut runs, mut ids) = (Vec::new(), Vec::new());
        for i in 0..a.warmup + a.steps.max(1) {
            let t0 = Instant::now();
            let out = decode::decode(source, &prompts, &o)?;
            let ms = t0.elapsed().as_secs_f64() * 1e3;
            eprintln!("generate {}: {ms:.0} ms, {} new tokens", i + 1, out.ids.iter().map(Vec::len).sum::<usize>());
            if i >= a.warmup {
                runs.push((ms, out.stats));
            }
            ids = out.ids;
        }
        Ok((runs, ids))
    };
    let (runs, ids, device, mem) = if gpu {
        let (g, gm, plan) = gpu_generation_model(a, c, model.as_ref(), &prompts)?;
        let mut source = crate::cuda::infer::GpuSource::new(&g, &gm, plan)?;
        let (runs, ids) = timed(&mut source)?;
        (runs, ids, g.name.clone(), crate::cuda::gpu::mem_peak() as u64)
    } else {
        let model = model.as_ref().expect("the CPU has a host model");
        let mut source = crate::generate::CpuSource::new(model);
        let (runs, ids) = timed(&mut source)?;
        (runs, ids, format!("cpu ({} threads)", rayon::current_num_threads()), peak_rss_bytes().unwrap_or(0))
    };
    let med = |f: &dyn Fn(&(f64, decode::DecodeStats)) -> f64| median(runs.iter().map(f).collect());
    let s = runs[0].1;
    Ok(serde_json::json!({
        "total_ms": med(&|r| r.0),
        "prefill_ms": med(&|r| r.1.prefill_s * 1e3),
        "decode_ms": med(&|r| r.1.step_s * 1e3),
        "prefill_tokens": s.prefill_tokens,
        "prefill_tokens_per_s": med(&|r| r.1.prefill_tokens as f64 / r.1.prefill_s),
        "decode_steps": s.steps,
        "decode_rows": s.step_rows,
        "decode_tokens_per_s": med(&|r| r.1.step_rows as f64 / r.1.step_s),
        "generated_tokens": ids.iter().map(Vec::len).sum::<usize>(),
        "batch": a.batch, "num_beams": a.num_beams, "max_new_tokens": a.max_new_tokens, "seq": a.seq,
        "config": a.config, "device": device, "peak_mem_bytes": mem,
        "prompt_ids": prompts, "new_ids": ids, "impl": "lift",
    }))
}

/// Timed decodes (milliseconds and stats) and the last one's new tokens.
type GenRuns = (Vec<(f64, crate::decode::DecodeStats)>, Vec<Vec<u32>>);

/// The GPU, the benchmark's model on it (the checkpoint's, or random weights
/// made on the device), and the decoding plan for these prompts.
fn gpu_generation_model(
    a: &BenchArgs,
    c: &Config,
    model: Option<&Model>,
    prompts: &[Vec<u32>],
) -> Result<(crate::cuda::gpu::Gpu, crate::cuda::model::GpuModel, crate::cuda::infer::Plan)> {
    use crate::cuda::{infer, model::GpuModel};
    let (g, _) = crate::cuda::open_with_attention(a.attention)?;
    let shape = infer::EvalShape {
        loss_len: 0,
        prompt_len: prompts.iter().map(Vec::len).max().unwrap_or(1),
        max_new: a.max_new_tokens.max(1),
        beams: a.num_beams,
    };
    infer::fit_batch(c, g.mem_info().0, Some(a.batch), a.batch, shape)?;
    let plan = shape.plan(a.batch);
    let mut gm = match model {
        Some(m) => GpuModel::upload(&g, m, plan.stride())?,
        None => GpuModel::random(&g, c, a.seed, plan.stride())?,
    };
    gm.ensure_rope(&g, plan.stride())?;
    Ok((g, gm, plan))
}

/// The checkpoint's model and tokenizer, or a random model of --config
/// (None for the GPU, which makes its random weights on the device).
fn bench_model(a: &BenchArgs, c: &Config, gpu: bool) -> Result<(Option<Model>, Option<crate::tokenizer::Tokenizer>)> {
    Ok(match &a.checkpoint {
        Some(p) => {
            let ck = crate::formats::checkpoint::Checkpoint::open(p)?;
            (Some(Model::new(c.clone(), ck.load_weights()?)), Some(ck.tokenizer))
        }
        None if gpu => (None, None),
        None => (Some(Model::new(c.clone(), crate::init::random_weights(c, a.seed))), None),
    })
}

/// The evaluation prompts of the first n examples of a data set.
fn data_prompts(path: &std::path::Path, tok: &crate::tokenizer::Tokenizer, n: usize) -> Result<Vec<Vec<u32>>> {
    use crate::data::{self, Purpose, Template};
    let loaded = data::load(path, Purpose::Eval, false)?;
    if loaded.examples.len() < n {
        bail!("{}: {} examples, fewer than --batch {n}", path.display(), loaded.examples.len());
    }
    let bos = if tok.add_bos() { tok.bos_id() } else { None };
    let encode = |s: &str| tok.encode(s);
    Ok(loaded.examples[..n].iter().map(|e| Template::Alpaca.prompt_ids(e, &encode, bos)).collect())
}
