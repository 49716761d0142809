//! Training on the GPU: each method's optimizer state on the device, the
//! gradient sinks the backward pass feeds, one optimizer step, and the
//! `lift train --device cuda` loop (train.rs's loop, on GpuModel).
//!
//! Memory, per method, besides the bf16 weights and the activations:
//!   lift   k x (index u32 + m + v + f32 master + gradient accumulator f32)
//!          = 20 bytes per selected entry, plus ONE dense f32 dW buffer the
//!          size of the largest matrix, reused matrix after matrix;
//!   full   20 bytes per trained weight (f32 gradient, m, v, master);
//!   lora   20 bytes per adapter value, plus its bf16 copy.

use std::time::Instant;

use anyhow::{Context, Result, anyhow, bail};

use super::gpu::{Bf16, Buf, Dt, Gpu};
use super::launch as k;
use super::model::{GpuActs, GpuAdapter, GpuModel, GpuSink, matrix_id, to_bf16};
use super::select::{Job, SelectScratch};
use crate::lift::{self, Approx, Budget};
use crate::model::{Config, Linear};
use crate::optim::{self, AdamW};
use crate::train::{Method, Svd, TrainOptions};

/// Sparse AdamW state of one matrix (optim::SparseState, plus the f32 master
/// values of the selected entries and their gradient accumulator).
pub struct GpuSparse {
    pub k: usize,
    pub idx: Buf<u32>,
    pub m: Buf<f32>,
    pub v: Buf<f32>,
    pub master: Buf<f32>,
    pub acc: Buf<f32>,
}

/// Dense AdamW state of one tensor (optim::DenseState, plus master and gradient).
pub struct GpuDense {
    pub n: usize,
    pub m: Buf<f32>,
    pub v: Buf<f32>,
    pub master: Buf<f32>,
    pub grad: Buf<f32>,
}

impl GpuDense {
    fn new(g: &Gpu, master: &[f32]) -> Result<GpuDense> {
        let n = master.len();
        Ok(GpuDense { n, m: g.zeros(n)?, v: g.zeros(n)?, master: g.upload(master)?, grad: g.zeros(n)? })
    }
}

pub enum GpuState {
    Sparse { states: Vec<GpuSparse>, dw: Buf<f32> },
    Full { states: Vec<GpuDense> },
    /// (A, B) per matrix; dyb (N, r) is the sink's dout @ B.
    Lora { states: Vec<(GpuDense, GpuDense)>, dyb: Buf<Bf16> },
}

/// What to select and how (the LIFT flags of TrainOptions).
#[derive(Clone, Copy, Debug)]
pub struct SelectOptions {
    pub method: Method,
    pub budget: Budget,
    pub filter_rank: usize,
    pub svd: Svd,
    pub oversample: usize,
    pub power_iters: usize,
    pub seed: u64,
    /// Multiply the sketches in TF32 on the tensor cores instead of f32 on
    /// the CUDA cores (`lift bench --sketch tf32`; gpu-check measures the
    /// mask overlap it costs). Off for training.
    pub sketch_tf32: bool,
}

impl SelectOptions {
    pub fn of(o: &TrainOptions) -> SelectOptions {
        let budget = match (o.rank, o.density) {
            (Some(r), _) => Budget::Rank(r),
            (None, Some(d)) => Budget::Density(d),
            (None, None) => Budget::Density(lift::DEFAULT_DENSITY),
        };
        SelectOptions {
            method: o.method,
            budget,
            filter_rank: o.filter_rank,
            svd: o.svd,
            oversample: o.oversample,
            power_iters: o.power_iters,
            seed: o.seed,
            sketch_tf32: false,
        }
    }

    /// On the GPU `auto` is the randomized path (falling back to exact when
    /// the sketch would not be smaller than the matrix): GEMMs are cheap
    /// there, while the exact path's eigenproblem runs on the host.
    fn approx(&self, seed: u64) -> Approx {
        match self.svd {
            Svd::Exact => Approx::Exact,
            Svd::Auto | Svd::Randomized => {
                Approx::Randomized { oversample: self.oversample, power_iters: self.power_iters, seed }
            }
        }
    }
}

