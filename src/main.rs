//! The `lift` command line. Each subcommand is a thin layer over the library:
//! parse arguments, call into `lift::*`, print results.

use std::path::{Path, PathBuf};
use std::time::Instant;

use anyhow::{Context, Result, bail};
use clap::{Args, Parser, Subcommand};

use lift::answer::Rule;
use lift::data::Template;
use lift::decode::{DecodeOptions, Sampling, Strategy};
use lift::formats::checkpoint::{Checkpoint, DType};
use lift::model::Model;
use lift::options::{Device, TrainOptions};

#[derive(Parser)]
#[command(
    name = "lift",
    version,
    subcommand_negates_reqs = true,
    about = "LIFT fine-tuning (Low-rank Informed Sparse Fine-Tuning) of Llama-family models",
    long_about = "LIFT fine-tuning of Llama-family models: only the principal weights \
                  (the largest entries of each linear layer's rank-r approximation) are trained.\n\n\
                  Models are read from lift's own model.bin; `lift convert` makes one from a \
                  GGUF file or a Hugging Face directory."
)]
struct Cli {
    /// Worker threads for the CPU backend (default: all cores).
    #[arg(long, global = true)]
    threads: Option<usize>,
    #[command(subcommand)]
    command: Option<Command>,
    /// With no subcommand, lift trains: `lift --checkpoint M --data F` = `lift train ...`.
    #[command(flatten)]
    train: TrainArgs,
}

#[derive(Subcommand)]
enum Command {
    /// Fine-tune a model (the default command): LIFT or a baseline method.
    Train(TrainArgs),
    /// Loss and answer accuracy of a model on a data set.
    Eval(EvalArgs),
    /// Write a model.bin as a Hugging Face directory or a GGUF file.
    Export(ExportArgs),
    /// Convert a GGUF file or a Hugging Face model directory into a model.bin.
    Convert(ConvertArgs),
    /// Print the token ids of a text as a JSON array (no BOS).
    Tokenize(TokenizeArgs),
    /// Continue prompts: greedy, beam search or sampling.
    Generate(GenerateArgs),
    /// Write a randomly initialized model of a named shape (for tests and benchmarks).
    Init(lift::init::InitArgs),
    /// Time training steps of a model shape; prints one JSON object.
    Bench(lift::bench::BenchArgs),
    /// Check every CUDA kernel and a whole LIFT step against the CPU backend.
    GpuCheck(lift::cuda::check::CheckArgs),
    /// Compile every CUDA kernel with NVRTC (no GPU needed) and write the PTX.
    KernelsCheck(KernelsCheckArgs),
}

#[derive(Args)]
struct KernelsCheckArgs {
    /// Architectures to compile for.
    #[arg(long, value_delimiter = ',', default_value = "compute_80,compute_90")]
    arch: Vec<String>,
    /// Write each kernel file's PTX here (for ptxas -v).
    #[arg(long)]
    ptx_dir: Option<PathBuf>,
}

#[derive(Args, Clone)]
struct TrainArgs {
    /// The model to fine-tune (a model.bin; see `lift convert`).
    #[arg(long, required = true)]
    checkpoint: Option<PathBuf>,
    /// Training data: LLM-Adapters JSON or JSONL.
    #[arg(long, required = true)]
    data: Option<PathBuf>,
    /// Output directory: model.bin, metrics.jsonl, loss.svg, state.bin
    /// [default: the --resume directory, or out].
    #[arg(long)]
    out: Option<PathBuf>,
    #[command(flatten)]
    options: TrainOptions,
    /// Continue the run saved in this directory (its state.bin).
    #[arg(long)]
    resume: Option<PathBuf>,
    /// Where to train: cuda (an NVIDIA GPU), cpu, or auto (cuda when a GPU and
    /// the CUDA libraries are found, else cpu).
    #[arg(long, value_enum, default_value = "auto")]
    device: Device,
}

