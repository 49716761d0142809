//! What is fuzzed: one target per input kind, each a list of seeds and a
//! function that hands an input to lift's own loading code the way a
//! command does, then uses what loaded (encodes, runs the model, exports,
//! resumes), so that a bad value that gets past a loader shows up too.
//!
//! A target's function returns lift's error for a malformed input; the
//! runner checks that it is one line. A panic, an abort (an allocation past
//! the budget, a stack overflow) or a hang is a finding.

use std::collections::HashMap;
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex, OnceLock};

use anyhow::{Context, Result, anyhow};
use serde_json::Value;

use lift::data::{self, Dataset, Purpose};
use lift::formats::checkpoint::{Checkpoint, DType};
use lift::formats::gguf::GgufFile;
use lift::formats::safetensors::SafeTensors;
use lift::formats::{convert, export, state};
use lift::model::{Activations, Config, Model, Weights};
use lift::options::{Device, Method, MethodOptions, TrainOptions};
use lift::tokenizer::Tokenizer;

use super::mutate::Layout;

/// One file of a seed: its name in the input directory, where its JSON
/// part is, its bytes.
pub struct SeedFile {
    pub name: String,
    pub layout: Layout,
    pub bytes: Vec<u8>,
}

/// A valid input. Most are one file; a Hugging Face directory is several,
/// of which each mutated input changes one. A state.bin seed names the
/// model.bin it belongs to.
pub struct Seed {
    pub name: String,
    pub files: Vec<SeedFile>,
    pub model: Option<PathBuf>,
}

pub struct Target {
    pub name: &'static str,
    pub seeds: Vec<Seed>,
    /// Runs one input of a seed: the file (a one-file seed) or the
    /// directory it was written to.
    pub run: fn(&Work, &Seed, &Path) -> Result<()>,
}

/// What a worker process keeps between inputs: its scratch directory and,
/// loaded once each, the models the state and data targets use.
pub struct Work {
    pub scratch: PathBuf,
    pub seeds: PathBuf,
    models: Mutex<HashMap<PathBuf, Arc<Loaded>>>,
}

/// A seed model.bin, loaded.
struct Loaded {
    config: Config,
    weights: Weights,
    tokenizer: Tokenizer,
}

impl Work {
    pub fn new(scratch: PathBuf, seeds: PathBuf) -> Work {
        Work { scratch, seeds, models: Mutex::new(HashMap::new()) }
    }

    /// The model at `path` (a seed: it loads).
    fn model(&self, path: &Path) -> Arc<Loaded> {
        let mut models = self.models.lock().unwrap_or_else(|e| e.into_inner());
        let m = models.entry(path.to_path_buf()).or_insert_with(|| {
            let ck = Checkpoint::open(path).expect("a seed model loads");
            let weights = ck.load_weights().expect("a seed model's weights load");
            Arc::new(Loaded { config: ck.config.clone(), weights, tokenizer: ck.tokenizer.clone() })
        });
        m.clone()
    }

    fn micro(&self) -> Arc<Loaded> {
        self.model(&self.seeds.join("micro.bin"))
    }

    /// A fresh, empty directory under the scratch directory.
    fn fresh(&self, name: &str) -> PathBuf {
        let d = self.scratch.join(name);
        let _ = std::fs::remove_dir_all(&d);
        let _ = std::fs::create_dir_all(&d);
        d
    }
}

fn read(path: &Path) -> Vec<u8> {
    std::fs::read(path).unwrap_or_else(|e| panic!("{}: {e}", path.display()))
}

fn file(name: &str, layout: Layout, path: &Path) -> SeedFile {
    SeedFile { name: name.to_string(), layout, bytes: read(path) }
}

fn one(name: &str, f: SeedFile) -> Seed {
    Seed { name: name.to_string(), files: vec![f], model: None }
}

/// Seeds made at the start of a long run from the tiny test model
/// (tests/reference/tiny_gqa), the inputs a user's fuzzer would start from:
/// set with `set_extra`, added by `all`.
static EXTRA: OnceLock<PathBuf> = OnceLock::new();

pub fn set_extra(dir: PathBuf) {
    let _ = EXTRA.set(dir);
}

