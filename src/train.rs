//! The training loop: LIFT and its baselines on one data path, on either
//! device. The loop (data order, learning-rate schedule, mask refreshes,
//! validation, metrics.jsonl, loss.svg, state.bin, Ctrl-C, divergence) is
//! written once, against the `Trainer` trait (trainer.rs); `CpuTrainer`
//! (cpu_trainer.rs) and `GpuTrainer` (cuda/trainer.rs) implement it.
//!
//! A run is three parts: `prepare` (model, data, a resumed state, the
//! output directory), `train_loop` (the optimizer steps), `finish`
//! (state.bin, model.bin, the memory report).
//!
//! One optimizer step = `grad_accum` micro-batches of forward + backward,
//! gradients averaged, clipped by global norm, then an AdamW update of the
//! trainable entries. What "trainable" means is the method's (method.rs).

use std::collections::BTreeMap;
use std::path::Path;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::Instant;

use anyhow::{Context, Result, anyhow, bail};
use serde_json::{Value, json};

use crate::cpu_trainer::CpuTrainer;
use crate::data::{self, Batch, Dataset, Purpose};
use crate::formats::checkpoint::{self, Checkpoint, DType};
use crate::formats::state::{self, StateHeader};
use crate::method::{self, Trainable, extra_params};
use crate::model::{Config, Model, Param};
use crate::optim::DenseState;
use crate::options::{Device, Method, TrainOptions, lr_at};
use crate::pack::{self, PackedBatch};
use crate::tokenizer::Tokenizer;
use crate::trainer::{StepStats, Trainer};

/// What a finished (or interrupted) run reports.
pub struct TrainSummary {
    pub steps: u64,
    pub final_train_loss: f32,
    pub final_val_loss: Option<f32>,
    pub interrupted: bool,
}

/// Set by the Ctrl-C handler; the loop saves and stops at the next step boundary.
pub static STOP: AtomicBool = AtomicBool::new(false);

/// `lift train`: the run `o` describes (continuing the one saved in
/// `resume`), on `device` (Cpu or Cuda, resolved).
pub fn train(o: &TrainOptions, resume: Option<&Path>, device: Device) -> Result<TrainSummary> {
    let started = Instant::now();
    let p = prepare(o, resume, device)?;
    let c = p.model.config.clone();
    // The GPU, when asked for, outlives the trainer that borrows it.
    let gpu = if device == Device::Cuda { Some(crate::cuda::open_for_training()?) } else { None };
    let rows = p.data.max_rows(o, p.step);
    let mut tr: Box<dyn Trainer + '_> = match &gpu {
        // (B, T) buffers: padded batches are at most (batch size, longest);
        // a packed one is one row of up to `rows` positions
        Some(g) => {
            let (b, t) = if p.data.packed.is_some() { (1, rows.max(p.longest)) } else { (o.batch_size, p.longest) };
            Box::new(crate::cuda::trainer::GpuTrainer::start(g, p.model, o, b, t, p.saved)?)
        }
        None => Box::new(CpuTrainer::start(p.model, o, p.longest, rows, p.saved)?),
    };
    let linear_total = method::linear_values(&c);
    eprintln!(
        "method {:?}: {} trainable values in the linear layers ({:.2}% of {linear_total}), optimizer state {:.1} MiB",
        o.method.kind,
        tr.trainable_count(),
        100.0 * tr.trainable_count() as f64 / linear_total as f64,
        tr.state_bytes() as f64 / (1 << 20) as f64
    );
    let mut run = Run::new(o, c, p.data, resume, p.step, p.mask_round);
    let interrupted = train_loop(&mut run, &mut *tr)?;
    let device_name = gpu.as_ref().map(|g| g.name.clone());
    finish(&run, &*tr, &p.tok, p.save_dtype, interrupted, device_name)?;
    let summary =
        TrainSummary { steps: run.step, final_train_loss: run.last_loss, final_val_loss: run.last_val, interrupted };
    write_summary(o, &summary, &*tr, started.elapsed().as_secs_f64())?;
    Ok(summary)
}

