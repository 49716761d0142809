//! Training on the CPU: the gradient sink the backward pass feeds, and one
//! optimizer step (`CpuTrainer`, the CPU's `Trainer`; cuda/trainer.rs is its
//! GPU twin). What each method trains is method.rs's.

use std::borrow::Cow;
use std::time::Instant;

use anyhow::{Result, bail};
use rayon::prelude::*;

use crate::cpu;
use crate::data::{self, Batch};
use crate::dora;
use crate::formats::state::{Record, StateSource, record_of};
use crate::method::{self, MaskPlan, MaskRule, Trainable, extra_params};
use crate::model::{Activations, Config, GradSink, Head, Linear, Model, Param, matrices, matrix_id};
use crate::optim::{self, AdamW, DenseState, RefreshStats, SparseState};
use crate::options::TrainOptions;
use crate::select;
use crate::trainer::{StepStats, Trainer};

/// Carries out the mask plans (method::mask_plans) on the model's weights:
/// one mask per linear matrix, in matrix_id order.
pub fn select_masks(model: &Model, plans: &[MaskPlan]) -> Vec<Vec<u32>> {
    // The masks live on, the selection's temporaries (tens of MiB per
    // matrix) do not. Allocated first, the masks leave no holes between the
    // temporaries, so freed temporaries lie where the allocator can give
    // them back instead of staying as slack in the training peak (about
    // 5 MiB less at the peak of a LIFT run on SmolLM2).
    let mut masks: Vec<Vec<u32>> = plans.iter().map(|p| Vec::with_capacity(p.k)).collect();
    for (p, mask) in plans.iter().zip(masks.iter_mut()) {
        let w = model.weights.layers[p.layer].linear(p.linear);
        let m = match &p.rule {
            MaskRule::Principal { r, approx, select } => {
                select::principal_mask_of(w, p.out, p.inp, p.k, *r, *approx, *select)
            }
            MaskRule::Magnitude { select } => select::select_k_abs(w, p.k, *select),
            MaskRule::Random { seed } => select::random_mask(p.out * p.inp, p.k, *seed),
            MaskRule::Fixed(mask) => mask.clone(),
        };
        mask.extend_from_slice(&m);
    }
    masks
}

/// The masks of round `round` of a sparse run, selected on the CPU.
pub fn masks_for(model: &Model, o: &TrainOptions, round: u64) -> Result<Vec<Vec<u32>>> {
    let plans = method::mask_plans(&model.config, &o.method, o.seed, round, method::CPU_EXACT_UP_TO)?;
    Ok(select_masks(model, &plans))
}

/// For the adapter methods: rebuilds every linear weight of the model from
/// its frozen base, as base + s B A (LoRA, PiSSA) or diag(m / ||V||) V with
/// V = base + s B A (DoRA, dora.rs). Returns DoRA's row norms ||V|| per
/// matrix (empty otherwise), which its backward pass takes as constants.
fn merge_adapters(trainable: &Trainable, base: &[Vec<f32>], model: &mut Model) -> Vec<Vec<f32>> {
    let mut norms = Vec::new();
    for (id, l, w) in matrices(&model.config) {
        let merged = model.weights.layers[l].linear_mut(w);
        match trainable {
            Trainable::Lora { adapters, .. } => adapters[id].merge_into(merged, &base[id]),
            Trainable::Dora { adapters, magnitudes, .. } => {
                norms.push(dora::merge_into(&adapters[id], &magnitudes[id].m, merged, &base[id]))
            }
            _ => return norms,
        }
    }
    norms
}

/// Gradient accumulators, kept outside `Trainable` so a state file need not hold them.
struct Grads {
    /// Per linear matrix: k gradients (sparse), out*in (full), or (dA, dB) flattened (lora).
    linear: Vec<Vec<f32>>,
    /// Dense gradients of the extra tensors.
    extra: Vec<(Param, Vec<f32>)>,
    /// Scratch for the transposed factors of a sampled dW (sparse), or
    /// DoRA's (N, OC) output products, reused matrix after matrix.
    dw: Vec<f32>,
}

