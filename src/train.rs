//! The training loop: LIFT and its baselines on one data path.
//!
//! One optimizer step = `grad_accum` micro-batches of forward + backward,
//! gradients averaged, clipped by global norm, then an AdamW update of the
//! trainable entries. What "trainable" means is the method's:
//!   lift       the principal weights of every linear layer (sparse AdamW),
//!              masks recomputed every `update_interval` steps
//!   magnitude  the largest |W| entries instead (ablation)
//!   random     random entries instead (ablation)
//!   full       every entry of every linear layer (dense AdamW)
//!   lora       low-rank adapters on every linear layer (dense AdamW on A, B)
//! Norms and embeddings are frozen unless `--train-norms` / `--train-embeddings`
//! ask for them; they are then trained densely whatever the method.

use std::collections::BTreeMap;
use std::io::Write;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::Instant;

use anyhow::{Context, Result, anyhow, bail};
use rayon::prelude::*;
use serde::{Deserialize, Serialize};

use crate::checkpoint::{self, Checkpoint};
use crate::data::{self, Batch, Dataset, Purpose, Rng};
use crate::lift::{self, Approx, Budget};
use crate::lora::Adapter;
use crate::model::{Activations, Config, GradSink, Linear, Model, Param};
use crate::optim::{self, AdamW, DenseState, RefreshStats, SparseState};

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize, clap::ValueEnum)]
#[serde(rename_all = "lowercase")]
pub enum Method {
    Lift,
    Full,
    Lora,
    Magnitude,
    Random,
}

impl Method {
    pub fn is_sparse(self) -> bool {
        matches!(self, Method::Lift | Method::Magnitude | Method::Random)
    }
}

/// How the rank-r approximation behind LIFT's scores is computed.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize, clap::ValueEnum)]
#[serde(rename_all = "lowercase")]
pub enum Svd {
    /// Exact for matrices whose smaller side is at most 1024 (cheaper there on
    /// CPU), randomized subspace iteration for larger ones.
    Auto,
    Randomized,
    Exact,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize, clap::ValueEnum)]
#[serde(rename_all = "lowercase")]
pub enum Schedule {
    Linear,
    Cosine,
    Constant,
}

/// Everything a run is configured by (the `lift train` flags).
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct TrainOptions {
    pub checkpoint: PathBuf,
    pub data: PathBuf,
    pub out: PathBuf,
    pub method: Method,
    pub lr: f32,
    pub epochs: usize,
    pub max_steps: Option<u64>,
    pub batch_size: usize,
    pub grad_accum: usize,
    pub max_seq_len: usize,
    pub warmup: f32,
    pub schedule: Schedule,
    pub weight_decay: f32,
    pub grad_clip: f32,
    pub seed: u64,
    pub val_size: usize,
    pub eval_every: u64,
    pub save_every: u64,
    pub log_every: u64,
    pub density: Option<f64>,
    pub rank: Option<usize>,
    pub filter_rank: usize,
    pub svd: Svd,
    pub power_iters: usize,
    pub oversample: usize,
    pub update_interval: u64,
    pub lora_rank: usize,
    pub lora_alpha: f32,
    pub train_norms: bool,
    pub train_embeddings: bool,
    pub skip_bad: bool,
}

impl TrainOptions {
    fn budget(&self) -> Budget {
        match (self.rank, self.density) {
            (Some(r), _) => Budget::Rank(r),
            (None, Some(d)) => Budget::Density(d),
            (None, None) => Budget::Density(0.05),
        }
    }

    fn adamw(&self) -> AdamW {
        AdamW { lr: self.lr, weight_decay: self.weight_decay, ..AdamW::default() }
    }

    fn approx(&self, out: usize, inp: usize, seed: u64) -> Approx {
        let randomized = Approx::Randomized { oversample: self.oversample, power_iters: self.power_iters, seed };
        match self.svd {
            Svd::Exact => Approx::Exact,
            Svd::Randomized => randomized,
            Svd::Auto if out.min(inp) <= 1024 => Approx::Exact,
            Svd::Auto => randomized,
        }
    }
}

/// The learning rate of optimizer step `step` (0-based) of `total`, as
/// Hugging Face's schedulers give it: linear warmup from 0 over the first
/// ceil(warmup * total) steps, then linear decay to 0, cosine decay to 0, or
/// constant.
pub fn lr_at(o: &TrainOptions, step: u64, total: u64) -> f32 {
    let warm = (o.warmup as f64 * total as f64).ceil() as u64;
    if step < warm {
        return o.lr * step as f32 / warm.max(1) as f32;
    }
    let progress = (step - warm) as f64 / (total.saturating_sub(warm)).max(1) as f64;
    let f = match o.schedule {
        Schedule::Constant => 1.0,
        Schedule::Linear => (1.0 - progress).max(0.0),
        Schedule::Cosine => 0.5 * (1.0 + (std::f64::consts::PI * progress.min(1.0)).cos()),
    };
    (o.lr as f64 * f) as f32
}

// ----------------------------------------------------------------------------
// Trainable state per method

/// The matrix number of a linear weight: layer * 7 + position in Linear::ALL.
fn matrix_id(l: usize, w: Linear) -> usize {
    l * 7 + Linear::ALL.iter().position(|&x| x == w).expect("a linear kind")
}

/// The tensors trained densely besides the method's own (norms, embeddings).
fn extra_params(c: &Config, o: &TrainOptions) -> Vec<Param> {
    let mut v = Vec::new();
    if o.train_embeddings {
        v.push(Param::Embed);
        if !c.tied_embeddings {
            v.push(Param::LmHead);
        }
    }
    if o.train_norms {
        for l in 0..c.n_layers {
            v.push(Param::AttnNorm(l));
            v.push(Param::MlpNorm(l));
        }
        v.push(Param::Norm);
    }
    v
}

