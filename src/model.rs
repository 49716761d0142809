//! What a Llama is: its configuration, its parameters, and the order in which
//! the forward and backward passes call the ops of `cpu.rs`.
//!
//! Shapes use fixed letters: B batch, T time, C model dim, NH query heads,
//! KVH key/value heads, HS head size, F FFN dim, V vocab, L layers.

use anyhow::{Result, bail};
use serde::{Deserialize, Serialize};

use crate::limits;

/// Llama 3.1/3.2 "llama3" RoPE frequency scaling (Hugging Face `rope_scaling`).
#[derive(Debug, Clone, Copy, PartialEq, Serialize, Deserialize)]
pub struct RopeScaling {
    pub factor: f32,
    pub low_freq_factor: f32,
    pub high_freq_factor: f32,
    pub original_max_position_embeddings: usize,
}

impl RopeScaling {
    /// The blend between the two wavelengths divides by high - low, and the
    /// long wavelengths by `factor`: all must be finite, positive, apart.
    fn validate(&self) -> Result<()> {
        let (f, lo, hi) = (self.factor, self.low_freq_factor, self.high_freq_factor);
        if !positive(f) || !positive(lo) || !positive(hi) || hi <= lo {
            bail!(
                "model config: rope scaling factor {f}, low_freq_factor {lo}, high_freq_factor {hi}: each must be finite and positive, high above low"
            );
        }
        let old = self.original_max_position_embeddings;
        if old == 0 || old > limits::MAX_CONTEXT {
            bail!(
                "model config: rope scaling original_max_position_embeddings is {old}, outside 1..={}",
                limits::MAX_CONTEXT
            );
        }
        Ok(())
    }
}

/// Finite and above zero (NaN is not).
fn positive(x: f32) -> bool {
    x.is_finite() && x > 0.0
}

/// The shape of a Llama-family model. Covers SmolLM2, TinyLlama, Llama-2,
/// Llama-3 and Llama-3.2 (GQA, llama3 RoPE scaling, tied or untied head).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Config {
    pub vocab_size: usize,
    /// C, the model (residual stream) width.
    pub dim: usize,
    pub n_layers: usize,
    /// NH, query heads.
    pub n_heads: usize,
    /// KVH, key/value heads (NH for plain multi-head attention).
    pub n_kv_heads: usize,
    /// HS, the width of one head (usually C / NH).
    pub head_dim: usize,
    /// F, the SwiGLU hidden width.
    pub ffn_dim: usize,
    pub norm_eps: f32,
    pub rope_theta: f32,
    pub rope_scaling: Option<RopeScaling>,
    /// True when the LM head reuses the token embedding matrix.
    pub tied_embeddings: bool,
    /// The context length the model was trained for (informational).
    pub max_seq_len: usize,
}

impl Config {
    /// Checks what the ops rely on: every size positive and within the
    /// bounds of `limits` (so that no product of sizes overflows and no
    /// buffer is sized from an absurd value), the heads dividing evenly, and
    /// every float finite and positive.
    pub fn validate(&self) -> Result<()> {
        let sizes = [
            ("vocab_size", self.vocab_size, limits::MAX_VOCAB),
            ("dim", self.dim, limits::MAX_DIM),
            ("n_layers", self.n_layers, limits::MAX_LAYERS),
            ("n_heads", self.n_heads, limits::MAX_HEADS),
            ("n_kv_heads", self.n_kv_heads, limits::MAX_HEADS),
            ("head_dim", self.head_dim, limits::MAX_HEAD_DIM),
            ("ffn_dim", self.ffn_dim, limits::MAX_FFN_DIM),
            ("max_seq_len", self.max_seq_len, limits::MAX_CONTEXT),
        ];
        for (name, v, max) in sizes {
            if v == 0 || v > max {
                bail!("model config: {name} is {v}, outside 1..={max}");
            }
        }
        // Both products are below 2^24 by the bounds above.
        if self.q_dim() > limits::MAX_DIM || self.kv_dim() > limits::MAX_DIM {
            bail!(
                "model config: {} heads of {} (q width {}) exceed the width limit {}",
                self.n_heads,
                self.head_dim,
                self.q_dim(),
                limits::MAX_DIM
            );
        }
        if !self.n_heads.is_multiple_of(self.n_kv_heads) {
            bail!("model config: n_heads {} is not a multiple of n_kv_heads {}", self.n_heads, self.n_kv_heads);
        }
        if !self.head_dim.is_multiple_of(2) {
            bail!("model config: head_dim {} must be even for RoPE", self.head_dim);
        }
        if !positive(self.norm_eps) || !positive(self.rope_theta) {
            bail!(
                "model config: norm_eps {} and rope_theta {} must be finite and positive",
                self.norm_eps,
                self.rope_theta
            );
        }
        if let Some(s) = &self.rope_scaling {
            s.validate()?;
        }
        Ok(())
    }

    /// Width of all query heads together, NH * HS.
    pub fn q_dim(&self) -> usize {
        self.n_heads * self.head_dim
    }

    /// Width of all key (or value) heads together, KVH * HS.
    pub fn kv_dim(&self) -> usize {
        self.n_kv_heads * self.head_dim
    }
}

impl Config {
    /// The inverse frequencies of RoPE, one per pair of head elements (HS/2),
    /// with the "llama3" scaling when configured: long wavelengths are
    /// stretched by `factor`, short ones kept, and the band between blended.
    pub fn rope_inv_freq(&self) -> Vec<f64> {
        let hs = self.head_dim;
        let base = self.rope_theta as f64;
        let mut inv: Vec<f64> = (0..hs / 2).map(|i| 1.0 / base.powf((2 * i) as f64 / hs as f64)).collect();
        if let Some(s) = self.rope_scaling {
            let old = s.original_max_position_embeddings as f64;
            let (lo, hi, factor) = (s.low_freq_factor as f64, s.high_freq_factor as f64, s.factor as f64);
            let low_freq_wavelen = old / lo;
            let high_freq_wavelen = old / hi;
            for f in inv.iter_mut() {
                let wavelen = 2.0 * std::f64::consts::PI / *f;
                if wavelen > low_freq_wavelen {
                    *f /= factor;
                } else if wavelen >= high_freq_wavelen {
                    let smooth = (old / wavelen - lo) / (hi - lo);
                    *f = (1.0 - smooth) * *f / factor + smooth * *f;
                }
            }
        }
        inv
    }
}

// ----------------------------------------------------------------------------
// Parameters

/// The seven linear layers of a transformer block, the ones LIFT trains.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
pub enum Linear {
    Q,
    K,
    V,
    O,
    Gate,
    Up,
    Down,
}

