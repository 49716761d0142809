//! The training loop: LIFT and its baselines on one data path, on either
//! device. The loop (data order, learning-rate schedule, mask refreshes,
//! validation, metrics.jsonl, loss.svg, state.bin, Ctrl-C, divergence) is
//! written once, against the `Trainer` trait; `CpuTrainer` (train_cpu.rs)
//! and `GpuTrainer` (cuda/train.rs) implement it.
//!
//! One optimizer step = `grad_accum` micro-batches of forward + backward,
//! gradients averaged, clipped by global norm, then an AdamW update of the
//! trainable entries. What "trainable" means is the method's (train_cpu.rs).
//! Norms and embeddings are frozen unless `--train-norms` / `--train-embeddings`
//! ask for them; they are then trained densely whatever the method.

use std::borrow::Cow;
use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::Instant;

use anyhow::{Context, Result, anyhow, bail};
use serde::{Deserialize, Serialize};

use crate::formats::checkpoint::{self, Checkpoint};
use crate::cuda::Device;
use crate::data::{self, Batch, Dataset, Purpose};
use crate::lift::{self, Approx, Budget};
use crate::model::{Activations, Config, Linear, Model, Param};
use crate::optim::{AdamW, RefreshStats};
use crate::state::{self, StateHeader, StateWriter};

pub use crate::train_cpu::{CpuTrainer, select_masks};

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
    /// Keep only each layer's input in the forward pass and recompute the
    /// rest during the backward pass (GPU only).
    #[serde(default)]
    pub recompute: bool,
}

impl TrainOptions {
    pub(crate) fn budget(&self) -> Budget {
        match (self.rank, self.density) {
            (Some(r), _) => Budget::Rank(r),
            (None, Some(d)) => Budget::Density(d),
            (None, None) => Budget::Density(0.05),
        }
    }

    pub(crate) fn adamw(&self) -> AdamW {
        AdamW { lr: self.lr, weight_decay: self.weight_decay, ..AdamW::default() }
    }

