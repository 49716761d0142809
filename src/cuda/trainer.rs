//! Training on the GPU: each method's optimizer state on the device, the
//! gradient sink the backward pass feeds, and one optimizer step
//! (`GpuTrainer`, the GPU's `Trainer`; cpu_trainer.rs is its CPU twin). The
//! loop that drives it is train.rs's, the same for both devices; what each
//! method trains (the mask plans, fresh adapters) is method.rs's.
//!
//! Memory, per method, besides the bf16 weights and the activations:
//!   lift   k x (index u32 + m + v + f32 master + gradient accumulator f32)
//!          = 20 bytes per selected entry, plus ONE dense f32 dW buffer the
//!          size of the largest matrix, reused matrix after matrix;
//!   full   20 bytes per trained weight (f32 gradient, m, v, master);
//!   lora   20 bytes per adapter value, plus its bf16 copy;
//!   norms and embeddings, when trained: 20 bytes per value, as `full`.
//!
//! The weights live in bf16; the f32 values of the trained entries are the
//! masters. What the run started from (the checkpoint's f32 weights, or a
//! resumed state's) is kept on the host as the `reference`: masters start
//! from it, and model.bin and state.bin take from it every entry that the
//! training left where it was (its bf16 rounding is still what the device
//! holds), so those stay bit-identical to the base as on the CPU.

use std::borrow::Cow;
use std::time::Instant;

use anyhow::{Result, anyhow, bail};
use half::bf16;

use super::gpu::{Bf16, Buf, Dt, Gpu};
use super::launch;
use super::model::{GpuActs, GpuAdapter, GpuDora, GpuModel, GpuSink, to_bf16};
use super::select::{Job, SelectScratch};
use crate::data::{self, Batch, Segment};
use crate::formats::state::{Record, StateSource};
use crate::lora::Adapter;
use crate::method::{self, Magnitude, MaskPlan, MaskRule, Trainable, extra_params};
use crate::model::{Config, Linear, Model, Param, Weights, matrices, matrix, matrix_id};
use crate::optim::{self, AdamW, DenseState, RefreshStats, SparseState};
use crate::options::{Method, TrainOptions};
use crate::select::{self, Select};
use crate::trainer::{StepStats, Trainer};

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
    /// Zero moments, the given f32 master.
    fn fresh(g: &Gpu, master: Buf<f32>) -> Result<GpuDense> {
        let n = master.len();
        Ok(GpuDense { n, m: g.zeros(n)?, v: g.zeros(n)?, master, grad: g.zeros(n)? })
    }

    /// A saved state and its f32 master values.
    fn upload(g: &Gpu, s: &DenseState, master: &[f32]) -> Result<GpuDense> {
        assert_eq!(s.m.len(), master.len(), "dense state and master of one tensor");
        Ok(GpuDense {
            n: master.len(),
            m: g.upload(&s.m)?,
            v: g.upload(&s.v)?,
            master: g.upload(master)?,
            grad: g.zeros(master.len())?,
        })
    }
}

pub enum GpuState {
    Sparse {
        states: Vec<GpuSparse>,
        dw: Buf<f32>,
    },
    Full {
        states: Vec<GpuDense>,
    },
    /// (A, B) per matrix; dyb (N, r) is the sink's dout @ B; DoRA's
    /// magnitudes and scratch besides.
    Lora {
        states: Vec<(GpuDense, GpuDense)>,
        dyb: Buf<Bf16>,
        dora: Option<Box<DoraState>>,
    },
}

/// DoRA on top of LoRA's state: the magnitude m (OC) of each matrix, with
/// its AdamW state (master = m), and the sink's and the norms' scratch.
pub struct DoraState {
    pub mags: Vec<GpuDense>,
    /// The bf16 copy the AdamW kernel writes (nothing reads it).
    mag_bf16: Vec<Buf<Bf16>>,
    /// (N, max OC): x V^T, then dout * c, in the sink.
    z: Buf<Bf16>,
    dsc: Buf<Bf16>,
    /// (largest matrix, f32): V = W + s B A, for the row norms.
    v: Buf<f32>,
}

/// DoRA's norms and output scales of every matrix (dora.rs merge_into, on
/// the device): V = W + s B A in f32, then ||V||_row and c = m / ||V||.
fn dora_norms(g: &Gpu, model: &mut GpuModel, d: &mut DoraState) -> Result<()> {
    let GpuModel { config, layers, adapters, .. } = model;
    for (id, l, w) in matrices(config) {
        let (oc, ic) = w.shape(config);
        let ad = &mut adapters[id];
        launch::convert(g, "bf16_to_f32", &mut d.v, layers[l].linear(w), oc * ic)?;
        g.gemm(false, false, oc, ic, ad.r, ad.scale, ad.b.ptr(), ad.a.ptr(), 1.0, d.v.ptr(), Dt::Bf16, Dt::F32)?;
        let dora = ad.dora.as_mut().ok_or_else(|| anyhow!("DoRA: adapter {id} has no norms"))?;
        launch::dora_norms(g, &mut dora.norm, &mut dora.c, &d.v, &d.mags[id].master, oc, ic)?;
    }
    Ok(())
}

