//! What each method trains, decided once on the host for both devices:
//!
//!   lift       the principal weights of every linear layer (sparse AdamW),
//!              masks recomputed every `update_interval` steps
//!   magnitude  the largest |W| entries instead (ablation)
//!   random     random entries instead (ablation)
//!   full       every entry of every linear layer (dense AdamW)
//!   lora       low-rank adapters on every linear layer (dense AdamW on A, B)
//!   pissa      LoRA whose adapters start from the top-r SVD, on the residual
//!   dora       LoRA plus a trained magnitude per output row (dora.rs)
//!   s2ft       whole FFN channels (and heads), sampled once: a fixed mask of
//!              rows and columns, trained by the same sparse AdamW
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

use crate::dora;
use crate::lora::Adapter;
use crate::model::{Config, Linear, Param, Weights, matrices};
use crate::optim::{DenseState, SparseState};
use crate::options::{Method, MethodOptions, Svd};
use crate::rng::Rng;
use crate::select::{self, Approx, Select};

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
#[derive(Debug, Clone, PartialEq)]
pub enum MaskRule {
    /// LIFT: the k largest (or smallest) |W_r| for the rank-r approximation W_r.
    Principal { r: usize, approx: Approx, select: Select },
    /// The k largest (or smallest) |W|.
    Magnitude { select: Select },
    /// k entries uniformly at random.
    Random { seed: u64 },
    /// S2FT: whole rows or columns chosen on the host; the mask itself.
    Fixed(Vec<u32>),
}

/// The selection of one linear matrix's mask.
#[derive(Debug, Clone, PartialEq)]
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
    if o.kind == Method::S2ft {
        return Ok(s2ft_plans(c, o, seed));
    }
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
                MaskRule::Principal { r, approx, select: o.select }
            }
            Method::Magnitude => MaskRule::Magnitude { select: o.select },
            Method::Random => MaskRule::Random { seed },
            m => bail!("--method {m:?} has no mask"),
        };
        plans.push(MaskPlan { id, layer, linear, out, inp, k, rule });
    }
    Ok(plans)
}

// ----------------------------------------------------------------------------
// S2FT: whole channels and heads

/// The units S2FT trains in each layer (ascending): FFN channels f for the
/// rows of up_proj and, independently, for the columns of down_proj; with
/// --s2ft-heads, key/value heads for the rows of v_proj and query heads
/// for the columns of o_proj. Each kind draws floor(units * L * ratio) of
/// its L * units without replacement, across all layers, as the authors'
/// finetune_s2ft.py does (its head path draws query heads for v_proj too,
/// which breaks under GQA; here v_proj draws among its own key/value heads).
pub struct S2ftUnits {
    pub up: Vec<Vec<usize>>,
    pub down: Vec<Vec<usize>>,
    pub v: Vec<Vec<usize>>,
    pub o: Vec<Vec<usize>>,
}

pub fn s2ft_units(c: &Config, o: &MethodOptions, seed: u64) -> S2ftUnits {
    let l = c.n_layers;
    let draw = |units: usize, stream: u64| -> Vec<Vec<usize>> {
        let count = ((units * l) as f64 * o.s2ft_ratio) as usize;
        let mut all: Vec<usize> = (0..units * l).collect();
        Rng::stream(seed, stream).shuffle(&mut all);
        let mut per_layer = vec![Vec::new(); l];
        for &u in &all[..count.min(all.len())] {
            per_layer[u / units].push(u % units);
        }
        per_layer.iter_mut().for_each(|v| v.sort_unstable());
        per_layer
    };
    let none = vec![Vec::new(); l];
    let heads = o.s2ft_heads;
    S2ftUnits {
        up: draw(c.ffn_dim, 11),
        down: draw(c.ffn_dim, 12),
        v: if heads { draw(c.n_kv_heads, 13) } else { none.clone() },
        o: if heads { draw(c.n_heads, 14) } else { none },
    }
}

/// The flat indices (ascending) of whole rows `rows` of a (out, inp) matrix,
/// each row unit `width` rows tall (a head's head_size rows, or 1).
fn rows_mask(units: &[usize], width: usize, inp: usize) -> Vec<u32> {
    units.iter().flat_map(|&u| (u * width * inp..(u + 1) * width * inp).map(|i| i as u32)).collect()
}

/// The flat indices (ascending) of whole columns: unit u is columns
/// u*width .. (u+1)*width of a (out, inp) matrix.
fn cols_mask(units: &[usize], width: usize, out: usize, inp: usize) -> Vec<u32> {
    let mut v = Vec::with_capacity(units.len() * width * out);
    for row in 0..out {
        for &u in units {
            v.extend((u * width..(u + 1) * width).map(|col| (row * inp + col) as u32));
        }
    }
    v
}

fn s2ft_plans(c: &Config, o: &MethodOptions, seed: u64) -> Vec<MaskPlan> {
    let u = s2ft_units(c, o, seed);
    let hs = c.head_dim;
    matrices(c)
        .map(|(id, layer, linear)| {
            let (out, inp) = linear.shape(c);
            let mask = match linear {
                Linear::Up => rows_mask(&u.up[layer], 1, inp),
                Linear::Down => cols_mask(&u.down[layer], 1, out, inp),
                Linear::V => rows_mask(&u.v[layer], hs, inp),
                Linear::O => cols_mask(&u.o[layer], hs, out, inp),
                _ => Vec::new(),
            };
            MaskPlan { id, layer, linear, out, inp, k: mask.len(), rule: MaskRule::Fixed(mask) }
        })
        .collect()
}