pub fn extra() -> Option<&'static Path> {
    EXTRA.get().map(PathBuf::as_path)
}

/// Every target, with the committed seeds (tests/fuzz_corpus/seeds), the
/// committed fixtures (tests/data), and the tiny model's when `set_extra`
/// was called.
pub fn all(root: &Path) -> Vec<Target> {
    let s = root.join("tests/fuzz_corpus/seeds");
    let fixtures = root.join("tests/data");
    let tok = |n: &str| {
        one(n, file("tokenizer.json", Layout::Json, &fixtures.join("tokenizer").join(n).join("tokenizer.json")))
    };
    let vocab =
        |n: &str| one(n, file("vocab.json", Layout::Json, &fixtures.join("tokenizer").join(n).join("vocab.json")));
    let hf = |name: &str, dir: &Path| Seed {
        name: name.into(),
        files: vec![
            file("config.json", Layout::Json, &dir.join("config.json")),
            file("tokenizer.json", Layout::Json, &dir.join("tokenizer.json")),
            file("tokenizer_config.json", Layout::Json, &dir.join("tokenizer_config.json")),
            file("model.safetensors", Layout::Safetensors, &dir.join("model.safetensors")),
        ],
        model: None,
    };
    let sharded = |dir: &Path| Seed {
        name: "hf_sharded".into(),
        files: vec![
            file("config.json", Layout::Json, &dir.join("config.json")),
            file("tokenizer.json", Layout::Json, &dir.join("tokenizer.json")),
            file("model.safetensors.index.json", Layout::Json, &dir.join("model.safetensors.index.json")),
            file(
                "model-00001-of-00002.safetensors",
                Layout::Safetensors,
                &dir.join("model-00001-of-00002.safetensors"),
            ),
            file(
                "model-00002-of-00002.safetensors",
                Layout::Safetensors,
                &dir.join("model-00002-of-00002.safetensors"),
            ),
        ],
        model: None,
    };
    let state = |name: &str, path: &Path, model: &Path| Seed {
        name: name.to_string(),
        files: vec![file("state.bin", Layout::StateBin, path)],
        model: Some(model.to_path_buf()),
    };
    let micro = s.join("micro.bin");
    let mut t = vec![
        Target {
            name: "model_bin",
            seeds: vec![one("micro.bin", file("model.bin", Layout::ModelBin, &micro))],
            run: model_bin,
        },
        Target {
            name: "gguf",
            seeds: vec![
                one("micro.gguf", file("model.gguf", Layout::Raw, &s.join("micro.gguf"))),
                one("quants.gguf", file("quants.gguf", Layout::Raw, &fixtures.join("formats/quants.gguf"))),
            ],
            run: gguf,
        },
        Target {
            name: "safetensors",
            seeds: vec![
                one(
                    "tensors.safetensors",
                    file("t.safetensors", Layout::Safetensors, &fixtures.join("formats/tensors.safetensors")),
                ),
                one("micro.safetensors", file("t.safetensors", Layout::Safetensors, &s.join("hf/model.safetensors"))),
            ],
            run: safetensors,
        },
        Target { name: "hf_dir", seeds: vec![hf("hf", &s.join("hf")), sharded(&s.join("hf_sharded"))], run: hf_dir },
        Target {
            name: "tokenizer_json",
            seeds: ["gpt2", "llama3", "metaspace", "sentencepiece", "smollm"].map(tok).into_iter().collect(),
            run: tokenizer_json,
        },
        Target { name: "gguf_vocab", seeds: vec![vocab("llama3_gguf"), vocab("sentencepiece_gguf")], run: gguf_vocab },
        Target {
            name: "state_bin",
            seeds: ["state_lift", "state_full", "state_lora"]
                .map(|n| state(n, &s.join(n).join("state.bin"), &micro))
                .into_iter()
                .collect(),
            run: state_bin,
        },
        Target {
            name: "data",
            seeds: vec![
                one("data.json", file("data.json", Layout::Json, &s.join("data.json"))),
                one("data.jsonl", file("data.jsonl", Layout::Raw, &s.join("data.jsonl"))),
            ],
            run: data_file,
        },
    ];
    if let Some(x) = extra() {
        let tiny = root.join("tests/reference/tiny_gqa");
        let add = |t: &mut Vec<Target>, name: &str, seed: Seed| {
            if let Some(target) = t.iter_mut().find(|t| t.name == name) {
                target.seeds.push(seed);
            }
        };
        add(&mut t, "model_bin", one("tiny.bin", file("model.bin", Layout::ModelBin, &x.join("tiny.bin"))));
        add(&mut t, "gguf", one("tiny.gguf", file("model.gguf", Layout::Raw, &x.join("tiny.gguf"))));
        add(&mut t, "gguf", one("tiny32.gguf", file("model.gguf", Layout::Raw, &x.join("tiny32.gguf"))));
        add(
            &mut t,
            "safetensors",
            one("tiny.safetensors", file("t.safetensors", Layout::Safetensors, &tiny.join("model.safetensors"))),
        );
        add(&mut t, "hf_dir", hf("tiny_gqa", &tiny));
        add(&mut t, "state_bin", state("tiny_state", &x.join("tiny_state/state.bin"), &x.join("tiny.bin")));
    }
    t
}