impl Linear {
    pub const ALL: [Linear; 7] = [Linear::Q, Linear::K, Linear::V, Linear::O, Linear::Gate, Linear::Up, Linear::Down];

    /// (out, in) of the weight matrix, as PyTorch stores it.
    pub fn shape(self, c: &Config) -> (usize, usize) {
        match self {
            Linear::Q => (c.q_dim(), c.dim),
            Linear::K | Linear::V => (c.kv_dim(), c.dim),
            Linear::O => (c.dim, c.q_dim()),
            Linear::Gate | Linear::Up => (c.ffn_dim, c.dim),
            Linear::Down => (c.dim, c.ffn_dim),
        }
    }

    /// The Hugging Face name of this weight in layer l.
    pub fn hf_name(self, l: usize) -> String {
        let part = match self {
            Linear::Q => "self_attn.q_proj",
            Linear::K => "self_attn.k_proj",
            Linear::V => "self_attn.v_proj",
            Linear::O => "self_attn.o_proj",
            Linear::Gate => "mlp.gate_proj",
            Linear::Up => "mlp.up_proj",
            Linear::Down => "mlp.down_proj",
        };
        format!("model.layers.{l}.{part}.weight")
    }
}

/// The number of a linear weight among the model's L*7, as every per-matrix
/// list (masks, optimizer states, adapters, state.bin records) is ordered:
/// layer * 7 + position in Linear::ALL.
pub fn matrix_id(l: usize, w: Linear) -> usize {
    l * 7 + w as usize
}

/// The (layer, kind) of linear weight number `id`: matrix_id's inverse.
pub fn matrix(id: usize) -> (usize, Linear) {
    (id / 7, Linear::ALL[id % 7])
}

/// (id, layer, kind) of every linear weight of a model, in id order.
pub fn matrices(c: &Config) -> impl Iterator<Item = (usize, usize, Linear)> {
    (0..c.n_layers * 7).map(|id| (id, id / 7, Linear::ALL[id % 7]))
}

/// The weights of one transformer block.
#[derive(Debug, Clone, PartialEq)]
pub struct LayerWeights {
    pub attn_norm: Vec<f32>, // (C)
    pub wq: Vec<f32>,        // (NH*HS, C)
    pub wk: Vec<f32>,        // (KVH*HS, C)
    pub wv: Vec<f32>,        // (KVH*HS, C)
    pub wo: Vec<f32>,        // (C, NH*HS)
    pub mlp_norm: Vec<f32>,  // (C)
    pub w_gate: Vec<f32>,    // (F, C)
    pub w_up: Vec<f32>,      // (F, C)
    pub w_down: Vec<f32>,    // (C, F)
}

impl LayerWeights {
    pub fn linear(&self, which: Linear) -> &[f32] {
        match which {
            Linear::Q => &self.wq,
            Linear::K => &self.wk,
            Linear::V => &self.wv,
            Linear::O => &self.wo,
            Linear::Gate => &self.w_gate,
            Linear::Up => &self.w_up,
            Linear::Down => &self.w_down,
        }
    }

    pub fn linear_mut(&mut self, which: Linear) -> &mut Vec<f32> {
        match which {
            Linear::Q => &mut self.wq,
            Linear::K => &mut self.wk,
            Linear::V => &mut self.wv,
            Linear::O => &mut self.wo,
            Linear::Gate => &mut self.w_gate,
            Linear::Up => &mut self.w_up,
            Linear::Down => &mut self.w_down,
        }
    }
}

/// All parameters of a Llama, in f32. The same type holds full gradients.
#[derive(Debug, Clone, PartialEq)]
pub struct Weights {
    pub embed: Vec<f32>, // (V, C)
    pub layers: Vec<LayerWeights>,
    pub norm: Vec<f32>,            // (C)
    pub lm_head: Option<Vec<f32>>, // (V, C); None when tied to `embed`
}

/// Names one parameter tensor of the model.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum Param {
    Embed,
    AttnNorm(usize),
    MlpNorm(usize),
    Linear(usize, Linear),
    Norm,
    LmHead,
}

impl Param {
    /// Every parameter of a model of this config, in checkpoint order.
    pub fn all(c: &Config) -> Vec<Param> {
        let mut v = vec![Param::Embed];
        for l in 0..c.n_layers {
            v.push(Param::AttnNorm(l));
            v.extend(Linear::ALL.iter().map(|&w| Param::Linear(l, w)));
            v.push(Param::MlpNorm(l));
        }
        v.push(Param::Norm);
        if !c.tied_embeddings {
            v.push(Param::LmHead);
        }
        v
    }

    pub fn shape(self, c: &Config) -> Vec<usize> {
        match self {
            Param::Embed | Param::LmHead => vec![c.vocab_size, c.dim],
            Param::AttnNorm(_) | Param::MlpNorm(_) | Param::Norm => vec![c.dim],
            Param::Linear(_, w) => {
                let (o, i) = w.shape(c);
                vec![o, i]
            }
        }
    }

    /// The Hugging Face name, which is also this project's tensor name.
    pub fn name(self) -> String {
        match self {
            Param::Embed => "model.embed_tokens.weight".into(),
            Param::AttnNorm(l) => format!("model.layers.{l}.input_layernorm.weight"),
            Param::MlpNorm(l) => format!("model.layers.{l}.post_attention_layernorm.weight"),
            Param::Linear(l, w) => w.hf_name(l),
            Param::Norm => "model.norm.weight".into(),
            Param::LmHead => "lm_head.weight".into(),
        }
    }
}

impl Weights {
    /// All-zero parameters of the given shape (also the start of a gradient).
    pub fn zeros(c: &Config) -> Weights {
        let z = |n: usize| vec![0.0f32; n];
        let (q, kv, d, f) = (c.q_dim(), c.kv_dim(), c.dim, c.ffn_dim);
        Weights {
            embed: z(c.vocab_size * d),
            layers: (0..c.n_layers)
                .map(|_| LayerWeights {
                    attn_norm: z(d),
                    wq: z(q * d),
                    wk: z(kv * d),
                    wv: z(kv * d),
                    wo: z(d * q),
                    mlp_norm: z(d),
                    w_gate: z(f * d),
                    w_up: z(f * d),
                    w_down: z(d * f),
                })
                .collect(),
            norm: z(d),
            lm_head: if c.tied_embeddings { None } else { Some(z(c.vocab_size * d)) },
        }
    }

