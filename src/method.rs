//! What each method trains, decided once on the host for both devices:
//!
//!   lift       the principal weights of every linear layer (sparse AdamW),
//!              masks recomputed every `update_interval` steps
//!   magnitude  the largest |W| entries instead (ablation)
//!   random     random entries instead (ablation)
//!   full       every entry of every linear layer (dense AdamW)
//!   lora       low-rank adapters on every linear layer (dense AdamW on A, B)
//!
//! plus the norms and embeddings when `--train-norms` / `--train-embeddings`
//! ask for them (dense AdamW whatever the method).
//!
//! The sparse methods' masks are described by a `MaskPlan` per linear
//! matrix (its k, its rule, the seed of its randomness); the CPU
//! (`cpu_trainer::select_masks`) and the GPU (`cuda::trainer::select_masks`)
//! carry the same plan out. `Trainable` is a method's state on the host:
//! what the CPU trains with, what the GPU uploads when it resumes, and what
//! state.bin stores.

use anyhow::{Context, Result, bail};

use crate::lora::Adapter;
use crate::model::{Config, Linear, Param, matrices};
use crate::optim::{DenseState, SparseState};
use crate::options::{Method, MethodOptions, Svd};
use crate::rng::Rng;
use crate::select::{self, Approx};

/// The tensors trained densely besides the method's own (norms, embeddings).
/// A tied LM head is the embedding, so it is not listed twice.
pub fn extra_params(c: &Config, o: &MethodOptions) -> Vec<Param> {
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

// ----------------------------------------------------------------------------
// Masks: which entries a sparse method trains

/// How one matrix's k entries are chosen.
#[derive(Debug, Clone, Copy, PartialEq)]
pub enum MaskRule {
    /// LIFT: the k largest |W_r| for the rank-r approximation W_r.
    Principal { r: usize, approx: Approx },
    /// The k largest |W|.
    Magnitude,
    /// k entries uniformly at random.
    Random { seed: u64 },
}

/// The selection of one linear matrix's mask.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct MaskPlan {
    /// matrix_id(layer, linear)
    pub id: usize,
    pub layer: usize,
    pub linear: Linear,
    pub out: usize,
    pub inp: usize,
    /// Entries to select (exact).
    pub k: usize,
    pub rule: MaskRule,
}

/// With `--svd auto` on the CPU, matrices whose smaller side is at most this
/// get the exact SVD: there the f64 eigenproblem is cheaper than the
/// randomized GEMMs (tests/lift_select.rs measures the two on SmolLM2).
pub const CPU_EXACT_UP_TO: usize = 1024;

/// The masks of round `round` (0 at the start, +1 per refresh) of every
/// linear matrix, in matrix_id order. `exact_up_to` is the device's rule
/// for `--svd auto` (CPU_EXACT_UP_TO on the CPU; 0 on the GPU, where GEMMs
/// are cheap and the exact path's eigenproblem would run on the host).
/// Every random choice of a matrix draws from seed ^ (round << 32) ^ id.
pub fn mask_plans(c: &Config, o: &MethodOptions, seed: u64, round: u64, exact_up_to: usize) -> Result<Vec<MaskPlan>> {
    let mut plans = Vec::with_capacity(c.n_layers * 7);
    for (id, layer, linear) in matrices(c) {
        let (out, inp) = linear.shape(c);
        let k = select::budget_k(out, inp, o.budget())
            .with_context(|| format!("layer {layer} {linear:?} ({out}x{inp})"))?;
        let seed = seed ^ (round << 32) ^ id as u64;
        let rule = match o.kind {
            Method::Lift => {
                let r = select::filter_rank(out, inp, o.filter_rank)?.0;
                let randomized = Approx::Randomized { oversample: o.oversample, power_iters: o.power_iters, seed };
                let approx = match o.svd {
                    Svd::Exact => Approx::Exact,
                    Svd::Randomized => randomized,
                    Svd::Auto if out.min(inp) <= exact_up_to => Approx::Exact,
                    Svd::Auto => randomized,
                };
                MaskRule::Principal { r, approx }
            }
            Method::Magnitude => MaskRule::Magnitude,
            Method::Random => MaskRule::Random { seed },
            m => bail!("--method {m:?} has no mask"),
        };
        plans.push(MaskPlan { id, layer, linear, out, inp, k, rule });
    }
    Ok(plans)
}