/// Writes the tiny model's seeds into `dir`: model.bin (converted from its
/// Hugging Face directory), GGUF (F16 and F32) and the state.bin of a
/// 2-step LIFT run on the micro data.
pub fn make_extra(root: &Path, dir: &Path) -> Result<()> {
    let tiny = root.join("tests/reference/tiny_gqa");
    std::fs::create_dir_all(dir)?;
    let bin = dir.join("tiny.bin");
    convert::convert(&tiny, &bin, DType::F32)?;
    let ck = Checkpoint::open(&bin)?;
    let w = ck.load_weights()?;
    export::export_gguf(&ck, &w, &dir.join("tiny.gguf"), true)?;
    export::export_gguf(&ck, &w, &dir.join("tiny32.gguf"), false)?;
    let seeds = root.join("tests/fuzz_corpus/seeds");
    let o = micro_options(&bin, &seeds.join("data.json"), Method::Lift, dir.join("tiny_state"));
    lift::train::train(&o, None, Device::Cpu)?;
    Ok(())
}

// ----------------------------------------------------------------------------
// The targets

/// Errors of calls whose failure is allowed (a tensor of a type lift does
/// not read) are still held to the one-line rule.
fn allowed<T>(r: Result<T>) -> Result<Option<T>> {
    match r {
        Ok(v) => Ok(Some(v)),
        Err(e) => {
            let msg = super::one_line(&e);
            if super::bad_message(&msg) {
                Err(anyhow!("a bad error message from an allowed failure: {msg}"))
            } else {
                Ok(None)
            }
        }
    }
}

/// What `lift eval`, `generate`, `tokenize`, `export` and `train` do with a
/// model.bin (one LIFT step on the micro data).
fn model_bin(w: &Work, _: &Seed, path: &Path) -> Result<()> {
    let ck = Checkpoint::open(path)?;
    let weights = ck.load_weights()?;
    use_tokenizer(&ck.tokenizer)?;
    let mut model = Model::new(ck.config.clone(), weights);
    run_model(&mut model, &ck.tokenizer)?;
    export::export_hf(&ck, &model.weights, &w.fresh("hf"), DType::Bf16)?;
    export::export_gguf(&ck, &model.weights, &w.scratch.join("x.gguf"), true)?;
    let mut o = micro_options(path, &w.seeds.join("data.json"), Method::Lift, w.fresh("train"));
    (o.max_steps, o.val_size) = (Some(1), 0);
    lift::train::train(&o, None, Device::Cpu)?;
    Ok(())
}

/// A short forward pass and eight greedy tokens from BOS, EOS and a prompt.
fn run_model(model: &mut Model, tok: &Tokenizer) -> Result<()> {
    let mut ids: Vec<u32> = tok.bos_id().into_iter().chain(tok.eos_id()).collect();
    ids.extend(tok.encode("Hi 12 é").into_iter().take(8));
    if ids.is_empty() {
        return Ok(());
    }
    model.ensure_rope(ids.len() + 8);
    let mut acts = Activations::new(&model.config, 1, ids.len());
    model.forward(&mut acts, &ids, None)?;
    // As `lift generate` prints: the text of the new tokens, prefix by prefix.
    let out = lift::generate::generate(model, &[ids], &lift::decode::DecodeOptions::greedy(8, None))?;
    for new in &out.ids {
        for n in 1..=new.len() {
            let _ = tok.decode(&new[..n]);
        }
    }
    Ok(())
}