/// Optimizer state and gradient accumulators of a run.
enum Trainable {
    /// lift / magnitude / random: one SparseState per linear matrix (L*7).
    Sparse { states: Vec<SparseState> },
    /// full: one DenseState per linear matrix (L*7).
    Full { states: Vec<DenseState> },
    /// lora: the frozen base of each linear matrix, its adapter, and the
    /// AdamW state of A and B.
    Lora { base: Vec<Vec<f32>>, adapters: Vec<Adapter>, states: Vec<(DenseState, DenseState)> },
}

/// Gradient accumulators, kept outside `Trainable` so a state file need not hold them.
struct Grads {
    /// Per linear matrix: k gradients (sparse), out*in (full), or (dA, dB) flattened (lora).
    linear: Vec<Vec<f32>>,
    /// Dense gradients of the extra tensors.
    extra: Vec<(Param, Vec<f32>)>,
    /// Scratch for the transposed factors of a sampled dW (sparse only),
    /// reused matrix after matrix; it grows to N * (OC + IC) floats.
    dw: Vec<f32>,
}

/// Selects the masks of every linear matrix for a sparse method.
pub fn select_masks(model: &Model, o: &TrainOptions, round: u64, log: bool) -> Result<Vec<Vec<u32>>> {
    let c = &model.config;
    let t0 = Instant::now();
    let mut masks = Vec::with_capacity(c.n_layers * 7);
    let mut capped = false;
    for l in 0..c.n_layers {
        for w in Linear::ALL {
            let (out, inp) = w.shape(c);
            let k = lift::budget_k(out, inp, o.budget()).with_context(|| format!("layer {l} {w:?} ({out}x{inp})"))?;
            let weights = model.weights.layers[l].linear(w);
            let seed = o.seed ^ (round << 32) ^ matrix_id(l, w) as u64;
            let mask = match o.method {
                Method::Lift => {
                    let (r, was_capped) = lift::filter_rank(out, inp, o.filter_rank)?;
                    capped |= was_capped;
                    lift::principal_mask(weights, out, inp, k, r, o.approx(out, inp, seed))
                }
                Method::Magnitude => lift::magnitude_mask(weights, k),
                Method::Random => lift::random_mask(out * inp, k, seed),
                _ => unreachable!("dense methods have no mask"),
            };
            masks.push(mask);
        }
    }
    if log {
        if capped {
            eprintln!("note: --filter-rank {} capped at the smaller side of some matrices", o.filter_rank);
        }
        let k: usize = masks.iter().map(Vec::len).sum();
        let n: usize = Linear::ALL.iter().map(|w| w.shape(c).0 * w.shape(c).1).sum::<usize>() * c.n_layers;
        eprintln!(
            "masks: {} matrices, {k} of {n} entries selected ({:.2}%), {:.1}s",
            masks.len(),
            100.0 * k as f64 / n as f64,
            t0.elapsed().as_secs_f64()
        );
    }
    Ok(masks)
}

impl Trainable {
    fn new(model: &mut Model, o: &TrainOptions) -> Result<Trainable> {
        let c = model.config.clone();
        Ok(match o.method {
            Method::Lift | Method::Magnitude | Method::Random => {
                let masks = select_masks(model, o, 0, true)?;
                Trainable::Sparse { states: masks.into_iter().map(SparseState::new).collect() }
            }
            Method::Full => Trainable::Full {
                states: (0..c.n_layers * 7)
                    .map(|id| {
                        let (out, inp) = Linear::ALL[id % 7].shape(&c);
                        DenseState::new(out * inp)
                    })
                    .collect(),
            },
            Method::Lora => {
                let mut rng = Rng::stream(o.seed, 7);
                let mut uniform = || rng.next_f32();
                let (mut base, mut adapters, mut states) = (Vec::new(), Vec::new(), Vec::new());
                for l in 0..c.n_layers {
                    for w in Linear::ALL {
                        let (out, inp) = w.shape(&c);
                        let ad = Adapter::new(out, inp, o.lora_rank.min(out.min(inp)), o.lora_alpha, &mut uniform);
                        base.push(model.weights.layers[l].linear(w).to_vec());
                        states.push((DenseState::new(ad.a.len()), DenseState::new(ad.b.len())));
                        adapters.push(ad);
                    }
                }
                Trainable::Lora { base, adapters, states }
            }
        })
    }

    fn new_grads(&self, c: &Config, o: &TrainOptions) -> Grads {
        let (linear, dw) = match self {
            Trainable::Sparse { states } => (states.iter().map(|s| vec![0.0; s.k()]).collect(), Vec::new()),
            Trainable::Full { states } => (states.iter().map(|s| vec![0.0; s.m.len()]).collect(), Vec::new()),
            Trainable::Lora { adapters, .. } => {
                (adapters.iter().map(|a| vec![0.0; a.a.len() + a.b.len()]).collect(), Vec::new())
            }
        };
        let extra = extra_params(c, o).into_iter().map(|p| (p, vec![0.0; p.shape(c).iter().product()])).collect();
        Grads { linear, extra, dw }
    }

    /// Bytes of optimizer state.
    fn state_bytes(&self) -> usize {
        match self {
            Trainable::Sparse { states } => states.iter().map(SparseState::bytes).sum(),
            Trainable::Full { states } => states.iter().map(DenseState::bytes).sum(),
            Trainable::Lora { adapters, states, .. } => {
                states.iter().map(|(a, b)| a.bytes() + b.bytes()).sum::<usize>()
                    + adapters.iter().map(|a| 4 * (a.a.len() + a.b.len())).sum::<usize>()
            }
        }
    }

    fn trainable_count(&self) -> usize {
        match self {
            Trainable::Sparse { states } => states.iter().map(SparseState::k).sum(),
            Trainable::Full { states } => states.iter().map(|s| s.m.len()).sum(),
            Trainable::Lora { adapters, .. } => adapters.iter().map(|a| a.a.len() + a.b.len()).sum(),
        }
    }