/// summary.json in the output directory: what a sweep (or a person) reads
/// back about the run without parsing its log. `wall_s` is this process's
/// part of the run (a resumed run counts from its resumption).
fn write_summary(o: &TrainOptions, s: &TrainSummary, tr: &dyn Trainer, wall_s: f64) -> Result<()> {
    let v = json!({
        "method": format!("{:?}", o.method.kind).to_lowercase(),
        "steps": s.steps,
        "interrupted": s.interrupted,
        "final_train_loss": s.final_train_loss,
        "final_val_loss": s.final_val_loss,
        "trainable_values": tr.trainable_count(),
        "optimizer_state_bytes": tr.state_bytes(),
        "gradient_bytes": tr.grad_bytes(),
        "peak_rss_bytes": peak_rss_bytes(),
        "wall_s": wall_s,
    });
    let path = o.out.join("summary.json");
    std::fs::write(&path, format!("{v:#}\n")).with_context(|| format!("cannot write {}", path.display()))
}

// ----------------------------------------------------------------------------
// Prepare

/// Everything a run starts from.
struct Prepared {
    model: Model,
    tok: Tokenizer,
    save_dtype: DType,
    data: Data,
    /// The resumed state (trainable, extras), if any.
    saved: Option<(Trainable, Vec<DenseState>)>,
    step: u64,
    mask_round: u64,
    /// The longest example (train or validation): what RoPE and the activations cover.
    longest: usize,
}

/// The data of a run, batched as the loop asks for it.
struct Data {
    ds: Dataset,
    val: Vec<Batch>,
    pad: u32,
    /// Padded batches per epoch (when not packed).
    per_epoch: u64,
    /// Packed batches: each epoch's packing, and the index of each epoch's
    /// first micro-batch over the whole run (one more at the end).
    packed: Option<(Vec<Vec<PackedBatch>>, Vec<u64>)>,
    total_steps: u64,
}

/// Checks the options, loads the model and the data, reads a resumed state
/// (which can fail) and makes sure the output directory is writable, all
/// before any work is done or anything written.
fn prepare(o: &TrainOptions, resume: Option<&Path>, device: Device) -> Result<Prepared> {
    validate(o)?;
    let ck = Checkpoint::open(&o.checkpoint)?;
    let c = ck.config.clone();
    if device == Device::Cuda {
        crate::cuda::trainer::check_supported(&c)?;
    } else {
        eprintln!("device: cpu ({} threads)", rayon::current_num_threads());
    }
    let tok = ck.tokenizer.clone();
    let mut model = Model::new(c.clone(), ck.load_weights()?);
    let save_dtype = ck.dtype();
    // The weights are copied out; unmapping the file keeps its pages out of
    // this process's resident memory.
    drop(ck);
    let data = load_data(o, &tok, !o.no_pack)?;
    method::check_budget(&c, &o.method)?;
    let longest = data.ds.train.iter().chain(&data.ds.val).map(|e| e.ids.len()).max().unwrap_or(1);
    let (saved, step, mask_round) = match resume {
        None => (None, 0, 0),
        Some(dir) => {
            let (saved, step, round) = load_resumed(dir, o, &mut model)?;
            if o.method.kind == Method::Pissa {
                // The frozen residuals, recomputed from the checkpoint as at the start.
                method::pissa_start(&c, &o.method, o.seed, &mut model.weights);
            }
            (Some(saved), step, round)
        }
    };
    // Created before the masks are selected, so an unwritable --out fails before any work.
    std::fs::create_dir_all(&o.out)
        .with_context(|| format!("{}: cannot create the output directory", o.out.display()))?;
    // Temporary files of a killed earlier run are of no use to anyone.
    checkpoint::remove_stale_temps(&o.out);
    let probe = o.out.join(".write-test");
    std::fs::write(&probe, b"").with_context(|| format!("{}: not writable", o.out.display()))?;
    let _ = std::fs::remove_file(&probe);
    Ok(Prepared { model, tok, save_dtype, data, saved, step, mask_round, longest })
}