    /// Weights whose every tensor comes from `get`, each checked to have
    /// its parameter's size: how a checkpoint is loaded, without sizing any
    /// buffer from the config before the file has shown it holds that much.
    pub fn try_from_fn(c: &Config, mut get: impl FnMut(Param) -> Result<Vec<f32>>) -> Result<Weights> {
        let mut take = |p: Param| -> Result<Vec<f32>> {
            let v = get(p)?;
            let want: usize = p.shape(c).iter().product();
            if v.len() != want {
                bail!("tensor {} has {} values, its shape {:?} needs {want}", p.name(), v.len(), p.shape(c));
            }
            Ok(v)
        };
        let embed = take(Param::Embed)?;
        let mut layers = Vec::with_capacity(c.n_layers);
        for l in 0..c.n_layers {
            let attn_norm = take(Param::AttnNorm(l))?;
            let [q, k, v, o, gate, up, down] = Linear::ALL.map(|w| take(Param::Linear(l, w)));
            let (wq, wk, wv, wo) = (q?, k?, v?, o?);
            let (w_gate, w_up, w_down) = (gate?, up?, down?);
            let mlp_norm = take(Param::MlpNorm(l))?;
            layers.push(LayerWeights { attn_norm, wq, wk, wv, wo, mlp_norm, w_gate, w_up, w_down });
        }
        let norm = take(Param::Norm)?;
        let lm_head = if c.tied_embeddings { None } else { Some(take(Param::LmHead)?) };
        Ok(Weights { embed, layers, norm, lm_head })
    }

    pub fn get(&self, p: Param) -> &[f32] {
        match p {
            Param::Embed => &self.embed,
            Param::AttnNorm(l) => &self.layers[l].attn_norm,
            Param::MlpNorm(l) => &self.layers[l].mlp_norm,
            Param::Linear(l, w) => self.layers[l].linear(w),
            Param::Norm => &self.norm,
            Param::LmHead => self.lm_head.as_deref().unwrap_or(&self.embed),
        }
    }

    pub fn get_mut(&mut self, p: Param) -> &mut [f32] {
        match p {
            Param::Embed => &mut self.embed,
            Param::AttnNorm(l) => &mut self.layers[l].attn_norm,
            Param::MlpNorm(l) => &mut self.layers[l].mlp_norm,
            Param::Linear(l, w) => self.layers[l].linear_mut(w),
            Param::Norm => &mut self.norm,
            Param::LmHead => match self.lm_head.as_mut() {
                Some(h) => h,
                None => &mut self.embed,
            },
        }
    }

    /// The matrix the LM head multiplies by: its own, or the embedding.
    pub fn head(&self) -> &[f32] {
        self.get(Param::LmHead)
    }

    pub fn num_params(&self) -> usize {
        self.embed.len()
            + self.norm.len()
            + self.lm_head.as_ref().map_or(0, |h| h.len())
            + self
                .layers
                .iter()
                .map(|l| {
                    l.attn_norm.len() + l.mlp_norm.len() + Linear::ALL.iter().map(|&w| l.linear(w).len()).sum::<usize>()
                })
                .sum::<usize>()
    }
}

// ----------------------------------------------------------------------------
// The model and its activations

use crate::cpu::{self, AttnDims, RopeTable};
use crate::data::Segment;
use crate::lm_head::{self, HeadInput, Logits};
use rayon::prelude::*;

/// A Llama ready to run: its shape, its weights and its RoPE table.
pub struct Model {
    pub config: Config,
    pub weights: Weights,
    pub rope: RopeTable,
}

/// One piece of buf (rows of `width` floats; row b*T + t is position t of
/// batch row b) per segment, in order: segment s gets its len rows. The
/// segments are ascending and disjoint (`Model::forward` checks).
fn pieces<'a>(mut buf: &'a mut [f32], width: usize, t: usize, segments: &[Segment]) -> Vec<&'a mut [f32]> {
    let mut out = Vec::with_capacity(segments.len());
    let mut done = 0; // rows of buf before `buf`
    for sg in segments {
        let at = sg.row * t + sg.start;
        let (_, rest) = std::mem::take(&mut buf).split_at_mut((at - done) * width);
        let (piece, rest) = rest.split_at_mut(sg.len * width);
        out.push(piece);
        (buf, done) = (rest, at + sg.len);
    }
    out
}

/// What the forward pass leaves of the LM head besides each position's
/// loss (lm_head.rs).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Head {
    /// Every (N, V) logit, in `Activations::logits` (generation, tests).
    Logits,
    /// Nothing more: the logits exist a chunk of rows at a time (evaluation).
    Loss,
    /// The gradient of the loss with respect to the head's input, for the
    /// backward pass to come (training): the (N, V) logits never exist.
    Gradient,
}

/// What the forward pass of one block keeps for the backward pass besides
/// the block's input (`Activations::resid`). N = B*T rows. The RMSNorm
/// outputs and silu(gate) * up are not kept: the backward pass recomputes
/// them from what is here (a few elementwise passes) instead of storing
/// 2C + F more floats per row and layer, a third of the total.
#[derive(Default)]
struct LayerActs {
    rstd1: Vec<f32>, // (N)
    q: Vec<f32>,     // (N, NH*HS) after RoPE
    k: Vec<f32>,     // (N, KVH*HS) after RoPE
    v: Vec<f32>,     // (N, KVH*HS)
    att: Vec<f32>,   // (N, NH*HS) attention output, before the o projection
    lse: Vec<f32>,   // (N, NH) log-sum-exp of each attention row
    x_mid: Vec<f32>, // (N, C) residual stream after attention
    rstd2: Vec<f32>, // (N)
    gate: Vec<f32>,  // (N, F)
    up: Vec<f32>,    // (N, F)
}

impl LayerActs {
    /// Every buffer with its floats per row.
    fn buffers(&mut self, c: &Config) -> [(&mut Vec<f32>, usize); 10] {
        let (d, q, kv, f) = (c.dim, c.q_dim(), c.kv_dim(), c.ffn_dim);
        [
            (&mut self.rstd1, 1),
            (&mut self.q, q),
            (&mut self.k, kv),
            (&mut self.v, kv),
            (&mut self.att, q),
            (&mut self.lse, c.n_heads),
            (&mut self.x_mid, d),
            (&mut self.rstd2, 1),
            (&mut self.gate, f),
            (&mut self.up, f),
        ]
    }

    fn all(&self) -> [&Vec<f32>; 10] {
        [&self.rstd1, &self.q, &self.k, &self.v, &self.att, &self.lse, &self.x_mid, &self.rstd2, &self.gate, &self.up]
    }
}