impl Grads {
    /// Accumulators for the method's trainable values, and for a sparse
    /// method the sampled product's scratch for batches of up to `rows`
    /// positions, made once (grown later, the old block would stay behind
    /// as allocator slack).
    fn new(trainable: &Trainable, c: &Config, o: &TrainOptions, rows: usize) -> Grads {
        let linear = match trainable {
            Trainable::Sparse { states } => states.iter().map(|s| vec![0.0; s.k()]).collect(),
            Trainable::Full { states } => states.iter().map(|s| vec![0.0; s.m.len()]).collect(),
            Trainable::Lora { adapters, .. } => adapters.iter().map(|a| vec![0.0; a.a.len() + a.b.len()]).collect(),
            // (dA, dB, dm) flattened
            Trainable::Dora { adapters, .. } => {
                adapters.iter().map(|a| vec![0.0; a.a.len() + a.b.len() + a.oc]).collect()
            }
        };
        let extra =
            extra_params(c, &o.method).into_iter().map(|p| (p, vec![0.0; p.shape(c).iter().product()])).collect();
        let dw = if matches!(trainable, Trainable::Sparse { .. }) {
            let most = Linear::ALL.iter().map(|w| w.shape(c)).map(|(o, i)| cpu::sampled_scratch(rows, i, o)).max();
            vec![0.0; most.unwrap_or(0)]
        } else {
            Vec::new()
        };
        Grads { linear, extra, dw }
    }

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

/// Routes the backward pass's weight gradients into the method's accumulators.
struct CpuMethodSink<'a> {
    trainable: &'a Trainable,
    grads: &'a mut Grads,
    /// The adapter methods' frozen base weights, and DoRA's row norms.
    base: &'a [Vec<f32>],
    norms: &'a [Vec<f32>],
}

impl GradSink for CpuMethodSink<'_> {
    fn wants(&self, p: Param) -> bool {
        matches!(p, Param::Linear(..)) || self.grads.extra.iter().any(|(q, _)| *q == p)
    }

    fn linear(&mut self, p: Param, dout: &[f32], inp: &[f32], n: usize, ic: usize, oc: usize) {
        let Param::Linear(l, w) = p else {
            // The LM head (only with --train-embeddings; a tied head's
            // gradient goes to the embedding).
            let g = self.dense(p);
            cpu::matmul_backward_weight(g, dout, inp, n, ic, oc);
            return;
        };
        let id = matrix_id(l, w);
        let acc = &mut self.grads.linear[id];
        match self.trainable {
            Trainable::Sparse { .. } => self.linears(&[(p, dout, oc)], inp, n, ic),
            Trainable::Full { .. } => cpu::matmul_backward_weight(acc, dout, inp, n, ic, oc),
            Trainable::Lora { adapters, .. } => {
                let ad = &adapters[id];
                let (da, db) = acc.split_at_mut(ad.a.len());
                ad.backward(da, db, dout, inp, n);
            }
            Trainable::Dora { adapters, magnitudes, .. } => {
                let ad = &adapters[id];
                let (da, rest) = acc.split_at_mut(ad.a.len());
                let (db, dm) = rest.split_at_mut(ad.b.len());
                let (m, norm, base) = (&magnitudes[id].m, &self.norms[id], &self.base[id]);
                dora::backward(ad, m, norm, base, da, db, dm, dout, inp, n, &mut self.grads.dw);
            }
        }
    }

    /// For a sparse method: only the k selected entries of each dW (a
    /// sampled product; the dense (OC, IC) gradient never exists), with the
    /// shared input transposed once.
    fn linears(&mut self, outs: &[(Param, &[f32], usize)], inp: &[f32], n: usize, ic: usize) {
        let Trainable::Sparse { states } = self.trainable else {
            for &(p, dout, oc) in outs {
                if self.wants(p) {
                    self.linear(p, dout, inp, n, ic, oc);
                }
            }
            return;
        };
        let id = |p| match p {
            Param::Linear(l, w) => matrix_id(l, w),
            _ => unreachable!("only linear weights are sparse"),
        };
        // S2FT trains some matrices not at all.
        let live = || outs.iter().filter(|&&(p, _, _)| states[id(p)].k() > 0);
        let Some(widest) = live().map(|&(_, _, oc)| oc).max() else { return };
        let need = cpu::sampled_scratch(n, ic, widest);
        if self.grads.dw.len() < need {
            self.grads.dw.resize(need, 0.0);
        }
        // one unique borrow of each live weight's accumulators
        let mut sel: Vec<Option<&mut Vec<f32>>> = self.grads.linear.iter_mut().map(Some).collect();
        let mut work: Vec<cpu::Sampled> = live()
            .map(|&(p, dout, oc)| {
                let dsel = sel[id(p)].take().expect("each weight once");
                cpu::Sampled { dsel, indices: &states[id(p)].indices, dout, oc }
            })
            .collect();
        cpu::matmul_backward_weight_sampled(&mut work, inp, n, ic, &mut self.grads.dw);
    }

    fn dense(&mut self, p: Param) -> &mut [f32] {
        let slot = self.grads.extra.iter_mut().find(|(q, _)| *q == p).expect("wants() said yes");
        &mut slot.1
    }
}

