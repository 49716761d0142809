//! `lift eval`: how well a model does on one or more data sets (a suite).
//!
//! Per set, two measures:
//! - loss: the mean cross-entropy of the target tokens (and EOS) under
//!   teacher forcing, over the examples that have a target, on the training
//!   template (`Template::tokenize`);
//! - accuracy: for the examples with an `answer`, generation from the
//!   evaluation prompt (greedy, beam search or sampling: `decode.rs`, batched
//!   with the KV cache) and the answer read out of the text by `answer.rs`.
//!
//! and for the suite the unweighted mean over sets, as the paper's tables
//! average their columns. `suites` names the paper's suites over the
//! LLM-Adapters layout of `../shared/datasets`.

use std::io::Write;
use std::path::{Path, PathBuf};
use std::time::Instant;

use anyhow::{Context, Result, anyhow, bail};
use serde::Serialize;

use crate::answer::{self, Rule};
use crate::cuda::gpu::{Attention, Gpu};
use crate::cuda::infer::{self, GpuSource};
use crate::cuda::model::{GpuActs, GpuModel};
use crate::data::{self, Example, Purpose, Template};
use crate::data::{Batch, TokenizedExample};
use crate::decode::{self, DecodeOptions, LogitSource, Strategy};
use crate::generate::CpuSource;
use crate::model::{Activations, Head, Model};
use crate::options::Device;
use crate::tokenizer::Tokenizer;

/// One data set of a suite: its name in the tables and its file.
#[derive(Debug, Clone, PartialEq)]
pub struct EvalSet {
    pub name: String,
    pub path: PathBuf,
}

pub struct EvalOptions {
    pub sets: Vec<EvalSet>,
    /// Only the first N examples of each set.
    pub limit: Option<usize>,
    /// A directory for one predictions JSONL per set (or, for a single set,
    /// a path ending in .jsonl).
    pub preds: Option<PathBuf>,
    pub generate: bool,
    pub strategy: Strategy,
    pub max_new_tokens: usize,
    /// Prompts per batch; None: 16 on the CPU, chosen from free memory on the GPU.
    pub batch_size: Option<usize>,
    pub max_seq_len: usize,
    pub skip_bad: bool,
    pub template: Template,
    pub rule: Rule,
    pub quiet: bool,
    /// Cpu or Cuda (`cuda::resolve` has turned Auto into one of them).
    pub device: Device,
}

/// The results of one set.
#[derive(Debug, Clone, Serialize)]
pub struct SetResult {
    pub name: String,
    pub path: String,
    /// Mean target-token loss (None when no example has a target).
    pub loss: Option<f32>,
    /// Fraction of generated answers that are correct (None without generation).
    pub accuracy: Option<f64>,
    /// The accuracy of the same answers read by each rule (lift, reference).
    pub accuracy_by_rule: Option<ByRule>,
    /// Examples evaluated.
    pub n: usize,
    /// Examples whose answer was checked, and how many were correct.
    pub n_answered: usize,
    pub n_correct: usize,
    pub loss_tokens: usize,
    /// New tokens of the returned answers, and their tokens per second of generation.
    pub generated_tokens: usize,
    pub generate_s: f64,
    pub tokens_per_s: Option<f64>,
}

#[derive(Debug, Clone, Copy, Serialize)]
pub struct ByRule {
    pub lift: f64,
    pub reference: f64,
}

/// A suite's results: the unweighted means over its sets (`accuracy` over
/// the sets with one, `loss` likewise) and the totals, then every set.
#[derive(Debug, Clone, Serialize)]
pub struct SuiteResult {
    pub accuracy: Option<f64>,
    pub loss: Option<f32>,
    pub n: usize,
    pub n_answered: usize,
    pub n_correct: usize,
    pub loss_tokens: usize,
    pub sets: Vec<SetResult>,
}

// ----------------------------------------------------------------------------
// Suites and data paths