/// The masks of every linear matrix of the model (matrix_id order) on the
/// device; round 0 at the start, +1 per refresh. The seven matrices of a
/// layer are selected together (select.rs), and the host's eigenproblems of
/// one layer overlap the GPU's work on the next.
pub fn select_masks(g: &Gpu, model: &GpuModel, so: &SelectOptions, round: u64) -> Result<Vec<Buf<u32>>> {
    let c = &model.config;
    let mut layers = Vec::with_capacity(c.n_layers);
    let mut masks = Vec::with_capacity(c.n_layers * 7);
    for l in 0..c.n_layers {
        let mut jobs = Vec::with_capacity(7);
        for w in Linear::ALL {
            let (out, inp) = w.shape(c);
            let kk = lift::budget_k(out, inp, so.budget).with_context(|| format!("layer {l} {w:?} ({out}x{inp})"))?;
            let seed = so.seed ^ (round << 32) ^ matrix_id(l, w) as u64;
            let r = match so.method {
                Method::Lift => lift::filter_rank(out, inp, so.filter_rank)?.0,
                Method::Magnitude => 0,
                Method::Random => {
                    masks.push(g.upload(&lift::random_mask(out * inp, kk, seed))?);
                    continue;
                }
                _ => bail!("--method {:?} has no mask", so.method),
            };
            jobs.push(Job { w: model.layers[l].linear(w), out, inp, k: kk, r, how: so.approx(seed) });
        }
        layers.push(jobs);
    }
    if so.method != Method::Random {
        let mut sc = SelectScratch::default();
        sc.tf32 = so.sketch_tf32;
        let batches: Vec<&[Job]> = layers.iter().map(|j| j.as_slice()).collect();
        masks = sc.select_batches(g, &batches)?;
    }
    g.sync()?;
    Ok(masks)
}

/// The model, its activations and the method's state: one training step at a time.
pub struct GpuTrainer {
    pub model: GpuModel,
    pub acts: GpuActs,
    pub state: GpuState,
    pub select: SelectOptions,
    partial: Buf<f64>,
    /// Seconds spent selecting masks (start and refreshes).
    pub mask_s: f64,
}

/// Timings of one step, in ms, and its loss and gradient norm.
#[derive(Clone, Copy, Debug, Default)]
pub struct StepStats {
    pub loss: f32,
    pub grad_norm: f64,
    pub forward_ms: f64,
    pub backward_ms: f64,
    pub optimizer_ms: f64,
}

struct LiftSink<'a> {
    states: &'a mut [GpuSparse],
    dw: &'a mut Buf<f32>,
}

impl GpuSink for LiftSink<'_> {
    fn linear(&mut self, g: &Gpu, id: usize, dout: &Buf<Bf16>, inp: &Buf<Bf16>, _xa: Option<&Buf<Bf16>>, n: usize, ic: usize, oc: usize) -> Result<()> {
        // One dense dW in the reused buffer, of which only the k selected
        // entries are kept (train.rs Sink::linear).
        // bf16 operands, f32 output and sums: a tensor-core GEMM.
        assert!(self.dw.len() >= oc * ic);
        g.timed("gemm dW", || g.gemm(true, false, oc, ic, n, 1.0, dout.ptr(), inp.ptr(), 0.0, self.dw.ptr(), Dt::Bf16, Dt::F32))?;
        let s = &mut self.states[id];
        g.timed("dW gather", || k::gather_add(g, &mut s.acc, self.dw, &s.idx, s.k))
    }
}

struct FullSink<'a> {
    states: &'a mut [GpuDense],
}

impl GpuSink for FullSink<'_> {
    fn linear(&mut self, g: &Gpu, id: usize, dout: &Buf<Bf16>, inp: &Buf<Bf16>, _xa: Option<&Buf<Bf16>>, n: usize, ic: usize, oc: usize) -> Result<()> {
        // cpu::matmul_backward_weight: dW (OC, IC) += dout^T @ inp, in f32.
        let s = &mut self.states[id];
        g.timed("gemm dW", || g.gemm(true, false, oc, ic, n, 1.0, dout.ptr(), inp.ptr(), 1.0, s.grad.ptr(), Dt::Bf16, Dt::F32))
    }
}

struct LoraSink<'a> {
    states: &'a mut [(GpuDense, GpuDense)],
    adapters: &'a [GpuAdapter],
    dyb: &'a Buf<Bf16>,
}