/// Gradient buffers for the backward pass, reused layer after layer (the
/// MLP's (N, F) gradients live in `h` and the layer's `up`: mlp_backward).
#[derive(Default)]
struct Scratch {
    dres: Vec<f32>,  // (N, C) gradient of the residual stream
    dxn: Vec<f32>,   // (N, C) gradient of a norm output (first: of the head's input)
    dq: Vec<f32>,    // (N, NH*HS)
    dk: Vec<f32>,    // (N, KVH*HS)
    dv: Vec<f32>,    // (N, KVH*HS)
    datt: Vec<f32>,  // (N, NH*HS)
    delta: Vec<f32>, // (N, NH)
    rstd: Vec<f32>,  // (N) rstd of a recomputed RMSNorm
}

impl Scratch {
    /// Every buffer with its floats per row.
    fn buffers(&mut self, c: &Config) -> [(&mut Vec<f32>, usize); 8] {
        let (d, q, kv) = (c.dim, c.q_dim(), c.kv_dim());
        [
            (&mut self.dres, d),
            (&mut self.dxn, d),
            (&mut self.dq, q),
            (&mut self.dk, kv),
            (&mut self.dv, kv),
            (&mut self.datt, q),
            (&mut self.delta, c.n_heads),
            (&mut self.rstd, 1),
        ]
    }

    fn all(&self) -> [&Vec<f32>; 8] {
        [&self.dres, &self.dxn, &self.dq, &self.dk, &self.dv, &self.datt, &self.delta, &self.rstd]
    }
}

/// v holds exactly len values (new ones `fill`): it grows to what is asked
/// and no further (Vec's doubling would reserve pages never used), and
/// never shrinks, so a smaller batch after a larger one does not allocate.
fn fit<T: Clone>(v: &mut Vec<T>, len: usize, fill: T) {
    if len > v.capacity() {
        v.reserve_exact(len - v.len());
    }
    v.resize(len, fill);
}

/// Every buffer of a forward and backward pass, reused from step to step.
pub struct Activations {
    pub b: usize,
    pub t: usize,
    /// What the forward pass leaves of the LM head.
    pub head: Head,
    /// Rows per chunk of logits (lm_head::ROWS; tests make it small).
    pub head_rows: usize,
    /// Keep only each block's input through the forward pass, and compute
    /// the rest again block by block in the backward pass (--recompute).
    recompute: bool,
    tokens: Vec<u32>,  // (N)
    targets: Vec<i32>, // (N), negative = no loss here
    /// L+1 x (N, C): the residual stream entering each block, then after the last.
    resid: Vec<Vec<f32>>,
    /// What each block keeps (L of them; one with `recompute`, refilled
    /// block by block in the backward pass).
    layers: Vec<LayerActs>,
    tmp: Vec<f32>,    // (N, C) a block's output before the residual add
    xn: Vec<f32>,     // (N, C) the current RMSNorm output (forward and backward)
    h: Vec<f32>,      // (N, F) the current silu(gate) * up (forward and backward)
    xf: Vec<f32>,     // (N, C) final RMSNorm output
    rstd_f: Vec<f32>, // (N)
    /// (N, V) logits with Head::Logits (dlogits after backward); else (R, V), one chunk's.
    pub logits: Vec<f32>,
    /// One chunk's rows with a target, gathered for the head (not with Head::Logits).
    gathered: lm_head::Gathered,
    losses: Vec<f32>, // (N)
    /// From the first backward pass on, or the first forward pass with Head::Gradient.
    scratch: Option<Scratch>,
    /// A packed batch's segments (data::Segment); empty: whole rows.
    pub segments: Vec<Segment>,
}

impl Activations {
    /// Buffers for batches of (B, T) that keep every block's activations
    /// and all (N, V) logits (what generation and the tests read).
    pub fn new(c: &Config, b: usize, t: usize) -> Activations {
        Activations::with(c, b, t, Head::Logits, false)
    }

    /// Buffers for batches of (B, T) (they grow for larger ones) with the
    /// given head output, keeping every block's activations or only each
    /// block's input (`recompute`).
    pub fn with(c: &Config, b: usize, t: usize, head: Head, recompute: bool) -> Activations {
        let mut a = Activations {
            b: 0,
            t: 0,
            head,
            head_rows: lm_head::ROWS,
            recompute,
            tokens: Vec::new(),
            targets: Vec::new(),
            resid: (0..=c.n_layers).map(|_| Vec::new()).collect(),
            layers: (0..if recompute { 1 } else { c.n_layers }).map(|_| LayerActs::default()).collect(),
            tmp: Vec::new(),
            xn: Vec::new(),
            h: Vec::new(),
            xf: Vec::new(),
            rstd_f: Vec::new(),
            logits: Vec::new(),
            gathered: lm_head::Gathered::default(),
            losses: Vec::new(),
            // made now for training, so that it too is sized once
            scratch: (head == Head::Gradient).then(Scratch::default),
            segments: Vec::new(),
        };
        a.set_shape(c, b, t);
        a
    }

    /// Bytes the buffers hold: their capacity, which `set_shape` keeps at
    /// what the largest batch so far needed, every byte of it written.
    pub fn bytes(&self) -> usize {
        let f = |v: &Vec<f32>| v.capacity() * 4;
        let layers: usize = self.layers.iter().flat_map(LayerActs::all).map(f).sum();
        let scratch: usize = self.scratch.iter().flat_map(Scratch::all).map(f).sum();
        let top = [&self.tmp, &self.xn, &self.h, &self.xf, &self.rstd_f, &self.logits, &self.losses];
        layers
            + scratch
            + self.resid.iter().map(f).sum::<usize>()
            + top.into_iter().map(f).sum::<usize>()
            + self.gathered.bytes()
            + 4 * (self.tokens.capacity() + self.targets.capacity())
    }

    /// Re-shapes every buffer for a batch of (B, T). Buffers grow to what
    /// the batch needs and keep their capacity, so after the largest batch
    /// has been seen no step allocates.
    pub fn set_shape(&mut self, c: &Config, b: usize, t: usize) {
        self.segments.clear();
        (self.b, self.t) = (b, t);
        let n = b * t;
        let (d, f) = (c.dim, c.ffn_dim);
        fit(&mut self.tokens, n, 0);
        fit(&mut self.targets, n, -1);
        for x in self.resid.iter_mut() {
            fit(x, n * d, 0.0);
        }
        for a in self.layers.iter_mut() {
            a.buffers(c).into_iter().for_each(|(v, w)| fit(v, n * w, 0.0));
        }
        let top = [(&mut self.tmp, d), (&mut self.xn, d), (&mut self.h, f), (&mut self.xf, d)];
        top.into_iter().for_each(|(v, w)| fit(v, n * w, 0.0));
        fit(&mut self.rstd_f, n, 0.0);
        fit(&mut self.losses, n, 0.0);
        let head_rows = if self.head == Head::Logits { n } else { n.min(self.head_rows) };
        fit(&mut self.logits, head_rows * c.vocab_size, 0.0);
        if self.head != Head::Logits {
            self.gathered.fit(head_rows, d);
        }
        if let Some(s) = self.scratch.as_mut() {
            s.buffers(c).into_iter().for_each(|(v, w)| fit(v, n * w, 0.0));
        }
    }