/// Carries out the mask plans (method::mask_plans, with the GPU's rule for
/// --svd auto) on the device's weights: one mask per linear matrix, in
/// matrix_id order. The seven matrices of a layer are selected together
/// (select.rs), and the host's eigenproblems of one layer overlap the GPU's
/// work on the next. `tf32` multiplies the sketches in TF32 on the tensor
/// cores (`lift bench --sketch tf32`; gpu-check measures the mask overlap it
/// costs), off for training.
pub fn select_masks(g: &Gpu, model: &GpuModel, plans: &[MaskPlan], tf32: bool) -> Result<Vec<Buf<u32>>> {
    // Masks chosen on the host (random, S2FT's channels) are uploaded; the
    // others are selected on the device, a layer at a time.
    let host = |p: &MaskPlan| match &p.rule {
        MaskRule::Random { seed } => Some(select::random_mask(p.out * p.inp, p.k, *seed)),
        MaskRule::Fixed(mask) => Some(mask.clone()),
        _ => None,
    };
    if plans.iter().all(|p| host(p).is_some()) {
        return plans.iter().map(|p| g.upload(&host(p).expect("a host mask"))).collect();
    }
    let mut layers: Vec<Vec<Job>> = Vec::new();
    for p in plans {
        let (r, how, which) = match &p.rule {
            MaskRule::Principal { r, approx, select } => (*r, *approx, *select),
            MaskRule::Magnitude { select } => (0, select::Approx::Exact, *select),
            _ => bail!("a host mask among selected ones"),
        };
        if p.linear == Linear::ALL[0] {
            layers.push(Vec::with_capacity(7));
        }
        let smallest = which == Select::Smallest;
        let job = Job { w: model.layers[p.layer].linear(p.linear), out: p.out, inp: p.inp, k: p.k, r, how, smallest };
        layers.last_mut().expect("plans start at a layer's first matrix").push(job);
    }
    let mut sc = SelectScratch::default();
    sc.tf32 = tf32;
    let batches: Vec<&[Job]> = layers.iter().map(|j| j.as_slice()).collect();
    let masks = sc.select_batches(g, &batches)?;
    g.sync()?;
    Ok(masks)
}

/// The masks of round `round` of a sparse run, selected on the GPU.
fn masks_for(g: &Gpu, model: &GpuModel, o: &TrainOptions, round: u64, tf32: bool) -> Result<Vec<Buf<u32>>> {
    let plans = method::mask_plans(&model.config, &o.method, o.seed, round, 0)?;
    select_masks(g, model, &plans, tf32)
}

/// Whether a model of this shape can train on the GPU.
pub fn check_supported(c: &Config) -> Result<()> {
    if c.head_dim > 128 {
        bail!(
            "--device cuda does not support head size {} (the attention kernels take up to 128); use --device cpu",
            c.head_dim
        );
    }
    Ok(())
}

/// The model, its activations and the method's state: one training step at a time.
pub struct GpuTrainer<'g> {
    g: &'g Gpu,
    pub model: GpuModel,
    pub acts: GpuActs,
    pub state: GpuState,
    /// Dense AdamW state of the norms and embeddings when trained, in the
    /// order of `extra_params`.
    pub extras: Vec<(Param, GpuDense)>,
    opts: TrainOptions,
    /// Sketch products of the mask selection in TF32 (`lift bench --sketch tf32`).
    pub sketch_tf32: bool,
    /// The f32 weights the run started from (see the module comment); None
    /// for a model made on the device (`lift bench`, `lift gpu-check`), whose
    /// masters start from the bf16 weights.
    reference: Option<Weights>,
    partial: Buf<f64>,
    /// Seconds spent selecting masks (start and refreshes).
    pub mask_s: f64,
}

/// Routes the backward pass's weight gradients into the method's
/// accumulators (cpu_trainer.rs CpuMethodSink, on the GPU).
struct GpuMethodSink<'a> {
    state: &'a mut GpuState,
    extras: &'a mut [(Param, GpuDense)],
    adapters: &'a [GpuAdapter],
    /// The model's weights (DoRA recomputes x V^T for its magnitudes).
    layers: &'a [super::model::GpuLayer],
}