impl GpuSink for LoraSink<'_> {
    fn linear(&mut self, g: &Gpu, id: usize, dout: &Buf<Bf16>, inp: &Buf<Bf16>, xa: Option<&Buf<Bf16>>, n: usize, ic: usize, oc: usize) -> Result<()> {
        // lora.rs Adapter::backward: dB = s dout^T (inp A^T), dA = s (dout B)^T inp.
        let ad = &self.adapters[id];
        let xa = xa.ok_or_else(|| anyhow!("LoRA: the forward pass kept no inp @ A^T"))?;
        let (sa, sb) = &mut self.states[id];
        g.timed("gemm dW", || {
            g.gemm(true, false, oc, ad.r, n, ad.scale, dout.ptr(), xa.ptr(), 1.0, sb.grad.ptr(), Dt::Bf16, Dt::F32)?;
            g.gemm(false, false, n, ad.r, oc, 1.0, dout.ptr(), ad.b.ptr(), 0.0, self.dyb.ptr(), Dt::Bf16, Dt::Bf16)?;
            g.gemm(true, false, ad.r, ic, n, ad.scale, self.dyb.ptr(), inp.ptr(), 1.0, sa.grad.ptr(), Dt::Bf16, Dt::F32)
        })
    }
}

impl GpuTrainer {
    /// Sets up `method` on a model already on the GPU, with activations for
    /// batches of up to (b, t). LIFT's masks are selected here.
    pub fn new(g: &Gpu, mut model: GpuModel, o: &TrainOptions, b: usize, t: usize) -> Result<GpuTrainer> {
        let c = model.config.clone();
        let so = SelectOptions::of(o);
        let t0 = Instant::now();
        let state = match o.method {
            Method::Lift | Method::Magnitude | Method::Random => {
                let masks = select_masks(g, &model, &so, 0)?;
                let mut states = Vec::with_capacity(masks.len());
                for (id, idx) in masks.into_iter().enumerate() {
                    let kk = idx.len();
                    let mut master = g.zeros::<f32>(kk)?;
                    let w = model.layers[id / 7].linear(Linear::ALL[id % 7]);
                    k::gather_bf16(g, &mut master, w, &idx, kk)?;
                    states.push(GpuSparse { k: kk, idx, m: g.zeros(kk)?, v: g.zeros(kk)?, master, acc: g.zeros(kk)? });
                }
                let max = Linear::ALL.iter().map(|w| w.shape(&c).0 * w.shape(&c).1).max().unwrap_or(0);
                GpuState::Sparse { states, dw: g.zeros(max)? }
            }
            Method::Full => {
                let mut states = Vec::with_capacity(c.n_layers * 7);
                for l in 0..c.n_layers {
                    for w in Linear::ALL {
                        let b = model.layers[l].linear(w);
                        let mut master = g.zeros::<f32>(b.len())?;
                        k::convert(g, "bf16_to_f32", &mut master, b, b.len())?;
                        let n = b.len();
                        states.push(GpuDense { n, m: g.zeros(n)?, v: g.zeros(n)?, master, grad: g.zeros(n)? });
                    }
                }
                GpuState::Full { states }
            }
            Method::Lora => {
                if o.lora_rank == 0 {
                    bail!("--lora-rank must be at least 1");
                }
                // The same initialization as train.rs: A ~ U(-1/sqrt(IC), 1/sqrt(IC)), B = 0.
                let mut rng = crate::data::Rng::stream(o.seed, 7);
                let mut uniform = || rng.next_f32();
                let mut states = Vec::new();
                for _l in 0..c.n_layers {
                    for w in Linear::ALL {
                        let (out, inp) = w.shape(&c);
                        let ad = crate::lora::Adapter::new(out, inp, o.lora_rank.min(out.min(inp)), o.lora_alpha, &mut uniform);
                        states.push((GpuDense::new(g, &ad.a)?, GpuDense::new(g, &ad.b)?));
                        model.adapters.push(GpuAdapter { r: ad.r, scale: ad.scale, a: g.upload(&to_bf16(&ad.a))?, b: g.upload(&to_bf16(&ad.b))? });
                    }
                }
                let r = model.adapters.iter().map(|a| a.r).max().unwrap_or(1);
                GpuState::Lora { states, dyb: g.zeros(b * t * r)? }
            }
        };
        g.sync()?;
        let mask_s = if o.method.is_sparse() { t0.elapsed().as_secs_f64() } else { 0.0 };
        let lora_r = if o.method == Method::Lora { model.adapters.iter().map(|a| a.r).max().unwrap_or(0) } else { 0 };
        let acts = GpuActs::new(g, &c, b, t, lora_r)?;
        let n_tensors = match &state {
            GpuState::Sparse { states, .. } => states.len(),
            GpuState::Full { states } => states.len(),
            GpuState::Lora { states, .. } => 2 * states.len(),
        };
        let partial = g.zeros(n_tensors * k::SUMSQ_BLOCKS)?;
        Ok(GpuTrainer { model, acts, state, select: so, partial, mask_s })
    }