    /// Per-position losses of the last forward pass (0 where ignored).
    pub fn losses(&self) -> &[f32] {
        &self.losses
    }

    /// Allocates the gradient buffers for the current shape, if not yet there.
    fn scratch(&mut self, c: &Config) {
        if self.scratch.is_none() {
            let mut s = Scratch::default();
            let n = self.b * self.t;
            s.buffers(c).into_iter().for_each(|(v, w)| fit(v, n * w, 0.0));
            self.scratch = Some(s);
        }
    }
}

/// Where the backward pass delivers parameter gradients. Full fine-tuning
/// keeps a dense gradient per tensor (`FullGrads`); LIFT keeps only the
/// selected entries of each linear weight, so the pass hands over the two
/// factors of dW and lets the sink decide what to compute.
pub trait GradSink {
    /// Whether p's gradient is wanted; frozen tensors cost nothing.
    fn wants(&self, p: Param) -> bool;
    /// dW(p) (OC, IC) += dout^T @ inp, with dout (N, OC) and inp (N, IC):
    /// a linear weight, or the LM head.
    fn linear(&mut self, p: Param, dout: &[f32], inp: &[f32], n: usize, ic: usize, oc: usize);
    /// `linear` for each wanted (p, dout, OC) of weights that read the same
    /// input (q, k, v; gate, up): a sink may prepare inp once for all.
    fn linears(&mut self, outs: &[(Param, &[f32], usize)], inp: &[f32], n: usize, ic: usize) {
        for &(p, dout, oc) in outs {
            if self.wants(p) {
                self.linear(p, dout, inp, n, ic, oc);
            }
        }
    }
    /// The accumulation buffer of a norm weight or the embedding.
    fn dense(&mut self, p: Param) -> &mut [f32];
}

/// Dense gradients of every parameter (or of those in `trainable`).
pub struct FullGrads {
    pub grads: Weights,
    pub trainable: Option<Vec<Param>>,
}

impl FullGrads {
    pub fn new(c: &Config) -> FullGrads {
        FullGrads { grads: Weights::zeros(c), trainable: None }
    }
}

impl GradSink for FullGrads {
    fn wants(&self, p: Param) -> bool {
        self.trainable.as_ref().is_none_or(|t| t.contains(&p))
    }
    fn linear(&mut self, p: Param, dout: &[f32], inp: &[f32], n: usize, ic: usize, oc: usize) {
        cpu::matmul_backward_weight(self.grads.get_mut(p), dout, inp, n, ic, oc);
    }
    fn dense(&mut self, p: Param) -> &mut [f32] {
        self.grads.get_mut(p)
    }
}

impl Model {
    pub fn new(config: Config, weights: Weights) -> Model {
        let rope = RopeTable::new(&config.rope_inv_freq(), 0);
        Model { config, weights, rope }
    }

    /// Makes sure the RoPE table covers positions 0..len.
    pub fn ensure_rope(&mut self, len: usize) {
        if self.rope.max_pos() < len {
            self.rope = RopeTable::new(&self.config.rope_inv_freq(), len.next_power_of_two());
        }
    }

    /// The forward pass over tokens (B, T). With targets (B, T) (negative =
    /// ignored) it returns the mean cross-entropy; per `acts.head` the
    /// logits (B, T, V) are left in `acts.logits`, or the gradient of the
    /// loss with respect to the head's input is made for `backward`. A token
    /// id outside the vocabulary is an error (as on the GPU), found before
    /// any work.
    pub fn forward(&self, acts: &mut Activations, tokens: &[u32], targets: Option<&[i32]>) -> Result<f32> {
        let c = &self.config;
        let (b, t) = (acts.b, acts.t);
        assert_eq!(tokens.len(), b * t, "forward: tokens must be (B, T)");
        // positions restart in each segment of a packed batch
        let longest = acts.segments.iter().map(|sg| sg.len).max().unwrap_or(t);
        assert!(self.rope.max_pos() >= longest, "forward: call ensure_rope first");
        if let Some(sg) = acts.segments.iter().find(|sg| sg.row >= b || sg.start + sg.len > t) {
            bail!("segment {sg:?} lies outside the batch ({b}, {t})");
        }
        let flat = |sg: &Segment| (sg.row * t + sg.start, sg.row * t + sg.start + sg.len);
        if let Some(p) = acts.segments.windows(2).find(|p| flat(&p[1]).0 < flat(&p[0]).1) {
            bail!("segments {:?} and {:?} overlap or are out of order", p[0], p[1]);
        }
        if let Some(&bad) = tokens.iter().find(|&&id| id as usize >= c.vocab_size) {
            bail!("token id {bad} is out of range (vocabulary of {})", c.vocab_size);
        }
        let dims = AttnDims { b, tq: t, tk: t, tcap: t, nh: c.n_heads, kvh: c.n_kv_heads, hs: c.head_dim };
        acts.tokens.copy_from_slice(tokens);
        match targets {
            Some(tg) => acts.targets.copy_from_slice(tg),
            None => acts.targets.fill(-1),
        }

        cpu::embedding_forward(&mut acts.resid[0], tokens, &self.weights.embed, c.dim);
        for l in 0..c.n_layers {
            self.block_forward(l, acts, dims);
        }
        let x_final = &acts.resid[c.n_layers];
        cpu::rmsnorm_forward(&mut acts.xf, &mut acts.rstd_f, x_final, &self.weights.norm, c.dim, c.norm_eps);
        Ok(self.head_forward(acts))
    }

    /// Block l: resid[l] -> resid[l+1], keeping what its backward pass needs.
    fn block_forward(&self, l: usize, acts: &mut Activations, dims: AttnDims) {
        let c = &self.config;
        let n = dims.b * dims.tq;
        let slot = if acts.recompute { 0 } else { l };
        let Activations { resid, layers, tmp, xn, h, segments, .. } = acts;
        let (done, rest) = resid.split_at_mut(l + 1);
        let a = &mut layers[slot];
        self.block_keep(l, a, &done[l], tmp, xn, segments, dims);
        // x_out = x_mid + down(silu(gate) * up)
        cpu::swiglu_forward(h, &a.gate, &a.up);
        cpu::matmul_forward(tmp, h, &self.weights.layers[l].w_down, n, c.ffn_dim, c.dim);
        rest[0].copy_from_slice(&a.x_mid);
        cpu::residual_forward(&mut rest[0], tmp);
    }