    pub(crate) fn approx(&self, out: usize, inp: usize, seed: u64) -> Approx {
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
// ----------------------------------------------------------------------------
// What a device provides to the loop

/// The matrix number of a linear weight: layer * 7 + position in Linear::ALL.
pub fn matrix_id(l: usize, w: Linear) -> usize {
    l * 7 + Linear::ALL.iter().position(|&x| x == w).expect("a linear kind")
}

/// The tensors trained densely besides the method's own (norms, embeddings).
/// A tied LM head is the embedding, so it is not listed twice.
pub fn extra_params(c: &Config, o: &TrainOptions) -> Vec<Param> {
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

/// A model on one device with a method's trainable state: everything the
/// loop asks of a device. `CpuTrainer` and `cuda::train::GpuTrainer`.
pub trait Trainer {
    /// One optimizer step t (1-based) over the micro-batches at learning
    /// rate `lr`: forward and backward of each, gradients averaged and
    /// clipped by global norm, then AdamW. A non-finite loss or gradient is
    /// an error returned before anything is updated, so the weights stay
    /// those of the last good step.
    fn step(&mut self, batches: &[Batch], lr: f32, t: u64) -> Result<StepStats>;

    /// New masks from the current weights (sparse methods; round counts the
    /// refreshes): how many selected entries kept their optimizer state.
    fn refresh_masks(&mut self, round: u64) -> Result<RefreshStats>;

    /// Mean validation loss, weighted by loss tokens.
    fn eval_loss(&mut self, batches: &[Batch]) -> Result<f32>;

    /// The arrays of state.bin after its header: the f32 values of
    /// `state::saved_tensors`, the optimizer records, the extras' records.
    fn write_state(&self, w: &mut StateWriter) -> Result<()>;

    /// One tensor's f32 values with the training applied (LoRA merged):
    /// what model.bin and state.bin get.
    fn tensor(&self, p: Param) -> Result<Cow<'_, [f32]>>;

    /// Trained values in the linear layers (selected entries, or adapter values).
    fn trainable_count(&self) -> usize;

    /// Bytes of optimizer state (moments, indices, f32 masters, adapters).
    fn state_bytes(&self) -> usize;

    /// Bytes of gradient accumulators and gradient scratch.
    fn grad_bytes(&self) -> usize;

    /// Peak device memory, for a trainer on a GPU.
    fn device_peak_bytes(&self) -> Option<u64>;
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

/// Mean loss over the validation batches, weighted by their loss tokens (CPU).
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

/// `lift train`: the run `o` describes (continuing the one saved in
/// `resume`), on `device` (Cpu or Cuda, resolved).
pub fn train(o: &TrainOptions, resume: Option<&Path>, device: Device) -> Result<TrainSummary> {
    validate(o)?;
    let ck = Checkpoint::open(&o.checkpoint)?;
    let c = ck.config.clone();
    let cuda = device == Device::Cuda;
    if cuda {
        crate::cuda::train::check_supported(&c)?;
    } else if o.recompute {
        bail!("--recompute is implemented for --device cuda only (the CPU keeps every layer's activations)");
    } else {
        eprintln!("device: cpu ({} threads)", rayon::current_num_threads());
    }
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
            let state::Saved { header: h, trainable: t, extras: ex } = state::load(dir, &c, &mut model.weights)?;
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
    let (state, mut step, mut mask_round) = match resumed {
        Some((trainable, extra_states, step, round)) => (Some((trainable, extra_states)), step, round),
        None => (None, 0, 0),
    };
    // The GPU, when asked for, outlives the trainer that borrows it.
    let gpu = if cuda { Some(crate::cuda::train::open_gpu()?) } else { None };
    let mut tr: Box<dyn Trainer + '_> = match (&gpu, state) {
        (Some(g), state) => Box::new(crate::cuda::train::GpuTrainer::start(g, model, o, o.batch_size, longest, state)?),
        (None, Some((trainable, extra_states))) => {
            Box::new(CpuTrainer::resume(model, trainable, extra_states, o, o.batch_size, longest))
        }
        (None, None) => Box::new(CpuTrainer::new(model, o, o.batch_size, longest)?),
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
        let v = tr.eval_loss(&val_batches)?;
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
                save_state(&*tr, o, &c, step, total_steps, mask_round)?;
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
            let v = tr.eval_loss(&val_batches)?;
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
            save_state(&*tr, o, &c, step, total_steps, mask_round)?;
            write_metrics(&history)?;
            write_plot(&history)?;
        }
    }

    save_state(&*tr, o, &c, step, total_steps, mask_round)?;
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
        if let Some(g) = &gpu {
            meta.insert("device".to_string(), g.name.clone());
        }
        // One tensor at a time: a GPU trainer downloads each when it is written.
        let params = Param::all(&c);
        let list: Vec<(String, Vec<usize>)> = params.iter().map(|p| (p.name(), p.shape(&c))).collect();
        checkpoint::write_model_bin(&o.out.join("model.bin"), &c, &tok, &meta, save_dtype, &list, |name| {
            let p = params.iter().find(|p| p.name() == name).expect("name from the same list");
            Ok(tr.tensor(*p)?.into_owned())
        })?;
        eprintln!("saved {}", o.out.join("model.bin").display());
    }
    let mib = |b: u64| b as f64 / (1 << 20) as f64;
    let device_peak = tr.device_peak_bytes().map(|b| format!("peak GPU {:.1} MiB, ", mib(b))).unwrap_or_default();
    eprintln!(
        "memory: {device_peak}peak resident {:.1} MiB, optimizer state {:.1} MiB, gradients {:.1} MiB",
        mib(peak_rss_bytes().unwrap_or(0)),
        mib(tr.state_bytes() as u64),
        mib(tr.grad_bytes() as u64)
    );
    Ok(TrainSummary { steps: step, final_train_loss: last_loss, final_val_loss: last_val, interrupted })
}

/// Writes DIR/state.bin (DIR = --out) for step `step`.
fn save_state(
    tr: &dyn Trainer,
    o: &TrainOptions,
    c: &Config,
    step: u64,
    total_steps: u64,
    mask_round: u64,
) -> Result<()> {
    let tensors = state::saved_tensors(c, o.method, &extra_params(c, o)).iter().map(|p| p.name()).collect();
    let header = StateHeader { step, total_steps, mask_round, options: o.clone(), tensors };
    state::save(&o.out, &header, |w| tr.write_state(w))
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
