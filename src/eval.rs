//! `lift eval`: how well a model does on a data set.
//!
//! Two measures, both on the training template:
//! - loss: the mean cross-entropy of the target tokens (and EOS) under
//!   teacher forcing, over the examples that have a target;
//! - accuracy: for the examples with an `answer`, greedy generation from the
//!   prompt (batched, KV cache) and the answer read out of the generated text
//!   by the rules in `answer.rs`.

use std::io::Write;
use std::path::{Path, PathBuf};
use std::time::Instant;

use anyhow::{Context, Result, anyhow, bail};
use serde::Serialize;

use crate::answer;
use crate::data::{self, Example, Purpose};
use crate::generate;
use crate::model::{Activations, Model};
use crate::tokenizer::Tokenizer;

pub struct EvalOptions {
    pub data: PathBuf,
    pub limit: Option<usize>,
    pub preds: Option<PathBuf>,
    pub generate: bool,
    pub max_new_tokens: usize,
    pub batch_size: usize,
    pub max_seq_len: usize,
    pub skip_bad: bool,
    pub quiet: bool,
}

#[derive(Debug, Clone, Serialize)]
pub struct EvalResult {
    /// Mean target-token loss (None when no example has a target).
    pub loss: Option<f32>,
    /// Fraction of generated answers that are correct (None without generation).
    pub accuracy: Option<f64>,
    /// Examples evaluated.
    pub n: usize,
    /// Examples whose answer was checked, and how many were correct.
    pub n_answered: usize,
    pub n_correct: usize,
    pub loss_tokens: usize,
}

#[derive(Serialize)]
struct Prediction<'a> {
    index: usize,
    instruction: &'a str,
    generated: String,
    extracted: Option<String>,
    answer: &'a str,
    correct: bool,
}

/// Loss and accuracy of `model` on the data set `o` names.
pub fn evaluate(model: &mut Model, tok: &Tokenizer, o: &EvalOptions) -> Result<EvalResult> {
    if o.batch_size == 0 {
        bail!("--batch-size must be at least 1");
    }
    let loaded = data::load(&o.data, Purpose::Eval, o.skip_bad)?;
    let mut examples = loaded.examples;
    if let Some(n) = o.limit {
        examples.truncate(n);
    }
    if examples.is_empty() {
        bail!("{}: no examples to evaluate", o.data.display());
    }
    let eos = tok.eos_id().ok_or_else(|| anyhow!("the tokenizer has no EOS token"))?;
    let (loss, loss_tokens) = target_loss(model, tok, &examples, o, eos)?;
    // Created before the generation, so an unwritable path fails before that work.
    let preds = match &o.preds {
        Some(p) => Some(std::fs::File::create(p).with_context(|| format!("{}: cannot create", p.display()))?),
        None => None,
    };
    let results = if o.generate { generate_answers(model, tok, &examples, o, eos)? } else { Vec::new() };
    if let Some(file) = preds {
        write_predictions(file, &examples, &results)?;
    }
    let n_answered = results.len();
    let n_correct = results.iter().filter(|r| r.2).count();
    let accuracy = (n_answered > 0).then(|| n_correct as f64 / n_answered as f64);
    Ok(EvalResult { loss, accuracy, n: examples.len(), n_answered, n_correct, loss_tokens })
}

/// The teacher-forced loss over the examples with a target, in batches:
/// the mean per target token, and how many target tokens there were.
fn target_loss(
    model: &mut Model,
    tok: &Tokenizer,
    examples: &[Example],
    o: &EvalOptions,
    eos: u32,
) -> Result<(Option<f32>, usize)> {
    let bos = if tok.add_bos() { tok.bos_id() } else { None };
    let encode = |s: &str| tok.encode(s);
    let tokenized: Vec<_> = examples
        .iter()
        .filter(|e| e.target.is_some())
        .map(|e| data::tokenize_example(e, &encode, bos, eos, o.max_seq_len))
        .filter(|t| t.loss_tokens() > 0)
        .collect();
    if tokenized.is_empty() {
        return Ok((None, 0));
    }
    let c = model.config.clone();
    let longest = tokenized.iter().map(|t| t.ids.len()).max().unwrap_or(1);
    model.ensure_rope(longest);
    let mut acts = Activations::new(&c, o.batch_size.min(tokenized.len()), longest);
    let mut parts = Vec::new();
    for chunk in tokenized.chunks(o.batch_size) {
        let refs: Vec<_> = chunk.iter().collect();
        let batch = data::make_batch(&refs, eos);
        acts.set_shape(&c, batch.b, batch.t);
        parts.push((model.forward(&mut acts, &batch.tokens, Some(&batch.targets))?, batch.n_loss));
    }
    let loss_tokens = parts.iter().map(|p| p.1).sum();
    Ok((Some(data::mean_loss(parts)), loss_tokens))
}

