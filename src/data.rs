//! The data path, from a file on disk to the (B, T) batches the model trains on:
//!
//!   JSON / JSONL file -> `Example` (instruction, input, target, answer)
//!     -> the prompt template (`format_prompt`)
//!     -> token ids [BOS] + prompt + target + [EOS] with a loss mask (`tokenize_example`)
//!     -> padded batches of tokens and targets (`make_batch`)
//!
//! and the `Dataset` that holds a tokenized training set: its train/validation
//! split, the shuffled order of every epoch, and its counts. The loss is taken
//! only on the target tokens and the EOS (the "response"), never on the prompt,
//! as in LLM-Adapters' `finetune.py` with `train_on_inputs=False`.
//!
//! Nothing here knows the tokenizer type: tokenization takes an `encode`
//! closure, so the tests can use a toy byte-level encoder and read every id.
//!
//! The seeded generator it shuffles with is `crate::rng::Rng`, which the rest of the crate reuses
//! wherever a run must be reproducible (data order, random masks, sketches).

use std::path::Path;

use anyhow::{Context, Result, bail};
use serde::{Deserialize, Serialize};
use serde_json::Value;

pub use crate::rng::Rng;

// ----------------------------------------------------------------------------
// Examples and the loader

/// One example, as read from the file. `target` is what the model learns to
/// write; `answer` is the short gold answer that `lift eval` checks against
/// (a number, a letter A-E or an option word), when the file has one.
#[derive(Debug, Clone, PartialEq)]
pub struct Example {
    pub instruction: String,
    pub input: String,
    pub target: Option<String>,
    pub answer: Option<String>,
}

/// Where the prompt comes from, in order of preference.
pub const PROMPT_FIELDS: [&str; 4] = ["instruction", "prompt", "question", "problem"];
/// Where the target comes from, in order of preference. `answer` counts only
/// for its text before `####` (GSM8K writes "reasoning\n#### 72").
pub const TARGET_FIELDS: [&str; 5] = ["output", "chosen", "answer", "rationale", "solution"];

/// What the examples are for: training needs a target in every example,
/// evaluation needs only the prompt (and reads `answer` if present).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Purpose {
    Train,
    Eval,
}

/// The result of loading a file: the usable examples, and one line for each
/// example that was skipped (only with `skip_bad`).
#[derive(Debug, Clone)]
pub struct Loaded {
    pub examples: Vec<Example>,
    pub skipped: Vec<String>,
}

/// Reads a data set: a JSON list of objects, or JSONL (one object per line).
/// Which of the two it is comes from the content (the first character is `[`
/// or `{`), not from the file name.
///
/// A bad example (not an object, no prompt, no target when training) stops the
/// load with an error naming the file and the example's index, unless
/// `skip_bad`, in which case it is skipped and listed in `Loaded::skipped`.
pub fn load(path: &Path, purpose: Purpose, skip_bad: bool) -> Result<Loaded> {
    let name = path.display().to_string();
    let bytes = std::fs::read(path).with_context(|| format!("{name}: cannot read"))?;
    let text = match String::from_utf8(bytes) {
        Ok(t) => t,
        Err(e) => {
            let (line, col) = line_col(&String::from_utf8_lossy(e.as_bytes()), e.utf8_error().valid_up_to());
            bail!("{name}: not UTF-8 text (line {line}, column {col})");
        }
    };
    parse(&text, &name, purpose, skip_bad)
}