/// A named suite: its folder under the datasets root and its sets as
/// (name in the tables, LLM-Adapters data set name).
pub struct Suite {
    pub name: &'static str,
    pub folder: &'static str,
    pub sets: &'static [(&'static str, &'static str)],
}

/// The paper's suites, in the order of its tables.
pub const SUITES: [Suite; 2] = [
    Suite {
        name: "math",
        folder: "math",
        sets: &[
            ("AddSub", "AddSub"),
            ("AQuA", "AQuA"),
            ("GSM8K", "gsm8k"),
            ("MultiArith", "MultiArith"),
            ("SingleEq", "SingleEq"),
            ("SVAMP", "SVAMP"),
            ("MAWPS", "mawps"),
        ],
    },
    Suite {
        name: "commonsense",
        folder: "commonsense",
        sets: &[
            ("BoolQ", "boolq"),
            ("PIQA", "piqa"),
            ("SIQA", "social_i_qa"),
            ("HellaSwag", "hellaswag"),
            ("WinoGrande", "winogrande"),
            ("ARC-e", "ARC-Easy"),
            ("ARC-c", "ARC-Challenge"),
            ("OBQA", "openbookqa"),
        ],
    },
];

/// The sets of suite `name` found under `root`, and a note for each one
/// that is missing. A set is `<root>/<folder>/<set>_test.json` (this
/// repository's layout) or `<root>/<folder>/<set>/test.json` (the LIFT
/// scripts'), either also directly under root; names match without case.
pub fn suite_sets(name: &str, root: &Path) -> Result<(Vec<EvalSet>, Vec<String>)> {
    let known: Vec<&str> = SUITES.iter().map(|s| s.name).collect();
    let Some(suite) = SUITES.iter().find(|s| s.name.eq_ignore_ascii_case(name)) else {
        bail!("unknown suite {name:?} (known: {})", known.join(", "));
    };
    let dirs = [root.join(suite.folder), root.to_path_buf()];
    let (mut sets, mut notes) = (Vec::new(), Vec::new());
    for (table_name, file) in suite.sets {
        match dirs.iter().find_map(|d| find_set(d, file)) {
            Some(path) => sets.push(EvalSet { name: table_name.to_string(), path }),
            None => notes.push(format!("{table_name}: no {file}_test.json under {}, skipped", dirs[0].display())),
        }
    }
    if sets.is_empty() {
        bail!("--suite {name}: none of its data sets is under {} (--suite-dir sets the root)", dirs[0].display());
    }
    Ok((sets, notes))
}

/// `<dir>/<set>_test.json[l]` or `<dir>/<set>/test.json[l]`, names without case.
fn find_set(dir: &Path, set: &str) -> Option<PathBuf> {
    let entries: Vec<PathBuf> = std::fs::read_dir(dir).ok()?.filter_map(|e| e.ok().map(|e| e.path())).collect();
    let named = |p: &PathBuf, want: &str| p.file_name().is_some_and(|n| n.to_string_lossy().eq_ignore_ascii_case(want));
    for ext in ["json", "jsonl"] {
        if let Some(p) = entries.iter().find(|p| p.is_file() && named(p, &format!("{set}_test.{ext}"))) {
            return Some(p.clone());
        }
        if let Some(d) = entries.iter().find(|p| p.is_dir() && named(p, set)) {
            let f = d.join(format!("test.{ext}"));
            if f.is_file() {
                return Some(f);
            }
        }
    }
    None
}