    /// For LoRA: rebuilds every linear weight of the model as base + s B A.
    fn merge_lora(&self, model: &mut Model) {
        if let Trainable::Lora { base, adapters, .. } = self {
            let n_layers = model.config.n_layers;
            for l in 0..n_layers {
                for w in Linear::ALL {
                    let id = matrix_id(l, w);
                    adapters[id].merge_into(model.weights.layers[l].linear_mut(w), &base[id]);
                }
            }
        }
    }
}

/// Routes the backward pass's weight gradients into the method's accumulators.
struct Sink<'a> {
    trainable: &'a Trainable,
    grads: &'a mut Grads,
}

impl GradSink for Sink<'_> {
    fn wants(&self, p: Param) -> bool {
        matches!(p, Param::Linear(..)) || self.grads.extra.iter().any(|(q, _)| *q == p)
    }

    fn linear(&mut self, p: Param, dout: &[f32], inp: &[f32], n: usize, ic: usize, oc: usize) {
        let Param::Linear(l, w) = p else {
            // The LM head (only when --train-embeddings and untied).
            let g = self.dense(p);
            crate::cpu::matmul_backward_weight(g, dout, inp, n, ic, oc);
            return;
        };
        let id = matrix_id(l, w);
        let acc = &mut self.grads.linear[id];
        match self.trainable {
            Trainable::Sparse { states } => {
                // Only the k selected entries of dW are computed (a sampled
                // product); the dense (OC, IC) gradient never exists.
                let need = n * (oc + ic);
                if self.grads.dw.len() < need {
                    self.grads.dw.resize(need, 0.0);
                }
                let (dout_t, inp_t) = self.grads.dw[..need].split_at_mut(n * oc);
                crate::cpu::matmul_backward_weight_sampled(
                    acc,
                    &states[id].indices,
                    dout,
                    inp,
                    n,
                    ic,
                    oc,
                    dout_t,
                    inp_t,
                );
            }
            Trainable::Full { .. } => crate::cpu::matmul_backward_weight(acc, dout, inp, n, ic, oc),
            Trainable::Lora { adapters, .. } => {
                let ad = &adapters[id];
                let (da, db) = acc.split_at_mut(ad.a.len());
                ad.backward(da, db, dout, inp, n);
            }
        }
    }

    fn dense(&mut self, p: Param) -> &mut [f32] {
        let slot = self.grads.extra.iter_mut().find(|(q, _)| *q == p).expect("wants() said yes");
        &mut slot.1
    }
}

impl Grads {
    fn zero(&mut self) {
        for g in self.linear.iter_mut().chain(self.extra.iter_mut().map(|(_, g)| g)) {
            g.fill(0.0);
        }
    }

    fn scale(&mut self, s: f32) {
        for g in self.linear.iter_mut().chain(self.extra.iter_mut().map(|(_, g)| g)) {
            g.iter_mut().for_each(|x| *x *= s);
        }
    }

    fn sum_sq(&self) -> f64 {
        self.linear
            .iter()
            .chain(self.extra.iter().map(|(_, g)| g))
            .map(|g| g.iter().map(|&x| x as f64 * x as f64).sum::<f64>())
            .sum()
    }

    fn bytes(&self) -> usize {
        4 * (self.linear.iter().map(Vec::len).sum::<usize>()
            + self.extra.iter().map(|(_, g)| g.len()).sum::<usize>()
            + self.dw.len())
    }
}

/// Dense AdamW state of the extra tensors, in the order of `extra_params`.
type ExtraStates = Vec<DenseState>;

/// One optimizer update of everything trainable, at step t (1-based).
fn apply_update(
    model: &mut Model,
    trainable: &mut Trainable,
    extra: &mut ExtraStates,
    grads: &Grads,
    opt: &AdamW,
    t: u64,
) {
    // Layers are independent: one task per layer, its seven matrices in turn.
    let layers = model.weights.layers.par_iter_mut().enumerate();
    match trainable {
        Trainable::Sparse { states } => {
            let states: Vec<&mut [SparseState]> = states.chunks_mut(7).collect();
            layers.zip(states).for_each(|((l, lw), st)| {
                for (i, w) in Linear::ALL.into_iter().enumerate() {
                    st[i].step(opt, t, lw.linear_mut(w), &grads.linear[matrix_id(l, w)]);
                }
            });
        }
        Trainable::Full { states } => {
            let states: Vec<&mut [DenseState]> = states.chunks_mut(7).collect();
            layers.zip(states).for_each(|((l, lw), st)| {
                for (i, w) in Linear::ALL.into_iter().enumerate() {
                    st[i].step(opt, t, lw.linear_mut(w), &grads.linear[matrix_id(l, w)]);
                }
            });
        }
        Trainable::Lora { adapters, states, .. } => {
            for (id, ad) in adapters.iter_mut().enumerate() {
                let (da, db) = grads.linear[id].split_at(ad.a.len());
                states[id].0.step(opt, t, &mut ad.a, da);
                states[id].1.step(opt, t, &mut ad.b, db);
            }
        }
    }
    for ((p, g), s) in grads.extra.iter().zip(extra.iter_mut()) {
        s.step(opt, t, model.weights.get_mut(*p), g);
    }
    trainable.merge_lora(model);
}

// ----------------------------------------------------------------------------
// One training step on the CPU

/// What one optimizer step did.
#[derive(Debug, Clone, Copy, Default)]
pub struct StepStats {
    /// Mean of the micro-batches' losses.
    pub loss: f32,
    /// Global L2 norm of the averaged gradient, before clipping.
    pub grad_norm: f64,
    pub tokens: usize,
    pub forward_ms: f64,
    pub backward_ms: f64,
    pub optimizer_ms: f64,
}