/// `load` for text already in memory; `name` is used in the error messages.
pub fn parse(text: &str, name: &str, purpose: Purpose, skip_bad: bool) -> Result<Loaded> {
    let text = text.strip_prefix('\u{feff}').unwrap_or(text); // a UTF-8 byte-order mark
    let Some(first) = text.char_indices().find(|(_, c)| !c.is_whitespace()) else {
        bail!("{name}: the file is empty (expected a JSON list of examples or JSONL)");
    };
    // (value, where it starts as "example N" or "example N (line L)")
    let mut values: Vec<(Value, String)> = Vec::new();
    match first.1 {
        '[' => {
            let list: Vec<Value> =
                serde_json::from_str(text).map_err(|e| anyhow::anyhow!("{name}: not valid JSON: {e}"))?;
            for (i, v) in list.into_iter().enumerate() {
                values.push((v, format!("example {i}")));
            }
        }
        '{' => {
            // JSONL: a stream of objects. The stream parser also accepts objects
            // that span several lines, and its errors carry the line and column.
            let mut stream = serde_json::Deserializer::from_str(text).into_iter::<Value>();
            let mut start = 0;
            loop {
                // The next value starts at the first non-space after the last one.
                let skip = text[start..].len() - text[start..].trim_start().len();
                let line = line_col(text, start + skip).0;
                match stream.next() {
                    None => break,
                    Some(Ok(v)) => values.push((v, format!("example {} (line {line})", values.len()))),
                    Some(Err(e)) => bail!("{name}: not valid JSON or JSONL: {e}"),
                }
                start = stream.byte_offset();
            }
        }
        _ => {
            let (line, col) = line_col(text, first.0);
            bail!("{name}: not JSON or JSONL: expected '[' or '{{' at line {line} column {col}, found {:?}", first.1);
        }
    }
    if values.is_empty() {
        bail!("{name}: the data set has no examples");
    }
    let mut loaded = Loaded { examples: Vec::with_capacity(values.len()), skipped: Vec::new() };
    for (v, at) in &values {
        match example_from_json(v, purpose) {
            Ok(ex) => loaded.examples.push(ex),
            Err(why) if skip_bad => loaded.skipped.push(format!("{name}: {at} {why}")),
            Err(why) => bail!("{name}: {at} {why}"),
        }
    }
    if loaded.examples.is_empty() {
        bail!("{name}: no usable examples ({} skipped; the first: {})", loaded.skipped.len(), loaded.skipped[0]);
    }
    Ok(loaded)
}

/// Builds an example from one JSON value, or says what is wrong with it (the
/// reason reads after "example N").
fn example_from_json(v: &Value, purpose: Purpose) -> std::result::Result<Example, String> {
    let Some(obj) = v.as_object() else {
        return Err(format!("is {}, not an object", json_kind(v)));
    };
    let field = |key: &str| obj.get(key).and_then(scalar_text);
    let Some(instruction) = PROMPT_FIELDS.iter().find_map(|k| field(k)) else {
        return Err(format!("has no prompt (looked for {})", PROMPT_FIELDS.join(", ")));
    };
    let input = field("input").unwrap_or_default();
    // `answer` may hold "worked solution\n#### 72" (GSM8K): the part before
    // `####` can be a target, the part after is the gold answer.
    let answer_field = field("answer");
    let (answer_target, answer) = match &answer_field {
        Some(a) => match a.split_once("####") {
            Some((before, after)) => (usable(before.trim_end()), usable(after.trim())),
            None => (Some(a.clone()), usable(a.trim())),
        },
        None => (None, None),
    };
    let target = TARGET_FIELDS.iter().find_map(|&k| if k == "answer" { answer_target.clone() } else { field(k) });
    if purpose == Purpose::Train && target.is_none() {
        return Err(format!("has no target (looked for {})", TARGET_FIELDS.join(", ")));
    }
    Ok(Example { instruction, input, target, answer })
}

/// A field's text: strings as they are, numbers and booleans written out (BoolQ
/// and many math sets store the answer as a JSON bool or number). Blank text,
/// null, lists and objects count as absent, so the next field is tried.
fn scalar_text(v: &Value) -> Option<String> {
    match v {
        Value::String(s) => usable(s),
        Value::Number(n) => Some(n.to_string()),
        Value::Bool(b) => Some(b.to_string()),
        _ => None,
    }
}