impl GpuSink for GpuMethodSink<'_> {
    fn linear(
        &mut self,
        g: &Gpu,
        id: usize,
        dout: &Buf<Bf16>,
        inp: &Buf<Bf16>,
        xa: Option<&Buf<Bf16>>,
        n: usize,
        ic: usize,
        oc: usize,
    ) -> Result<()> {
        match self.state {
            GpuState::Sparse { states, dw } => {
                // One dense dW in the reused buffer, of which only the k
                // selected entries are kept. bf16 operands, f32 output and
                // sums: a tensor-core GEMM. (S2FT leaves most matrices with k = 0.)
                if states[id].k == 0 {
                    return Ok(());
                }
                assert!(dw.len() >= oc * ic);
                g.timed("gemm dW", || {
                    g.gemm(true, false, oc, ic, n, 1.0, dout.ptr(), inp.ptr(), 0.0, dw.ptr(), Dt::Bf16, Dt::F32)
                })?;
                let s = &mut states[id];
                g.timed("dW gather", || launch::gather_add(g, &mut s.acc, dw, &s.idx, s.k))
            }
            GpuState::Full { states } => {
                // cpu::matmul_backward_weight: dW (OC, IC) += dout^T @ inp, in f32.
                let s = &mut states[id];
                g.timed("gemm dW", || {
                    g.gemm(true, false, oc, ic, n, 1.0, dout.ptr(), inp.ptr(), 1.0, s.grad.ptr(), Dt::Bf16, Dt::F32)
                })
            }
            GpuState::Lora { states, dyb, dora } => {
                // lora.rs Adapter::backward: dB = s dout^T (inp A^T), dA = s (dout B)^T inp.
                let ad = &self.adapters[id];
                let xa = xa.ok_or_else(|| anyhow!("LoRA: the forward pass kept no inp @ A^T"))?;
                let (sa, sb) = &mut states[id];
                // DoRA (dora.rs backward): dm from z = x V^T, then the
                // adapter's gradients of dout * c.
                let dout = match (dora.as_mut(), ad.dora.as_ref()) {
                    (Some(d), Some(dd)) => {
                        let (l, which) = matrix(id);
                        let w = self.layers[l].linear(which);
                        g.timed("dora", || {
                            g.gemm(
                                false,
                                true,
                                n,
                                oc,
                                ic,
                                1.0,
                                inp.ptr(),
                                w.ptr(),
                                0.0,
                                d.z.ptr(),
                                Dt::Bf16,
                                Dt::Bf16,
                            )?;
                            g.gemm(
                                false,
                                true,
                                n,
                                oc,
                                ad.r,
                                ad.scale,
                                xa.ptr(),
                                ad.b.ptr(),
                                1.0,
                                d.z.ptr(),
                                Dt::Bf16,
                                Dt::Bf16,
                            )?;
                            launch::column_dot(g, &mut d.mags[id].grad, dout, &d.z, &dd.norm, n, oc)?;
                            launch::scale_columns(g, &d.dsc, dout, &dd.c, n, oc)
                        })?;
                        &d.dsc
                    }
                    _ => dout,
                };
                g.timed("gemm dW", || {
                    g.gemm(
                        true,
                        false,
                        oc,
                        ad.r,
                        n,
                        ad.scale,
                        dout.ptr(),
                        xa.ptr(),
                        1.0,
                        sb.grad.ptr(),
                        Dt::Bf16,
                        Dt::F32,
                    )?;
                    g.gemm(false, false, n, ad.r, oc, 1.0, dout.ptr(), ad.b.ptr(), 0.0, dyb.ptr(), Dt::Bf16, Dt::Bf16)?;
                    g.gemm(
                        true,
                        false,
                        ad.r,
                        ic,
                        n,
                        ad.scale,
                        dyb.ptr(),
                        inp.ptr(),
                        1.0,
                        sa.grad.ptr(),
                        Dt::Bf16,
                        Dt::F32,
                    )
                })
            }
        }
    }

    fn dense(&mut self, p: Param) -> Option<&mut Buf<f32>> {
        self.extras.iter_mut().find(|(q, _)| *q == p).map(|(_, s)| &mut s.grad)
    }
}

/// f32 masters of a whole tensor: the reference values, or the device's bf16 widened.
fn dense_master(g: &Gpu, reference: Option<&[f32]>, w: &Buf<Bf16>) -> Result<Buf<f32>> {
    match reference {
        Some(r) => g.upload(r),
        None => {
            let mut master = g.zeros::<f32>(w.len())?;
            launch::convert(g, "bf16_to_f32", &mut master, w, w.len())?;
            Ok(master)
        }
    }
}

/// f32 masters of the selected entries `idx` of a matrix, likewise.
fn sparse_master(g: &Gpu, reference: Option<&[f32]>, w: &Buf<Bf16>, idx: &Buf<u32>) -> Result<Buf<f32>> {
    match reference {
        Some(r) => {
            let host_idx = g.download(idx, idx.len())?;
            g.upload(&host_idx.iter().map(|&i| r[i as usize]).collect::<Vec<f32>>())
        }
        None => {
            let mut master = g.zeros::<f32>(idx.len())?;
            launch::gather_bf16(g, &mut master, w, idx, idx.len())?;
            Ok(master)
        }
    }
}

/// A fresh sparse state: the masks selected on the device, zero moments,
/// masters from the reference (or the device's weights).
fn fresh_sparse(
    g: &Gpu,
    model: &GpuModel,
    o: &TrainOptions,
    reference: Option<&Weights>,
    tf32: bool,
) -> Result<GpuState> {
    let t0 = Instant::now();
    let c = &model.config;
    let masks = masks_for(g, model, o, 0, tf32)?;
    let mut states = Vec::with_capacity(masks.len());
    for (id, idx) in masks.into_iter().enumerate() {
        let (l, w) = matrix(id);
        let k = idx.len();
        let master = sparse_master(g, reference.map(|r| r.layers[l].linear(w)), model.layers[l].linear(w), &idx)?;
        states.push(GpuSparse { k, idx, m: g.zeros(k)?, v: g.zeros(k)?, master, acc: g.zeros(k)? });
    }
    eprintln!("{}", method::describe_masks(c, states.iter().map(|s| s.k), t0.elapsed().as_secs_f64(), " on the GPU"));
    Ok(GpuState::Sparse { states, dw: g.zeros(largest_matrix(c))? })
}

/// A saved sparse state on the device; masters from the host weights (which hold the saved values).
fn upload_sparse(g: &Gpu, c: &Config, saved: &[SparseState], reference: Option<&Weights>) -> Result<GpuState> {
    let reference = reference.ok_or_else(|| anyhow!("resuming needs the host weights"))?;
    let mut states = Vec::with_capacity(saved.len());
    for (id, s) in saved.iter().enumerate() {
        let (l, w) = matrix(id);
        let w = reference.layers[l].linear(w);
        let master: Vec<f32> = s.indices.iter().map(|&i| w[i as usize]).collect();
        let (idx, m, v) = (g.upload(&s.indices)?, g.upload(&s.m)?, g.upload(&s.v)?);
        states.push(GpuSparse { k: s.k(), idx, m, v, master: g.upload(&master)?, acc: g.zeros(s.k())? });
    }
    Ok(GpuState::Sparse { states, dw: g.zeros(largest_matrix(c))? })
}