/// The sets that --data names: each file is a set; a directory gives its
/// JSON and JSONL files, only the test sets if it has any (names with
/// "test"), with a note for the files left out.
pub fn data_sets(paths: &[PathBuf]) -> Result<(Vec<EvalSet>, Vec<String>)> {
    let (mut sets, mut notes) = (Vec::new(), Vec::new());
    for p in paths {
        if !p.is_dir() {
            sets.push(EvalSet { name: set_name(p), path: p.clone() });
            continue;
        }
        let mut files: Vec<PathBuf> = std::fs::read_dir(p)
            .with_context(|| format!("{}: cannot read the directory", p.display()))?
            .filter_map(|e| e.ok().map(|e| e.path()))
            .filter(|f| f.is_file() && f.extension().is_some_and(|e| e == "json" || e == "jsonl"))
            .collect();
        files.sort();
        let is_test = |f: &PathBuf| f.file_name().is_some_and(|n| n.to_string_lossy().to_lowercase().contains("test"));
        if files.iter().any(is_test) {
            for f in files.iter().filter(|f| !is_test(f)) {
                notes.push(format!("{}: not a test set (no \"test\" in the name), skipped", f.display()));
            }
            files.retain(is_test);
        }
        if files.is_empty() {
            bail!("{}: no .json or .jsonl files in the directory", p.display());
        }
        sets.extend(files.into_iter().map(|f| EvalSet { name: set_name(&f), path: f }));
    }
    Ok((sets, notes))
}

/// A set's name from its path: "gsm8k_test.json" -> gsm8k, "AQuA/test.json" -> AQuA.
fn set_name(p: &Path) -> String {
    let stem = p.file_stem().map(|s| s.to_string_lossy().into_owned()).unwrap_or_default();
    if stem.eq_ignore_ascii_case("test")
        && let Some(parent) = p.parent().and_then(Path::file_name)
    {
        return parent.to_string_lossy().into_owned();
    }
    let lower = stem.to_lowercase();
    for suffix in ["_test", "-test", ".test"] {
        if lower.ends_with(suffix) && stem.len() > suffix.len() {
            return stem[..stem.len() - suffix.len()].to_string();
        }
    }
    stem
}

// ----------------------------------------------------------------------------
// Evaluation

/// One set's examples, loaded and tokenized before any work so that a bad
/// file fails first and the GPU's buffers can be sized for the longest.
struct Loaded {
    set: EvalSet,
    examples: Vec<Example>,
    /// The examples with a target, on the training template (for the loss).
    targets: Vec<TokenizedExample>,
    /// The evaluation prompts of the examples with an answer, by index.
    prompts: Vec<(usize, Vec<u32>)>,
}

/// Where evaluate runs: the teacher-forced loss of batches and a
/// LogitSource for generation, from the CPU model or the GPU's.
trait Engine {
    /// The mean target loss of each batch (at most (B, longest)).
    fn losses(&mut self, batches: &[Batch], longest: usize) -> Result<Vec<f32>>;
    fn source(&mut self) -> &mut dyn LogitSource;
}

struct CpuEngine<'a> {
    model: &'a Model,
    source: CpuSource<'a>,
}

impl Engine for CpuEngine<'_> {
    fn losses(&mut self, batches: &[Batch], longest: usize) -> Result<Vec<f32>> {
        let c = &self.model.config;
        let b = batches.iter().map(|b| b.b).max().unwrap_or(1);
        let mut acts = Activations::with(c, b, longest, Head::Loss, false);
        let mut out = Vec::new();
        for batch in batches {
            acts.set_shape(c, batch.b, batch.t);
            out.push(self.model.forward(&mut acts, &batch.tokens, Some(&batch.targets))?);
        }
        Ok(out)
    }
    fn source(&mut self) -> &mut dyn LogitSource {
        &mut self.source
    }
}

/// The GPU model: GpuModel::forward for the loss (with recomputation, so
/// one layer's activations), GpuSource for generation; every buffer made
/// once for the whole suite.
struct GpuEngine<'a> {
    g: &'a Gpu,
    model: &'a GpuModel,
    acts: GpuActs,
    source: GpuSource<'a>,
}