/// Encoding, decoding and both writers of a tokenizer.
fn use_tokenizer(tok: &Tokenizer) -> Result<()> {
    let text = "Hello world! 123 <s> é中\n\n  x</s>\t▁";
    let ids = tok.encode(text);
    tok.decode(&ids)?;
    for &id in ids.iter().take(16) {
        tok.decode_token_bytes(id)?;
    }
    let json = tok.to_hf_json()?;
    Tokenizer::from_hf_json(&json, None).context("the tokenizer written back")?;
    tok.to_gguf_metadata();
    Ok(())
}

/// What `lift convert` does with a GGUF, then reading the result.
fn gguf(w: &Work, _: &Seed, path: &Path) -> Result<()> {
    let g = GgufFile::open(path)?;
    for (k, _) in g.metadata() {
        let _ = (g.get_str(k), g.get_u64(k), g.get_f32(k), g.get_bool(k));
        let _ = (g.get_str_array(k), g.get_i32_array(k), g.get_f32_array(k));
    }
    for t in g.tensors().iter().take(64) {
        allowed(g.tensor_f32(t))?;
    }
    // A model (it has an embedding) must convert; quants.gguf holds
    // tensors, not a model, and its conversion may fail.
    let out = w.scratch.join("out.bin");
    let converted = convert::convert(path, &out, DType::Bf16);
    let converted = if g.find("token_embd.weight").is_some() { Some(converted?) } else { allowed(converted)? };
    if converted.is_some() {
        Checkpoint::open(&out)?.load_weights()?;
    }
    Ok(())
}

fn safetensors(_: &Work, _: &Seed, path: &Path) -> Result<()> {
    let f = SafeTensors::open(path)?;
    for t in f.tensors() {
        allowed(f.tensor_f32(&t.name))?;
    }
    Ok(())
}

/// `lift convert` of a Hugging Face directory, then reading the result.
fn hf_dir(w: &Work, _: &Seed, dir: &Path) -> Result<()> {
    let out = w.scratch.join("out.bin");
    convert::convert(dir, &out, DType::F32)?;
    let ck = Checkpoint::open(&out)?;
    let mut model = Model::new(ck.config.clone(), ck.load_weights()?);
    run_model(&mut model, &ck.tokenizer)
}

fn tokenizer_json(_: &Work, _: &Seed, path: &Path) -> Result<()> {
    let text = String::from_utf8(read(path)).map_err(|_| anyhow!("{}: not UTF-8", path.display()))?;
    use_tokenizer(&Tokenizer::from_hf_json(&text, None)?)
}

/// A GGUF vocabulary (`tokenizer.ggml.*` as JSON, tests/data/tokenizer/*_gguf).
fn gguf_vocab(_: &Work, _: &Seed, path: &Path) -> Result<()> {
    let v: Value = serde_json::from_slice(&read(path))?;
    let strings = |k: &str| -> Result<Vec<String>> {
        let a = v[k].as_array().ok_or_else(|| anyhow!("{k} is not an array"))?;
        a.iter().map(|s| s.as_str().map(String::from).ok_or_else(|| anyhow!("{k}: not a string"))).collect()
    };
    let ints = |k: &str| -> Result<Vec<i32>> {
        let a = v[k].as_array().ok_or_else(|| anyhow!("{k} is not an array"))?;
        a.iter()
            .map(|x| x.as_i64().and_then(|x| i32::try_from(x).ok()).ok_or_else(|| anyhow!("{k}: not an i32")))
            .collect()
    };
    let floats = |k: &str| -> Result<Vec<f32>> {
        let a = v[k].as_array().ok_or_else(|| anyhow!("{k} is not an array"))?;
        a.iter().map(|x| x.as_f64().map(|x| x as f32).ok_or_else(|| anyhow!("{k}: not a number"))).collect()
    };
    let id = |k: &str| v[k].as_u64().and_then(|x| u32::try_from(x).ok());
    let tok = Tokenizer::from_gguf_vocab(
        v["model"].as_str().unwrap_or(""),
        v["pre"].as_str().unwrap_or(""),
        strings("tokens")?,
        ints("token_types")?,
        strings("merges")?,
        floats("scores")?,
        id("bos_id"),
        id("eos_id"),
        v["add_bos"].as_bool().unwrap_or(false),
    )?;
    use_tokenizer(&tok)
}