/// Full fine-tuning's state: fresh, or the saved moments.
fn full_state(
    g: &Gpu,
    model: &GpuModel,
    saved: Option<&[DenseState]>,
    reference: Option<&Weights>,
) -> Result<GpuState> {
    let mut states = Vec::with_capacity(model.config.n_layers * 7);
    for (id, l, w) in matrices(&model.config) {
        let host = reference.map(|r| r.layers[l].linear(w));
        states.push(match saved {
            None => GpuDense::fresh(g, dense_master(g, host, model.layers[l].linear(w))?)?,
            Some(s) => GpuDense::upload(g, &s[id], host.ok_or_else(|| anyhow!("resuming needs the host weights"))?)?,
        });
    }
    Ok(GpuState::Full { states })
}

/// LoRA's state: the host's adapters (fresh ones are method::new_adapters',
/// the CPU's too) on the device, with their moments; `rows` (B*T) sizes the
/// sink's dout @ B scratch.
fn lora_state(
    g: &Gpu,
    model: &mut GpuModel,
    adapters: &[Adapter],
    moments: &[(DenseState, DenseState)],
    magnitudes: Option<&[Magnitude]>,
    rows: usize,
) -> Result<GpuState> {
    let mut states = Vec::with_capacity(adapters.len());
    for (ad, (sa, sb)) in adapters.iter().zip(moments) {
        states.push((GpuDense::upload(g, sa, &ad.a)?, GpuDense::upload(g, sb, &ad.b)?));
        let (a, b) = (g.upload(&to_bf16(&ad.a))?, g.upload(&to_bf16(&ad.b))?);
        let dora = match magnitudes {
            Some(_) => Some(GpuDora { norm: g.zeros(ad.oc)?, c: g.zeros(ad.oc)? }),
            None => None,
        };
        model.adapters.push(GpuAdapter { r: ad.r, scale: ad.scale, a, b, dora });
    }
    let r = model.adapters.iter().map(|a| a.r).max().unwrap_or(1);
    let dora = match magnitudes {
        None => None,
        Some(mags) => {
            let c = &model.config;
            let widest = c.dim.max(c.q_dim()).max(c.ffn_dim);
            let mut d = DoraState {
                mags: mags.iter().map(|m| GpuDense::upload(g, &m.state, &m.m)).collect::<Result<_>>()?,
                mag_bf16: mags.iter().map(|m| g.zeros(m.m.len())).collect::<Result<_>>()?,
                z: g.zeros(rows * widest)?,
                dsc: g.zeros(rows * widest)?,
                v: g.zeros(largest_matrix(c))?,
            };
            dora_norms(g, model, &mut d)?;
            Some(Box::new(d))
        }
    };
    Ok(GpuState::Lora { states, dyb: g.zeros(rows * r)?, dora })
}

/// DoRA's fresh magnitudes for a model made on the device: the row norms of
/// its (bf16) weights.
fn device_magnitudes(g: &Gpu, model: &GpuModel) -> Result<Vec<Magnitude>> {
    let c = &model.config;
    matrices(c)
        .map(|(_, l, w)| {
            let (oc, ic) = w.shape(c);
            let bits = g.download(model.layers[l].linear(w), oc * ic)?;
            let host: Vec<f32> = bits.into_iter().map(|x| bf16::from_bits(x).to_f32()).collect();
            let m = crate::dora::row_norms(&host, oc, ic);
            Ok(Magnitude { state: DenseState::new(oc), m })
        })
        .collect()
}

/// The extra tensors' dense state (norms, embeddings): fresh, or saved.
fn extras_state(
    g: &Gpu,
    model: &GpuModel,
    o: &TrainOptions,
    reference: Option<&Weights>,
    saved: Option<&[DenseState]>,
) -> Result<Vec<(Param, GpuDense)>> {
    let mut extras = Vec::new();
    for (i, p) in extra_params(&model.config, &o.method).into_iter().enumerate() {
        let host = reference.map(|r| r.get(p));
        let s = match saved {
            None => GpuDense::fresh(g, dense_master(g, host, model.param(p))?)?,
            Some(ex) => GpuDense::upload(g, &ex[i], host.ok_or_else(|| anyhow!("resuming needs the host weights"))?)?,
        };
        extras.push((p, s));
    }
    Ok(extras)
}

impl<'g> GpuTrainer<'g> {
    /// Sets up a fresh run on a model made on the device (benchmarks,
    /// checks), with activations for batches of up to (b, t). The masks of
    /// a sparse method are selected here.
    pub fn new(g: &'g Gpu, model: GpuModel, o: &TrainOptions, b: usize, t: usize) -> Result<GpuTrainer<'g>> {
        GpuTrainer::build(g, model, o, b, t, None, None, false)
    }

    /// Like `new`, with the mask selection's sketches in TF32 or not.
    pub fn with_sketch(
        g: &'g Gpu,
        model: GpuModel,
        o: &TrainOptions,
        b: usize,
        t: usize,
        tf32: bool,
    ) -> Result<GpuTrainer<'g>> {
        GpuTrainer::build(g, model, o, b, t, None, None, tf32)
    }