fn usable(s: &str) -> Option<String> {
    if s.trim().is_empty() { None } else { Some(s.to_string()) }
}

fn json_kind(v: &Value) -> &'static str {
    match v {
        Value::Null => "null",
        Value::Bool(_) => "a boolean",
        Value::Number(_) => "a number",
        Value::String(_) => "a string",
        Value::Array(_) => "a list",
        Value::Object(_) => "an object",
    }
}

/// 1-based line and column (in characters) of a byte offset.
fn line_col(text: &str, offset: usize) -> (usize, usize) {
    let before = &text[..offset.min(text.len())];
    let line = before.matches('\n').count() + 1;
    let col = before.rsplit('\n').next().map_or(0, |l| l.chars().count()) + 1;
    (line, col)
}

// ----------------------------------------------------------------------------
// The prompt template

/// The first sentence of every prompt.
pub const PREAMBLE: &str =
    "Below is an instruction that describes a task. Write a response that appropriately completes the request.";

/// The text the model sees before its response, exactly:
///
/// ```text
/// Below is an instruction that describes a task. Write a response that appropriately completes the request.
///
/// ### Instruction:
/// {instruction}
///
/// ### Input:          <- only when `input` is not blank
/// {input}
///
/// ### Response:
/// ```
///
/// ending in a newline after "### Response:", so the target starts on a line
/// of its own.
///
/// Note: LLM-Adapters (whose template and data the LIFT paper uses) switches
/// the first sentence when there is an input, to "Below is an instruction that
/// describes a task, paired with an input that provides further context. Write
/// a response that appropriately completes the request." We keep one sentence
/// for both cases (the project's template). The math and commonsense sets never
/// have an input, so the two agree on all of them.
pub fn format_prompt(instruction: &str, input: &str) -> String {
    let mut p = format!("{PREAMBLE}\n\n### Instruction:\n{instruction}\n\n");
    // Blank counts as absent (LLM-Adapters tests `if input:`, so "" is absent there too).
    if !input.trim().is_empty() {
        p.push_str(&format!("### Input:\n{input}\n\n"));
    }
    p.push_str("### Response:\n");
    p
}

impl Example {
    /// This example's prompt, `format_prompt(instruction, input)`.
    pub fn prompt(&self) -> String {
        format_prompt(&self.instruction, &self.input)
    }
}

/// Which prompt strings a run uses (`--template`, for training and
/// evaluation alike).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, Serialize, Deserialize, clap::ValueEnum)]
#[serde(rename_all = "lowercase")]
pub enum Template {
    /// lift's prompt (`format_prompt`), the same for training and generation.
    #[default]
    Alpaca,
    /// The LIFT release's exact strings: its training prompt (`BASE_PROMPT`)
    /// for training and the loss, its evaluation prompt (`i_prompt`) for
    /// generation; see `reference_train_prompt` and `reference_eval_prompt`.
    Reference,
    /// No wrapper: the instruction (and the input after it, on a new line)
    /// is the prompt as it is, and the output follows it directly. For
    /// plain text, e.g. the loss of a continuation of general prose.
    Plain,
}

/// The prompt of `--template plain`: the instruction, and the input on the
/// next line when there is one, nothing added.
pub fn plain_prompt(ex: &Example) -> String {
    if ex.input.is_empty() { ex.instruction.clone() } else { format!("{}\n{}", ex.instruction, ex.input) }
}