/// Checks the method's budget against every linear weight's shape before
/// any output is written: a --density that rounds to k = 0 entries in some
/// weight would train nothing there. Says so when --filter-rank is capped.
pub fn check_budget(c: &Config, o: &MethodOptions) -> Result<()> {
    if o.kind == Method::S2ft {
        if !(o.s2ft_ratio > 0.0 && o.s2ft_ratio <= 1.0) {
            bail!("--s2ft-ratio {} is out of range (0, 1]", o.s2ft_ratio);
        }
        if ((c.ffn_dim * c.n_layers) as f64 * o.s2ft_ratio) < 1.0 {
            bail!(
                "--s2ft-ratio {} selects no FFN channel of {} x {} layers; raise it",
                o.s2ft_ratio,
                c.ffn_dim,
                c.n_layers
            );
        }
        return Ok(());
    }
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
    /// lift / magnitude / random / s2ft: the mask and its moments.
    Sparse { states: Vec<SparseState> },
    /// full: the moments of every entry.
    Full { states: Vec<DenseState> },
    /// lora / pissa: the adapter and the moments of its A and B.
    Lora { adapters: Vec<Adapter>, states: Vec<(DenseState, DenseState)> },
    /// dora: as lora, plus the magnitude (OC) of each matrix and its moments.
    Dora { adapters: Vec<Adapter>, states: Vec<(DenseState, DenseState)>, magnitudes: Vec<Magnitude> },
}

/// DoRA's trained magnitude of one matrix: m (OC) and its AdamW state.
#[derive(Debug, Clone, PartialEq)]
pub struct Magnitude {
    pub m: Vec<f32>,
    pub state: DenseState,
}

impl Trainable {
    /// A fresh run's state: the given masks (sparse methods), zero moments
    /// (full), new adapters (LoRA, DoRA, whose magnitudes start at the row
    /// norms of `weights`), or PiSSA's adapters, for which the linear
    /// `weights` become the frozen residuals (`pissa_start`).
    pub fn fresh(c: &Config, o: &MethodOptions, seed: u64, masks: Vec<Vec<u32>>, weights: &mut Weights) -> Trainable {
        match o.kind {
            Method::Lift | Method::Magnitude | Method::Random | Method::S2ft => {
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
            Method::Pissa => {
                let adapters = pissa_start(c, o, seed, weights);
                let states =
                    adapters.iter().map(|a| (DenseState::new(a.a.len()), DenseState::new(a.b.len()))).collect();
                Trainable::Lora { adapters, states }
            }
            Method::Dora => {
                let (adapters, states) = new_adapters(c, o, seed);
                let magnitudes = matrices(c)
                    .map(|(_, l, w)| {
                        let (out, inp) = w.shape(c);
                        let m = dora::row_norms(weights.layers[l].linear(w), out, inp);
                        Magnitude { state: DenseState::new(m.len()), m }
                    })
                    .collect();
                Trainable::Dora { adapters, states, magnitudes }
            }
        }
    }

    /// Bytes of optimizer state (adapters and magnitudes count as state: they are what is trained).
    pub fn state_bytes(&self) -> usize {
        let adapters = |ads: &[Adapter], states: &[(DenseState, DenseState)]| {
            states.iter().map(|(a, b)| a.bytes() + b.bytes()).sum::<usize>()
                + ads.iter().map(|a| 4 * (a.a.len() + a.b.len())).sum::<usize>()
        };
        match self {
            Trainable::Sparse { states } => states.iter().map(SparseState::bytes).sum(),
            Trainable::Full { states } => states.iter().map(DenseState::bytes).sum(),
            Trainable::Lora { adapters: a, states } => adapters(a, states),
            Trainable::Dora { adapters: a, states, magnitudes } => {
                adapters(a, states) + magnitudes.iter().map(|m| 4 * m.m.len() + m.state.bytes()).sum::<usize>()
            }
        }
    }

    /// Trained values in the linear layers (selected entries, adapter values, magnitudes).
    pub fn trainable_count(&self) -> usize {
        match self {
            Trainable::Sparse { states } => states.iter().map(SparseState::k).sum(),
            Trainable::Full { states } => states.iter().map(|s| s.m.len()).sum(),
            Trainable::Lora { adapters, .. } => adapters.iter().map(|a| a.a.len() + a.b.len()).sum(),
            Trainable::Dora { adapters, magnitudes, .. } => {
                adapters.iter().map(|a| a.a.len() + a.b.len()).sum::<usize>()
                    + magnitudes.iter().map(|m| m.m.len()).sum::<usize>()
            }
        }
    }

    /// The adapters of an adapter method.
    pub fn adapters(&self) -> Option<&[Adapter]> {
        match self {
            Trainable::Lora { adapters, .. } | Trainable::Dora { adapters, .. } => Some(adapters),
            _ => None,
        }
    }
}

/// PiSSA's adapters (lora.rs `Adapter::pissa`, exact SVD or --pissa-niter)
/// for every linear matrix; each weight in `weights` is replaced by its
/// residual W - s B A, the frozen base. A resumed run calls this on the
/// checkpoint's weights for the residuals and keeps its saved adapters.
pub fn pissa_start(c: &Config, o: &MethodOptions, seed: u64, weights: &mut Weights) -> Vec<Adapter> {
    matrices(c)
        .map(|(id, l, w)| {
            let (out, inp) = w.shape(c);
            let r = o.lora_rank.min(out.min(inp));
            let niter = o.pissa_niter.map(|n| (n, seed ^ id as u64));
            let (ad, residual) = Adapter::pissa(weights.layers[l].linear(w), out, inp, r, o.lora_alpha, niter);
            weights.layers[l].linear_mut(w).copy_from_slice(&residual);
            ad
        })
        .collect()
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