impl Engine for GpuEngine<'_> {
    fn losses(&mut self, batches: &[Batch], _longest: usize) -> Result<Vec<f32>> {
        let mut out = Vec::new();
        for batch in batches {
            self.acts.set_shape(batch.b, batch.t)?;
            out.push(self.model.forward(self.g, &mut self.acts, &batch.tokens, Some(&batch.targets))?);
        }
        Ok(out)
    }
    fn source(&mut self) -> &mut dyn LogitSource {
        &mut self.source
    }
}

/// Loss and accuracy of `model` on every set of `o`, on o.device.
pub fn evaluate(model: &mut Model, tok: &Tokenizer, o: &EvalOptions) -> Result<SuiteResult> {
    if o.batch_size == Some(0) {
        bail!("--batch-size must be at least 1");
    }
    let eos = tok.eos_id().ok_or_else(|| anyhow!("the tokenizer has no EOS token"))?;
    let decoding = DecodeOptions { strategy: o.strategy.clone(), max_new_tokens: o.max_new_tokens, eos: Some(eos) };
    decoding.validate()?;
    let loaded = load_sets(o, tok)?;
    let outs = prediction_paths(o, &loaded)?;
    let longest = Longest::of(&loaded);
    if o.device == Device::Cuda {
        return evaluate_gpu(model, tok, o, &decoding, &loaded, &outs, longest);
    }
    let batch = o.batch_size.unwrap_or(16);
    model.ensure_rope(longest.target.max(1));
    let mut engine = CpuEngine { model, source: CpuSource::new(model) };
    run_sets(&mut engine, tok, o, batch, &decoding, &loaded, &outs)
}

/// The longest target example and prompt of the suite, and its largest set.
#[derive(Clone, Copy)]
struct Longest {
    target: usize,
    prompt: usize,
    examples: usize,
}

impl Longest {
    fn of(sets: &[Loaded]) -> Longest {
        let max = |f: &dyn Fn(&Loaded) -> usize| sets.iter().map(f).max().unwrap_or(0);
        Longest {
            target: max(&|l| l.targets.iter().map(|t| t.ids.len()).max().unwrap_or(0)),
            prompt: max(&|l| l.prompts.iter().map(|p| p.1.len()).max().unwrap_or(0)),
            examples: max(&|l| l.examples.len()),
        }
    }
}

/// evaluate on the GPU: the memory plan (every buffer of the suite, the
/// batch chosen from free memory unless given) is checked before any work.
fn evaluate_gpu(
    model: &Model,
    tok: &Tokenizer,
    o: &EvalOptions,
    decoding: &DecodeOptions,
    loaded: &[Loaded],
    outs: &[Option<PathBuf>],
    longest: Longest,
) -> Result<SuiteResult> {
    let (g, _) = crate::cuda::open_with_attention(Attention::Auto)?;
    let c = &model.config;
    let beams = match o.strategy {
        Strategy::Beam { num_beams, .. } if o.generate => num_beams,
        _ => 1,
    };
    // (--no-generate: a token of cache per prompt, the smallest plan)
    let max_new = if o.generate { o.max_new_tokens.max(1) } else { 1 };
    let shape = infer::EvalShape { loss_len: longest.target, prompt_len: longest.prompt.max(1), max_new, beams };
    let batch = infer::fit_batch(c, g.mem_info().0, o.batch_size, longest.examples.max(1), shape)?;
    let mut gm = GpuModel::upload(&g, model, longest.target.max(1))?;
    gm.ensure_rope(&g, shape.plan(batch).stride())?;
    let acts = GpuActs::new(&g, c, batch, longest.target.max(1), 0, false, true)?;
    let source = GpuSource::new(&g, &gm, shape.plan(batch))?;
    if !o.quiet {
        eprintln!(
            "eval on {}: batch {batch}, {:.2} GiB of device memory",
            g.name,
            crate::cuda::gpu::mem_live() as f64 / (1u64 << 30) as f64
        );
    }
    let mut engine = GpuEngine { g: &g, model: &gm, acts, source };
    run_sets(&mut engine, tok, o, batch, decoding, loaded, outs)
}