/// The training prompt of the LIFT release (`src/utils/data_utils.py`,
/// `BASE_PROMPT`), character for character:
///
/// ```text
/// <s> Below is an instruction that describes a task. Write a response that appropriately completes the request.␣␣
///
/// ### Instruction:
/// {instruction}
/// ␣␣␣␣␣␣␣␣␣␣␣␣␣␣␣␣            <- a line of 16 spaces
/// ### Response:
/// ```
///
/// with a literal "<s> " in front (text, whatever the tokenizer makes of
/// it; the tokenizer's own BOS is added as usual) and two spaces after
/// "request.". The release puts the `input`, when not empty, where the
/// instruction goes (its `get_instruction_or_prompt`), and drops the
/// instruction; so does this.
pub fn reference_train_prompt(ex: &Example) -> String {
    let text = if ex.input.is_empty() { &ex.instruction } else { &ex.input };
    format!("<s> {PREAMBLE}  \n\n### Instruction:\n{text}\n{}\n### Response:\n", " ".repeat(16))
}

/// The evaluation prompt of the LIFT release (`src/eval/run_math_parallel.py`
/// and `run_commonsense_parallel.py`, `i_prompt`), which differs from its
/// training prompt: one space after "request.", an empty line (no spaces)
/// before "### Response:", and only the instruction (never the input).
///
/// ```text
/// <s> Below is an instruction that describes a task. Write a response that appropriately completes the request.␣
///
/// ### Instruction:
/// {instruction}
///
/// ### Response:
/// ```
pub fn reference_eval_prompt(ex: &Example) -> String {
    format!("<s> {PREAMBLE} \n\n### Instruction:\n{}\n\n### Response:\n", ex.instruction)
}

impl Template {
    /// The prompt the model learns to answer (and the loss is measured after).
    pub fn train_prompt(self, ex: &Example) -> String {
        match self {
            Template::Alpaca => ex.prompt(),
            Template::Reference => reference_train_prompt(ex),
            Template::Plain => plain_prompt(ex),
        }
    }

    /// The prompt generation starts from.
    pub fn eval_prompt(self, ex: &Example) -> String {
        match self {
            Template::Alpaca => ex.prompt(),
            Template::Reference => reference_eval_prompt(ex),
            Template::Plain => plain_prompt(ex),
        }
    }

    /// One example as training ids with its loss mask.
    ///
    /// alpaca and plain: `tokenize_example` (prompt and target encoded
    /// apart, EOS id appended). reference, as the release's `preprocess`: the target is
    /// `output + " " + EOS text` (any "</s>" in the output removed),
    /// prompt and target are encoded as one text, and the prompt's share is
    /// the length of the prompt encoded alone (so a BPE merge across the
    /// boundary moves it by a token, as there); no EOS id is appended, the
    /// EOS text is in the target.
    pub fn tokenize(self, ex: &Example, t: &Tokenization) -> TokenizedExample {
        match self {
            Template::Alpaca => tokenize_example(ex, t.encode, t.bos, t.eos, t.max_seq_len),
            Template::Plain => {
                let target = ex.target.as_deref().unwrap_or("");
                tokenize_pair(&plain_prompt(ex), target, t.encode, t.bos, t.eos, t.max_seq_len)
            }
            Template::Reference => {
                let prompt = reference_train_prompt(ex);
                let output = ex.target.as_deref().unwrap_or("").replace("</s>", "");
                let whole = format!("{prompt}{output} {}", t.eos_text);
                let mut ids: Vec<u32> = t.bos.into_iter().collect();
                let n_prompt = ids.len() + (t.encode)(&prompt).len();
                ids.extend((t.encode)(&whole));
                let full_len = ids.len();
                ids.truncate(t.max_seq_len);
                TokenizedExample { ids, n_prompt, truncated: full_len > t.max_seq_len, full_len }
            }
        }
    }

    /// The ids generation starts from: [BOS] + encode(eval prompt).
    pub fn prompt_ids(self, ex: &Example, encode: &dyn Fn(&str) -> Vec<u32>, bos: Option<u32>) -> Vec<u32> {
        bos.into_iter().chain(encode(&self.eval_prompt(ex))).collect()
    }
}