    /// `lift train`'s trainer: uploads the host model (whose weights become
    /// the reference) and starts fresh, or from a state read from state.bin
    /// (the model's weights then hold its saved tensors).
    pub fn start(
        g: &'g Gpu,
        model: Model,
        o: &TrainOptions,
        b: usize,
        t: usize,
        saved: Option<(Trainable, Vec<DenseState>)>,
    ) -> Result<GpuTrainer<'g>> {
        // The adapter methods start from the host's state, as on the CPU
        // (PiSSA's turns the linear weights into the residuals first).
        let mut model = model;
        let saved = match saved {
            None if o.method.kind.has_adapters() => {
                let c = model.config.clone();
                let fresh = Trainable::fresh(&c, &o.method, o.seed, Vec::new(), &mut model.weights);
                Some((fresh, method::fresh_extras(&c, &o.method)))
            }
            s => s,
        };
        let gm = GpuModel::upload(g, &model, t)?;
        GpuTrainer::build(g, gm, o, b, t, Some(model.weights), saved, false)
    }

    #[allow(clippy::too_many_arguments)]
    fn build(
        g: &'g Gpu,
        mut model: GpuModel,
        o: &TrainOptions,
        b: usize,
        t: usize,
        reference: Option<Weights>,
        saved: Option<(Trainable, Vec<DenseState>)>,
        sketch_tf32: bool,
    ) -> Result<GpuTrainer<'g>> {
        let t0 = Instant::now();
        let (saved, saved_extras) = match saved {
            Some((tr, ex)) => (Some(tr), Some(ex)),
            None => (None, None),
        };
        let r = reference.as_ref();
        let state = match (o.method.kind, saved) {
            (m, None) if m.is_sparse() => fresh_sparse(g, &model, o, r, sketch_tf32)?,
            (m, Some(Trainable::Sparse { states })) if m.is_sparse() => upload_sparse(g, &model.config, &states, r)?,
            (Method::Full, None) => full_state(g, &model, None, r)?,
            (Method::Full, Some(Trainable::Full { states })) => full_state(g, &model, Some(&states), r)?,
            (Method::Lora, None) => {
                let (adapters, moments) = method::new_adapters(&model.config, &o.method, o.seed);
                lora_state(g, &mut model, &adapters, &moments, None, b * t)?
            }
            (Method::Lora | Method::Pissa, Some(Trainable::Lora { adapters, states })) => {
                lora_state(g, &mut model, &adapters, &states, None, b * t)?
            }
            (Method::Pissa, None) => {
                bail!("--method pissa starts from the host weights (lift train), not a model made on the GPU")
            }
            (Method::Dora, Some(Trainable::Dora { adapters, states, magnitudes })) => {
                lora_state(g, &mut model, &adapters, &states, Some(&magnitudes), b * t)?
            }
            (Method::Dora, None) => {
                let (adapters, moments) = method::new_adapters(&model.config, &o.method, o.seed);
                let magnitudes = device_magnitudes(g, &model)?;
                lora_state(g, &mut model, &adapters, &moments, Some(&magnitudes), b * t)?
            }
            (m, _) => bail!("the saved state is not --method {m:?}'s"),
        };
        let extras = extras_state(g, &model, o, r, saved_extras.as_deref())?;
        g.sync()?;
        let mask_s = if o.method.kind.is_sparse() { t0.elapsed().as_secs_f64() } else { 0.0 };
        let lora_r = model.adapters.iter().map(|a| a.r).max().unwrap_or(0);
        let is_dora = o.method.kind == Method::Dora;
        let acts = GpuActs::new(g, &model.config, b, t, lora_r, is_dora, o.recompute)?;
        let n_tensors = extras.len()
            + match &state {
                GpuState::Sparse { states, .. } => states.len(),
                GpuState::Full { states } => states.len(),
                GpuState::Lora { states, dora, .. } => 2 * states.len() + dora.as_ref().map_or(0, |d| d.mags.len()),
            };
        let partial = g.zeros(n_tensors * launch::SUMSQ_BLOCKS)?;
        Ok(GpuTrainer { g, model, acts, state, extras, opts: o.clone(), sketch_tf32, reference, partial, mask_s })
    }

    /// Zeroes the gradient accumulators.
    pub fn zero_grads(&mut self) -> Result<()> {
        let g = self.g;
        g.timed("zero", || {
            match &mut self.state {
                GpuState::Sparse { states, .. } => states.iter_mut().try_for_each(|s| g.zero(&mut s.acc))?,
                GpuState::Full { states } => states.iter_mut().try_for_each(|s| g.zero(&mut s.grad))?,
                GpuState::Lora { states, dora, .. } => {
                    states.iter_mut().try_for_each(|(a, b)| {
                        g.zero(&mut a.grad)?;
                        g.zero(&mut b.grad)
                    })?;
                    if let Some(d) = dora {
                        d.mags.iter_mut().try_for_each(|m| g.zero(&mut m.grad))?;
                    }
                }
            }
            self.extras.iter_mut().try_for_each(|(_, s)| g.zero(&mut s.grad))
        })
    }

    /// Forward and backward of one micro-batch (tokens and targets (B, T),
    /// the segments of a packed one or none), accumulating gradients.
    /// Returns (loss, forward ms, backward ms).
    pub fn micro_step(
        &mut self,
        b: usize,
        t: usize,
        tokens: &[u32],
        targets: &[i32],
        segments: &[Segment],
    ) -> Result<(f32, f64, f64)> {
        let g = self.g;
        self.acts.set_shape(b, t)?;
        self.acts.set_segments(g, segments)?;
        let t0 = Instant::now();
        let loss = self.model.forward(g, &mut self.acts, tokens, Some(targets))?; // synchronizes (loss)
        let t1 = Instant::now();
        let mut sink = GpuMethodSink {
            state: &mut self.state,
            extras: &mut self.extras,
            adapters: &self.model.adapters,
            layers: &self.model.layers,
        };
        self.model.backward(g, &mut self.acts, &mut sink)?;
        g.sync()?;
        Ok((loss, (t1 - t0).as_secs_f64() * 1e3, t1.elapsed().as_secs_f64() * 1e3))
    }

    /// Sum of squares of every gradient accumulator (f64, deterministic).
    fn grad_sum_sq(&mut self) -> Result<f64> {
        let g = self.g;
        let mut off = 0;
        let partial = &mut self.partial;
        let mut add = |buf: &Buf<f32>, n: usize| -> Result<()> {
            g.timed("grad norm", || launch::sum_squares(g, partial, off, buf, n))?;
            off += launch::SUMSQ_BLOCKS;
            Ok(())
        };
        match &self.state {
            GpuState::Sparse { states, .. } => states.iter().try_for_each(|s| add(&s.acc, s.k))?,
            GpuState::Full { states } => states.iter().try_for_each(|s| add(&s.grad, s.n))?,
            GpuState::Lora { states, dora, .. } => {
                states.iter().try_for_each(|(a, b)| {
                    add(&a.grad, a.n)?;
                    add(&b.grad, b.n)
                })?;
                if let Some(d) = dora {
                    d.mags.iter().try_for_each(|m| add(&m.grad, m.n))?;
                }
            }
        }
        self.extras.iter().try_for_each(|(_, s)| add(&s.grad, s.n))?;
        let p = g.download(&self.partial, off)?;
        Ok(p.iter().sum())
    }

    /// The optimizer half of a step: global-norm clipping of the accumulated
    /// gradients (averaged over `accum` micro-batches), then AdamW at step t.
    /// A non-finite gradient norm is an error, and nothing is updated.
    /// Returns (gradient norm, ms).
    pub fn update(&mut self, opt: &AdamW, t: u64, grad_clip: f32, accum: usize) -> Result<(f64, f64)> {
        let g = self.g;
        let t0 = Instant::now();
        let accum = accum as f32;
        let sum_sq = self.grad_sum_sq()? / (accum as f64 * accum as f64);
        // As on the CPU: clipping would scale an infinite gradient to NaN.
        if !sum_sq.is_finite() {
            bail!("the gradient norm is {} at step {t}", sum_sq.sqrt());
        }
        let clip = optim::clip_scale(sum_sq, grad_clip);
        let gscale = clip / accum;
        match &mut self.state {
            GpuState::Sparse { states, .. } => {
                for (id, s) in states.iter_mut().enumerate() {
                    let (l, which) = matrix(id);
                    let w = self.model.layers[l].linear_mut(which);
                    let n = w.len();
                    g.timed("adamw", || {
                        launch::sparse_adamw(
                            g,
                            w,
                            n,
                            &s.idx,
                            &mut s.m,
                            &mut s.v,
                            &mut s.master,
                            &s.acc,
                            s.k,
                            gscale,
                            opt,
                            t,
                        )
                    })?;
                }
            }
            GpuState::Full { states } => {
                for (id, s) in states.iter_mut().enumerate() {
                    let (l, which) = matrix(id);
                    let w = self.model.layers[l].linear_mut(which);
                    g.timed("adamw", || {
                        launch::adamw(g, w, &mut s.m, &mut s.v, &mut s.master, &s.grad, s.n, gscale, opt, t)
                    })?;
                }
            }
            GpuState::Lora { states, dora, .. } => {
                if let Some(d) = dora {
                    for (m, w) in d.mags.iter_mut().zip(d.mag_bf16.iter_mut()) {
                        g.timed("adamw", || {
                            launch::adamw(g, w, &mut m.m, &mut m.v, &mut m.master, &m.grad, m.n, gscale, opt, t)
                        })?;
                    }
                }
                for (ad, (sa, sb)) in self.model.adapters.iter_mut().zip(states.iter_mut()) {
                    g.timed("adamw", || {
                        launch::adamw(
                            g,
                            &mut ad.a,
                            &mut sa.m,
                            &mut sa.v,
                            &mut sa.master,
                            &sa.grad,
                            sa.n,
                            gscale,
                            opt,
                            t,
                        )?;
                        launch::adamw(
                            g,
                            &mut ad.b,
                            &mut sb.m,
                            &mut sb.v,
                            &mut sb.master,
                            &sb.grad,
                            sb.n,
                            gscale,
                            opt,
                            t,
                        )
                    })?;
                }
            }
        }
        for (p, s) in self.extras.iter_mut() {
            let w = self.model.param_mut(*p);
            g.timed("adamw", || launch::adamw(g, w, &mut s.m, &mut s.v, &mut s.master, &s.grad, s.n, gscale, opt, t))?;
        }
        if let GpuState::Lora { dora: Some(d), .. } = &mut self.state {
            g.timed("dora norms", || dora_norms(g, &mut self.model, d))?;
        }
        g.sync()?;
        Ok((sum_sq.sqrt(), t0.elapsed().as_secs_f64() * 1e3))
    }

    /// Every gradient accumulator of the method on the host, per linear
    /// matrix as CpuTrainer::linear_grads lays them out: the k entries
    /// (sparse), out*in (full), dA then dB (LoRA, PiSSA) then dm (DoRA).
    pub fn linear_grads(&self) -> Result<Vec<Vec<f32>>> {
        let g = self.g;
        match &self.state {
            GpuState::Sparse { states, .. } => states.iter().map(|s| g.download(&s.acc, s.k)).collect(),
            GpuState::Full { states } => states.iter().map(|s| g.download(&s.grad, s.n)).collect(),
            GpuState::Lora { states, dora, .. } => {
                let mut out = Vec::with_capacity(states.len());
                for (id, (sa, sb)) in states.iter().enumerate() {
                    let mut v = g.download(&sa.grad, sa.n)?;
                    v.extend(g.download(&sb.grad, sb.n)?);
                    if let Some(d) = dora {
                        v.extend(g.download(&d.mags[id].grad, d.mags[id].n)?);
                    }
                    out.push(v);
                }
                Ok(out)
            }
        }
    }

    /// The masks on the host (matrix_id order), for checks.
    pub fn masks(&self) -> Result<Vec<Vec<u32>>> {
        match &self.state {
            GpuState::Sparse { states, .. } => states.iter().map(|s| self.g.download(&s.idx, s.k)).collect(),
            _ => Ok(Vec::new()),
        }
    }

    /// The adapter of linear matrix `id` with its f32 masters, on the host.
    fn adapter(&self, id: usize) -> Result<Adapter> {
        let GpuState::Lora { states, .. } = &self.state else { bail!("not a LoRA run") };
        let (sa, sb) = &states[id];
        let (oc, ic) = matrix(id).1.shape(&self.model.config);
        let ad = &self.model.adapters[id];
        let (a, b) = (self.g.download(&sa.master, sa.n)?, self.g.download(&sb.master, sb.n)?);
        Ok(Adapter { r: ad.r, oc, ic, scale: ad.scale, a, b })
    }

    /// The device's bf16 values of one tensor, widened, where they differ
    /// from the reference's rounding; the reference's f32 values elsewhere.
    fn current(&self, p: Param) -> Result<Vec<f32>> {
        let buf = self.model.param(p);
        let dev = self.g.download(buf, buf.len())?;
        let widen = |x: Bf16| bf16::from_bits(x).to_f32();
        Ok(match &self.reference {
            Some(r) => r
                .get(p)
                .iter()
                .zip(&dev)
                .map(|(&x, &d)| if bf16::from_f32(x).to_bits() == d { x } else { widen(d) })
                .collect(),
            None => dev.into_iter().map(widen).collect(),
        })
    }
}