/// A model with a method's trainable state, ready to take optimizer steps:
/// what `lift train` runs and what `lift bench` times.
pub struct CpuTrainer {
    pub model: Model,
    trainable: Trainable,
    /// The tensors trained densely besides the method's own, and their state.
    extras: Vec<Param>,
    extra_states: ExtraStates,
    grads: Grads,
    acts: Activations,
    opts: TrainOptions,
}

impl CpuTrainer {
    /// A fresh run: selects the masks (sparse methods) or makes the adapters
    /// (LoRA). Activations are sized for batches up to (B, T).
    pub fn new(model: Model, o: &TrainOptions, b: usize, t: usize) -> Result<CpuTrainer> {
        let mut model = model;
        let trainable = Trainable::new(&mut model, o)?;
        let extras = extra_params(&model.config, o);
        let extra_states = extras.iter().map(|p| DenseState::new(p.shape(&model.config).iter().product())).collect();
        Ok(CpuTrainer::assemble(model, trainable, extras, extra_states, o, b, t))
    }

    fn assemble(
        mut model: Model,
        trainable: Trainable,
        extras: Vec<Param>,
        extra_states: ExtraStates,
        o: &TrainOptions,
        b: usize,
        t: usize,
    ) -> CpuTrainer {
        trainable.merge_lora(&mut model);
        model.ensure_rope(t);
        let grads = trainable.new_grads(&model.config, o);
        let acts = Activations::new(&model.config, b, t);
        CpuTrainer { model, trainable, extras, extra_states, grads, acts, opts: o.clone() }
    }

    /// One optimizer step (t, 1-based) over the micro-batches: forward and
    /// backward of each, gradients averaged and clipped by global norm, then
    /// the AdamW update at learning rate `lr`. A non-finite loss or gradient
    /// is returned as an error before anything is updated, so the weights
    /// stay those of the last good step.
    pub fn step(&mut self, batches: &[Batch], lr: f32, t: u64) -> Result<StepStats> {
        let c = &self.model.config;
        let mut st = StepStats::default();
        self.grads.zero();
        let mut loss_sum = 0.0f64;
        for (micro, batch) in batches.iter().enumerate() {
            self.acts.set_shape(c, batch.b, batch.t);
            let t0 = Instant::now();
            let loss = self.model.forward(&mut self.acts, &batch.tokens, Some(&batch.targets));
            st.forward_ms += t0.elapsed().as_secs_f64() * 1e3;
            if !loss.is_finite() {
                bail!("loss is {loss} at step {t} (micro-batch {micro})");
            }
            let t0 = Instant::now();
            self.model.backward(&mut self.acts, &mut Sink { trainable: &self.trainable, grads: &mut self.grads });
            st.backward_ms += t0.elapsed().as_secs_f64() * 1e3;
            loss_sum += loss as f64;
            st.tokens += batch.tokens.len();
        }
        let t0 = Instant::now();
        self.grads.scale(1.0 / batches.len().max(1) as f32);
        let sum_sq = self.grads.sum_sq();
        // A finite loss can still have an overflowing gradient; applying it
        // would write NaN into the weights (clipping scales inf to NaN).
        if !sum_sq.is_finite() {
            bail!("the gradient norm is {} at step {t}", sum_sq.sqrt());
        }
        let clip = optim::clip_scale(sum_sq, self.opts.grad_clip);
        if clip != 1.0 {
            self.grads.scale(clip);
        }
        let opt = AdamW { lr, ..self.opts.adamw() };
        apply_update(&mut self.model, &mut self.trainable, &mut self.extra_states, &self.grads, &opt, t);
        st.optimizer_ms = t0.elapsed().as_secs_f64() * 1e3;
        st.loss = (loss_sum / batches.len().max(1) as f64) as f32;
        st.grad_norm = sum_sq.sqrt();
        Ok(st)
    }

    /// Recomputes the masks from the current weights (sparse methods):
    /// returns how many selected entries kept their optimizer state, of how many.
    pub fn refresh_masks(&mut self, round: u64) -> Result<RefreshStats> {
        let masks = select_masks(&self.model, &self.opts, round, false)?;
        let mut stats = RefreshStats::default();
        if let Trainable::Sparse { states } = &mut self.trainable {
            for (s, m) in states.iter_mut().zip(masks) {
                let r = s.refresh(m);
                stats.kept += r.kept;
                stats.total += r.total;
            }
        }
        self.grads = self.trainable.new_grads(&self.model.config, &self.opts);
        Ok(stats)
    }

    /// Mean validation loss, weighted by loss tokens.
    pub fn eval_loss(&mut self, batches: &[Batch]) -> f32 {
        eval_loss(&self.model, &mut self.acts, batches)
    }

    /// Bytes of optimizer state, and of gradient accumulators.
    pub fn state_bytes(&self) -> usize {
        self.trainable.state_bytes() + self.extra_states.iter().map(DenseState::bytes).sum::<usize>()
    }

    pub fn grad_bytes(&self) -> usize {
        self.grads.bytes()
    }

    pub fn trainable_count(&self) -> usize {
        self.trainable.trainable_count()
    }

    /// Writes DIR/state.bin for step `step`.
    fn save(&self, dir: &Path, step: u64, total_steps: u64, mask_round: u64) -> Result<()> {
        let c = &self.model.config;
        let mut tensors: Vec<String> = match self.trainable {
            Trainable::Lora { .. } => Vec::new(),
            _ => (0..c.n_layers).flat_map(|l| Linear::ALL.map(|w| w.hf_name(l))).collect(),
        };
        tensors.extend(self.extras.iter().map(|p| p.name()));
        let header = StateHeader { step, total_steps, mask_round, options: self.opts.clone(), tensors };
        save_state(dir, &header, &self.model, &self.trainable, &self.extra_states)
    }
}

