//! What a run is configured by: the training options, the method's options
//! within them, and the device. These types are the command line's too
//! (`clap` derives on them), so `lift train`, `lift bench` and `lift
//! gpu-check` share one definition and one set of defaults, and state.bin
//! stores them as they are (serde).

use std::path::PathBuf;

use clap::{Args, ValueEnum};
use serde::{Deserialize, Serialize};

use crate::data::Template;
use crate::optim::{AdamW, EpsForm};
use crate::select::{Budget, DEFAULT_DENSITY, DEFAULT_FILTER_RANK, DEFAULT_OVERSAMPLE, DEFAULT_POWER_ITERS, Select};

/// What is trained (`--method`).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize, ValueEnum)]
#[serde(rename_all = "lowercase")]
pub enum Method {
    /// The principal weights of every linear layer (sparse AdamW).
    Lift,
    /// Every entry of every linear layer (dense AdamW).
    Full,
    /// Low-rank adapters on every linear layer.
    Lora,
    /// The largest |W| entries, with no rank reduction (ablation).
    Magnitude,
    /// Uniformly random entries (ablation).
    Random,
    /// Weight-decomposed LoRA: adapters plus a trained magnitude per output row.
    Dora,
    /// LoRA with adapters from the top-r singular triplets, on the residual.
    Pissa,
    /// Structured sparse fine-tuning: whole FFN channels (and heads), sampled.
    S2ft,
}

impl Method {
    /// Whether the method trains a mask of entries of the linear weights
    /// (sparse AdamW; S2FT's mask is whole rows and columns).
    pub fn is_sparse(self) -> bool {
        matches!(self, Method::Lift | Method::Magnitude | Method::Random | Method::S2ft)
    }

    /// Whether the mask is recomputed every --update-interval steps.
    pub fn refreshes(self) -> bool {
        matches!(self, Method::Lift | Method::Magnitude | Method::Random)
    }

    /// Whether the method trains low-rank adapters (merged on save).
    pub fn has_adapters(self) -> bool {
        matches!(self, Method::Lora | Method::Dora | Method::Pissa)
    }
}

/// How the rank-r approximation behind LIFT's scores is computed (`--svd`).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize, ValueEnum)]
#[serde(rename_all = "lowercase")]
pub enum Svd {
    /// On the CPU: exact for matrices whose smaller side is at most 1024
    /// (cheaper there), randomized above; on the GPU: randomized.
    Auto,
    Randomized,
    Exact,
}

/// The learning-rate schedule after warmup (`--schedule`).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize, ValueEnum)]
#[serde(rename_all = "lowercase")]
pub enum Schedule {
    Linear,
    Cosine,
    Constant,
}

/// Where the numbers are computed (`--device`).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize, ValueEnum)]
#[serde(rename_all = "lowercase")]
pub enum Device {
    /// CUDA when a usable GPU and the CUDA libraries are found, else CPU.
    Auto,
    Cpu,
    Cuda,
}