    /// What block l keeps for its backward pass, from its input x_in (N, C):
    /// the attention block through x_mid = x_in + o(attention(rope(q),
    /// rope(k), v)), then the MLP's gate and up projections of norm(x_mid).
    /// The forward pass runs it, and with --recompute the backward pass runs
    /// it again on the kept input: the same ops on the same values, so the
    /// same bits.
    #[allow(clippy::too_many_arguments)]
    fn block_keep(
        &self,
        l: usize,
        a: &mut LayerActs,
        x_in: &[f32],
        tmp: &mut [f32],
        xn: &mut [f32],
        segments: &[Segment],
        dims: AttnDims,
    ) {
        let c = &self.config;
        let (n, d, qd, kvd, f) = (dims.b * dims.tq, c.dim, c.q_dim(), c.kv_dim(), c.ffn_dim);
        let w = &self.weights.layers[l];
        cpu::rmsnorm_forward(xn, &mut a.rstd1, x_in, &w.attn_norm, d, c.norm_eps);
        cpu::matmul_forward(&mut a.q, xn, &w.wq, n, d, qd);
        cpu::matmul_forward(&mut a.k, xn, &w.wk, n, d, kvd);
        cpu::matmul_forward(&mut a.v, xn, &w.wv, n, d, kvd);
        self.rope_attention_forward(a, segments, dims);
        cpu::matmul_forward(tmp, &a.att, &w.wo, n, qd, d);
        a.x_mid.copy_from_slice(x_in);
        cpu::residual_forward(&mut a.x_mid, tmp);
        cpu::rmsnorm_forward(xn, &mut a.rstd2, &a.x_mid, &w.mlp_norm, d, c.norm_eps);
        cpu::matmul_forward(&mut a.gate, xn, &w.w_gate, n, d, f);
        cpu::matmul_forward(&mut a.up, xn, &w.w_up, n, d, f);
    }

    /// The LM head and the loss (lm_head.rs), a chunk of rows at a time:
    /// the mean loss, and per acts.head the logits kept, or dxf made for the
    /// backward pass (in the scratch's dxn).
    fn head_forward(&self, acts: &mut Activations) -> f32 {
        let c = &self.config;
        if acts.head == Head::Gradient {
            acts.scratch(c);
        }
        let Activations { xf, targets, logits, gathered, losses, scratch, head, head_rows, .. } = acts;
        let x = HeadInput { xf, w: self.weights.head(), targets, c: c.dim, v: c.vocab_size };
        let mut out = Logits { buf: logits, keep: *head == Head::Logits, rows: *head_rows, gathered };
        let dxf = match head {
            Head::Gradient => scratch.as_mut().map(|s| &mut s.dxn[..]),
            _ => None,
        };
        lm_head::forward(x, &mut out, losses, dxf)
    }

    /// The backward pass of the mean loss of the last `forward` call. Weight
    /// gradients go to `sink`. With --recompute each block's activations
    /// are computed again from its kept input just before its backward pass.
    pub fn backward(&self, acts: &mut Activations, sink: &mut dyn GradSink) {
        let c = &self.config;
        let (b, t) = (acts.b, acts.t);
        let n = b * t;
        let d = c.dim;
        let dims = AttnDims { b, tq: t, tk: t, tcap: t, nh: c.n_heads, kvh: c.n_kv_heads, hs: c.head_dim };
        acts.scratch(c);
        self.head_backward(acts, sink);
        let Activations { layers, resid, rstd_f, tokens, scratch, tmp, xn, h, segments, recompute, .. } = acts;
        let s = scratch.as_mut().expect("scratch allocated above");
        s.dres.fill(0.0);
        let dnorm = if sink.wants(Param::Norm) { Some(sink.dense(Param::Norm)) } else { None };
        cpu::rmsnorm_backward(&mut s.dres, dnorm, &s.dxn, &resid[c.n_layers], &self.weights.norm, rstd_f, d);

        for l in (0..c.n_layers).rev() {
            let slot = if *recompute { 0 } else { l };
            if *recompute {
                self.block_keep(l, &mut layers[0], &resid[l], tmp, xn, segments, dims);
            }
            let a = &mut layers[slot];
            self.mlp_backward(l, a, s, xn, h, sink, n);
            self.attention_block_backward(l, a, &resid[l], s, xn, sink, dims, segments);
        }
        if sink.wants(Param::Embed) {
            cpu::embedding_backward(sink.dense(Param::Embed), &s.dres, tokens, d);
        }
    }

    /// The LM head's part of the backward pass: dxf (into the scratch's
    /// dxn) unless the forward pass made it (Head::Gradient), and the head's
    /// weight gradient when the sink wants it. A tied head is the embedding,
    /// whose gradient then has both parts.
    fn head_backward(&self, acts: &mut Activations, sink: &mut dyn GradSink) {
        let c = &self.config;
        let head = if c.tied_embeddings { Param::Embed } else { Param::LmHead };
        let (want_dxf, want_dw) = (acts.head != Head::Gradient, sink.wants(head));
        if !want_dxf && !want_dw {
            return;
        }
        let Activations { xf, targets, logits, gathered, scratch, head: mode, head_rows, .. } = acts;
        let x = HeadInput { xf, w: self.weights.head(), targets, c: c.dim, v: c.vocab_size };
        let mut out = Logits { buf: logits, keep: *mode == Head::Logits, rows: *head_rows, gathered };
        let s = scratch.as_mut().expect("allocated by backward");
        let dxf = if want_dxf { Some(&mut s.dxn[..]) } else { None };
        let mut add = |dl: &[f32], xr: &[f32], m: usize| sink.linear(head, dl, xr, m, c.dim, c.vocab_size);
        let dw: Option<lm_head::WeightGrad> = if want_dw { Some(&mut add) } else { None };
        lm_head::backward(x, &mut out, dxf, dw);
    }