/// A model with a method's trainable state, ready to take optimizer steps:
/// what `lift train --device cpu` runs and what `lift bench` times.
pub struct CpuTrainer {
    pub model: Model,
    trainable: Trainable,
    /// The adapter methods only: the frozen base of each linear matrix
    /// (L*7); the model holds the merged weights (merge_adapters).
    adapter_base: Vec<Vec<f32>>,
    /// DoRA only: the row norms ||base + s B A|| of the merged weights.
    dora_norms: Vec<Vec<f32>>,
    /// Dense AdamW state of the extra tensors, in the order of `extra_params`.
    extra_states: Vec<DenseState>,
    grads: Grads,
    acts: Activations,
    opts: TrainOptions,
}

impl CpuTrainer {
    /// A run from a state read from state.bin, or a fresh one: the masks
    /// selected (sparse methods) or the adapters made (LoRA). RoPE covers
    /// sequences up to T; the activations are sized for batches of up to
    /// `rows` positions (B*T; a larger one makes them grow).
    pub fn start(
        mut model: Model,
        o: &TrainOptions,
        t: usize,
        rows: usize,
        saved: Option<(Trainable, Vec<DenseState>)>,
    ) -> Result<CpuTrainer> {
        let c = &model.config.clone();
        let (trainable, extra_states) = match saved {
            Some(s) => s,
            None => {
                let t0 = Instant::now();
                let masks = if o.method.kind.is_sparse() { masks_for(&model, o, 0)? } else { Vec::new() };
                if o.method.kind.is_sparse() {
                    let secs = t0.elapsed().as_secs_f64();
                    eprintln!("{}", method::describe_masks(c, masks.iter().map(Vec::len), secs, ""));
                }
                let trainable = Trainable::fresh(c, &o.method, o.seed, masks, &mut model.weights);
                (trainable, method::fresh_extras(c, &o.method))
            }
        };
        Ok(CpuTrainer::resume(model, trainable, extra_states, o, t, rows))
    }

    /// A run from a given state (a fresh one, or one read from state.bin).
    /// For LoRA the model's linear weights are the frozen base.
    pub fn resume(
        mut model: Model,
        trainable: Trainable,
        extra_states: Vec<DenseState>,
        o: &TrainOptions,
        t: usize,
        rows: usize,
    ) -> CpuTrainer {
        let adapter_base = match trainable.adapters() {
            Some(_) => matrices(&model.config).map(|(_, l, w)| model.weights.layers[l].linear(w).to_vec()).collect(),
            None => Vec::new(),
        };
        let dora_norms = merge_adapters(&trainable, &adapter_base, &mut model);
        model.ensure_rope(t);
        let grads = Grads::new(&trainable, &model.config, o, rows);
        let acts = Activations::with(&model.config, 1, rows, Head::Gradient, o.recompute);
        CpuTrainer { model, trainable, adapter_base, dora_norms, extra_states, grads, acts, opts: o.clone() }
    }