/// Every set in turn on `engine`, then the suite's averages.
fn run_sets(
    engine: &mut dyn Engine,
    tok: &Tokenizer,
    o: &EvalOptions,
    batch: usize,
    decoding: &DecodeOptions,
    loaded: &[Loaded],
    outs: &[Option<PathBuf>],
) -> Result<SuiteResult> {
    let mut progress = Progress::new(loaded, o);
    let mut sets = Vec::new();
    for (l, out) in loaded.iter().zip(outs) {
        progress.set = l.set.name.clone();
        sets.push(evaluate_set(engine, tok, l, o, batch, decoding, out.as_deref(), &mut progress)?);
    }
    progress.end();
    Ok(suite_result(sets))
}

/// Every set's examples (the first --limit), with a note for a set that
/// has no gold answers.
fn load_sets(o: &EvalOptions, tok: &Tokenizer) -> Result<Vec<Loaded>> {
    let mut out = Vec::new();
    for set in &o.sets {
        let loaded = data::load(&set.path, Purpose::Eval, o.skip_bad)?;
        for s in loaded.skipped.iter().take(5) {
            eprintln!("skipped (--skip-bad): {s}");
        }
        let mut examples = loaded.examples;
        if let Some(n) = o.limit {
            examples.truncate(n);
        }
        if examples.is_empty() {
            bail!("{}: no examples to evaluate (--limit 0?)", set.path.display());
        }
        let answers = examples.iter().any(|e| e.answer.is_some());
        let targets = examples.iter().any(|e| e.target.is_some());
        if !answers && !targets {
            bail!("{}: no example has a target or an answer: nothing to evaluate", set.path.display());
        }
        if !answers && o.generate {
            eprintln!("note: {}: no example has an `answer`: loss only", set.path.display());
        }
        let (targets, prompts) = tokenize_set(&examples, tok, o)?;
        out.push(Loaded { set: set.clone(), examples, targets, prompts });
    }
    Ok(out)
}

/// A set's target examples on the training template (those with loss
/// tokens), and the evaluation prompts of the examples with an answer.
#[allow(clippy::type_complexity)]
fn tokenize_set(
    examples: &[Example],
    tok: &Tokenizer,
    o: &EvalOptions,
) -> Result<(Vec<TokenizedExample>, Vec<(usize, Vec<u32>)>)> {
    let eos = tok.eos_id().ok_or_else(|| anyhow!("the tokenizer has no EOS token"))?;
    let bos = if tok.add_bos() { tok.bos_id() } else { None };
    let encode = |s: &str| tok.encode(s);
    let t = data::Tokenization {
        encode: &encode,
        bos,
        eos,
        eos_text: tok.token_str(eos).unwrap_or_default().to_string(),
        max_seq_len: o.max_seq_len,
    };
    let targets = examples
        .iter()
        .filter(|e| e.target.is_some())
        .map(|e| o.template.tokenize(e, &t))
        .filter(|t| t.loss_tokens() > 0)
        .collect();
    let prompts = if o.generate {
        let with_answer = examples.iter().enumerate().filter(|(_, e)| e.answer.is_some());
        with_answer.map(|(i, e)| (i, o.template.prompt_ids(e, &encode, bos))).collect()
    } else {
        Vec::new()
    };
    Ok((targets, prompts))
}

