//! `lift bench`: times training steps of a model shape on either device and
//! prints one JSON object (medians over the timed steps, after warm-up):
//!   tokens_per_s, step_ms, forward_ms, backward_ms, optimizer_ms,
//!   mask_ms (mask selection time / --update-interval: its amortized cost per
//!   step), peak_mem_bytes, mfu, device
//! plus the run's parameters. The model is random (`lift init`'s), made in
//! memory (on the GPU for --device cuda), so no file is needed; tokens are
//! random and every position counts in the loss.
//!
//! `--profile` (CUDA) times every op class with CUDA events during the timed
//! steps (or the timed selection, with --mask-only) and prints a table of
//! milliseconds per step and share, also added to the JSON as "profile".
//! Events cost a little host time per op, so the step time of a profiled
//! run is a little longer than that of a plain one.

use std::time::Instant;

use anyhow::{Result, bail};
use clap::Args;

use crate::cuda::{Attention, Device};
use crate::lift::{self, Approx, Budget};
use crate::lora::Adapter;
use crate::model::{Activations, Config, FullGrads, GradSink, Linear, Model, Param};
use crate::optim::{AdamW, DenseState, SparseState};
use crate::rng::Rng;
use crate::train::{Method, Schedule, Svd, TrainOptions};

#[derive(Args, Clone)]
pub struct BenchArgs {
    /// Model shape (see `lift init`).
    #[arg(long, default_value = "smollm2-135m")]
    pub config: String,
    #[arg(long, value_enum, default_value = "lift")]
    pub method: Method,
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
    #[arg(long, default_value_t = lift::DEFAULT_DENSITY)]
    pub density: f64,
    #[arg(long, default_value_t = lift::DEFAULT_FILTER_RANK)]
    pub filter_rank: usize,
    #[arg(long, default_value_t = lift::DEFAULT_OVERSAMPLE)]
    pub oversample: usize,
    #[arg(long, default_value_t = lift::DEFAULT_POWER_ITERS)]
    pub power_iters: usize,
    #[arg(long, value_enum, default_value = "auto")]
    pub svd: Svd,
    /// Mask refresh interval over which the selection time is amortized.
    #[arg(long, default_value_t = 400)]
    pub update_interval: u64,
    #[arg(long, default_value_t = 16)]
    pub lora_rank: usize,
    /// Only time the mask selection of every linear layer (no training step).
    #[arg(long)]
    pub mask_only: bool,
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
    #[arg(long, default_value_t = 0)]
    pub seed: u64,
}