/// The training set, its validation split and the step count.
fn load_data(o: &TrainOptions, tok: &Tokenizer, pack: bool) -> Result<Data> {
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
    let eos_text = tok.token_str(eos).unwrap_or_default().to_string();
    let t = data::Tokenization { encode: &encode, bos, eos, eos_text, max_seq_len: o.max_seq_len };
    let tokenize = |ex: &data::Example| o.template.tokenize(ex, &t);
    let ds = Dataset::with_tokenizer(&loaded.examples, &tokenize, o.max_seq_len, o.val_size, o.seed)
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
    let val = if pack {
        // the validation loss is token-weighted, so packing leaves it as it is
        let lens: Vec<usize> = ds.val.iter().map(|e| e.ids.len()).collect();
        let order: Vec<usize> = (0..lens.len()).collect();
        let packed = pack::pack_epoch(&lens, &order, o.max_seq_len, batch_budget(o, &ds));
        packed.iter().map(|p| pack::make_packed_batch(&ds.val, p)).collect()
    } else {
        ds.val_batches(o.batch_size, pad)
    };
    let per_epoch = ds.batches_per_epoch(o.batch_size) as u64;
    let packed = if pack { Some(pack_epochs(o, &ds)) } else { None };
    let micro = match &packed {
        Some((_, starts)) => *starts.last().unwrap_or(&0),
        None => o.epochs as u64 * per_epoch,
    };
    let mut total_steps = micro.div_ceil(o.grad_accum as u64);
    if let Some(m) = o.max_steps {
        total_steps = total_steps.min(m);
    }
    if total_steps == 0 {
        bail!("nothing to train: 0 optimizer steps (check --epochs and --max-steps)");
    }
    eprintln!("{micro} micro-batches, {total_steps} optimizer steps (--grad-accum {})", o.grad_accum);
    Ok(Data { ds, val, pad, per_epoch, packed, total_steps })
}

impl Data {
    /// Micro-batch m of the run (counted over the whole run), in the epoch
    /// order the seed fixes; `order` caches an epoch and its order.
    fn micro_batch(&self, o: &TrainOptions, m: u64, order: &mut (usize, Vec<usize>)) -> Batch {
        if let Some((epochs, starts)) = &self.packed {
            // the last step of a run may ask past the end: wrap around
            let m = m % starts.last().copied().unwrap_or(1).max(1);
            let e = starts.partition_point(|&s| s <= m) - 1;
            return pack::make_packed_batch(&self.ds.train, &epochs[e][(m - starts[e]) as usize]);
        }
        let epoch = (m / self.per_epoch) as usize;
        if epoch != order.0 {
            *order = (epoch, self.ds.epoch_order(epoch, o.seed));
        }
        self.ds.train_batch(&order.1, (m % self.per_epoch) as usize, o.batch_size, self.pad)
    }

    /// The most positions (B*T) of any micro-batch from optimizer step
    /// `step` to the end of the run, or of a validation batch: what the
    /// CPU's activations are sized for, once, at the start (not the batch
    /// size times the longest example, which packed batches never reach;
    /// buffers grown step by step would leave their old blocks behind as
    /// allocator slack).
    fn max_rows(&self, o: &TrainOptions, step: u64) -> usize {
        let (accum, mut order) = (o.grad_accum as u64, (usize::MAX, Vec::new()));
        let mut most = self.val.iter().map(|b| b.b * b.t).max().unwrap_or(0);
        for m in step * accum..self.total_steps * accum {
            let b = self.micro_batch(o, m, &mut order);
            most = most.max(b.b * b.t);
        }
        most
    }
}

/// Tokens per packed batch: --batch-tokens, or --batch-size times the mean
/// training example's length.
fn batch_budget(o: &TrainOptions, ds: &Dataset) -> usize {
    let tokens: usize = ds.train.iter().map(|e| e.ids.len()).sum();
    o.batch_tokens.unwrap_or(o.batch_size * tokens.div_ceil(ds.train.len().max(1))).max(1)
}