/// Checks the method's budget against every linear weight's shape before
/// any output is written: a --density that rounds to k = 0 entries in some
/// weight would train nothing there. Says so when --filter-rank is capped.
pub fn check_budget(c: &Config, o: &MethodOptions) -> Result<()> {
    if !o.kind.is_sparse() {
        return Ok(());
    }
    let mut capped = false;
    for w in Linear::ALL {
        let (out, inp) = w.shape(c);
        if select::budget_k(out, inp, o.budget())? == 0 {
            bail!(
                "--density {} selects no entry of the {w:?} weights ({out}x{inp} = {} values); raise it",
                o.density.unwrap_or(select::DEFAULT_DENSITY),
                out * inp
            );
        }
        if o.kind == Method::Lift {
            capped |= select::filter_rank(out, inp, o.filter_rank)?.1;
        }
    }
    if capped {
        eprintln!("note: --filter-rank {} capped at the smaller side of some matrices", o.filter_rank);
    }
    Ok(())
}

/// One line on a selection: how many entries of how many, and how long.
pub fn describe_masks(c: &Config, ks: impl Iterator<Item = usize>, secs: f64, place: &str) -> String {
    let (mut k, mut count) = (0usize, 0usize);
    for x in ks {
        k += x;
        count += 1;
    }
    let n = linear_values(c);
    format!(
        "masks: {count} matrices, {k} of {n} entries selected ({:.2}%), {secs:.2}s{place}",
        100.0 * k as f64 / n as f64
    )
}

/// Values in all linear weights of the model.
pub fn linear_values(c: &Config) -> usize {
    Linear::ALL.iter().map(|w| w.shape(c).0 * w.shape(c).1).sum::<usize>() * c.n_layers
}

// ----------------------------------------------------------------------------
// The trainable state on the host

/// A method's trainable state on the host, one entry per linear matrix
/// (matrix_id order).
#[derive(Debug, Clone, PartialEq)]
pub enum Trainable {
    /// lift / magnitude / random: the mask and its moments.
    Sparse { states: Vec<SparseState> },
    /// full: the moments of every entry.
    Full { states: Vec<DenseState> },
    /// lora: the adapter and the moments of its A and B.
    Lora { adapters: Vec<Adapter>, states: Vec<(DenseState, DenseState)> },
}

impl Trainable {
    /// A fresh run's state: the given masks (sparse methods), zero moments
    /// (full), or new adapters (LoRA).
    pub fn fresh(c: &Config, o: &MethodOptions, seed: u64, masks: Vec<Vec<u32>>) -> Trainable {
        match o.kind {
            Method::Lift | Method::Magnitude | Method::Random => {
                Trainable::Sparse { states: masks.into_iter().map(SparseState::new).collect() }
            }
            Method::Full => Trainable::Full {
                states: matrices(c)
                    .map(|(_, _, w)| {
                        let (out, inp) = w.shape(c);
                        DenseState::new(out * inp)
                    })
                    .collect(),
            },
            Method::Lora => {
                let (adapters, states) = new_adapters(c, o, seed);
                Trainable::Lora { adapters, states }
            }
        }
    }

    /// Bytes of optimizer state (LoRA's adapters count as state: they are what is trained).
    pub fn state_bytes(&self) -> usize {
        match self {
            Trainable::Sparse { states } => states.iter().map(SparseState::bytes).sum(),
            Trainable::Full { states } => states.iter().map(DenseState::bytes).sum(),
            Trainable::Lora { adapters, states } => {
                states.iter().map(|(a, b)| a.bytes() + b.bytes()).sum::<usize>()
                    + adapters.iter().map(|a| 4 * (a.a.len() + a.b.len())).sum::<usize>()
            }
        }
    }

    /// Trained values in the linear layers (selected entries, or adapter values).
    pub fn trainable_count(&self) -> usize {
        match self {
            Trainable::Sparse { states } => states.iter().map(SparseState::k).sum(),
            Trainable::Full { states } => states.iter().map(|s| s.m.len()).sum(),
            Trainable::Lora { adapters, .. } => adapters.iter().map(|a| a.a.len() + a.b.len()).sum(),
        }
    }
}

/// Zero AdamW state for each extra tensor (norms, embeddings), in
/// `extra_params` order.
pub fn fresh_extras(c: &Config, o: &MethodOptions) -> Vec<DenseState> {
    extra_params(c, o).iter().map(|p| DenseState::new(p.shape(c).iter().product())).collect()
}

/// LoRA's fresh adapters, one per linear matrix, with zero moments: A
/// uniform from the seed's stream 7, B = 0. Both devices start from these.
pub fn new_adapters(c: &Config, o: &MethodOptions, seed: u64) -> (Vec<Adapter>, Vec<(DenseState, DenseState)>) {
    let mut rng = Rng::stream(seed, 7);
    let mut uniform = || rng.next_f32();
    let (mut adapters, mut states) = (Vec::new(), Vec::new());
    for (_, _, w) in matrices(c) {
        let (out, inp) = w.shape(c);
        let ad = Adapter::new(out, inp, o.lora_rank.min(out.min(inp)), o.lora_alpha, &mut uniform);
        states.push((DenseState::new(ad.a.len()), DenseState::new(ad.b.len())));
        adapters.push(ad);
    }
    (adapters, states)
}