    /// RoPE (positions from 0) and causal attention of one layer's q, k, v
    /// (B, T, ...), into att (B, T, NH*HS) and lse (B, T, NH): over whole
    /// rows, or, for a packed batch, over each segment on its own (positions
    /// from 0 again, no attention across segments). Positions outside every
    /// segment (a packed row's padding) get zero output.
    fn rope_attention_forward(&self, a: &mut LayerActs, segments: &[Segment], dims: AttnDims) {
        let c = &self.config;
        let (nh, kvh, hs, t) = (c.n_heads, c.n_kv_heads, c.head_dim, dims.tq);
        if segments.is_empty() {
            cpu::rope_forward(&mut a.q, &self.rope, t, nh, hs, 0);
            cpu::rope_forward(&mut a.k, &self.rope, t, kvh, hs, 0);
            cpu::attention_forward(&mut a.att, &mut a.lse, &a.q, &a.k, &a.v, dims, None);
            return;
        }
        a.att.fill(0.0);
        a.lse.fill(0.0);
        // the segments side by side (each splits its heads again: the
        // threads share out segments x heads, not 9 heads at a time)
        let (qd, kvd) = (nh * hs, kvh * hs);
        let (q, k) = (pieces(&mut a.q, qd, t, segments), pieces(&mut a.k, kvd, t, segments));
        let (att, lse) = (pieces(&mut a.att, qd, t, segments), pieces(&mut a.lse, nh, t, segments));
        let v = &a.v;
        let work = segments.par_iter().zip(q).zip(k).zip(att).zip(lse);
        work.for_each(|((((sg, q), k), att), lse)| {
            let (at, len) = (sg.row * t + sg.start, sg.len);
            let one = AttnDims { b: 1, tq: len, tk: len, tcap: len, ..dims };
            cpu::rope_forward(q, &self.rope, len, nh, hs, 0);
            cpu::rope_forward(k, &self.rope, len, kvh, hs, 0);
            cpu::attention_forward(att, lse, q, k, &v[at * kvd..(at + len) * kvd], one, None);
        });
    }

    /// Backward of rope_attention_forward: s.datt (B, T, NH*HS) into s.dq,
    /// s.dk, s.dv (zeroed by the caller), segment by segment when packed.
    fn rope_attention_backward(&self, s: &mut Scratch, a: &LayerActs, segments: &[Segment], dims: AttnDims) {
        let c = &self.config;
        let (nh, kvh, hs, t) = (c.n_heads, c.n_kv_heads, c.head_dim, dims.tq);
        if segments.is_empty() {
            let (q, k, v) = (&a.q, &a.k, &a.v);
            cpu::attention_backward(
                &mut s.dq,
                &mut s.dk,
                &mut s.dv,
                &mut s.delta,
                &s.datt,
                &a.att,
                &a.lse,
                q,
                k,
                v,
                dims,
            );
            cpu::rope_backward(&mut s.dq, &self.rope, t, nh, hs);
            cpu::rope_backward(&mut s.dk, &self.rope, t, kvh, hs);
            return;
        }
        let (qd, kvd) = (nh * hs, kvh * hs);
        let (dq, dk) = (pieces(&mut s.dq, qd, t, segments), pieces(&mut s.dk, kvd, t, segments));
        let (dv, delta) = (pieces(&mut s.dv, kvd, t, segments), pieces(&mut s.delta, nh, t, segments));
        let datt = &s.datt;
        let work = segments.par_iter().zip(dq).zip(dk).zip(dv).zip(delta);
        work.for_each(|((((sg, dq), dk), dv), delta)| {
            let (at, len) = (sg.row * t + sg.start, sg.len);
            let one = AttnDims { b: 1, tq: len, tk: len, tcap: len, ..dims };
            let (rq, rkv, rh) = (at * qd..(at + len) * qd, at * kvd..(at + len) * kvd, at * nh..(at + len) * nh);
            let (datt, att, lse) = (&datt[rq.clone()], &a.att[rq.clone()], &a.lse[rh]);
            let (q, k, v) = (&a.q[rq], &a.k[rkv.clone()], &a.v[rkv]);
            cpu::attention_backward(dq, dk, dv, delta, datt, att, lse, q, k, v, one);
            cpu::rope_backward(dq, &self.rope, len, nh, hs);
            cpu::rope_backward(dk, &self.rope, len, kvh, hs);
        });
    }

    /// The MLP block's backward pass of layer l: s.dres holds d(x_out) and
    /// becomes d(x_mid). The block's normed input `xn` and SwiGLU output `h`
    /// are recomputed first (the forward pass did not keep them); once the
    /// down projection's weight gradient has used h, h holds dh and then
    /// dgate, and a.up becomes dup (the layer's activations are spent).
    #[allow(clippy::too_many_arguments)]
    fn mlp_backward(
        &self,
        l: usize,
        a: &mut LayerActs,
        s: &mut Scratch,
        xn: &mut [f32],
        h: &mut [f32],
        sink: &mut dyn GradSink,
        n: usize,
    ) {
        let c = &self.config;
        let (d, f) = (c.dim, c.ffn_dim);
        let w = &self.weights.layers[l];
        let lin = |which| Param::Linear(l, which);
        cpu::rmsnorm_forward(xn, &mut s.rstd, &a.x_mid, &w.mlp_norm, d, c.norm_eps);
        cpu::swiglu_forward(h, &a.gate, &a.up);
        if sink.wants(lin(Linear::Down)) {
            sink.linear(lin(Linear::Down), &s.dres, h, n, f, d);
        }
        let dh = h;
        dh.fill(0.0);
        cpu::matmul_backward_input(dh, &s.dres, &w.w_down, n, f, d);
        cpu::swiglu_backward_inplace(dh, &mut a.up, &a.gate);
        let (dgate, dup) = (&*dh, &a.up);
        sink.linears(&[(lin(Linear::Gate), dgate, f), (lin(Linear::Up), dup, f)], xn, n, d);
        s.dxn.fill(0.0);
        cpu::matmul_backward_input(&mut s.dxn, dgate, &w.w_gate, n, d, f);
        cpu::matmul_backward_input(&mut s.dxn, dup, &w.w_up, n, d, f);
        let dw = if sink.wants(Param::MlpNorm(l)) { Some(sink.dense(Param::MlpNorm(l))) } else { None };
        cpu::rmsnorm_backward(&mut s.dres, dw, &s.dxn, &a.x_mid, &w.mlp_norm, &a.rstd2, d);
    }