/// Where each set's predictions go, created now so that an unwritable path
/// fails before the work.
fn prediction_paths(o: &EvalOptions, sets: &[Loaded]) -> Result<Vec<Option<PathBuf>>> {
    let Some(out) = &o.preds else {
        return Ok(vec![None; sets.len()]);
    };
    if sets.len() == 1 && out.extension().is_some_and(|e| e == "jsonl") {
        std::fs::File::create(out).with_context(|| format!("{}: cannot create", out.display()))?;
        return Ok(vec![Some(out.clone())]);
    }
    std::fs::create_dir_all(out).with_context(|| format!("{}: cannot create the directory", out.display()))?;
    let mut paths = Vec::new();
    for (i, l) in sets.iter().enumerate() {
        // Two sets of one name (from two folders) get the second a suffix.
        let taken = sets[..i].iter().filter(|p| p.set.name == l.set.name).count();
        let name = if taken == 0 { l.set.name.clone() } else { format!("{}-{}", l.set.name, taken + 1) };
        let p = out.join(format!("{name}.jsonl"));
        std::fs::File::create(&p).with_context(|| format!("{}: cannot create", p.display()))?;
        paths.push(Some(p));
    }
    Ok(paths)
}

#[allow(clippy::too_many_arguments)]
fn evaluate_set(
    engine: &mut dyn Engine,
    tok: &Tokenizer,
    l: &Loaded,
    o: &EvalOptions,
    batch: usize,
    decoding: &DecodeOptions,
    out: Option<&Path>,
    progress: &mut Progress,
) -> Result<SetResult> {
    let t0 = Instant::now();
    let (loss, loss_tokens) = target_loss(engine, &l.targets, batch, tok)?;
    progress.loss_done(l.examples.len(), t0.elapsed().as_secs_f64());
    let answers = if o.generate {
        generate_answers(engine.source(), tok, l, o, batch, decoding, progress)?
    } else {
        Answers::default()
    };
    if let Some(path) = out {
        write_predictions(path, &l.examples, &answers.rows, o.rule)?;
    }
    let n_answered = answers.rows.len();
    let n_correct = answers.rows.iter().filter(|r| r.correct).count();
    let accuracy = (n_answered > 0).then(|| n_correct as f64 / n_answered as f64);
    let share = |f: fn(&AnswerRow) -> bool| answers.rows.iter().filter(|r| f(r)).count() as f64 / n_answered as f64;
    let accuracy_by_rule =
        (n_answered > 0).then(|| ByRule { lift: share(|r| r.by_rule[0]), reference: share(|r| r.by_rule[1]) });
    let tokens_per_s = (answers.tokens > 0).then(|| answers.tokens as f64 / answers.seconds.max(1e-9));
    Ok(SetResult {
        name: l.set.name.clone(),
        path: l.set.path.display().to_string(),
        loss,
        accuracy,
        accuracy_by_rule,
        n: l.examples.len(),
        n_answered,
        n_correct,
        loss_tokens,
        generated_tokens: answers.tokens,
        generate_s: answers.seconds,
        tokens_per_s,
    })
}

/// The unweighted means over the sets, and the totals.
fn suite_result(sets: Vec<SetResult>) -> SuiteResult {
    let accs: Vec<f64> = sets.iter().filter_map(|s| s.accuracy).collect();
    let losses: Vec<f32> = sets.iter().filter_map(|s| s.loss).collect();
    SuiteResult {
        accuracy: (!accs.is_empty()).then(|| accs.iter().sum::<f64>() / accs.len() as f64),
        loss: (!losses.is_empty()).then(|| losses.iter().sum::<f32>() / losses.len() as f32),
        n: sets.iter().map(|s| s.n).sum(),
        n_answered: sets.iter().map(|s| s.n_answered).sum(),
        n_correct: sets.iter().map(|s| s.n_correct).sum(),
        loss_tokens: sets.iter().map(|s| s.loss_tokens).sum(),
        sets,
    }
}