// ----------------------------------------------------------------------------
// The resumable state file

/// What DIR/state.bin holds besides the arrays: where the run stands.
#[derive(Serialize, Deserialize)]
struct StateHeader {
    step: u64,
    total_steps: u64,
    mask_round: u64,
    options: TrainOptions,
    /// The trainable tensors' current values (names of Param), saved whole.
    tensors: Vec<String>,
}

/// Writes DIR/state.bin atomically: header, trainable tensors, optimizer state.
fn save_state(
    dir: &Path,
    header: &StateHeader,
    model: &Model,
    trainable: &Trainable,
    extra: &ExtraStates,
) -> Result<()> {
    let path = dir.join("state.bin");
    let tmp = checkpoint::tmp_path(&path);
    let result = (|| -> Result<()> {
        let f = std::fs::File::create(&tmp).with_context(|| format!("{}: cannot create", tmp.display()))?;
        let mut w = std::io::BufWriter::with_capacity(1 << 20, f);
        let head = serde_json::to_vec(header)?;
        w.write_all(b"LIFTSTAT")?;
        w.write_all(&(head.len() as u64).to_le_bytes())?;
        w.write_all(&head)?;
        for name in &header.tensors {
            let p = Param::all(&model.config)
                .into_iter()
                .find(|p| p.name() == *name)
                .ok_or_else(|| anyhow!("unknown tensor {name}"))?;
            write_f32s(&mut w, model.weights.get(p))?;
        }
        write_optimizer(&mut w, trainable, extra)?;
        w.into_inner().map_err(|e| e.into_error())?.sync_all()?;
        Ok(())
    })();
    match result {
        Ok(()) => std::fs::rename(&tmp, &path).with_context(|| format!("{}: cannot write", path.display())),
        Err(e) => {
            let _ = std::fs::remove_file(&tmp);
            Err(e.context(format!("{}: cannot save the training state", path.display())))
        }
    }
}

fn write_f32s(w: &mut dyn Write, xs: &[f32]) -> Result<()> {
    let bytes: Vec<u8> = xs.iter().flat_map(|v| v.to_le_bytes()).collect();
    w.write_all(&bytes)?;
    Ok(())
}

/// The optimizer state as length-prefixed little-endian arrays. LoRA's frozen
/// base weights are not stored: they are the base checkpoint's.
fn write_optimizer(w: &mut dyn Write, trainable: &Trainable, extra: &ExtraStates) -> Result<()> {
    let len = |w: &mut dyn Write, n: usize| w.write_all(&(n as u64).to_le_bytes());
    let dense = |w: &mut dyn Write, s: &DenseState| -> Result<()> {
        len(w, s.m.len())?;
        write_f32s(&mut *w, &s.m)?;
        write_f32s(&mut *w, &s.v)
    };
    match trainable {
        Trainable::Sparse { states } => {
            w.write_all(&[0u8])?;
            len(w, states.len())?;
            for s in states {
                len(w, s.k())?;
                w.write_all(&s.indices.iter().flat_map(|i| i.to_le_bytes()).collect::<Vec<u8>>())?;
                write_f32s(w, &s.m)?;
                write_f32s(w, &s.v)?;
            }
        }
        Trainable::Full { states } => {
            w.write_all(&[1u8])?;
            len(w, states.len())?;
            for s in states {
                dense(w, s)?;
            }
        }
        Trainable::Lora { adapters, states, .. } => {
            w.write_all(&[2u8])?;
            len(w, adapters.len())?;
            for (ad, (sa, sb)) in adapters.iter().zip(states) {
                for n in [ad.r, ad.oc, ad.ic] {
                    len(w, n)?;
                }
                write_f32s(w, &[ad.scale])?;
                write_f32s(w, &ad.a)?;
                write_f32s(w, &ad.b)?;
                dense(w, sa)?;
                dense(w, sb)?;
            }
        }
    }
    len(w, extra.len())?;
    for s in extra {
        dense(w, s)?;
    }
    Ok(())
}

/// Reads what `write_optimizer` wrote. `model` holds the base weights (for LoRA).
fn read_optimizer(r: &mut Reader, model: &Model) -> Result<(Trainable, ExtraStates)> {
    let dense = |r: &mut Reader| -> Result<DenseState> {
        let n = r.len()?;
        Ok(DenseState { m: r.f32s(n)?, v: r.f32s(n)? })
    };
    let kind = r.bytes(1)?[0];
    let count = r.len()?;
    // One state per linear weight of this model, each of its size: a state
    // from another model must fail here, not index out of bounds later.
    let c = &model.config;
    if count != c.n_layers * 7 {
        bail!("optimizer state for {count} linear weights, the model has {}", c.n_layers * 7);
    }
    let size = |id: usize| Linear::ALL[id % 7].shape(c);
    let trainable = match kind {
        0 => {
            let mut states = Vec::with_capacity(count);
            for id in 0..count {
                let k = r.len()?;
                let indices = r.u32s(k)?;
                let (out, inp) = size(id);
                if indices.iter().any(|&i| i as usize >= out * inp) {
                    bail!("mask {id} has an index beyond its {out}x{inp} weight");
                }
                states.push(SparseState { indices, m: r.f32s(k)?, v: r.f32s(k)? });
            }
            Trainable::Sparse { states }
        }
        1 => {
            let states: Vec<DenseState> = (0..count).map(|_| dense(r)).collect::<Result<_>>()?;
            if let Some(id) = (0..count).find(|&id| states[id].m.len() != size(id).0 * size(id).1) {
                bail!("optimizer state {id} does not have the size of its weight");
            }
            Trainable::Full { states }
        }
        2 => {
            let (mut adapters, mut states, mut base) = (Vec::new(), Vec::new(), Vec::new());
            for id in 0..count {
                let (rank, oc, ic) = (r.len()?, r.len()?, r.len()?);
                if (oc, ic) != size(id) {
                    bail!("adapter {id} is {oc}x{ic}, its weight {}x{}", size(id).0, size(id).1);
                }
                let scale = r.f32s(1)?[0];
                let (a, b) = (r.f32s(rank * ic)?, r.f32s(oc * rank)?);
                adapters.push(Adapter { r: rank, oc, ic, scale, a, b });
                states.push((dense(r)?, dense(r)?));
                let (l, w) = (id / 7, Linear::ALL[id % 7]);
                base.push(model.weights.layers.get(l).ok_or_else(|| anyhow!("too many adapters"))?.linear(w).to_vec());
            }
            Trainable::Lora { base, adapters, states }
        }
        k => bail!("unknown optimizer kind {k}"),
    };
    let n_extra = r.len()?;
    let extra = (0..n_extra).map(|_| dense(r)).collect::<Result<_>>()?;
    Ok((trainable, extra))
}