/// What tokenizing an example needs besides the template.
pub struct Tokenization<'a> {
    pub encode: &'a dyn Fn(&str) -> Vec<u32>,
    /// Some when the tokenizer adds a BOS (Llama 2/3 do, SmolLM2 does not).
    pub bos: Option<u32>,
    pub eos: u32,
    /// The EOS token as text (the reference template writes it into the target).
    pub eos_text: String,
    pub max_seq_len: usize,
}

// ----------------------------------------------------------------------------
// Tokenization and the loss mask

/// One example as token ids. The first `n_prompt` ids (BOS and the prompt)
/// take no loss; every id after them (the target and the EOS) is predicted.
#[derive(Debug, Clone, PartialEq)]
pub struct TokenizedExample {
    pub ids: Vec<u32>,
    pub n_prompt: usize,
    /// Whether ids were cut to `max_seq_len`; `full_len` is the length before.
    pub truncated: bool,
    pub full_len: usize,
}

impl TokenizedExample {
    /// How many positions take a loss: each id at index >= max(n_prompt, 1) is
    /// predicted by the position before it. Zero when truncation cut away the
    /// whole target (and the EOS).
    pub fn loss_tokens(&self) -> usize {
        self.ids.len().saturating_sub(self.n_prompt.max(1))
    }
}

/// ids = [BOS] + encode(prompt) + encode(target) + [EOS], cut to the first
/// `max_seq_len` ids. Prompt and target are encoded separately, so a BPE merge
/// never crosses the boundary and `n_prompt` is exact. `bos` is Some when the
/// tokenizer adds a BOS (Llama 2/3 do, SmolLM2 does not). An example without a
/// target is tokenized as if the target were empty (only the EOS is learned);
/// `Dataset::new` refuses such examples for training.
pub fn tokenize_example(
    ex: &Example,
    encode: &dyn Fn(&str) -> Vec<u32>,
    bos: Option<u32>,
    eos: u32,
    max_seq_len: usize,
) -> TokenizedExample {
    tokenize_pair(&ex.prompt(), ex.target.as_deref().unwrap_or(""), encode, bos, eos, max_seq_len)
}

/// `tokenize_example` for a prompt and target given as text.
pub fn tokenize_pair(
    prompt: &str,
    target: &str,
    encode: &dyn Fn(&str) -> Vec<u32>,
    bos: Option<u32>,
    eos: u32,
    max_seq_len: usize,
) -> TokenizedExample {
    let mut ids: Vec<u32> = bos.into_iter().collect();
    ids.extend(encode(prompt));
    let n_prompt = ids.len();
    ids.extend(encode(target));
    ids.push(eos);
    let full_len = ids.len();
    let truncated = full_len > max_seq_len;
    ids.truncate(max_seq_len);
    TokenizedExample { ids, n_prompt, truncated, full_len }
}

/// The ids `lift eval` feeds the model: [BOS] + encode(prompt), the same
/// prefix as in training, so generation continues where the target would start.
pub fn prompt_ids(ex: &Example, encode: &dyn Fn(&str) -> Vec<u32>, bos: Option<u32>) -> Vec<u32> {
    let mut ids: Vec<u32> = bos.into_iter().collect();
    ids.extend(encode(&ex.prompt()));
    ids
}

// ----------------------------------------------------------------------------
// Batches

/// A target that takes no loss (prompt, padding, the last position).
pub const IGNORE: i32 = -1;

/// B rows of T positions, row-major (B, T). Position t of a row holds token
/// ids[t] and its target is ids[t+1], or IGNORE.
#[derive(Debug, Clone, PartialEq)]
pub struct Batch {
    pub b: usize,
    pub t: usize,
    pub tokens: Vec<u32>,
    pub targets: Vec<i32>,
    /// The number of targets that are not IGNORE: the loss is their mean.
    pub n_loss: usize,
    /// A packed batch's examples (pack.rs), each attended to on its own with
    /// positions from 0; empty: each row is one sequence from position 0.
    pub segments: Vec<Segment>,
}

/// One example inside a packed row: tokens start .. start + len of row `row`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Segment {
    pub row: usize,
    pub start: usize,
    pub len: usize,
}