    /// Forward and backward of one batch into freshly zeroed gradient
    /// accumulators; returns the loss. The first half of a step, for checks
    /// against references (cuda::trainer's micro_step is its twin).
    pub fn gradients(&mut self, batch: &Batch) -> Result<f32> {
        self.grads.zero();
        self.acts.set_shape(&self.model.config, batch.b, batch.t);
        self.acts.segments.clone_from(&batch.segments);
        let loss = self.model.forward(&mut self.acts, &batch.tokens, Some(&batch.targets))?;
        let mut sink = CpuMethodSink {
            trainable: &self.trainable,
            grads: &mut self.grads,
            base: &self.adapter_base,
            norms: &self.dora_norms,
        };
        self.model.backward(&mut self.acts, &mut sink);
        Ok(loss)
    }

    /// The gradient accumulator of each linear matrix: its k entries
    /// (sparse), out*in (full), dA then dB (LoRA, PiSSA), dA, dB, dm (DoRA).
    pub fn linear_grads(&self) -> &[Vec<f32>] {
        &self.grads.linear
    }

    /// The method's state.
    pub fn trainable(&self) -> &Trainable {
        &self.trainable
    }

    /// One optimizer update of everything trainable, at step t (1-based).
    fn apply_update(&mut self, opt: &AdamW, t: u64) {
        let grads = &self.grads;
        // Layers are independent: one task per layer, its seven matrices in turn.
        let layers = self.model.weights.layers.par_iter_mut().enumerate();
        match &mut self.trainable {
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
            Trainable::Lora { adapters, states } => {
                for (id, ad) in adapters.iter_mut().enumerate() {
                    let (da, db) = grads.linear[id].split_at(ad.a.len());
                    states[id].0.step(opt, t, &mut ad.a, da);
                    states[id].1.step(opt, t, &mut ad.b, db);
                }
            }
            Trainable::Dora { adapters, states, magnitudes } => {
                for (id, ad) in adapters.iter_mut().enumerate() {
                    let (da, rest) = grads.linear[id].split_at(ad.a.len());
                    let (db, dm) = rest.split_at(ad.b.len());
                    states[id].0.step(opt, t, &mut ad.a, da);
                    states[id].1.step(opt, t, &mut ad.b, db);
                    let mag = &mut magnitudes[id];
                    mag.state.step(opt, t, &mut mag.m, dm);
                }
            }
        }
        for ((p, g), s) in grads.extra.iter().zip(self.extra_states.iter_mut()) {
            s.step(opt, t, self.model.weights.get_mut(*p), g);
        }
        self.dora_norms = merge_adapters(&self.trainable, &self.adapter_base, &mut self.model);
    }
}