/// f32 values in the largest linear matrix (the sparse dW scratch).
fn largest_matrix(c: &Config) -> usize {
    Linear::ALL.iter().map(|w| w.shape(c).0 * w.shape(c).1).max().unwrap_or(0)
}

impl Trainer for GpuTrainer<'_> {
    fn step(&mut self, batches: &[Batch], lr: f32, t: u64) -> Result<StepStats> {
        self.zero_grads()?;
        let mut st = StepStats::default();
        let mut loss_sum = 0.0f64;
        for (micro, b) in batches.iter().enumerate() {
            let (loss, f, bw) = self.micro_step(b.b, b.t, &b.tokens, &b.targets, &b.segments)?;
            if !loss.is_finite() {
                bail!("loss is {loss} at step {t} (micro-batch {micro})");
            }
            loss_sum += loss as f64;
            st.forward_ms += f;
            st.backward_ms += bw;
            st.tokens += b.tokens.len();
        }
        let opt = self.opts.adamw(lr);
        let (grad_norm, ms) = self.update(&opt, t, self.opts.grad_clip, batches.len().max(1))?;
        st.optimizer_ms = ms;
        st.grad_norm = grad_norm;
        st.loss = (loss_sum / batches.len().max(1) as f64) as f32;
        Ok(st)
    }

    /// New masks from the current weights; entries selected before and
    /// after keep m, v and their master value, new ones start from zero
    /// state and their current (bf16) weight. The pairing is
    /// optim::refresh_pairs, on the host (every --update-interval steps, so
    /// its cost is amortized).
    fn refresh_masks(&mut self, round: u64) -> Result<RefreshStats> {
        let g = self.g;
        let t0 = Instant::now();
        let GpuState::Sparse { states, .. } = &mut self.state else { return Ok(RefreshStats::default()) };
        let masks = masks_for(g, &self.model, &self.opts, round, self.sketch_tf32)?;
        let mut stats = RefreshStats::default();
        for (id, (s, new_idx)) in states.iter_mut().zip(masks).enumerate() {
            let (old_idx, old_m, old_v, old_master) =
                (g.download(&s.idx, s.k)?, g.download(&s.m, s.k)?, g.download(&s.v, s.k)?, g.download(&s.master, s.k)?);
            let k = new_idx.len();
            let idx = g.download(&new_idx, k)?;
            let (l, which) = matrix(id);
            let mut cur = g.zeros::<f32>(k)?;
            launch::gather_bf16(g, &mut cur, self.model.layers[l].linear(which), &new_idx, k)?;
            let mut master = g.download(&cur, k)?;
            let (mut m, mut v) = (vec![0.0f32; k], vec![0.0f32; k]);
            for (j, old) in optim::refresh_pairs(&old_idx, &idx).into_iter().enumerate() {
                if let Some(i) = old {
                    (m[j], v[j], master[j]) = (old_m[i], old_v[i], old_master[i]);
                    stats.kept += 1;
                }
            }
            stats.total += k;
            let (m, v, master, acc) = (g.upload(&m)?, g.upload(&v)?, g.upload(&master)?, g.zeros(k)?);
            *s = GpuSparse { k, idx: new_idx, m, v, master, acc };
        }
        self.mask_s += t0.elapsed().as_secs_f64();
        Ok(stats)
    }

    fn eval_loss(&mut self, batches: &[Batch]) -> Result<f32> {
        let mut parts = Vec::with_capacity(batches.len());
        for b in batches {
            self.acts.set_shape(b.b, b.t)?;
            self.acts.set_segments(self.g, &b.segments)?;
            parts.push((self.model.forward(self.g, &mut self.acts, &b.tokens, Some(&b.targets))?, b.n_loss));
        }
        Ok(data::mean_loss(parts))
    }

    fn trainable_count(&self) -> usize {
        match &self.state {
            GpuState::Sparse { states, .. } => states.iter().map(|s| s.k).sum(),
            GpuState::Full { states } => states.iter().map(|s| s.n).sum(),
            GpuState::Lora { states, dora, .. } => {
                states.iter().map(|(a, b)| a.n + b.n).sum::<usize>()
                    + dora.as_ref().map_or(0, |d| d.mags.iter().map(|m| m.n).sum::<usize>())
            }
        }
    }
    /// Indices, moments and f32 masters (and LoRA's bf16 adapter copies).
    fn state_bytes(&self) -> usize {
        let dense = |s: &GpuDense| s.m.bytes() + s.v.bytes() + s.master.bytes();
        let method = match &self.state {
            GpuState::Sparse { states, .. } => {
                states.iter().map(|s| s.idx.bytes() + s.m.bytes() + s.v.bytes() + s.master.bytes()).sum()
            }
            GpuState::Full { states } => states.iter().map(dense).sum(),
            GpuState::Lora { states, dora, .. } => {
                states.iter().map(|(a, b)| dense(a) + dense(b)).sum::<usize>()
                    + self.model.adapters.iter().map(|a| a.a.bytes() + a.b.bytes()).sum::<usize>()
                    + dora.as_ref().map_or(0, |d| d.mags.iter().map(dense).sum::<usize>())
            }
        };
        method + self.extras.iter().map(|(_, s)| dense(s)).sum::<usize>()
    }

    /// Accumulators, the sparse dW scratch, LoRA's dout @ B.
    fn grad_bytes(&self) -> usize {
        let method = match &self.state {
            GpuState::Sparse { states, dw } => states.iter().map(|s| s.acc.bytes()).sum::<usize>() + dw.bytes(),
            GpuState::Full { states } => states.iter().map(|s| s.grad.bytes()).sum(),
            GpuState::Lora { states, dyb, dora } => {
                states.iter().map(|(a, b)| a.grad.bytes() + b.grad.bytes()).sum::<usize>()
                    + dyb.bytes()
                    + dora.as_ref().map_or(0, |d| {
                        d.mags.iter().map(|m| m.grad.bytes()).sum::<usize>() + d.z.bytes() + d.dsc.bytes() + d.v.bytes()
                    })
            }
        };
        method + self.extras.iter().map(|(_, s)| s.grad.bytes()).sum::<usize>()
    }

    fn device_peak_bytes(&self) -> Option<u64> {
        Some(super::gpu::mem_peak() as u64)
    }

    fn host_parts(&self) -> Option<(usize, usize)> {
        None
    }
}