/// Reads little-endian values from a byte buffer, failing on truncation.
struct Reader<'a> {
    bytes: &'a [u8],
    pos: usize,
}

impl Reader<'_> {
    fn bytes(&mut self, n: usize) -> Result<&[u8]> {
        let end = self.pos.checked_add(n).filter(|&e| e <= self.bytes.len()).ok_or_else(|| anyhow!("truncated"))?;
        let s = &self.bytes[self.pos..end];
        self.pos = end;
        Ok(s)
    }
    fn len(&mut self) -> Result<usize> {
        Ok(u64::from_le_bytes(self.bytes(8)?.try_into().unwrap()) as usize)
    }
    fn f32s(&mut self, n: usize) -> Result<Vec<f32>> {
        let b = self.bytes(n.checked_mul(4).ok_or_else(|| anyhow!("corrupt length"))?)?;
        Ok(b.chunks_exact(4).map(|c| f32::from_le_bytes(c.try_into().unwrap())).collect())
    }
    fn u32s(&mut self, n: usize) -> Result<Vec<u32>> {
        let b = self.bytes(n.checked_mul(4).ok_or_else(|| anyhow!("corrupt length"))?)?;
        Ok(b.chunks_exact(4).map(|c| u32::from_le_bytes(c.try_into().unwrap())).collect())
    }
}

/// Reads DIR/state.bin back into the model (trainable tensors) and returns
/// the header and optimizer state.
fn load_state(dir: &Path, model: &mut Model) -> Result<(StateHeader, Trainable, ExtraStates)> {
    let path = dir.join("state.bin");
    let p = path.display().to_string();
    let bytes = std::fs::read(&path)
        .with_context(|| format!("{p}: cannot read (is {} the --out of a training run?)", dir.display()))?;
    let mut r = Reader { bytes: &bytes, pos: 0 };
    let inner = |r: &mut Reader, model: &mut Model| -> Result<(StateHeader, Trainable, ExtraStates)> {
        if r.bytes(8)? != b"LIFTSTAT" {
            bail!("not a lift training state");
        }
        let hlen = r.len()?;
        let header: StateHeader = serde_json::from_slice(r.bytes(hlen)?).map_err(|e| anyhow!("corrupt header: {e}"))?;
        let params = Param::all(&model.config);
        for name in &header.tensors {
            let param = params.iter().find(|q| q.name() == *name).ok_or_else(|| anyhow!("unknown tensor {name}"))?;
            let n = model.weights.get(*param).len();
            let values = r.f32s(n)?;
            model.weights.get_mut(*param).copy_from_slice(&values);
        }
        let (t, ex) = read_optimizer(r, model)?;
        Ok((header, t, ex))
    };
    inner(&mut r, model).map_err(|e| anyhow!("{p}: {e}"))
}

// ----------------------------------------------------------------------------
// The loop

/// What a finished (or interrupted) run reports.
pub struct TrainSummary {
    pub steps: u64,
    pub final_train_loss: f32,
    pub final_val_loss: Option<f32>,
    pub interrupted: bool,
}

/// Set by the Ctrl-C handler; the loop saves and stops at the next step boundary.
pub static STOP: AtomicBool = AtomicBool::new(false);

/// Mean loss over the validation batches, weighted by their loss tokens.
pub fn eval_loss(model: &Model, acts: &mut Activations, batches: &[Batch]) -> f32 {
    let (mut sum, mut n) = (0.0f64, 0usize);
    for b in batches {
        acts.set_shape(&model.config, b.b, b.t);
        let l = model.forward(acts, &b.tokens, Some(&b.targets));
        sum += l as f64 * b.n_loss as f64;
        n += b.n_loss;
    }
    if n == 0 { f32::NAN } else { (sum / n as f64) as f32 }
}

/// Peak resident memory of this process in bytes (Linux), if known.
pub fn peak_rss_bytes() -> Option<u64> {
    let s = std::fs::read_to_string("/proc/self/status").ok()?;
    let line = s.lines().find(|l| l.starts_with("VmHWM:"))?;
    let kb: u64 = line.split_whitespace().nth(1)?.parse().ok()?;
    Some(kb * 1024)
}

fn fmt_duration(secs: f64) -> String {
    let s = secs.max(0.0) as u64;
    if s >= 3600 { format!("{}h{:02}m", s / 3600, (s % 3600) / 60) } else { format!("{}m{:02}s", s / 60, s % 60) }
}