/// The teacher-forced loss over the examples with a target, in batches:
/// the mean per target token, and how many target tokens there were.
fn target_loss(
    engine: &mut dyn Engine,
    tokenized: &[TokenizedExample],
    batch: usize,
    tok: &Tokenizer,
) -> Result<(Option<f32>, usize)> {
    if tokenized.is_empty() {
        return Ok((None, 0));
    }
    let eos = tok.eos_id().ok_or_else(|| anyhow!("the tokenizer has no EOS token"))?;
    let longest = tokenized.iter().map(|t| t.ids.len()).max().unwrap_or(1);
    let batches: Vec<Batch> =
        tokenized.chunks(batch).map(|chunk| data::make_batch(&chunk.iter().collect::<Vec<_>>(), eos)).collect();
    let losses = engine.losses(&batches, longest)?;
    let parts: Vec<(f32, usize)> = losses.into_iter().zip(&batches).map(|(l, b)| (l, b.n_loss)).collect();
    let loss_tokens = parts.iter().map(|p| p.1).sum();
    Ok((Some(data::mean_loss(parts)), loss_tokens))
}

/// One generated answer.
struct AnswerRow {
    index: usize,
    text: String,
    /// By the rule of --answer-rule, and by [lift, reference].
    correct: bool,
    by_rule: [bool; 2],
}

#[derive(Default)]
struct Answers {
    rows: Vec<AnswerRow>,
    /// New tokens (EOS not counted) and the seconds generation took.
    tokens: usize,
    seconds: f64,
}

/// Answers to the examples with an `answer`, in example order, generated
/// `batch` prompts at a time.
fn generate_answers(
    source: &mut dyn LogitSource,
    tok: &Tokenizer,
    l: &Loaded,
    o: &EvalOptions,
    batch: usize,
    decoding: &DecodeOptions,
    progress: &mut Progress,
) -> Result<Answers> {
    let examples = &l.examples;
    let mut a = Answers::default();
    for chunk in l.prompts.chunks(batch) {
        let t0 = Instant::now();
        let prompts: Vec<Vec<u32>> = chunk.iter().map(|(_, p)| p.clone()).collect();
        let out = decode::decode(source, &prompts, decoding)?;
        for ((i, _), ids) in chunk.iter().zip(out.ids) {
            let ids: Vec<u32> = ids.into_iter().filter(|&id| Some(id) != decoding.eos).collect();
            a.tokens += ids.len();
            let text = tok.decode(&ids)?;
            let gold = examples[*i].answer.as_deref().unwrap_or("");
            let by_rule = [Rule::Lift, Rule::Reference].map(|r| answer::is_correct_by(r, &text, gold));
            let correct = by_rule[(o.rule == Rule::Reference) as usize];
            a.rows.push(AnswerRow { index: *i, text, correct, by_rule });
        }
        let dt = t0.elapsed().as_secs_f64();
        a.seconds += dt;
        progress.generated(chunk.len(), dt, a.rows.iter().filter(|r| r.correct).count(), a.rows.len());
    }
    Ok(a)
}

#[derive(Serialize)]
struct Prediction<'a> {
    index: usize,
    instruction: &'a str,
    generated: &'a str,
    extracted: Option<String>,
    answer: &'a str,
    correct: bool,
}

/// One JSON line per generated answer: the prompt, the text, what was read
/// out of it, the gold answer, and whether they agree.
fn write_predictions(path: &Path, examples: &[Example], rows: &[AnswerRow], rule: Rule) -> Result<()> {
    let file = std::fs::File::create(path).with_context(|| format!("{}: cannot create", path.display()))?;
    let mut w = std::io::BufWriter::new(file);
    for r in rows {
        let e = &examples[r.index];
        let gold = e.answer.as_deref().unwrap_or("");
        let p = Prediction {
            index: r.index,
            instruction: &e.instruction,
            extracted: answer::extract_by(rule, &r.text, answer::answer_kind(gold)),
            generated: &r.text,
            answer: gold,
            correct: r.correct,
        };
        writeln!(w, "{}", serde_json::to_string(&p)?)?;
    }
    w.flush().with_context(|| format!("{}: cannot write", path.display()))?;
    Ok(())
}

// ----------------------------------------------------------------------------
// Progress over the whole suite