impl StateSource for GpuTrainer<'_> {
    /// Extras: their f32 masters. Linear weights: the current values (see
    /// `current`) with the selected entries' masters over them (sparse), the
    /// masters (full), or base + (alpha / r) B A from the f32 masters of A
    /// and B (LoRA: the adapters merged, as the CPU's model.bin has them).
    fn tensor(&self, p: Param) -> Result<Cow<'_, [f32]>> {
        let g = self.g;
        if let Some((_, s)) = self.extras.iter().find(|(q, _)| *q == p) {
            return Ok(Cow::Owned(g.download(&s.master, s.n)?));
        }
        let Param::Linear(l, which) = p else { return Ok(Cow::Owned(self.current(p)?)) };
        let id = matrix_id(l, which);
        Ok(Cow::Owned(match &self.state {
            GpuState::Lora { dora, .. } => {
                let base = match &self.reference {
                    Some(r) => r.get(p).to_vec(),
                    None => self.current(p)?,
                };
                let mut merged = vec![0.0f32; base.len()];
                match dora {
                    None => self.adapter(id)?.merge_into(&mut merged, &base),
                    Some(d) => {
                        let m = g.download(&d.mags[id].master, d.mags[id].n)?;
                        crate::dora::merge_into(&self.adapter(id)?, &m, &mut merged, &base);
                    }
                }
                merged
            }
            GpuState::Full { states } => g.download(&states[id].master, states[id].n)?,
            GpuState::Sparse { states, .. } => {
                let s = &states[id];
                let mut values = self.current(p)?;
                for (&i, x) in g.download(&s.idx, s.k)?.iter().zip(g.download(&s.master, s.k)?) {
                    values[i as usize] = x;
                }
                values
            }
        }))
    }

    /// The masks and moments, or the adapters' f32 masters and moments, downloaded.
    fn record(&self, id: usize) -> Result<Record<'_>> {
        let g = self.g;
        let dense = |s: &GpuDense| -> Result<DenseState> {
            Ok(DenseState { m: g.download(&s.m, s.n)?, v: g.download(&s.v, s.n)? })
        };
        Ok(match &self.state {
            GpuState::Sparse { states, .. } => {
                let s = &states[id];
                let (indices, m, v) = (g.download(&s.idx, s.k)?, g.download(&s.m, s.k)?, g.download(&s.v, s.k)?);
                Record::Sparse(Cow::Owned(SparseState { indices, m, v }))
            }
            GpuState::Full { states } => Record::Full(Cow::Owned(dense(&states[id])?)),
            GpuState::Lora { states, dora, .. } => {
                let (sa, sb) = &states[id];
                let (ad, sa, sb) = (Cow::Owned(self.adapter(id)?), Cow::Owned(dense(sa)?), Cow::Owned(dense(sb)?));
                match dora {
                    None => Record::Lora(ad, sa, sb),
                    Some(d) => {
                        let mag = &d.mags[id];
                        let m = Magnitude { m: g.download(&mag.master, mag.n)?, state: dense(mag)? };
                        Record::Dora(ad, sa, sb, Cow::Owned(m))
                    }
                }
            }
        })
    }

    fn extra(&self, i: usize) -> Result<Cow<'_, DenseState>> {
        let s = &self.extras[i].1;
        Ok(Cow::Owned(DenseState { m: self.g.download(&s.m, s.n)?, v: self.g.download(&s.v, s.n)? }))
    }
}