#[derive(Args)]
struct EvalArgs {
    /// A model.bin.
    #[arg(long)]
    checkpoint: PathBuf,
    /// Data sets: LLM-Adapters JSON or JSONL files, or directories of them
    /// (their test sets); each is one row of the table.
    #[arg(long, num_args = 1.., required_unless_present = "suite")]
    data: Vec<PathBuf>,
    /// A named suite of the paper: math (AddSub, AQuA, GSM8K, MultiArith,
    /// SingleEq, SVAMP, MAWPS) or commonsense (BoolQ, PIQA, SIQA, HellaSwag,
    /// WinoGrande, ARC-e, ARC-c, OBQA); missing sets are skipped with a note.
    #[arg(long, conflicts_with = "data")]
    suite: Option<String>,
    /// Where --suite looks for its sets (<dir>/math/gsm8k_test.json, ...).
    #[arg(long, default_value = "../shared/datasets")]
    suite_dir: PathBuf,
    /// Only the first N examples of each set.
    #[arg(long)]
    limit: Option<usize>,
    /// A directory for one predictions JSONL per set (<dir>/<set>.jsonl);
    /// with one set, a path ending in .jsonl is the file itself.
    #[arg(long)]
    out: Option<PathBuf>,
    /// Only the loss; no generation.
    #[arg(long)]
    no_generate: bool,
    /// Print one JSON object: the averages and totals, and "sets" with each set's results.
    #[arg(long)]
    json: bool,
    /// Generation length limit per example.
    #[arg(long, default_value_t = 256)]
    max_new_tokens: usize,
    #[command(flatten)]
    decoding: DecodeArgs,
    /// Prompts per batch (loss and generation; beams multiply the rows)
    /// [default: 16 on the CPU; on the GPU the largest that fits in its free memory].
    #[arg(long)]
    batch_size: Option<usize>,
    /// Longer examples are truncated for the loss.
    #[arg(long, default_value_t = 2048)]
    max_seq_len: usize,
    /// Prompt template: alpaca (lift's), reference (the LIFT release's
    /// evaluation prompt for generation, its training format for the loss)
    /// or plain (the instruction as it is: plain text).
    #[arg(long, value_enum, default_value_t = Template::Alpaca)]
    template: Template,
    /// How answers are read: lift's rules or the LIFT release's (see the README).
    #[arg(long, value_enum, default_value_t = Rule::Lift)]
    answer_rule: Rule,
    /// Skip examples with no usable prompt instead of stopping.
    #[arg(long)]
    skip_bad: bool,
    /// Where to run: cuda (bf16 weights, f32 accumulation), cpu, or auto
    /// (cuda when a GPU and the CUDA libraries are found, else cpu).
    #[arg(long, value_enum, default_value = "auto")]
    device: Device,
}

#[derive(Args)]
struct ExportArgs {
    /// A model.bin (e.g. out/model.bin after training).
    #[arg(long)]
    checkpoint: PathBuf,
    /// hf: config.json + model.safetensors + tokenizer.json; gguf: one llama.cpp file.
    #[arg(long, value_parser = ["hf", "gguf"])]
    format: String,
    /// Output directory (hf) or file (gguf).
    #[arg(short, long)]
    output: PathBuf,
    /// Tensor type: f32 or bf16 for hf, f32 or f16 for gguf (default: f32).
    #[arg(long, value_parser = ["f32", "bf16", "f16"])]
    dtype: Option<String>,
}

#[derive(Args)]
struct ConvertArgs {
    /// A .gguf file, or a Hugging Face directory with config.json,
    /// model.safetensors (or shards + index) and tokenizer.json.
    input: PathBuf,
    /// Where to write the model.bin.
    #[arg(short, long)]
    output: PathBuf,
    /// Storage type of the tensors in the output.
    #[arg(long, default_value = "f32", value_parser = ["f32", "bf16"])]
    dtype: String,
}

#[derive(Args)]
struct TokenizeArgs {
    /// A model.bin (its tokenizer is used).
    #[arg(long)]
    checkpoint: PathBuf,
    /// The text to tokenize.
    #[arg(long)]
    text: String,
}

#[derive(Args)]
struct GenerateArgs {
    /// A model.bin.
    #[arg(long)]
    checkpoint: PathBuf,
    /// A prompt text (encoded with BOS if the tokenizer adds one); repeat the
    /// flag to decode several prompts as one batch.
    #[arg(long, required_unless_present = "prompt_ids")]
    prompt: Vec<String>,
    /// A prompt as token ids, e.g. "1,2,3" (no BOS added); repeatable, instead of --prompt.
    #[arg(long, conflicts_with = "prompt")]
    prompt_ids: Vec<String>,
    /// How many tokens to generate at most (stops early at EOS).
    #[arg(long, default_value_t = 128)]
    max_new_tokens: usize,
    #[command(flatten)]
    decoding: DecodeArgs,
    /// Print {"ids": [...], "text": "..."} with only the new tokens (one line per prompt).
    #[arg(long)]
    json: bool,
    /// Where to run: cuda, cpu, or auto (cuda when a GPU and the CUDA libraries are found).
    #[arg(long, value_enum, default_value = "auto")]
    device: Device,
}