/// Every epoch's packing (pack.rs), in the seed's orders, and a line on it.
fn pack_epochs(o: &TrainOptions, ds: &Dataset) -> (Vec<Vec<PackedBatch>>, Vec<u64>) {
    let lens: Vec<usize> = ds.train.iter().map(|e| e.ids.len()).collect();
    let budget = batch_budget(o, ds);
    let (mut epochs, mut starts) = (Vec::with_capacity(o.epochs), vec![0u64]);
    for epoch in 0..o.epochs {
        let batches = pack::pack_epoch(&lens, &ds.epoch_order(epoch, o.seed), o.max_seq_len, budget);
        starts.push(starts.last().unwrap_or(&0) + batches.len() as u64);
        epochs.push(batches);
    }
    let n = epochs.first().map_or(0, Vec::len);
    eprintln!(
        "packed batches: --batch-tokens {budget}, {n} batches per epoch, {:.0} tokens each on average, no padding (--no-pack pads instead)",
        lens.iter().sum::<usize>() as f64 / n.max(1) as f64
    );
    (epochs, starts)
}

/// Reads DIR/state.bin into the model's weights: the method's state, the
/// extras' states, the step and the mask round.
fn load_resumed(dir: &Path, o: &TrainOptions, model: &mut Model) -> Result<((Trainable, Vec<DenseState>), u64, u64)> {
    let c = model.config.clone();
    let state::Saved { header: h, trainable, extras } = state::load(dir, &c, &mut model.weights)?;
    if h.options.method.kind != o.method.kind {
        bail!("{}: the saved run used --method {:?}, not {:?}", dir.display(), h.options.method.kind, o.method.kind);
    }
    let wanted = extra_params(&c, &o.method);
    let sizes_match = extras.len() == wanted.len()
        && extras.iter().zip(&wanted).all(|(s, p)| s.m.len() == p.shape(&c).iter().product::<usize>());
    if !sizes_match {
        bail!(
            "{}: the saved run trained other tensors (--train-norms / --train-embeddings must be as before)",
            dir.display()
        );
    }
    eprintln!("resuming from {} at step {}", dir.display(), h.step);
    Ok(((trainable, extras), h.step, h.mask_round))
}

// ----------------------------------------------------------------------------
// The loop

/// Where a run stands between steps.
struct Run<'o> {
    o: &'o TrainOptions,
    c: Config,
    data: Data,
    step: u64,
    mask_round: u64,
    /// metrics.jsonl's records so far.
    history: Vec<Value>,
    started: Instant,
    start_step: u64,
    tokens_done: usize,
    last_loss: f32,
    last_val: Option<f32>,
    /// An epoch and its shuffled order (`Data::micro_batch`'s cache).
    order: (usize, Vec<usize>),
}