    /// Zeroes the gradient accumulators.
    pub fn zero_grads(&mut self, g: &Gpu) -> Result<()> {
        g.timed("zero", || self.zero_grads_inner(g))
    }

    fn zero_grads_inner(&mut self, g: &Gpu) -> Result<()> {
        match &mut self.state {
            GpuState::Sparse { states, .. } => states.iter_mut().try_for_each(|s| g.zero(&mut s.acc)),
            GpuState::Full { states } => states.iter_mut().try_for_each(|s| g.zero(&mut s.grad)),
            GpuState::Lora { states, .. } => states.iter_mut().try_for_each(|(a, b)| {
                g.zero(&mut a.grad)?;
                g.zero(&mut b.grad)
            }),
        }
    }

    /// Forward and backward of one micro-batch (tokens and targets (B, T)),
    /// accumulating gradients. Returns (loss, forward ms, backward ms).
    pub fn micro_step(&mut self, g: &Gpu, b: usize, t: usize, tokens: &[u32], targets: &[i32]) -> Result<(f32, f64, f64)> {
        self.acts.set_shape(b, t)?;
        let t0 = Instant::now();
        let loss = self.model.forward(g, &mut self.acts, tokens, Some(targets))?; // synchronizes (loss)
        let t1 = Instant::now();
        match &mut self.state {
            GpuState::Sparse { states, dw } => self.model.backward(g, &mut self.acts, &mut LiftSink { states, dw })?,
            GpuState::Full { states } => self.model.backward(g, &mut self.acts, &mut FullSink { states })?,
            GpuState::Lora { states, dyb } => self.model.backward(
                g,
                &mut self.acts,
                &mut LoraSink { states, adapters: &self.model.adapters, dyb },
            )?,
        }
        g.sync()?;
        Ok((loss, (t1 - t0).as_secs_f64() * 1e3, t1.elapsed().as_secs_f64() * 1e3))
    }

    /// Sum of squares of every gradient accumulator (f64, deterministic).
    fn grad_sum_sq(&mut self, g: &Gpu) -> Result<f64> {
        let mut off = 0;
        let partial = &mut self.partial;
        let mut add = |buf: &Buf<f32>, n: usize| -> Result<()> {
            g.timed("grad norm", || k::sum_squares(g, partial, off, buf, n))?;
            off += k::SUMSQ_BLOCKS;
            Ok(())
        };
        match &self.state {
            GpuState::Sparse { states, .. } => states.iter().try_for_each(|s| add(&s.acc, s.k))?,
            GpuState::Full { states } => states.iter().try_for_each(|s| add(&s.grad, s.n))?,
            GpuState::Lora { states, .. } => states.iter().try_for_each(|(a, b)| {
                add(&a.grad, a.n)?;
                add(&b.grad, b.n)
            })?,
        }
        let p = g.download(&self.partial, off)?;
        Ok(p.iter().sum())
    }

    /// One optimizer step over `micro` micro-batches (each (b, t, tokens,
    /// targets)), at step t (1-based), learning rate lr: train.rs's step.
    pub fn step(&mut self, g: &Gpu, micro: &[(usize, usize, &[u32], &[i32])], opt: &AdamW, t: u64, grad_clip: f32) -> Result<StepStats> {
        self.zero_grads(g)?;
        let mut st = StepStats::default();
        let mut loss_sum = 0.0f64;
        for &(b, tt, tokens, targets) in micro {
            let (loss, f, bw) = self.micro_step(g, b, tt, tokens, targets)?;
            if !loss.is_finite() {
                bail!("loss is {loss} at step {t}; stopped");
            }
            loss_sum += loss as f64;
            st.forward_ms += f;
            st.backward_ms += bw;
        }
        let (grad_norm, ms) = self.update(g, opt, t, grad_clip, micro.len().max(1))?;
        st.optimizer_ms = ms;
        st.grad_norm = grad_norm;
        st.loss = (loss_sum / micro.len().max(1) as f64) as f32;
        Ok(st)
    }