/// The method and what it trains: the flags every command that builds a
/// trainer takes (`lift train`, `lift bench`).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, Args)]
pub struct MethodOptions {
    /// What to train.
    #[arg(long = "method", value_enum, default_value_t = MethodOptions::default().kind)]
    #[serde(rename = "method")]
    pub kind: Method,
    /// Fraction of each linear weight to train (LIFT, magnitude, random) [default: 0.05].
    #[arg(long, conflicts_with = "rank")]
    pub density: Option<f64>,
    /// Instead of --density: the LoRA-equivalent budget k = (out+in)*rank per matrix.
    #[arg(long)]
    pub rank: Option<usize>,
    /// Rank r of the low-rank approximation that scores the weights (LIFT).
    #[arg(long, default_value_t = MethodOptions::default().filter_rank)]
    pub filter_rank: usize,
    /// How to compute the rank-r approximation (auto: exact SVD for matrices up
    /// to 1024 on the smaller side, randomized subspace iteration above; on a
    /// GPU always randomized).
    #[arg(long, value_enum, default_value_t = MethodOptions::default().svd)]
    pub svd: Svd,
    /// Power iterations of the randomized low-rank approximation.
    #[arg(long, default_value_t = MethodOptions::default().power_iters)]
    pub power_iters: usize,
    /// Extra columns of the randomized sketch beyond the filter rank.
    #[arg(long, default_value_t = MethodOptions::default().oversample)]
    pub oversample: usize,
    /// Recompute the masks every N optimizer steps (0 = never).
    #[arg(long, default_value_t = MethodOptions::default().update_interval)]
    pub update_interval: u64,
    /// Adapter rank (--method lora, dora, pissa).
    #[arg(long, default_value_t = MethodOptions::default().lora_rank)]
    pub lora_rank: usize,
    /// Adapter alpha; adapters are scaled by alpha / rank.
    #[arg(long, default_value_t = MethodOptions::default().lora_alpha)]
    pub lora_alpha: f32,
    /// Which entries a LIFT or magnitude mask takes: the largest scores (the
    /// paper) or the smallest (the released code's `lift_sparse` at HEAD).
    #[arg(long, value_enum, default_value_t = Select::Largest)]
    #[serde(default)]
    pub select: Select,
    /// PiSSA: initialize from a randomized SVD with N power iterations
    /// (PEFT's `pissa_niter_N`) instead of the exact SVD.
    #[arg(long)]
    #[serde(default)]
    pub pissa_niter: Option<usize>,
    /// S2FT: the fraction of FFN channels trained (rows of up_proj, columns
    /// of down_proj, each sampled across all layers; the release's d_ratio).
    #[arg(long, default_value_t = MethodOptions::default().s2ft_ratio)]
    #[serde(default = "default_s2ft_ratio")]
    pub s2ft_ratio: f64,
    /// S2FT: also train the same fraction of attention heads (rows of
    /// v_proj of key/value heads, columns of o_proj of query heads).
    #[arg(long)]
    #[serde(default)]
    pub s2ft_heads: bool,
    /// Also train the RMSNorm weights (densely).
    #[arg(long)]
    pub train_norms: bool,
    /// Also train the embedding and LM head (densely).
    #[arg(long)]
    pub train_embeddings: bool,
}

impl Default for MethodOptions {
    /// The paper's settings where it gives them: LIFT at 5% density, filter
    /// rank 128, masks refreshed every 400 steps; LoRA r = 16, alpha = 32.
    fn default() -> MethodOptions {
        MethodOptions {
            kind: Method::Lift,
            density: None,
            rank: None,
            filter_rank: DEFAULT_FILTER_RANK,
            svd: Svd::Auto,
            power_iters: DEFAULT_POWER_ITERS,
            oversample: DEFAULT_OVERSAMPLE,
            update_interval: 400,
            lora_rank: 16,
            lora_alpha: 32.0,
            select: Select::Largest,
            pissa_niter: None,
            s2ft_ratio: default_s2ft_ratio(),
            s2ft_heads: false,
            train_norms: false,
            train_embeddings: false,
        }
    }
}

/// S2FT's d_ratio in the authors' scripts.
fn default_s2ft_ratio() -> f64 {
    0.06
}

impl MethodOptions {
    /// The size of each matrix's trainable set: --rank, else --density.
    pub fn budget(&self) -> Budget {
        match (self.rank, self.density) {
            (Some(r), _) => Budget::Rank(r),
            (None, Some(d)) => Budget::Density(d),
            (None, None) => Budget::Density(DEFAULT_DENSITY),
        }
    }
}