impl BenchArgs {
    pub fn options(&self) -> TrainOptions {
        TrainOptions {
            checkpoint: "".into(),
            data: "".into(),
            out: "".into(),
            method: self.method,
            lr: 1e-5,
            epochs: 1,
            max_steps: None,
            batch_size: self.batch,
            grad_accum: 1,
            max_seq_len: self.seq,
            warmup: 0.0,
            schedule: Schedule::Constant,
            weight_decay: 0.0,
            grad_clip: 1.0,
            seed: self.seed,
            val_size: 0,
            eval_every: 0,
            save_every: 0,
            log_every: 1,
            density: Some(self.density),
            rank: None,
            filter_rank: self.filter_rank,
            svd: self.svd,
            power_iters: self.power_iters,
            oversample: self.oversample,
            update_interval: self.update_interval,
            lora_rank: self.lora_rank,
            lora_alpha: 2.0 * self.lora_rank as f32,
            train_norms: false,
            train_embeddings: false,
            skip_bad: false,
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
fn random_batch(c: &Config, b: usize, t: usize, seed: u64) -> (Vec<u32>, Vec<i32>) {
    let mut rng = Rng::new(seed);
    let tokens: Vec<u32> = (0..b * t).map(|_| rng.below(c.vocab_size) as u32).collect();
    let mut targets = vec![0i32; b * t];
    for i in 0..b * t {
        targets[i] = if (i + 1) % t == 0 { rng.below(c.vocab_size) as i32 } else { tokens[i + 1] as i32 };
    }
    (tokens, targets)
}

pub fn run(a: &BenchArgs) -> Result<()> {
    let c = crate::init::named_config(&a.config)?;
    if a.seq == 0 || a.batch == 0 {
        bail!("--seq and --batch must be at least 1");
    }
    let json = match a.device.resolve() {
        Device::Cuda => bench_gpu(a, &c)?,
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

fn report(a: &BenchArgs, c: &Config, t: Timings, mask_total_s: f64, peak: u64, device: &str, peak_flops: Option<f64>) -> serde_json::Value {
    let tokens = (a.batch * a.seq) as f64;
    let step_ms = median(t.step);
    let tps = tokens / (step_ms / 1e3);
    let mask_ms = if a.method.is_sparse() && a.update_interval > 0 { mask_total_s * 1e3 / a.update_interval as f64 } else { 0.0 };
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
        "method": format!("{:?}", a.method).to_lowercase(),
        "seq": a.seq,
        "batch": a.batch,
        "steps": a.steps,
        "mask_total_ms": mask_total_s * 1e3,
        "impl": "lift",
    })
}

/// The profile table: op classes by time, ms per step and share of the sum
/// of GPU spans; host-timed rows (the selection's eigenproblems) apart.
fn print_profile(title: &str, rows: &std::collections::BTreeMap<&'static str, crate::cuda::gpu::ProfileRow>, per: f64, total_ms: f64) -> serde_json::Value {
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
            eprintln!("  {:<28} {:>10.2} {:>6.1}% {:>8.0}", name, ms, 100.0 * ms / gpu_sum.max(1e-12), r.calls as f64 / per);
        }
        json.insert(name.to_string(), serde_json::json!(ms));
    }
    eprintln!("  {:<28} {:>10.2}", "sum of GPU spans", gpu_sum);
    eprintln!("  {:<28} {:>10.2}   (wall clock; the rest is launch gaps, syncs and host work)", "measured total", total_ms);
    json.insert("sum_gpu_spans".into(), serde_json::json!(gpu_sum));
    serde_json::Value::Object(json)
}

fn bench_gpu(a: &BenchArgs, c: &Config) -> Result<serde_json::Value> {
    use crate::cuda::{check, gpu, model::GpuModel, train as gt};
    let g = gpu::Gpu::new()?;
    eprintln!("device: {} (sm_{}{}), kernels compiled in {:.2}s", g.name, g.cc.0, g.cc.1, g.compile_s);
    let attention = check::choose_attention(&g, a.attention)?;
    let o = a.options();
    let t0 = Instant::now();
    let model = GpuModel::random(&g, c, a.seed, a.seq)?;
    eprintln!("random {} on the GPU in {:.1}s", a.config, t0.elapsed().as_secs_f64());
    if a.mask_only {
        if !a.method.is_sparse() {
            bail!("--mask-only needs a sparse --method (lift, magnitude, random)");
        }
        let mut so = gt::SelectOptions::of(&o);
        so.sketch_tf32 = a.sketch == Sketch::Tf32;
        let _ = gt::select_masks(&g, &model, &so, 0)?; // warm-up: cuBLAS heuristics, allocations
        if a.profile {
            g.enable_profiling();
        }
        let t0 = Instant::now();
        let masks = gt::select_masks(&g, &model, &so, 1)?;
        let s = t0.elapsed().as_secs_f64();
        let profile = if a.profile { Some(print_profile("mask selection", &g.take_profile()?, 1.0, s * 1e3)) } else { None };
        let k: usize = masks.iter().map(|m| m.len()).sum();
        return Ok(serde_json::json!({
            "mask_total_ms": s * 1e3, "matrices": masks.len(), "selected": k, "config": a.config,
            "filter_rank": a.filter_rank, "oversample": a.oversample, "power_iters": a.power_iters,
            "sketch": format!("{:?}", a.sketch).to_lowercase(),
            "peak_mem_bytes": gpu::mem_peak(), "device": g.name, "impl": "lift", "profile": profile,
        }));
    }
    let mut tr = gt::GpuTrainer::new(&g, model, &o, a.batch, a.seq)?;
    let (tokens, targets) = random_batch(c, a.batch, a.seq, a.seed ^ 1);
    let opt = AdamW { lr: 1e-5, ..AdamW::default() };
    let mut t = Timings { step: vec![], fwd: vec![], bwd: vec![], opt: vec![] };
    let mut prof = std::collections::BTreeMap::new();
    for i in 0..a.warmup + a.steps {
        if a.profile && i == a.warmup {
            g.enable_profiling();
        }
        let t0 = Instant::now();
        let st = tr.step(&g, &[(a.batch, a.seq, &tokens[..], &targets[..])], &opt, i as u64 + 1, 1.0)?;
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
        let title = format!("{} {} (B={}, T={}), attention {:?}, per step", a.config, format!("{:?}", a.method).to_lowercase(), a.batch, a.seq, attention);
        Some(print_profile(&title, &prof, a.steps.max(1) as f64, total))
    } else {
        None
    };
    let mut json = report(a, c, t, tr.mask_s, gpu::mem_peak() as u64, &g.name, peak_flops(&g.name));
    json["attention"] = serde_json::json!(format!("{attention:?}").to_lowercase());
    if let Some(p) = profile {
        json["profile"] = p;
    }
    Ok(json)
}

/// The CPU methods' state for the benchmark (train.rs's, reduced to one step).
enum CpuState {
    Sparse(Vec<SparseState>, Vec<Vec<f32>>, Vec<f32>),
    Full(FullGrads, Vec<DenseState>),
    Lora(Vec<Vec<f32>>, Vec<Adapter>, Vec<Vec<f32>>, Vec<(DenseState, DenseState)>),
}

struct CpuSink<'a>(&'a mut CpuState);