/// Writes the targets of one example (`targets` has its length): the id at
/// each index >= max(n_prompt, 1), at the position before it; the rest stay
/// IGNORE. Returns how many targets it wrote.
pub fn write_targets(targets: &mut [i32], ex: &TokenizedExample) -> usize {
    let first = ex.n_prompt.max(1);
    for next in first..ex.ids.len() {
        targets[next - 1] = ex.ids[next] as i32;
    }
    ex.ids.len().saturating_sub(first)
}

/// The mean loss over several batches, each weighted by its loss tokens:
/// (a batch's mean loss, its n_loss) pairs in, the mean per target token
/// out (NaN when there is no target at all).
pub fn mean_loss(parts: impl IntoIterator<Item = (f32, usize)>) -> f32 {
    let (mut sum, mut n) = (0.0f64, 0usize);
    for (loss, n_loss) in parts {
        sum += loss as f64 * n_loss as f64;
        n += n_loss;
    }
    if n == 0 { f32::NAN } else { (sum / n as f64) as f32 }
}

/// Pads the examples to the longest one (T) and lays out tokens and targets.
/// For a row with ids of length L:
///   tokens[t]  = ids[t] for t < L, else pad_id
///   targets[t] = ids[t+1] when t+1 < L and t+1 >= n_prompt, else IGNORE
/// so the prompt, the last position and all padding are outside the loss, and
/// pad_id never appears as a target (it is only ever an input past the end).
pub fn make_batch(examples: &[&TokenizedExample], pad_id: u32) -> Batch {
    let b = examples.len();
    let t = examples.iter().map(|e| e.ids.len()).max().unwrap_or(0);
    let mut tokens = vec![pad_id; b * t];
    let mut targets = vec![IGNORE; b * t];
    let mut n_loss = 0;
    for (row, ex) in examples.iter().enumerate() {
        let (tok, tgt) = (&mut tokens[row * t..(row + 1) * t], &mut targets[row * t..(row + 1) * t]);
        tok[..ex.ids.len()].copy_from_slice(&ex.ids);
        n_loss += write_targets(&mut tgt[..ex.ids.len()], ex);
    }
    Batch { b, t, tokens, targets, n_loss, segments: Vec::new() }
}

// ----------------------------------------------------------------------------
// The training set

/// Counts over the whole tokenized set (train and validation together).
#[derive(Debug, Clone, Default, PartialEq)]
pub struct DataStats {
    /// Examples tokenized.
    pub examples: usize,
    /// Examples longer than max_seq_len, cut to it.
    pub truncated: usize,
    /// Truncated so far that no target token is left: dropped, they teach nothing.
    pub no_loss: usize,
    /// Token ids after truncation, and how many of them take a loss.
    pub tokens: usize,
    pub loss_tokens: usize,
    /// The longest example before truncation.
    pub longest: usize,
}

/// A tokenized training set split into train and validation examples.
#[derive(Debug, Clone)]
pub struct Dataset {
    pub train: Vec<TokenizedExample>,
    pub val: Vec<TokenizedExample>,
    pub stats: DataStats,
}

/// Salt that separates the split's random stream from the epoch orders'.
const SPLIT_STREAM: u64 = u64::MAX;

impl Dataset {
    /// Tokenizes `examples` and sets `val_size` of them aside for validation
    /// (0 = none). Which ones is decided by a shuffle seeded with `seed`, before
    /// tokenization, so the split depends only on the seed and the number of
    /// examples: the same seed gives the same split with any tokenizer.
    /// Examples with no loss token left after truncation are dropped and
    /// counted in `stats.no_loss`.
    pub fn new(
        examples: &[Example],
        encode: &dyn Fn(&str) -> Vec<u32>,
        bos: Option<u32>,
        eos: u32,
        max_seq_len: usize,
        val_size: usize,
        seed: u64,
    ) -> Result<Dataset> {
        let tokenize = |ex: &Example| tokenize_example(ex, encode, bos, eos, max_seq_len);
        Dataset::with_tokenizer(examples, &tokenize, max_seq_len, val_size, seed)
    }