impl Trainer for CpuTrainer {
    /// One optimizer step (t, 1-based) over the micro-batches: forward and
    /// backward of each, gradients averaged and clipped by global norm, then
    /// the AdamW update at learning rate `lr`. A non-finite loss or gradient
    /// is returned as an error before anything is updated, so the weights
    /// stay those of the last good step.
    fn step(&mut self, batches: &[Batch], lr: f32, t: u64) -> Result<StepStats> {
        let c = &self.model.config;
        let mut st = StepStats::default();
        self.grads.zero();
        let mut loss_sum = 0.0f64;
        for (micro, batch) in batches.iter().enumerate() {
            self.acts.set_shape(c, batch.b, batch.t);
            self.acts.segments.clone_from(&batch.segments);
            let t0 = Instant::now();
            let loss = self.model.forward(&mut self.acts, &batch.tokens, Some(&batch.targets))?;
            st.forward_ms += t0.elapsed().as_secs_f64() * 1e3;
            if !loss.is_finite() {
                bail!("loss is {loss} at step {t} (micro-batch {micro})");
            }
            let t0 = Instant::now();
            self.model.backward(
                &mut self.acts,
                &mut CpuMethodSink {
                    trainable: &self.trainable,
                    grads: &mut self.grads,
                    base: &self.adapter_base,
                    norms: &self.dora_norms,
                },
            );
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
        let opt = self.opts.adamw(lr);
        self.apply_update(&opt, t);
        st.optimizer_ms = t0.elapsed().as_secs_f64() * 1e3;
        st.loss = (loss_sum / batches.len().max(1) as f64) as f32;
        st.grad_norm = sum_sq.sqrt();
        Ok(st)
    }

    /// Recomputes the masks from the current weights (sparse methods):
    /// returns how many selected entries kept their optimizer state, of how many.
    fn refresh_masks(&mut self, round: u64) -> Result<RefreshStats> {
        let masks = masks_for(&self.model, &self.opts, round)?;
        let mut stats = RefreshStats::default();
        if let Trainable::Sparse { states } = &mut self.trainable {
            for (s, m) in states.iter_mut().zip(masks) {
                let r = s.refresh(m);
                stats.kept += r.kept;
                stats.total += r.total;
            }
        }
        let dw = std::mem::take(&mut self.grads.dw);
        self.grads = Grads { dw, ..Grads::new(&self.trainable, &self.model.config, &self.opts, 0) };
        Ok(stats)
    }

    fn eval_loss(&mut self, batches: &[Batch]) -> Result<f32> {
        eval_loss(&self.model, &mut self.acts, batches)
    }

    fn trainable_count(&self) -> usize {
        self.trainable.trainable_count()
    }

    /// Bytes of optimizer state, and of gradient accumulators.
    fn state_bytes(&self) -> usize {
        self.trainable.state_bytes() + self.extra_states.iter().map(DenseState::bytes).sum::<usize>()
    }

    fn grad_bytes(&self) -> usize {
        self.grads.bytes()
    }

    fn device_peak_bytes(&self) -> Option<u64> {
        None
    }

    fn host_parts(&self) -> Option<(usize, usize)> {
        let c = &self.model.config;
        let weights = Param::all(c).iter().map(|p| p.shape(c).iter().product::<usize>()).sum::<usize>() * 4;
        let base = self.adapter_base.iter().map(Vec::len).sum::<usize>() * 4;
        Some((weights + base, self.acts.bytes()))
    }
}

impl StateSource for CpuTrainer {
    /// The model's own values (LoRA's are merged after every step).
    fn tensor(&self, p: Param) -> Result<Cow<'_, [f32]>> {
        Ok(Cow::Borrowed(self.model.weights.get(p)))
    }

    fn record(&self, id: usize) -> Result<Record<'_>> {
        Ok(record_of(&self.trainable, id))
    }

    fn extra(&self, i: usize) -> Result<Cow<'_, DenseState>> {
        Ok(Cow::Borrowed(&self.extra_states[i]))
    }
}

/// Mean loss over the validation batches, weighted by their loss tokens
/// (the losses only: no logits kept, no gradient made).
pub fn eval_loss(model: &Model, acts: &mut Activations, batches: &[Batch]) -> Result<f32> {
    let head = std::mem::replace(&mut acts.head, Head::Loss);
    let parts: Result<Vec<(f32, usize)>> = batches
        .iter()
        .map(|b| {
            acts.set_shape(&model.config, b.b, b.t);
            acts.segments.clone_from(&b.segments);
            Ok((model.forward(acts, &b.tokens, Some(&b.targets))?, b.n_loss))
        })
        .collect();
    acts.head = head;
    Ok(data::mean_loss(parts?))
}