pub fn train(o: &TrainOptions, resume: Option<&Path>) -> Result<TrainSummary> {
    validate(o)?;
    let ck = Checkpoint::open(&o.checkpoint)?;
    let c = ck.config.clone();
    let tok = ck.tokenizer.clone();
    let mut model = Model::new(c.clone(), ck.load_weights()?);
    let save_dtype = ck.dtype();
    // The weights are copied out; unmapping the file keeps its pages out of
    // this process's resident memory.
    drop(ck);

    // Data.
    let loaded = data::load(&o.data, Purpose::Train, o.skip_bad).map_err(|e| {
        if !o.skip_bad && e.to_string().contains("example") {
            anyhow!("{e} (--skip-bad skips unusable examples)")
        } else {
            e
        }
    })?;
    if !loaded.skipped.is_empty() {
        eprintln!("skipped {} bad examples (--skip-bad):", loaded.skipped.len());
        for s in loaded.skipped.iter().take(5) {
            eprintln!("  {s}");
        }
    }
    let eos = tok.eos_id().ok_or_else(|| anyhow!("{}: the tokenizer has no EOS token", o.checkpoint.display()))?;
    let bos = if tok.add_bos() { tok.bos_id() } else { None };
    let encode = |s: &str| tok.encode(s);
    let ds = Dataset::new(&loaded.examples, &encode, bos, eos, o.max_seq_len, o.val_size, o.seed)
        .with_context(|| o.data.display().to_string())?;
    let st = &ds.stats;
    eprintln!(
        "data: {} examples ({} train, {} validation), {} tokens, longest {}, {} truncated to --max-seq-len {}{}",
        st.examples,
        ds.train.len(),
        ds.val.len(),
        st.tokens,
        st.longest,
        st.truncated,
        o.max_seq_len,
        if st.no_loss > 0 { format!(", {} dropped with no target left", st.no_loss) } else { String::new() }
    );
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
    check_budgets(&c, o)?;

    // A resumed state is read (and can fail) before anything is written.
    let extras = extra_params(&c, o);
    let resumed = match resume {
        None => None,
        Some(dir) => {
            let (h, t, ex) = load_state(dir, &mut model)?;
            if h.options.method != o.method {
                bail!("{}: the saved run used --method {:?}, not {:?}", dir.display(), h.options.method, o.method);
            }
            let sizes_match = ex.len() == extras.len()
                && ex.iter().zip(&extras).all(|(s, p)| s.m.len() == p.shape(&c).iter().product::<usize>());
            if !sizes_match {
                bail!(
                    "{}: the saved run trained other tensors (--train-norms / --train-embeddings must be as before)",
                    dir.display()
                );
            }
            eprintln!("resuming from {} at step {}", dir.display(), h.step);
            Some((t, ex, h.step, h.mask_round))
        }
    };

    // Output directory: created before the masks are selected, so an
    // unwritable --out fails before any work.
    std::fs::create_dir_all(&o.out)
        .with_context(|| format!("{}: cannot create the output directory", o.out.display()))?;
    let probe = o.out.join(".write-test");
    std::fs::write(&probe, b"").with_context(|| format!("{}: not writable", o.out.display()))?;
    let _ = std::fs::remove_file(&probe);

    // RoPE and the activations cover the longest example, validation ones included.
    let longest = ds.train.iter().chain(&ds.val).map(|e| e.ids.len()).max().unwrap_or(1);
    let (mut tr, mut step, mut mask_round) = match resumed {
        Some((trainable, extra_states, step, round)) => {
            (CpuTrainer::assemble(model, trainable, extras, extra_states, o, o.batch_size, longest), step, round)
        }
        None => (CpuTrainer::new(model, o, o.batch_size, longest)?, 0u64, 0u64),
    };
    let linear_total = Linear::ALL.iter().map(|w| w.shape(&c).0 * w.shape(&c).1).sum::<usize>() * c.n_layers;
    eprintln!(
        "method {:?}: {} trainable values in the linear layers ({:.2}% of {linear_total}), optimizer state {:.1} MiB",
        o.method,
        tr.trainable_count(),
        100.0 * tr.trainable_count() as f64 / linear_total as f64,
        tr.state_bytes() as f64 / (1 << 20) as f64
    );

    // Metrics: keep the records up to the resumed step, then append.
    // (The records come from the resumed directory, which --out may not be.)
    let metrics_path = o.out.join("metrics.jsonl");
    let mut history: Vec<serde_json::Value> = Vec::new();
    if let Some(dir) = resume
        && let Ok(text) = std::fs::read_to_string(dir.join("metrics.jsonl"))
    {
        history = text
            .lines()
            .filter_map(|l| serde_json::from_str::<serde_json::Value>(l).ok())
            .filter(|r| r["step"].as_u64().is_some_and(|s| s <= step))
            .collect();
    }
    let write_metrics = |history: &[serde_json::Value]| -> Result<()> {
        let text: String = history.iter().map(|r| format!("{r}\n")).collect();
        let tmp = checkpoint::tmp_path(&metrics_path);
        std::fs::write(&tmp, text)?;
        std::fs::rename(&tmp, &metrics_path)?;
        Ok(())
    };
    let write_plot = |history: &[serde_json::Value]| -> Result<()> {
        let pts = |key: &str| -> Vec<(u64, f32)> {
            history.iter().filter_map(|r| Some((r["step"].as_u64()?, r[key].as_f64()? as f32))).collect()
        };
        let title = format!("lift {:?} on {}", o.method, o.data.file_name().unwrap_or_default().to_string_lossy());
        std::fs::write(o.out.join("loss.svg"), crate::plot::loss_svg(&title, &pts("loss"), &pts("val_loss")))?;
        Ok(())
    };

    let t_start = Instant::now();
    let start_step = step;
    let mut tokens_done = 0usize;
    let mut last_loss = f32::NAN;
    let mut last_val = None;
    let mut interrupted = false;
    let mut order_epoch = usize::MAX;
    let mut order: Vec<usize> = Vec::new();

    if step == 0 && !val_batches.is_empty() {
        let v = tr.eval_loss(&val_batches);
        eprintln!("step 0: validation loss {v:.4}");
        history.push(serde_json::json!({"step": 0, "val_loss": v}));
        last_val = Some(v);
    }

    while step < total_steps {
        if STOP.load(Ordering::SeqCst) {
            interrupted = true;
            break;
        }
        let t0 = Instant::now();
        // This step's micro-batches, in the epoch order the seed fixes.
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
        let lr = lr_at(o, step, total_steps);
        let stats = match tr.step(&batches, lr, step + 1) {
            Ok(s) => s,
            Err(why) => {
                // The weights are those of the last completed step: never a
                // non-finite update.
                tr.save(&o.out, step, total_steps, mask_round)?;
                write_metrics(&history)?;
                write_plot(&history)?;
                bail!("{why}; stopped. The last good state (step {step}) is in {}", o.out.display());
            }
        };
        step += 1;

        // Mask refresh for the sparse methods, from the current weights.
        if o.method.is_sparse() && o.update_interval > 0 && step % o.update_interval == 0 && step < total_steps {
            mask_round += 1;
            let r = tr.refresh_masks(mask_round)?;
            eprintln!(
                "step {step}: masks refreshed, {:.1}% of entries kept their state",
                100.0 * r.kept as f64 / r.total.max(1) as f64
            );
        }

        last_loss = stats.loss;
        tokens_done += stats.tokens;
        let dt = t0.elapsed().as_secs_f64();
        let elapsed = t_start.elapsed().as_secs_f64();
        let mut rec = serde_json::json!({
            "step": step, "loss": stats.loss, "lr": lr, "grad_norm": stats.grad_norm,
            "tokens": stats.tokens, "step_s": dt, "tokens_per_s": stats.tokens as f64 / dt,
            "elapsed_s": elapsed,
        });
        if (o.eval_every > 0 && step % o.eval_every == 0 || step == total_steps) && !val_batches.is_empty() {
            let v = tr.eval_loss(&val_batches);
            rec["val_loss"] = serde_json::json!(v);
            last_val = Some(v);
        }
        if step % o.log_every.max(1) == 0 || step == total_steps || rec.get("val_loss").is_some() {
            let per_step = elapsed / (step - start_step).max(1) as f64;
            let eta = per_step * (total_steps - step) as f64;
            let val =
                rec.get("val_loss").and_then(|v| v.as_f64()).map(|v| format!(" | val {v:.4}")).unwrap_or_default();
            eprintln!(
                "step {step}/{total_steps} | loss {:.4}{val} | lr {lr:.2e} | {:.0} tok/s | ETA {}",
                stats.loss,
                tokens_done as f64 / elapsed,
                fmt_duration(eta)
            );
        }
        history.push(rec);
        if o.save_every > 0 && step % o.save_every == 0 && step < total_steps {
            tr.save(&o.out, step, total_steps, mask_round)?;
            write_metrics(&history)?;
            write_plot(&history)?;
        }
    }

    tr.save(&o.out, step, total_steps, mask_round)?;
    write_metrics(&history)?;
    write_plot(&history)?;
    if interrupted {
        eprintln!(
            "interrupted at step {step}: state saved in {} (continue with --resume {})",
            o.out.display(),
            o.out.display()
        );
    } else {
        let mut meta = BTreeMap::new();
        meta.insert("base_checkpoint".to_string(), o.checkpoint.display().to_string());
        meta.insert("method".to_string(), format!("{:?}", o.method).to_lowercase());
        meta.insert("steps".to_string(), step.to_string());
        checkpoint::save_weights(&o.out.join("model.bin"), &c, &tok, &tr.model.weights, save_dtype, &meta)?;
        eprintln!("saved {}", o.out.join("model.bin").display());
    }
    eprintln!(
        "memory: peak resident {:.1} MiB, optimizer state {:.1} MiB, gradients {:.1} MiB",
        peak_rss_bytes().unwrap_or(0) as f64 / (1 << 20) as f64,
        tr.state_bytes() as f64 / (1 << 20) as f64,
        tr.grad_bytes() as f64 / (1 << 20) as f64
    );
    Ok(TrainSummary { steps: step, final_train_loss: last_loss, final_val_loss: last_val, interrupted })
}