impl GradSink for CpuSink<'_> {
    fn wants(&self, p: Param) -> bool {
        matches!(p, Param::Linear(..))
    }
    fn linear(&mut self, p: Param, dout: &[f32], inp: &[f32], n: usize, ic: usize, oc: usize) {
        let Param::Linear(l, w) = p else { return };
        let id = crate::cuda::model::matrix_id(l, w);
        match &mut *self.0 {
            CpuState::Sparse(states, acc, dw) => {
                let dw = &mut dw[..oc * ic];
                crate::cpu::sgemm(oc, ic, n, dout, 1, oc, inp, ic, 1, dw, ic, false);
                for (a, &i) in acc[id].iter_mut().zip(&states[id].indices) {
                    *a += dw[i as usize];
                }
            }
            CpuState::Full(fg, _) => fg.linear(p, dout, inp, n, ic, oc),
            CpuState::Lora(_, ads, grads, _) => {
                let ad = &ads[id];
                let (da, db) = grads[id].split_at_mut(ad.a.len());
                ad.backward(da, db, dout, inp, n);
            }
        }
    }
    fn dense(&mut self, _p: Param) -> &mut [f32] {
        unreachable!("only linear weights are trained in the benchmark")
    }
}

fn bench_cpu(a: &BenchArgs, c: &Config) -> Result<serde_json::Value> {
    let t0 = Instant::now();
    let mut model = Model::new(c.clone(), crate::init::random_weights(c, a.seed));
    model.ensure_rope(a.seq);
    eprintln!("random {} in {:.1}s", a.config, t0.elapsed().as_secs_f64());
    let o = a.options();
    let budget = Budget::Density(a.density);
    let t_mask = Instant::now();
    let mut state = match a.method {
        Method::Lift | Method::Magnitude | Method::Random => {
            let mut states = Vec::new();
            for l in 0..c.n_layers {
                for w in Linear::ALL {
                    let (out, inp) = w.shape(c);
                    let k = lift::budget_k(out, inp, budget)?;
                    let wt = model.weights.layers[l].linear(w);
                    let seed = a.seed ^ crate::cuda::model::matrix_id(l, w) as u64;
                    let mask = match a.method {
                        Method::Lift => {
                            let r = lift::filter_rank(out, inp, a.filter_rank)?.0;
                            let how = match a.svd {
                                Svd::Exact => Approx::Exact,
                                Svd::Auto if out.min(inp) <= 1024 => Approx::Exact,
                                _ => Approx::Randomized { oversample: a.oversample, power_iters: a.power_iters, seed },
                            };
                            lift::principal_mask(wt, out, inp, k, r, how)
                        }
                        Method::Magnitude => lift::magnitude_mask(wt, k),
                        _ => lift::random_mask(out * inp, k, seed),
                    };
                    states.push(SparseState::new(mask));
                }
            }
            let acc = states.iter().map(|s| vec![0.0f32; s.k()]).collect();
            let max = Linear::ALL.iter().map(|w| w.shape(c).0 * w.shape(c).1).max().unwrap_or(0);
            CpuState::Sparse(states, acc, vec![0.0; max])
        }
        Method::Full => {
            let mut fg = FullGrads::new(c);
            fg.trainable = Some((0..c.n_layers).flat_map(|l| Linear::ALL.map(|w| Param::Linear(l, w))).collect());
            let states = (0..c.n_layers * 7).map(|id| {
                let (out, inp) = Linear::ALL[id % 7].shape(c);
                DenseState::new(out * inp)
            });
            CpuState::Full(fg, states.collect())
        }
        Method::Lora => {
            let mut rng = Rng::stream(a.seed, 7);
            let mut uniform = || rng.next_f32();
            let (mut base, mut ads, mut grads, mut states) = (vec![], vec![], vec![], vec![]);
            for l in 0..c.n_layers {
                for w in Linear::ALL {
                    let (out, inp) = w.shape(c);
                    let ad = Adapter::new(out, inp, a.lora_rank.min(out.min(inp)), o.lora_alpha, &mut uniform);
                    base.push(model.weights.layers[l].linear(w).to_vec());
                    grads.push(vec![0.0; ad.a.len() + ad.b.len()]);
                    states.push((DenseState::new(ad.a.len()), DenseState::new(ad.b.len())));
                    ads.push(ad);
                }
            }
            CpuState::Lora(base, ads, grads, states)
        }
    };
    let mask_s = if a.method.is_sparse() { t_mask.elapsed().as_secs_f64() } else { 0.0 };
    let mut acts = Activations::new(c, a.batch, a.seq);
    let (tokens, targets) = random_batch(c, a.batch, a.seq, a.seed ^ 1);
    let opt = AdamW { lr: 1e-5, ..AdamW::default() };
    let mut t = Timings { step: vec![], fwd: vec![], bwd: vec![], opt: vec![] };
    for i in 0..a.warmup + a.steps {
        let t0 = Instant::now();
        match &mut state {
            CpuState::Sparse(_, acc, _) => acc.iter_mut().for_each(|g| g.fill(0.0)),
            CpuState::Full(fg, _) => fg.grads = crate::model::Weights::zeros(c),
            CpuState::Lora(_, _, grads, _) => grads.iter_mut().for_each(|g| g.fill(0.0)),
        }
        let loss = model.forward(&mut acts, &tokens, Some(&targets));
        let t1 = Instant::now();
        model.backward(&mut acts, &mut CpuSink(&mut state));
        let t2 = Instant::now();
        let step = i as u64 + 1;
        match &mut state {
            CpuState::Sparse(states, acc, _) => {
                for l in 0..c.n_layers {
                    for w in Linear::ALL {
                        let id = crate::cuda::model::matrix_id(l, w);
                        states[id].step(&opt, step, model.weights.layers[l].linear_mut(w), &acc[id]);
                    }
                }
            }
            CpuState::Full(fg, states) => {
                for l in 0..c.n_layers {
                    for w in Linear::ALL {
                        let id = crate::cuda::model::matrix_id(l, w);
                        states[id].step(&opt, step, model.weights.layers[l].linear_mut(w), fg.grads.layers[l].linear(w));
                    }
                }
            }
            CpuState::Lora(base, ads, grads, states) => {
                for (id, ad) in ads.iter_mut().enumerate() {
                    let (da, db) = grads[id].split_at(ad.a.len());
                    states[id].0.step(&opt, step, &mut ad.a, da);
                    states[id].1.step(&opt, step, &mut ad.b, db);
                    let (l, w) = (id / 7, Linear::ALL[id % 7]);
                    ad.merge_into(model.weights.layers[l].linear_mut(w), &base[id]);
                }
            }
        }
        let t3 = Instant::now();
        if i >= a.warmup {
            t.step.push((t3 - t0).as_secs_f64() * 1e3);
            t.fwd.push((t1 - t0).as_secs_f64() * 1e3);
            t.bwd.push((t2 - t1).as_secs_f64() * 1e3);
            t.opt.push((t3 - t2).as_secs_f64() * 1e3);
        }
        eprintln!("step {}: loss {loss:.4}, {:.1} ms", i + 1, (t3 - t0).as_secs_f64() * 1e3);
    }
    let peak = crate::train::peak_rss_bytes().unwrap_or(0);
    let device = format!("cpu ({} threads)", rayon::current_num_threads());
    Ok(report(a, c, t, mask_s, peak, &device, None))
}