/// Everything a training run is configured by (the `lift train` flags but
/// --resume and --device, which say where it runs, not what it is).
#[derive(Debug, Clone, Serialize, Deserialize, Args)]
pub struct TrainOptions {
    /// The model to fine-tune (the command line sets it from --checkpoint).
    #[arg(skip)]
    pub checkpoint: PathBuf,
    /// Training data (from --data).
    #[arg(skip)]
    pub data: PathBuf,
    /// Output directory (from --out).
    #[arg(skip)]
    pub out: PathBuf,
    #[command(flatten)]
    #[serde(flatten)]
    pub method: MethodOptions,
    /// Peak learning rate.
    #[arg(long, default_value_t = TrainOptions::default().lr)]
    pub lr: f32,
    #[arg(long, default_value_t = TrainOptions::default().epochs)]
    pub epochs: usize,
    /// Stop after this many optimizer steps.
    #[arg(long)]
    pub max_steps: Option<u64>,
    /// Examples per micro-batch.
    #[arg(long, default_value_t = TrainOptions::default().batch_size)]
    pub batch_size: usize,
    /// Micro-batches per optimizer step.
    #[arg(long, default_value_t = TrainOptions::default().grad_accum)]
    pub grad_accum: usize,
    /// Longer examples are truncated (and counted).
    #[arg(long, default_value_t = TrainOptions::default().max_seq_len)]
    pub max_seq_len: usize,
    /// Warmup as a fraction of the total steps.
    #[arg(long, default_value_t = TrainOptions::default().warmup)]
    pub warmup: f32,
    #[arg(long, value_enum, default_value_t = TrainOptions::default().schedule)]
    pub schedule: Schedule,
    /// Decoupled weight decay (on the trained entries only).
    #[arg(long, default_value_t = TrainOptions::default().weight_decay)]
    pub weight_decay: f32,
    /// Where AdamW's eps enters: hf (Hugging Face's former AdamW and LIFT's
    /// sparse AdamW: m / (sqrt(v) + eps) with the bias correction in the step
    /// size) or torch (torch.optim.AdamW: eps added to sqrt(v_hat)), which
    /// the authors' LoRA, DoRA and PiSSA scripts use.
    #[arg(long, value_enum, default_value_t = EpsForm::Hf)]
    #[serde(default)]
    pub adamw: EpsForm,
    /// AdamW's eps (the paper's 1e-6; torch.optim.AdamW's default is 1e-8).
    #[arg(long, default_value_t = TrainOptions::default().adam_eps)]
    #[serde(default = "default_adam_eps")]
    pub adam_eps: f32,
    /// Clip the global gradient norm to this (0 = off).
    #[arg(long, default_value_t = TrainOptions::default().grad_clip)]
    pub grad_clip: f32,
    #[arg(long, default_value_t = TrainOptions::default().seed)]
    pub seed: u64,
    /// Examples held out for validation (0 = none).
    #[arg(long, default_value_t = TrainOptions::default().val_size)]
    pub val_size: usize,
    /// Validation loss every N optimizer steps (and at the end).
    #[arg(long, default_value_t = TrainOptions::default().eval_every)]
    pub eval_every: u64,
    /// Save a resumable state every N optimizer steps (0 = only at the end).
    #[arg(long, default_value_t = TrainOptions::default().save_every)]
    pub save_every: u64,
    /// Print a progress line every N optimizer steps.
    #[arg(long, default_value_t = TrainOptions::default().log_every)]
    pub log_every: u64,
    /// Pad each batch's examples to its longest instead of packing them end
    /// to end into rows of --max-seq-len tokens (pack.rs, the default).
    #[arg(long)]
    #[serde(default)]
    pub no_pack: bool,
    /// Packed batches: tokens per batch [default: --batch-size x the mean
    /// example length, so that a step sees about as many examples].
    #[arg(long)]
    #[serde(default)]
    pub batch_tokens: Option<usize>,
    /// Skip examples with no usable prompt or target instead of stopping.
    #[arg(long)]
    pub skip_bad: bool,
    /// Keep only each layer's input in the forward pass and recompute the
    /// layer's activations in the backward pass: less memory, about one
    /// more forward pass of time (both devices; the same gradients).
    #[arg(long)]
    #[serde(default)]
    pub recompute: bool,
    /// Prompt template: alpaca (lift's), reference (the LIFT release's
    /// training prompt and target format; see the README) or plain (no
    /// wrapper).
    #[arg(long, value_enum, default_value_t = Template::Alpaca)]
    #[serde(default)]
    pub template: Template,
}

impl Default for TrainOptions {
    /// `lift train`'s defaults: AdamW at 2e-4 with 3% linear warmup and
    /// linear decay, 3 epochs of batches of 8, gradient norm clipped at 1.
    fn default() -> TrainOptions {
        TrainOptions {
            checkpoint: PathBuf::new(),
            data: PathBuf::new(),
            out: PathBuf::from("out"),
            method: MethodOptions::default(),
            lr: 2e-4,
            epochs: 3,
            max_steps: None,
            batch_size: 8,
            grad_accum: 1,
            max_seq_len: 2048,
            warmup: 0.03,
            schedule: Schedule::Linear,
            weight_decay: 0.0,
            adamw: EpsForm::Hf,
            adam_eps: default_adam_eps(),
            grad_clip: 1.0,
            seed: 42,
            val_size: 100,
            eval_every: 50,
            save_every: 100,
            log_every: 1,
            no_pack: false,
            batch_tokens: None,
            skip_bad: false,
            recompute: false,
            template: Template::Alpaca,
        }
    }
}

/// The paper's AdamW eps.
fn default_adam_eps() -> f32 {
    1e-6
}

impl TrainOptions {
    /// AdamW at learning rate `lr` with this run's weight decay (the paper's
    /// betas and eps).
    pub fn adamw(&self, lr: f32) -> AdamW {
        AdamW { lr, weight_decay: self.weight_decay, eps: self.adam_eps, form: self.adamw, ..AdamW::default() }
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