impl<'o> Run<'o> {
    /// A run at `step`; a resumed one keeps the records of metrics.jsonl up
    /// to its step (read from the resumed directory, which --out may not be).
    fn new(o: &'o TrainOptions, c: Config, data: Data, resume: Option<&Path>, step: u64, mask_round: u64) -> Run<'o> {
        let mut history = Vec::new();
        if let Some(dir) = resume
            && let Ok(text) = std::fs::read_to_string(dir.join("metrics.jsonl"))
        {
            history = text
                .lines()
                .filter_map(|l| serde_json::from_str::<Value>(l).ok())
                .filter(|r| r["step"].as_u64().is_some_and(|s| s <= step))
                .collect();
        }
        let (last_loss, last_val) = (f32::NAN, None);
        let started = Instant::now();
        Run {
            o,
            c,
            data,
            step,
            mask_round,
            history,
            started,
            start_step: step,
            tokens_done: 0,
            last_loss,
            last_val,
            order: (usize::MAX, Vec::new()),
        }
    }

    /// This step's micro-batches, in the epoch order the seed fixes.
    fn batches(&mut self) -> Vec<Batch> {
        let accum = self.o.grad_accum as u64;
        let first = self.step * accum;
        (first..first + accum).map(|m| self.data.micro_batch(self.o, m, &mut self.order)).collect()
    }

    fn done(&self) -> bool {
        self.step >= self.data.total_steps
    }

    /// A mask refresh every --update-interval steps (sparse methods), from the current weights.
    fn maybe_refresh(&mut self, tr: &mut dyn Trainer) -> Result<()> {
        let every = self.o.method.update_interval;
        if self.o.method.kind.refreshes() && every > 0 && self.step.is_multiple_of(every) && !self.done() {
            self.mask_round += 1;
            let r = tr.refresh_masks(self.mask_round)?;
            let kept = 100.0 * r.kept as f64 / r.total.max(1) as f64;
            eprintln!("step {}: masks refreshed, {kept:.1}% of entries kept their state", self.step);
        }
        Ok(())
    }

    /// The step's metrics record, with the validation loss when it is due,
    /// and the progress line.
    fn record(&mut self, tr: &mut dyn Trainer, s: StepStats, lr: f32, secs: f64) -> Result<()> {
        let (o, step, total) = (self.o, self.step, self.data.total_steps);
        self.last_loss = s.loss;
        self.tokens_done += s.tokens;
        let elapsed = self.started.elapsed().as_secs_f64();
        let mut rec = json!({
            "step": step, "loss": s.loss, "lr": lr, "grad_norm": s.grad_norm,
            "tokens": s.tokens, "step_s": secs, "tokens_per_s": s.tokens as f64 / secs,
            "elapsed_s": elapsed,
        });
        if (o.eval_every > 0 && step % o.eval_every == 0 || step == total) && !self.data.val.is_empty() {
            let v = tr.eval_loss(&self.data.val)?;
            rec["val_loss"] = json!(v);
            self.last_val = Some(v);
        }
        if step % o.log_every.max(1) == 0 || step == total || rec.get("val_loss").is_some() {
            let eta = elapsed / (step - self.start_step).max(1) as f64 * (total - step) as f64;
            let val = rec.get("val_loss").and_then(Value::as_f64).map(|v| format!(" | val {v:.4}")).unwrap_or_default();
            let tps = self.tokens_done as f64 / elapsed;
            eprintln!(
                "step {step}/{total} | loss {:.4}{val} | lr {lr:.2e} | {tps:.0} tok/s | ETA {}",
                s.loss,
                fmt_duration(eta)
            );
        }
        self.history.push(rec);
        Ok(())
    }

    /// state.bin, metrics.jsonl and loss.svg as the run stands.
    fn save(&self, tr: &dyn Trainer) -> Result<()> {
        let (o, c) = (self.o, &self.c);
        let extras = extra_params(c, &o.method);
        let tensors = state::saved_tensors(c, o.method.kind, &extras).iter().map(|p| p.name()).collect();
        let header = StateHeader {
            step: self.step,
            total_steps: self.data.total_steps,
            mask_round: self.mask_round,
            options: o.clone(),
            tensors,
        };
        state::save(&o.out, c, &header, tr)?;
        let text: String = self.history.iter().map(|r| format!("{r}\n")).collect();
        let metrics = o.out.join("metrics.jsonl");
        let tmp = checkpoint::tmp_path(&metrics);
        std::fs::write(&tmp, text)?;
        std::fs::rename(&tmp, &metrics)?;
        let pts = |key: &str| -> Vec<(u64, f32)> {
            self.history.iter().filter_map(|r| Some((r["step"].as_u64()?, r[key].as_f64()? as f32))).collect()
        };
        let title = format!("lift {:?} on {}", o.method.kind, o.data.file_name().unwrap_or_default().to_string_lossy());
        std::fs::write(o.out.join("loss.svg"), crate::plot::loss_svg(&title, &pts("loss"), &pts("val_loss")))?;
        Ok(())
    }
}

/// The optimizer steps from where the run stands to its end, or to a
/// Ctrl-C (then true). A failed step (a non-finite loss or gradient) saves
/// the last good state and stops with the error.
fn train_loop(run: &mut Run, tr: &mut dyn Trainer) -> Result<bool> {
    if run.step == 0 && !run.data.val.is_empty() {
        let v = tr.eval_loss(&run.data.val)?;
        eprintln!("step 0: validation loss {v:.4}");
        run.history.push(json!({"step": 0, "val_loss": v}));
        run.last_val = Some(v);
    }
    let o = run.o;
    while !run.done() {
        if STOP.load(Ordering::SeqCst) {
            return Ok(true);
        }
        let t0 = Instant::now();
        let batches = run.batches();
        let lr = lr_at(o, run.step, run.data.total_steps);
        let stats = match tr.step(&batches, lr, run.step + 1) {
            Ok(s) => s,
            Err(why) => {
                // The weights are those of the last completed step: never a non-finite update.
                run.save(tr)?;
                bail!("{why}; stopped. The last good state (step {}) is in {}", run.step, o.out.display());
            }
        };
        run.step += 1;
        run.maybe_refresh(tr)?;
        run.record(tr, stats, lr, t0.elapsed().as_secs_f64())?;
        if o.save_every > 0 && run.step.is_multiple_of(o.save_every) && !run.done() {
            run.save(tr)?;
        }
    }
    Ok(false)
}

// ----------------------------------------------------------------------------
// Finish

/// Saves the state, then (unless interrupted) model.bin, and reports memory.
fn finish(
    run: &Run,
    tr: &dyn Trainer,
    tok: &Tokenizer,
    dtype: DType,
    interrupted: bool,
    device: Option<String>,
) -> Result<()> {
    let (o, c, step) = (run.o, &run.c, run.step);
    run.save(tr)?;
    if interrupted {
        let out = o.out.display();
        eprintln!("interrupted at step {step}: state saved in {out} (continue with --resume {out})");
    } else {
        let mut meta = BTreeMap::new();
        meta.insert("base_checkpoint".to_string(), o.checkpoint.display().to_string());
        meta.insert("method".to_string(), format!("{:?}", o.method.kind).to_lowercase());
        meta.insert("steps".to_string(), step.to_string());
        if let Some(name) = device {
            meta.insert("device".to_string(), name);
        }
        // One tensor at a time: a GPU trainer downloads each when it is written.
        let params = Param::all(c);
        let list: Vec<(String, Vec<usize>)> = params.iter().map(|p| (p.name(), p.shape(c))).collect();
        let path = o.out.join("model.bin");
        checkpoint::write_model_bin(&path, c, tok, &meta, dtype, &list, |name| {
            let p = params.iter().find(|p| p.name() == name).expect("name from the same list");
            tr.tensor(*p)
        })?;
        eprintln!("saved {}", path.display());
    }
    let mib = |b: u64| b as f64 / (1 << 20) as f64;
    let device_peak = tr.device_peak_bytes().map(|b| format!("peak GPU {:.1} MiB, ", mib(b))).unwrap_or_default();
    let (peak, state, grads) = (peak_rss_bytes().unwrap_or(0), tr.state_bytes() as u64, tr.grad_bytes() as u64);
    eprintln!(
        "memory: {device_peak}peak resident {:.1} MiB, optimizer state {:.1} MiB, gradients {:.1} MiB",
        mib(peak),
        mib(state),
        mib(grads)
    );
    if let Some((weights, acts)) = tr.host_parts() {
        let other = peak.saturating_sub(weights as u64 + acts as u64 + state + grads);
        eprintln!(
            "memory: the peak is weights {:.1} + activations {:.1} + optimizer state {:.1} + gradients {:.1} + other {:.1} MiB \
             (other: the program, allocator slack, the checkpoint while it loaded)",
            mib(weights as u64),
            mib(acts as u64),
            mib(state),
            mib(grads),
            mib(other)
        );
    }
    Ok(())
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

fn validate(o: &TrainOptions) -> Result<()> {
    let m = &o.method;
    if o.batch_size == 0 || o.grad_accum == 0 {
        bail!("--batch-size and --grad-accum must be at least 1");
    }
    if o.max_seq_len < 2 {
        bail!("--max-seq-len must be at least 2");
    }
    if !o.lr.is_finite() || o.lr <= 0.0 {
        bail!("--lr must be a positive number");
    }
    if !(o.adam_eps.is_finite() && o.adam_eps >= 0.0) {
        bail!("--adam-eps must be a finite number >= 0");
    }
    if !(0.0..1.0).contains(&o.warmup) {
        bail!("--warmup is a ratio of the total steps, in [0, 1)");
    }
    if let Some(d) = m.density
        && !(d > 0.0 && d <= 1.0)
    {
        bail!("--density {d} is out of range (0, 1]");
    }
    if m.rank == Some(0) {
        bail!("--rank must be at least 1");
    }
    if m.kind == Method::Lift && m.filter_rank == 0 {
        bail!("--filter-rank must be at least 1");
    }
    if m.kind.has_adapters() && m.lora_rank == 0 {
        bail!("--lora-rank must be at least 1");
    }
    Ok(())
}