/// Checks the sparse budget against the shape of every linear weight before
/// any output is written: a --density that rounds to k = 0 entries in some
/// weight would train nothing there.
fn check_budgets(c: &Config, o: &TrainOptions) -> Result<()> {
    if !o.method.is_sparse() {
        return Ok(());
    }
    for w in Linear::ALL {
        let (out, inp) = w.shape(c);
        let k = lift::budget_k(out, inp, o.budget())?;
        if k == 0 {
            bail!(
                "--density {} selects no entry of the {w:?} weights ({out}x{inp} = {} values); raise it",
                o.density.unwrap_or(lift::DEFAULT_DENSITY),
                out * inp
            );
        }
    }
    Ok(())
}

fn validate(o: &TrainOptions) -> Result<()> {
    if o.batch_size == 0 || o.grad_accum == 0 {
        bail!("--batch-size and --grad-accum must be at least 1");
    }
    if o.max_seq_len < 2 {
        bail!("--max-seq-len must be at least 2");
    }
    if !o.lr.is_finite() || o.lr <= 0.0 {
        bail!("--lr must be a positive number");
    }
    if !(0.0..1.0).contains(&o.warmup) {
        bail!("--warmup is a ratio of the total steps, in [0, 1)");
    }
    if let Some(d) = o.density
        && !(d > 0.0 && d <= 1.0)
    {
        bail!("--density {d} is out of range (0, 1]");
    }
    if o.rank == Some(0) {
        bail!("--rank must be at least 1");
    }
    if o.method == Method::Lift && o.filter_rank == 0 {
        bail!("--filter-rank must be at least 1");
    }
    if o.method == Method::Lora && o.lora_rank == 0 {
        bail!("--lora-rank must be at least 1");
    }
    Ok(())
}