/// How tokens are chosen (`lift generate` and `lift eval`): greedy unless
/// --num-beams is above 1 or a sampling flag is given.
#[derive(Args, Clone)]
struct DecodeArgs {
    /// Beam search with N beams (Hugging Face generate semantics; 1 = greedy).
    #[arg(long, default_value_t = 1)]
    num_beams: usize,
    /// Beam search: finished hypotheses score sum(log p) / length^this.
    #[arg(long, default_value_t = 1.0, allow_negative_numbers = true)]
    length_penalty: f32,
    /// Sample at this temperature (0 = greedy).
    #[arg(long, allow_negative_numbers = true)]
    temperature: Option<f32>,
    /// Sample from the K most likely tokens only (temperature 1 unless given).
    #[arg(long)]
    top_k: Option<usize>,
    /// Sample from the smallest set of tokens whose probability reaches P, in (0, 1].
    #[arg(long, allow_negative_numbers = true)]
    top_p: Option<f32>,
    /// Seed of the sampling generator (the same seed gives the same text).
    #[arg(long, default_value_t = 0)]
    seed: u64,
}

impl DecodeArgs {
    fn strategy(&self) -> Result<Strategy> {
        if self.num_beams == 0 {
            bail!("--num-beams must be at least 1");
        }
        if let Some(p) = self.top_p
            && !(p > 0.0 && p <= 1.0)
        {
            bail!("--top-p must be in (0, 1], not {p}");
        }
        if self.top_k == Some(0) {
            bail!("--top-k must be at least 1");
        }
        if let Some(t) = self.temperature
            && !(t.is_finite() && t >= 0.0)
        {
            bail!("--temperature must be 0 (greedy) or positive, not {t}");
        }
        let sampling = self.temperature != Some(0.0)
            && (self.temperature.is_some() || self.top_k.is_some() || self.top_p.is_some());
        if sampling && self.num_beams > 1 {
            bail!("--num-beams cannot be combined with sampling (--temperature, --top-k, --top-p)");
        }
        Ok(if self.num_beams > 1 {
            Strategy::Beam { num_beams: self.num_beams, length_penalty: self.length_penalty }
        } else if sampling {
            Strategy::Sample(Sampling {
                temperature: self.temperature.unwrap_or(1.0),
                top_k: self.top_k.unwrap_or(0),
                top_p: self.top_p.unwrap_or(1.0),
                seed: self.seed,
            })
        } else {
            Strategy::Greedy
        })
    }
}

fn main() {
    let cli = Cli::parse();
    if let Err(e) = run(cli) {
        eprintln!("error: {}", one_line(&e));
        std::process::exit(1);
    }
}

/// Joins an error and its causes into one line, outermost first.
fn one_line(e: &anyhow::Error) -> String {
    let mut parts: Vec<String> = Vec::new();
    for cause in e.chain() {
        let s = cause.to_string();
        if !parts.iter().any(|p| p.contains(&s)) {
            parts.push(s);
        }
    }
    parts.join(": ")
}

fn run(cli: Cli) -> Result<()> {
    if let Some(n) = cli.threads {
        rayon::ThreadPoolBuilder::new().num_threads(n.max(1)).build_global()?;
    }
    match cli.command {
        None => train(cli.train),
        Some(Command::Train(a)) => train(a),
        Some(Command::Eval(a)) => eval(a),
        Some(Command::Convert(a)) => convert(a),
        Some(Command::Export(a)) => export(a),
        Some(Command::Tokenize(a)) => tokenize(a),
        Some(Command::Generate(a)) => generate(a),
        Some(Command::Init(a)) => lift::init::run(&a),
        Some(Command::Bench(a)) => lift::bench::run(&a),
        Some(Command::GpuCheck(a)) => lift::cuda::check::run(&a),
        Some(Command::KernelsCheck(a)) => {
            let archs: Vec<&'static str> = a
                .arch
                .iter()
                .map(|s| match s.as_str() {
                    "compute_80" | "sm_80" => Ok("compute_80"),
                    "compute_86" | "sm_86" => Ok("compute_86"),
                    "compute_89" | "sm_89" => Ok("compute_89"),
                    "compute_90" | "sm_90" => Ok("compute_90"),
                    "compute_100" | "sm_100" => Ok("compute_100"),
                    other => Err(anyhow::anyhow!("--arch {other}: not one of compute_80, 86, 89, 90, 100")),
                })
                .collect::<Result<_>>()?;
            lift::cuda::kernels::check(&archs, a.ptx_dir.as_deref())
        }
    }
}