/// One stderr line, rewritten as work finishes: where the suite is and an
/// ETA from the rates seen so far (loss and generation timed apart, as
/// generating an answer costs far more than scoring a target).
struct Progress {
    quiet: bool,
    t0: Instant,
    set: String,
    /// Examples still to score / to generate, over the whole suite.
    loss_left: usize,
    gen_left: usize,
    gen_total: usize,
    /// Examples done and seconds spent, per kind.
    loss_done: (usize, f64),
    gen_done: (usize, f64),
    shown: bool,
}

impl Progress {
    fn new(sets: &[Loaded], o: &EvalOptions) -> Progress {
        let count = |f: fn(&Example) -> bool| sets.iter().flat_map(|s| &s.examples).filter(|e| f(e)).count();
        let gen_total = if o.generate { count(|e| e.answer.is_some()) } else { 0 };
        Progress {
            quiet: o.quiet,
            t0: Instant::now(),
            set: String::new(),
            loss_left: count(|e| e.target.is_some()),
            gen_left: gen_total,
            gen_total,
            loss_done: (0, 0.0),
            gen_done: (0, 0.0),
            shown: false,
        }
    }

    fn loss_done(&mut self, n: usize, secs: f64) {
        self.loss_left = self.loss_left.saturating_sub(n);
        self.loss_done = (self.loss_done.0 + n, self.loss_done.1 + secs);
    }

    fn generated(&mut self, n: usize, secs: f64, correct: usize, answered: usize) {
        self.gen_left = self.gen_left.saturating_sub(n);
        self.gen_done = (self.gen_done.0 + n, self.gen_done.1 + secs);
        if self.quiet {
            return;
        }
        let acc = 100.0 * correct as f64 / answered.max(1) as f64;
        let eta = self.eta().map_or("?".to_string(), clock);
        eprint!(
            "\r{}: generated {}/{} | {acc:.1}% so far on this set | {} elapsed | ETA {eta}   ",
            self.set,
            self.gen_done.0,
            self.gen_total,
            clock(self.t0.elapsed().as_secs_f64()),
        );
        self.shown = true;
    }

    /// Seconds left at the rates so far; None before any generation.
    fn eta(&self) -> Option<f64> {
        let rate = |(n, s): (usize, f64)| if n > 0 { Some(s / n as f64) } else { None };
        let generating = rate(self.gen_done)? * self.gen_left as f64;
        Some(generating + rate(self.loss_done).unwrap_or(0.0) * self.loss_left as f64)
    }

    fn end(&self) {
        if self.shown {
            eprintln!();
        }
    }
}

/// 75.3 -> "1m15s".
fn clock(secs: f64) -> String {
    let s = secs.round() as u64;
    match s {
        0..60 => format!("{s}s"),
        60..3600 => format!("{}m{:02}s", s / 60, s % 60),
        _ => format!("{}h{:02}m", s / 3600, (s % 3600) / 60),
    }
}

// ----------------------------------------------------------------------------
// The table

/// The per-set table and the unweighted average, as the paper prints them.
pub fn table(r: &SuiteResult) -> String {
    let pct = |a: Option<f64>| a.map_or("-".to_string(), |a| format!("{:.1}", 100.0 * a));
    let loss = |l: Option<f32>| l.map_or("-".to_string(), |l| format!("{l:.4}"));
    let width = r.sets.iter().map(|s| s.name.len()).max().unwrap_or(0).max(7);
    let mut out = format!("{:<width$} {:>8} {:>10} {:>9} {:>9}\n", "set", "examples", "accuracy %", "loss", "tokens/s");
    for s in &r.sets {
        let tps = s.tokens_per_s.map_or("-".to_string(), |t| format!("{t:.1}"));
        out += &format!("{:<width$} {:>8} {:>10} {:>9} {:>9}\n", s.name, s.n, pct(s.accuracy), loss(s.loss), tps);
    }
    if r.sets.len() > 1 {
        out += &format!("{:<width$} {:>8} {:>10} {:>9}\n", "average", r.n, pct(r.accuracy), loss(r.loss));
    }
    out
}