    /// The optimizer half of a step: global-norm clipping of the accumulated
    /// gradients (averaged over `accum` micro-batches), then AdamW at step t.
    /// Returns (gradient norm, ms).
    pub fn update(&mut self, g: &Gpu, opt: &AdamW, t: u64, grad_clip: f32, accum: usize) -> Result<(f64, f64)> {
        let t0 = Instant::now();
        let accum = accum as f32;
        let sum_sq = self.grad_sum_sq(g)? / (accum as f64 * accum as f64);
        let clip = optim::clip_scale(sum_sq, grad_clip);
        let gscale = clip / accum;
        match &mut self.state {
            GpuState::Sparse { states, .. } => {
                for (id, s) in states.iter_mut().enumerate() {
                    let w = self.model.layers[id / 7].linear_mut(Linear::ALL[id % 7]);
                    let n = w.len();
                    g.timed("adamw", || k::sparse_adamw(g, w, n, &s.idx, &mut s.m, &mut s.v, &mut s.master, &s.acc, s.k, gscale, opt, t))?;
                }
            }
            GpuState::Full { states } => {
                for (id, s) in states.iter_mut().enumerate() {
                    let w = self.model.layers[id / 7].linear_mut(Linear::ALL[id % 7]);
                    g.timed("adamw", || k::adamw(g, w, &mut s.m, &mut s.v, &mut s.master, &s.grad, s.n, gscale, opt, t))?;
                }
            }
            GpuState::Lora { states, .. } => {
                for (ad, (sa, sb)) in self.model.adapters.iter_mut().zip(states.iter_mut()) {
                    g.timed("adamw", || {
                        k::adamw(g, &mut ad.a, &mut sa.m, &mut sa.v, &mut sa.master, &sa.grad, sa.n, gscale, opt, t)?;
                        k::adamw(g, &mut ad.b, &mut sb.m, &mut sb.v, &mut sb.master, &sb.grad, sb.n, gscale, opt, t)
                    })?;
                }
            }
        }
        g.sync()?;
        Ok((sum_sq.sqrt(), t0.elapsed().as_secs_f64() * 1e3))
    }

    /// A mask refresh (train.rs): new masks from the current weights;
    /// entries selected before and after keep m, v and their master value,
    /// new ones start from zero state and the current weight. The merge of
    /// the two ascending index lists is optim::SparseState::refresh's, on
    /// the host (every --update-interval steps, so its cost is amortized).
    pub fn refresh_masks(&mut self, g: &Gpu, round: u64) -> Result<(usize, usize)> {
        let t0 = Instant::now();
        let GpuState::Sparse { states, .. } = &mut self.state else { return Ok((0, 0)) };
        let masks = select_masks(g, &self.model, &self.select, round)?;
        let (mut kept, mut total) = (0, 0);
        for (id, (s, new_idx)) in states.iter_mut().zip(masks).enumerate() {
            let (old_idx, old_m, old_v, old_master) =
                (g.download(&s.idx, s.k)?, g.download(&s.m, s.k)?, g.download(&s.v, s.k)?, g.download(&s.master, s.k)?);
            let kk = new_idx.len();
            let idx = g.download(&new_idx, kk)?;
            let w = self.model.layers[id / 7].linear(Linear::ALL[id % 7]);
            let mut cur = g.zeros::<f32>(kk)?;
            k::gather_bf16(g, &mut cur, w, &new_idx, kk)?;
            let mut master = g.download(&cur, kk)?;
            let (mut m, mut v) = (vec![0.0f32; kk], vec![0.0f32; kk]);
            let mut i = 0;
            for (j, &x) in idx.iter().enumerate() {
                while i < old_idx.len() && old_idx[i] < x {
                    i += 1;
                }
                if i < old_idx.len() && old_idx[i] == x {
                    m[j] = old_m[i];
                    v[j] = old_v[i];
                    master[j] = old_master[i];
                    kept += 1;
                }
            }
            total += kk;
            *s = GpuSparse { k: kk, idx: new_idx, m: g.upload(&m)?, v: g.upload(&v)?, master: g.upload(&master)?, acc: g.zeros(kk)? };
        }
        self.mask_s += t0.elapsed().as_secs_f64();
        Ok((kept, total))
    }