fn train(a: TrainArgs) -> Result<()> {
    let (Some(checkpoint), Some(data)) = (a.checkpoint, a.data) else {
        bail!("training needs --checkpoint MODEL.bin and --data FILE.json (see lift --help)");
    };
    let o = TrainOptions {
        checkpoint,
        data,
        // A resumed run continues in its own directory unless told otherwise.
        out: a.out.or_else(|| a.resume.clone()).unwrap_or_else(|| PathBuf::from("out")),
        ..a.options
    };
    // Ctrl-C: the first asks the loop to save and stop after the current
    // step; a second one quits at once.
    ctrlc::set_handler(|| {
        if lift::train::STOP.swap(true, std::sync::atomic::Ordering::SeqCst) {
            std::process::exit(130);
        }
        eprintln!("\ninterrupt: saving the state after this step (Ctrl-C again to quit now)");
    })?;
    let s = lift::train::train(&o, a.resume.as_deref(), lift::cuda::resolve(a.device))?;
    if let (false, Some(v)) = (s.interrupted, s.final_val_loss) {
        eprintln!("done: {} steps, last train loss {:.4}, validation loss {v:.4}", s.steps, s.final_train_loss);
    }
    Ok(())
}

fn eval(a: EvalArgs) -> Result<()> {
    let strategy = a.decoding.strategy()?;
    let (sets, notes) = match &a.suite {
        Some(name) => lift::eval::suite_sets(name, &a.suite_dir)?,
        None => lift::eval::data_sets(&a.data)?,
    };
    for n in &notes {
        eprintln!("note: {n}");
    }
    let device = lift::cuda::resolve(a.device);
    if device == Device::Cuda {
        lift::cuda::gpu::probe()?;
    }
    let (ck, mut model) = load_model(&a.checkpoint)?;
    if ck.tokenizer.eos_id().is_none() {
        bail!("{}: the tokenizer has no EOS token (lift eval ends every target with it)", a.checkpoint.display());
    }
    let o = lift::eval::EvalOptions {
        sets,
        limit: a.limit,
        preds: a.out,
        generate: !a.no_generate,
        strategy,
        max_new_tokens: a.max_new_tokens,
        batch_size: a.batch_size,
        max_seq_len: a.max_seq_len,
        skip_bad: a.skip_bad,
        template: a.template,
        rule: a.answer_rule,
        quiet: a.json,
        device,
    };
    let r = lift::eval::evaluate(&mut model, &ck.tokenizer, &o)?;
    if a.json {
        println!("{}", serde_json::to_string(&r)?);
    } else {
        print!("{}", lift::eval::table(&r));
    }
    Ok(())
}

fn export(a: ExportArgs) -> Result<()> {
    lift::formats::export::check_target(&a.output, &a.format)?;
    let dtype = a.dtype.as_deref().unwrap_or("f32");
    let (ck, model) = load_model(&a.checkpoint)?;
    let t0 = Instant::now();
    match (a.format.as_str(), dtype) {
        ("hf", "f32") => lift::formats::export::export_hf(&ck, &model.weights, &a.output, DType::F32)?,
        ("hf", "bf16") => lift::formats::export::export_hf(&ck, &model.weights, &a.output, DType::Bf16)?,
        ("gguf", "f32") => lift::formats::export::export_gguf(&ck, &model.weights, &a.output, false)?,
        ("gguf", "f16") => lift::formats::export::export_gguf(&ck, &model.weights, &a.output, true)?,
        (f, d) => bail!("--format {f} does not take --dtype {d} (hf: f32, bf16; gguf: f32, f16)"),
    }
    eprintln!(
        "exported {} -> {} ({}, {dtype}, {:.1}s)",
        a.checkpoint.display(),
        a.output.display(),
        a.format,
        t0.elapsed().as_secs_f64()
    );
    Ok(())
}

fn convert(a: ConvertArgs) -> Result<()> {
    let t0 = Instant::now();
    let dtype = DType::parse(&a.dtype)?;
    let r = lift::formats::convert::convert(&a.input, &a.output, dtype)?;
    let c = &r.config;
    eprintln!(
        "converted {} ({}) -> {}: {} layers, dim {}, {} heads ({} kv), ffn {}, vocab {}, {} tensors, {:.1}M parameters, {:?}, {:.1}s",
        a.input.display(),
        r.source,
        a.output.display(),
        c.n_layers,
        c.dim,
        c.n_heads,
        c.n_kv_heads,
        c.ffn_dim,
        c.vocab_size,
        r.n_tensors,
        r.n_params as f64 / 1e6,
        dtype,
        t0.elapsed().as_secs_f64()
    );
    Ok(())
}