    /// The attention block's backward pass of layer l: s.dres holds d(x_mid)
    /// and becomes d(x_in).
    #[allow(clippy::too_many_arguments)]
    fn attention_block_backward(
        &self,
        l: usize,
        a: &LayerActs,
        x_in: &[f32],
        s: &mut Scratch,
        xn: &mut [f32],
        sink: &mut dyn GradSink,
        dims: AttnDims,
        segments: &[Segment],
    ) {
        let c = &self.config;
        let (n, d, qd, kvd) = (dims.b * dims.tq, c.dim, c.q_dim(), c.kv_dim());
        let w = &self.weights.layers[l];
        let lin = |which| Param::Linear(l, which);
        if sink.wants(lin(Linear::O)) {
            sink.linear(lin(Linear::O), &s.dres, &a.att, n, qd, d);
        }
        s.datt.fill(0.0);
        cpu::matmul_backward_input(&mut s.datt, &s.dres, &w.wo, n, qd, d);
        s.dq.fill(0.0);
        s.dk.fill(0.0);
        s.dv.fill(0.0);
        self.rope_attention_backward(s, a, segments, dims);
        cpu::rmsnorm_forward(xn, &mut s.rstd, x_in, &w.attn_norm, d, c.norm_eps);
        sink.linears(
            &[(lin(Linear::Q), &s.dq, qd), (lin(Linear::K), &s.dk, kvd), (lin(Linear::V), &s.dv, kvd)],
            xn,
            n,
            d,
        );
        s.dxn.fill(0.0);
        cpu::matmul_backward_input(&mut s.dxn, &s.dq, &w.wq, n, d, qd);
        cpu::matmul_backward_input(&mut s.dxn, &s.dk, &w.wk, n, d, kvd);
        cpu::matmul_backward_input(&mut s.dxn, &s.dv, &w.wv, n, d, kvd);
        let dw = if sink.wants(Param::AttnNorm(l)) { Some(sink.dense(Param::AttnNorm(l))) } else { None };
        cpu::rmsnorm_backward(&mut s.dres, dw, &s.dxn, x_in, &w.attn_norm, &a.rstd1, d);
    }
}

// ----------------------------------------------------------------------------
// Inference with a KV cache

/// Keys and values of every layer for the positions seen so far, so that
/// generating one more token costs one row of work instead of T.
pub struct KvCache {
    pub b: usize,
    /// Capacity in positions.
    pub cap: usize,
    /// Positions filled.
    pub len: usize,
    /// (B) the first real position of each row; earlier ones are left padding.
    pub starts: Vec<usize>,
    k: Vec<Vec<f32>>, // L x (B, cap, KVH*HS), after RoPE
    v: Vec<Vec<f32>>, // L x (B, cap, KVH*HS)
}

impl KvCache {
    pub fn new(c: &Config, b: usize, cap: usize) -> KvCache {
        let size = b * cap * c.kv_dim();
        KvCache {
            b,
            cap,
            len: 0,
            starts: vec![0; b],
            k: (0..c.n_layers).map(|_| vec![0.0; size]).collect(),
            v: (0..c.n_layers).map(|_| vec![0.0; size]).collect(),
        }
    }
}

impl Model {
    /// Runs tokens (B, n) at positions cache.len .. cache.len + n, appends
    /// their keys and values to the cache, and returns the logits (B, V) of
    /// the last of the n positions of each row. `cache.starts` masks the
    /// left padding of rows whose prompts are shorter than the batch's longest.
    pub fn forward_cached(&self, cache: &mut KvCache, tokens: &[u32]) -> Vec<f32> {
        let c = &self.config;
        let b = cache.b;
        let n = tokens.len() / b;
        let rows = b * n;
        let (d, qd, kvd, f) = (c.dim, c.q_dim(), c.kv_dim(), c.ffn_dim);
        let pos0 = cache.len;
        assert_eq!(tokens.len(), rows, "forward_cached: tokens must be (B, n)");
        assert!(pos0 + n <= cache.cap, "forward_cached: KV cache is full");
        assert!(self.rope.max_pos() >= pos0 + n, "forward_cached: call ensure_rope first");
        let dims =
            AttnDims { b, tq: n, tk: pos0 + n, tcap: cache.cap, nh: c.n_heads, kvh: c.n_kv_heads, hs: c.head_dim };
        let z = |len: usize| vec![0.0f32; len];
        let (mut x, mut xn, mut rstd, mut tmp) = (z(rows * d), z(rows * d), z(rows), z(rows * d));
        let (mut q, mut k, mut v, mut att, mut lse) =
            (z(rows * qd), z(rows * kvd), z(rows * kvd), z(rows * qd), z(rows * c.n_heads));
        let (mut gate, mut up, mut h) = (z(rows * f), z(rows * f), z(rows * f));

        cpu::embedding_forward(&mut x, tokens, &self.weights.embed, d);
        for l in 0..c.n_layers {
            let w = &self.weights.layers[l];
            cpu::rmsnorm_forward(&mut xn, &mut rstd, &x, &w.attn_norm, d, c.norm_eps);
            cpu::matmul_forward(&mut q, &xn, &w.wq, rows, d, qd);
            cpu::matmul_forward(&mut k, &xn, &w.wk, rows, d, kvd);
            cpu::matmul_forward(&mut v, &xn, &w.wv, rows, d, kvd);
            cpu::rope_forward(&mut q, &self.rope, n, c.n_heads, c.head_dim, pos0);
            cpu::rope_forward(&mut k, &self.rope, n, c.n_kv_heads, c.head_dim, pos0);
            for bi in 0..b {
                let dst = (bi * cache.cap + pos0) * kvd;
                cache.k[l][dst..dst + n * kvd].copy_from_slice(&k[bi * n * kvd..(bi + 1) * n * kvd]);
                cache.v[l][dst..dst + n * kvd].copy_from_slice(&v[bi * n * kvd..(bi + 1) * n * kvd]);
            }
            let starts = if cache.starts.iter().any(|&s| s > 0) { Some(&cache.starts[..]) } else { None };
            cpu::attention_forward(&mut att, &mut lse, &q, &cache.k[l], &cache.v[l], dims, starts);
            cpu::matmul_forward(&mut tmp, &att, &w.wo, rows, qd, d);
            cpu::residual_forward(&mut x, &tmp);
            cpu::rmsnorm_forward(&mut xn, &mut rstd, &x, &w.mlp_norm, d, c.norm_eps);
            cpu::matmul_forward(&mut gate, &xn, &w.w_gate, rows, d, f);
            cpu::matmul_forward(&mut up, &xn, &w.w_up, rows, d, f);
            cpu::swiglu_forward(&mut h, &gate, &up);
            cpu::matmul_forward(&mut tmp, &h, &w.w_down, rows, f, d);
            cpu::residual_forward(&mut x, &tmp);
        }
        cache.len += n;
        // Only the last position of each row needs the final norm and the head.
        let mut last = z(b * d);
        for bi in 0..b {
            let src = (bi * n + n - 1) * d;
            last[bi * d..(bi + 1) * d].copy_from_slice(&x[src..src + d]);
        }
        let mut lastn = z(b * d);
        cpu::rmsnorm_forward(&mut lastn, &mut rstd[..b], &last, &self.weights.norm, d, c.norm_eps);
        let mut logits = z(b * c.vocab_size);
        cpu::matmul_forward(&mut logits, &lastn, self.weights.head(), b, d, c.vocab_size);
        logits
    }
}