/// Greedy answers to the examples with an `answer`, batched by prompt
/// length so little padding is run: (example index, generated text,
/// correct) in example order.
fn generate_answers(
    model: &mut Model,
    tok: &Tokenizer,
    examples: &[Example],
    o: &EvalOptions,
    eos: u32,
) -> Result<Vec<(usize, String, bool)>> {
    let bos = if tok.add_bos() { tok.bos_id() } else { None };
    let encode = |s: &str| tok.encode(s);
    let mut todo: Vec<(usize, Vec<u32>)> = examples
        .iter()
        .enumerate()
        .filter(|(_, e)| e.answer.is_some())
        .map(|(i, e)| (i, data::prompt_ids(e, &encode, bos)))
        .collect();
    todo.sort_by_key(|(_, ids)| ids.len());
    let t0 = Instant::now();
    let total = todo.len();
    let mut results: Vec<(usize, String, bool)> = Vec::with_capacity(total);
    for chunk in todo.chunks(o.batch_size) {
        let prompts: Vec<Vec<u32>> = chunk.iter().map(|(_, p)| p.clone()).collect();
        let outs =
            generate::generate(model, &prompts, &crate::decode::DecodeOptions::greedy(o.max_new_tokens, Some(eos)))?
                .ids;
        for ((i, _), ids) in chunk.iter().zip(outs) {
            let ids: Vec<u32> = ids.into_iter().filter(|&id| id != eos).collect();
            let text = tok.decode(&ids)?;
            let ok = answer::is_correct(&text, examples[*i].answer.as_deref().unwrap_or(""));
            results.push((*i, text, ok));
        }
        if !o.quiet {
            let done = results.len();
            let correct = results.iter().filter(|r| r.2).count();
            let acc = 100.0 * correct as f64 / done as f64;
            eprint!("\rgenerating: {done}/{total} | accuracy so far {acc:.1}% | {:.0}s", t0.elapsed().as_secs_f64());
        }
    }
    if !o.quiet && total > 0 {
        eprintln!();
    }
    results.sort_by_key(|r| r.0);
    Ok(results)
}

/// One JSON line per generated answer: the prompt, the text, what was read
/// out of it, the gold answer, and whether they agree.
fn write_predictions(file: std::fs::File, examples: &[Example], results: &[(usize, String, bool)]) -> Result<()> {
    let mut w = std::io::BufWriter::new(file);
    for (i, text, ok) in results {
        let e = &examples[*i];
        let gold = e.answer.as_deref().unwrap_or("");
        let p = Prediction {
            index: *i,
            instruction: &e.instruction,
            extracted: answer::extract(text, answer::answer_kind(gold)),
            generated: text.clone(),
            answer: gold,
            correct: *ok,
        };
        writeln!(w, "{}", serde_json::to_string(&p)?)?;
    }
    w.flush()?;
    Ok(())
}

/// A one-line human summary of an evaluation.
pub fn summary(r: &EvalResult, data: &Path) -> String {
    let loss = r.loss.map_or("n/a".to_string(), |l| format!("{l:.4}"));
    let acc = r.accuracy.map_or("n/a".to_string(), |a| format!("{:.1}% ({}/{})", 100.0 * a, r.n_correct, r.n_answered));
    format!("{}: {} examples | loss {loss} | accuracy {acc}", data.display(), r.n)
}