fn tokenize(a: TokenizeArgs) -> Result<()> {
    let ck = Checkpoint::open(&a.checkpoint)?;
    let ids = ck.tokenizer.encode(&a.text);
    println!("{}", serde_json::to_string(&ids)?);
    Ok(())
}

/// Opens a model.bin and loads its weights for the CPU.
fn load_model(path: &Path) -> Result<(Checkpoint, Model)> {
    let ck = Checkpoint::open(path)?;
    let weights = ck.load_weights()?;
    let model = Model::new(ck.config.clone(), weights);
    Ok((ck, model))
}

fn generate(a: GenerateArgs) -> Result<()> {
    let strategy = a.decoding.strategy()?;
    let device = lift::cuda::resolve(a.device);
    if device == Device::Cuda {
        lift::cuda::gpu::probe()?;
    }
    let (ck, model) = load_model(&a.checkpoint)?;
    let tok = &ck.tokenizer;
    let prompts: Vec<Vec<u32>> = if a.prompt_ids.is_empty() {
        let bos = if tok.add_bos() { tok.bos_id() } else { None };
        a.prompt.iter().map(|text| bos.into_iter().chain(tok.encode(text)).collect()).collect()
    } else {
        a.prompt_ids.iter().map(|s| parse_ids(s)).collect::<Result<_>>()?
    };
    if let Some(i) = prompts.iter().position(Vec::is_empty) {
        bail!("prompt {} is empty", i + 1);
    }
    let vocab = model.config.vocab_size;
    for p in &prompts {
        if let Some(&bad) = p.iter().find(|&&id| id as usize >= vocab) {
            bail!("token id {bad} is out of range (vocab {vocab})");
        }
        if device == Device::Cpu {
            check_memory(&model.config, p.len(), a.max_new_tokens)?;
        }
    }
    let o = DecodeOptions { strategy, max_new_tokens: a.max_new_tokens, eos: tok.eos_id() };
    let t0 = Instant::now();
    let out = match device {
        Device::Cuda => {
            let (g, _) = lift::cuda::open_with_attention(lift::cuda::gpu::Attention::Auto)?;
            lift::cuda::infer::generate(&g, &model, &prompts, &o)?
        }
        _ => lift::generate::generate(&model, &prompts, &o)?,
    };
    let secs = t0.elapsed().as_secs_f64();
    for ids in &out.ids {
        let text = tok.decode(ids)?;
        if a.json {
            println!("{}", serde_json::json!({ "ids": ids, "text": text }));
        } else {
            println!("{text}");
        }
    }
    let s = &out.stats;
    let new: usize = out.ids.iter().map(Vec::len).sum();
    eprintln!(
        "{} prompt tokens, {new} new tokens in {secs:.2}s (prefill {:.0} tokens/s, decode {:.1} steps/s)",
        s.prefill_tokens,
        s.prefill_tokens as f64 / s.prefill_s.max(1e-9),
        s.steps as f64 / s.step_s.max(1e-9),
    );
    Ok(())
}

/// `lift generate` keeps a KV cache of every position (prompt and new
/// tokens), and the CPU attention scores the prompt as one (T, T) block per
/// head and thread: refuse a prompt or a --max-new-tokens whose buffers
/// could not be allocated, rather than be killed trying.
fn check_memory(c: &lift::model::Config, prompt: usize, max_new: usize) -> Result<()> {
    const MAX_BYTES: u128 = 32 << 30;
    let positions = prompt as u128 + max_new as u128;
    let cache = positions * (2 * 4 * c.n_layers * c.kv_dim()) as u128;
    if cache > MAX_BYTES {
        bail!(
            "--max-new-tokens {max_new}: a KV cache for {positions} positions would take {} GiB (at most {} GiB)",
            cache >> 30,
            MAX_BYTES >> 30
        );
    }
    let scores = (prompt as u128).pow(2) * 4 * rayon::current_num_threads() as u128;
    if scores > MAX_BYTES {
        bail!(
            "the prompt has {prompt} tokens: its attention scores would take {} GiB (at most {} GiB)",
            scores >> 30,
            MAX_BYTES >> 30
        );
    }
    Ok(())
}

fn parse_ids(s: &str) -> Result<Vec<u32>> {
    s.trim_matches(|c| c == '[' || c == ']')
        .split(',')
        .filter(|p| !p.trim().is_empty())
        .map(|p| p.trim().parse::<u32>().with_context(|| format!("--prompt-ids: {p:?} is not a token id")))
        .collect()
}