    /// The masks on the host (matrix_id order), for checks.
    pub fn masks(&self, g: &Gpu) -> Result<Vec<Vec<u32>>> {
        match &self.state {
            GpuState::Sparse { states, .. } => states.iter().map(|s| g.download(&s.idx, s.k)).collect(),
            _ => Ok(Vec::new()),
        }
    }
}

/// Checks that the options can run on the GPU.
pub fn unsupported(o: &TrainOptions, c: &Config) -> Option<String> {
    if o.train_norms || o.train_embeddings {
        return Some("--train-norms and --train-embeddings".into());
    }
    if c.head_dim > 128 {
        return Some(format!("head size {} (the attention kernels take up to 128)", c.head_dim));
    }
    None
}

/// `lift train --device cuda`: train.rs's loop (data, schedule, clipping,
/// refreshes, validation, metrics.jsonl, model.bin) with the steps on the GPU.
pub fn train(o: &TrainOptions) -> Result<()> {
    use crate::checkpoint::{self, Checkpoint};
    use crate::data::{self, Dataset, Purpose};

    let ck = Checkpoint::open(&o.checkpoint)?;
    let c = ck.config.clone();
    if let Some(what) = unsupported(o, &c) {
        bail!("--device cuda does not support {what}; use --device cpu");
    }
    if o.batch_size == 0 || o.grad_accum == 0 {
        bail!("--batch-size and --grad-accum must be at least 1");
    }
    let tok = ck.tokenizer.clone();
    let g = Gpu::new()?;
    eprintln!("device: {} (sm_{}{}), kernels compiled in {:.2}s", g.name, g.cc.0, g.cc.1, g.compile_s);
    // tensor-core attention after a quick check against the plain kernels
    // (LIFT_ATTENTION=plain skips it)
    let wanted = if g.attention() == super::Attention::Plain { super::Attention::Plain } else { super::Attention::Auto };
    super::check::choose_attention(&g, wanted)?;
    let loaded = data::load(&o.data, Purpose::Train, o.skip_bad)?;
    let eos = tok.eos_id().ok_or_else(|| anyhow!("{}: the tokenizer has no EOS token", o.checkpoint.display()))?;
    let bos = if tok.add_bos() { tok.bos_id() } else { None };
    let encode = |s: &str| tok.encode(s);
    let ds = Dataset::new(&loaded.examples, &encode, bos, eos, o.max_seq_len, o.val_size, o.seed)
        .with_context(|| o.data.display().to_string())?;
    if ds.train.is_empty() {
        bail!("{}: no training examples left", o.data.display());
    }
    let pad = eos;
    let val_batches = ds.val_batches(o.batch_size, pad);
    let per_epoch = ds.batches_per_epoch(o.batch_size) as u64;
    let mut total_steps = (o.epochs as u64 * per_epoch).div_ceil(o.grad_accum as u64);
    if let Some(m) = o.max_steps {
        total_steps = total_steps.min(m);
    }
    if total_steps == 0 {
        bail!("nothing to train: 0 optimizer steps (check --epochs and --max-steps)");
    }
    std::fs::create_dir_all(&o.out).with_context(|| format!("{}: cannot create the output directory", o.out.display()))?;

    let longest = ds.train.iter().chain(ds.val.iter()).map(|e| e.ids.len()).max().unwrap_or(1);
    let cpu_model = crate::model::Model::new(c.clone(), ck.load_weights()?);
    let gm = GpuModel::upload(&g, &cpu_model, longest)?;
    drop(cpu_model);
    let mut tr = GpuTrainer::new(&g, gm, o, o.batch_size, longest)?;
    if o.method.is_sparse() {
        eprintln!("masks selected on the GPU in {:.2}s", tr.mask_s);
    }
    let opt_base = AdamW { lr: o.lr, weight_decay: o.weight_decay, ..AdamW::default() };
    let eval = |tr: &mut GpuTrainer| -> Result<f32> {
        let (mut sum, mut n) = (0.0f64, 0usize);
        for b in &val_batches {
            tr.acts.set_shape(b.b, b.t)?;
            let l = tr.model.forward(&g, &mut tr.acts, &b.tokens, Some(&b.targets))?;
            sum += l as f64 * b.n_loss as f64;
            n += b.n_loss;
        }
        Ok(if n == 0 { f32::NAN } else { (sum / n as f64) as f32 })
    };
    let mut history: Vec<serde_json::Value> = Vec::new();
    if !val_batches.is_empty() {
        let v = eval(&mut tr)?;
        eprintln!("step 0: validation loss {v:.4}");
        history.push(serde_json::json!({"step": 0, "val_loss": v}));
    }
    let t_start = Instant::now();
    let (mut order_epoch, mut order) = (usize::MAX, Vec::new());
    let mut mask_round = 0u64;
    let mut step = 0u64;
    while step < total_steps {
        let t0 = Instant::now();
        let mut batches = Vec::with_capacity(o.grad_accum);
        for micro in 0..o.grad_accum as u64 {
            let m = step * o.grad_accum as u64 + micro;
            let epoch = (m / per_epoch) as usize;
            if epoch != order_epoch {
                order = ds.epoch_order(epoch, o.seed);
                order_epoch = epoch;
            }
            batches.push(ds.train_batch(&order, (m % per_epoch) as usize, o.batch_size, pad));
        }
        let micro: Vec<(usize, usize, &[u32], &[i32])> =
            batches.iter().map(|b| (b.b, b.t, &b.tokens[..], &b.targets[..])).collect();
        let lr = crate::train::lr_at(o, step, total_steps);
        let opt = AdamW { lr, ..opt_base };
        step += 1;
        let st = tr.step(&g, &micro, &opt, step, o.grad_clip)?;
        if o.method.is_sparse() && o.update_interval > 0 && step % o.update_interval == 0 && step < total_steps {
            mask_round += 1;
            let (kept, total) = tr.refresh_masks(&g, mask_round)?;
            eprintln!("step {step}: masks refreshed, {:.1}% of entries kept their state", 100.0 * kept as f64 / total.max(1) as f64);
        }
        let tokens: usize = batches.iter().map(|b| b.tokens.len()).sum();
        let dt = t0.elapsed().as_secs_f64();
        let mut rec = serde_json::json!({
            "step": step, "loss": st.loss, "lr": lr, "grad_norm": st.grad_norm, "tokens": tokens,
            "step_s": dt, "tokens_per_s": tokens as f64 / dt, "elapsed_s": t_start.elapsed().as_secs_f64(),
        });
        if (o.eval_every > 0 && step % o.eval_every == 0 || step == total_steps) && !val_batches.is_empty() {
            rec["val_loss"] = serde_json::json!(eval(&mut tr)?);
        }
        if step % o.log_every.max(1) == 0 || step == total_steps {
            eprintln!("step {step}/{total_steps} | loss {:.4} | lr {lr:.2e} | {:.0} tok/s", st.loss, tokens as f64 / dt);
        }
        history.push(rec);
    }
    let text: String = history.iter().map(|r| format!("{r}\n")).collect();
    std::fs::write(o.out.join("metrics.jsonl"), text)?;
    let weights = tr.model.download(&g)?;
    let mut meta = std::collections::BTreeMap::new();
    meta.insert("base_checkpoint".to_string(), o.checkpoint.display().to_string());
    meta.insert("method".to_string(), format!("{:?}", o.method).to_lowercase());
    meta.insert("steps".to_string(), step.to_string());
    meta.insert("device".to_string(), g.name.clone());
    if o.method == Method::Lora {
        eprintln!("note: LoRA adapters are not merged into the saved model.bin on the GPU path yet");
    }
    checkpoint::save_weights(&o.out.join("model.bin"), &c, &tok, &weights, ck.dtype(), &meta)?;
    eprintln!(
        "saved {}; GPU memory peak {:.1} MiB",
        o.out.join("model.bin").display(),
        super::gpu::mem_peak() as f64 / (1 << 20) as f64
    );
    Ok(())
}