    /// `new` with any tokenization of the examples (a template's, see
    /// `Template::tokenize`); `max_seq_len` is the one it cuts to.
    pub fn with_tokenizer(
        examples: &[Example],
        tokenize: &dyn Fn(&Example) -> TokenizedExample,
        max_seq_len: usize,
        val_size: usize,
        seed: u64,
    ) -> Result<Dataset> {
        if let Some(i) = examples.iter().position(|e| e.target.is_none()) {
            bail!("example {i} has no target (looked for {}): cannot train on it", TARGET_FIELDS.join(", "));
        }
        if max_seq_len < 2 {
            bail!("max_seq_len {max_seq_len} is too short: a training row needs at least 2 tokens");
        }
        if val_size >= examples.len() {
            bail!(
                "a validation set of {val_size} examples leaves none to train on (the data set has {}); \
                 lower --val-size",
                examples.len()
            );
        }
        let mut is_val = vec![false; examples.len()];
        let mut idx: Vec<usize> = (0..examples.len()).collect();
        Rng::stream(seed, SPLIT_STREAM).shuffle(&mut idx);
        for &i in &idx[..val_size] {
            is_val[i] = true;
        }

        let mut ds = Dataset { train: Vec::new(), val: Vec::new(), stats: DataStats::default() };
        for (ex, &val) in examples.iter().zip(&is_val) {
            let tok = tokenize(ex);
            let s = &mut ds.stats;
            s.examples += 1;
            s.truncated += tok.truncated as usize;
            s.longest = s.longest.max(tok.full_len);
            if tok.loss_tokens() == 0 {
                s.no_loss += 1;
                continue;
            }
            s.tokens += tok.ids.len();
            s.loss_tokens += tok.loss_tokens();
            if val { ds.val.push(tok) } else { ds.train.push(tok) }
        }
        if ds.train.is_empty() {
            bail!(
                "no training example keeps a target token within max_seq_len {max_seq_len} \
                 (the longest example has {} tokens)",
                ds.stats.longest
            );
        }
        Ok(ds)
    }

    /// The order in which epoch `epoch` visits the training examples: a
    /// permutation of 0..train.len() that depends only on (seed, epoch), so a
    /// run stopped at (epoch, batch) resumes with exactly the batches it would
    /// have seen.
    pub fn epoch_order(&self, epoch: usize, seed: u64) -> Vec<usize> {
        let mut order: Vec<usize> = (0..self.train.len()).collect();
        Rng::stream(seed, epoch as u64).shuffle(&mut order);
        order
    }

    /// Batches per epoch; the last one may be smaller than batch_size.
    pub fn batches_per_epoch(&self, batch_size: usize) -> usize {
        self.train.len().div_ceil(batch_size)
    }

    /// Batch number `index` of an epoch whose order is `order`: the examples
    /// order[index*batch_size ..] (at most batch_size of them).
    pub fn train_batch(&self, order: &[usize], index: usize, batch_size: usize, pad_id: u32) -> Batch {
        let lo = (index * batch_size).min(order.len());
        let hi = (lo + batch_size).min(order.len());
        let rows: Vec<&TokenizedExample> = order[lo..hi].iter().map(|&i| &self.train[i]).collect();
        make_batch(&rows, pad_id)
    }

    /// The validation set in file order, in batches of batch_size.
    pub fn val_batches(&self, batch_size: usize, pad_id: u32) -> Vec<Batch> {
        self.val.chunks(batch_size.max(1)).map(|c| make_batch(&c.iter().collect::<Vec<_>>(), pad_id)).collect()
    }
}

// ----------------------------------------------------------------------------
// A small seeded random number generator