/// The options the seed runs of a method were made with (tests/fuzz.rs
/// --make-seeds), for a model and a data file.
pub fn micro_options(checkpoint: &Path, data: &Path, kind: Method, out: PathBuf) -> TrainOptions {
    let mut method = MethodOptions { kind, density: Some(0.25), filter_rank: 2, lora_rank: 2, ..Default::default() };
    method.train_norms = kind == Method::Full;
    TrainOptions {
        checkpoint: checkpoint.to_path_buf(),
        data: data.to_path_buf(),
        out,
        method,
        lr: 1e-2,
        epochs: 1,
        max_steps: Some(2),
        batch_size: 2,
        max_seq_len: 256,
        warmup: 0.0,
        val_size: 2,
        eval_every: 0,
        save_every: 0,
        log_every: 100,
        ..Default::default()
    }
}

/// `lift train --resume` of a state.bin: the load, then one more step.
fn state_bin(w: &Work, seed: &Seed, path: &Path) -> Result<()> {
    let model = seed.model.clone().unwrap_or_else(|| w.seeds.join("micro.bin"));
    let m = w.model(&model);
    let dir = path.parent().unwrap_or(Path::new("."));
    let mut weights = m.weights.clone();
    let saved = state::load(dir, &m.config, &mut weights)?;
    let kind = saved.header.options.method.kind;
    let mut o = micro_options(&model, &w.seeds.join("data.json"), kind, w.fresh("out"));
    o.max_steps = Some(saved.header.step.saturating_add(1).min(4));
    lift::train::train(&o, Some(dir), Device::Cpu)?;
    Ok(())
}

/// `lift train`'s and `lift eval`'s use of a data file with the micro model.
fn data_file(w: &Work, _: &Seed, path: &Path) -> Result<()> {
    let m = w.micro();
    let tok = &m.tokenizer;
    let eos = tok.eos_id().ok_or_else(|| anyhow!("the micro tokenizer has an EOS"))?;
    let encode = |s: &str| tok.encode(s);
    let loaded = data::load(path, Purpose::Train, true)?;
    let val = 1.min(loaded.examples.len().saturating_sub(1));
    if let Some(ds) = allowed(Dataset::new(&loaded.examples, &encode, tok.bos_id(), eos, 256, val, 3))? {
        let order = ds.epoch_order(0, 3);
        ds.train_batch(&order, 0, 4, eos);
        ds.val_batches(4, eos);
    }
    // KNOWN, outside this harness's files: `lift eval` generates from the
    // whole prompt, and the CPU attention (cpu::attention_forward) holds a
    // (T, T) score block per head, so a 100,000-token prompt asks for 40 GB.
    // Until eval truncates its prompts, long ones are kept out of eval here.
    let longest = loaded.examples.iter().map(|e| e.prompt().len()).max().unwrap_or(0);
    if longest > 4096 {
        return Ok(());
    }
    let mut model = Model::new(m.config.clone(), m.weights.clone());
    let o = lift::eval::EvalOptions {
        sets: vec![lift::eval::EvalSet { name: "fuzz".into(), path: path.to_path_buf() }],
        limit: Some(4),
        preds: None,
        generate: true,
        strategy: lift::decode::Strategy::Greedy,
        max_new_tokens: 3,
        batch_size: Some(2),
        max_seq_len: 256,
        skip_bad: true,
        template: lift::data::Template::Alpaca,
        rule: lift::answer::Rule::Lift,
        quiet: true,
        device: lift::options::Device::Cpu,
    };
    lift::eval::evaluate(&mut model, tok, &o)?;
    Ok(())
}
