//! Fuzzing lift's inputs on stable Rust (harness = false: this file's
//! `main` is the test).
//!
//! `cargo test --release --test fuzz` (part of `make test`) does, in about
//! a minute on 2 cores:
//!   1. every seed (tests/fuzz_corpus/seeds, tests/data) loads: the
//!      mutations start from valid inputs;
//!   2. every case of the regression corpus (tests/fuzz_corpus/cases) gives
//!      exactly its one-line error;
//!   3. a fixed number of seeded mutations of every target, each of which
//!      must be accepted or refused with a one-line error: a panic, an
//!      error of several lines (or of more than 600 bytes), an abort (an
//!      allocation past the 1 GiB budget, a stack overflow) or a hang (a
//!      worker silent for 60 s) fails the test, with the input written
//!      down as a corpus case under target/tmp/fuzz/findings.
//!
//! Other modes (after `--`):
//!   --long SECS [--seed N] [--target NAME]  SECS of fresh mutations per target
//!                                            (`make fuzz`), printing runs/s
//!   --bless                  rewrite each corpus case's expected error with what it gives
//!   --make-seeds             rebuild tests/fuzz_corpus/seeds (then re-bless the corpus)
//!   --save-case TARGET BASE INPUT NAME WHY   add input INPUT of a run to the corpus
//!   --child ...              a worker (started by the supervisor)

mod fuzzing;

use std::path::Path;
use std::time::Duration;

use fuzzing::targets::{self, Work};
use fuzzing::{Outcome, alloc};

#[global_allocator]
static ALLOC: alloc::Bounded = alloc::Bounded;

/// Inputs per target in the short run: about 50 s in all on 2 cores.
const SHORT_RUNS: &[(&str, u64)] = &[
    ("model_bin", 3500),
    ("gguf", 5500),
    ("safetensors", 10000),
    ("hf_dir", 1800),
    ("tokenizer_json", 900),
    ("gguf_vocab", 1500),
    ("state_bin", 5500),
    ("data", 4500),
];

/// The base seed of the short run (fixed, so every run of the suite tries
/// the same inputs).
const SHORT_SEED: u64 = 2026;

fn main() {
    let args: Vec<String> = std::env::args().skip(1).collect();
    let flag = |name: &str| args.iter().position(|a| a == name).and_then(|i| args.get(i + 1)).cloned();
    if let Some(x) = flag("--extra") {
        targets::set_extra(x.into());
    }
    if args.first().is_some_and(|a| a == "--child") {
        let num = |i: usize| args.get(i).and_then(|a| a.parse::<f64>().ok()).unwrap_or(0.0);
        let at = |i: usize| args.get(i).and_then(|a| a.parse::<u64>().ok()).unwrap_or(0);
        fuzzing::worker(&args[1], at(2), at(3), at(4), num(5));
        return;
    }
    if args.iter().any(|a| a == "--seeds-child") {
        std::process::exit(if check_seeds() == 0 { 0 } else { 1 });
    }
    if args.first().is_some_and(|a| a == "--save-case") {
        save_case(&args[1..]);
        return;
    }
    if args.iter().any(|a| a == "--make-seeds") {
        make_seeds();
        return;
    }
    if args.iter().any(|a| a == "--list") {
        println!("fuzz: test");
        return;
    }
    if filtered_out(&args) {
        return;
    }
    let bless = args.iter().any(|a| a == "--bless");
    let long = flag("--long").and_then(|s| s.parse::<f64>().ok());
    let base = flag("--seed").and_then(|s| s.parse().ok()).unwrap_or_else(clock_seed);
    if long.is_some() {
        let extra = fuzzing::work_dir().join("extra-seeds");
        targets::make_extra(&fuzzing::root(), &extra).expect("the tiny model's seeds");
        targets::set_extra(extra);
    }
    let mut failed = seeds_in_child() + check_corpus(bless);
    if bless {
        std::process::exit(0);
    }
    let only = flag("--target");
    let jobs: Vec<(String, u64, u64, f64)> = match long {
        Some(secs) => {
            println!("fuzz: {secs} s per target, base seed {base} (rerun with --seed {base}), tiny model seeds added");
            SHORT_RUNS.iter().map(|(t, _)| (t.to_string(), base, u64::MAX, secs)).collect()
        }
        None => SHORT_RUNS.iter().map(|&(t, n)| (t.to_string(), SHORT_SEED, n, f64::INFINITY)).collect(),
    };
    let jobs: Vec<_> = jobs.into_iter().filter(|j| only.as_ref().is_none_or(|o| *o == j.0)).collect();
    failed += fuzz(&jobs);
    if failed > 0 {
        println!("fuzz: FAILED ({failed} problems)");
        std::process::exit(1);
    }
    println!("fuzz: ok");
}

/// Whether `cargo test NAME` names another test: a word that is not a flag
/// or a flag's value, of which "fuzz" does not contain one.
fn filtered_out(args: &[String]) -> bool {
    const VALUED: [&str; 6] = ["--long", "--seed", "--target", "--extra", "--test-threads", "--format"];
    let mut words = Vec::new();
    let mut i = 0;
    while i < args.len() {
        if VALUED.contains(&args[i].as_str()) {
            i += 1;
        } else if !args[i].starts_with('-') {
            words.push(args[i].as_str());
        }
        i += 1;
    }
    !words.is_empty() && !words.iter().any(|w| "fuzz".contains(w))
}

fn clock_seed() -> u64 {
    std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).map_or(1, |d| d.as_secs())
}

/// Runs the jobs two at a time (one worker process each); returns the
/// number of distinct findings.
fn fuzz(jobs: &[(String, u64, u64, f64)]) -> usize {
    let all = targets::all(&fuzzing::root());
    let queue = std::sync::Mutex::new(jobs.iter());
    let findings = std::sync::atomic::AtomicUsize::new(0);
    let (mut runs, t0) = (std::sync::atomic::AtomicU64::new(0), std::time::Instant::now());
    std::thread::scope(|sc| {
        for _ in 0..2 {
            sc.spawn(|| {
                while let Some((name, base, n, secs)) = queue.lock().ok().and_then(|mut q| q.next()) {
                    let r = fuzzing::supervise(name, *base, *n, *secs, Duration::from_secs(60));
                    let t = all.iter().find(|t| t.name == name).expect("a known target");
                    findings.fetch_add(fuzzing::print_report(t, *base, &r), std::sync::atomic::Ordering::Relaxed);
                    runs.fetch_add(r.runs, std::sync::atomic::Ordering::Relaxed);
                }
            });
        }
    });
    let runs = *runs.get_mut();
    println!("fuzz: {runs} inputs in {:.1} s", t0.elapsed().as_secs_f64());
    findings.into_inner()
}

/// `check_seeds` in a process of its own, whose stderr (the progress lines
/// of the resumed training runs) is dropped: 1 if a seed is not accepted.
fn seeds_in_child() -> usize {
    let mut cmd = std::process::Command::new(std::env::current_exe().expect("own path"));
    cmd.arg("--seeds-child");
    if let Some(x) = targets::extra() {
        cmd.arg("--extra").arg(x);
    }
    let status =
        cmd.env("RAYON_NUM_THREADS", "1").stderr(std::process::Stdio::null()).status().expect("start the seed check");
    usize::from(!status.success())
}

/// Every seed, unmutated, is accepted: returns how many are not.
fn check_seeds() -> usize {
    fuzzing::quiet_panics();
    let all = targets::all(&fuzzing::root());
    let w = Work::new(fuzzing::work_dir().join("seeds-check"), fuzzing::root().join("tests/fuzz_corpus/seeds"));
    let mut bad = 0;
    for t in &all {
        for s in 0..t.seeds.len() {
            let input = fuzzing::materialize(t, s, 0, &[], &w.scratch.join("in"));
            match fuzzing::run_one(t, s, &w, &input) {
                Outcome::Accepted => {}
                Outcome::Refused(msg) | Outcome::Finding(_, msg) => {
                    println!("seed {} of {} is not accepted: {msg}", t.seeds[s].name, t.name);
                    bad += 1;
                }
            }
        }
    }
    let n = all.iter().map(|t| t.seeds.len()).sum::<usize>();
    println!("fuzz: {} of {n} seeds of {} targets load", n - bad, all.len());
    bad
}

/// Every corpus case gives its error; with `bless`, the errors are written
/// into the cases instead. Returns how many do not.
fn check_corpus(bless: bool) -> usize {
    let all = targets::all(&fuzzing::root());
    let w = Work::new(fuzzing::work_dir().join("corpus"), fuzzing::root().join("tests/fuzz_corpus/seeds"));
    alloc::set_limit(fuzzing::WORKER_LIMIT);
    let cases = fuzzing::cases();
    let mut bad = 0;
    for c in &cases {
        let want = c.json["error"].as_str().unwrap_or("");
        let name = c.path.file_name().map(|n| n.to_string_lossy().into_owned()).unwrap_or_default();
        match fuzzing::run_case(&all, c, &w) {
            Ok(got) if bless && got != want => {
                let mut j = c.json.clone();
                j["error"] = got.clone().into();
                let text = serde_json::to_string_pretty(&j).unwrap_or_default() + "\n";
                std::fs::write(&c.path, text).unwrap_or_else(|e| panic!("{}: {e}", c.path.display()));
                println!("corpus {name}: blessed: {got}");
            }
            Ok(got) if got == want => {}
            Ok(got) => {
                println!("corpus {name}: gives\n    {got}\n  instead of\n    {want}");
                bad += 1;
            }
            Err(why) => {
                println!("corpus {name}: {why}");
                bad += 1;
            }
        }
    }
    alloc::set_limit(usize::MAX);
    println!("fuzz: {} corpus cases, {} as expected", cases.len(), cases.len() - bad);
    bad
}

/// `--save-case TARGET BASE INPUT NAME WHY`: input INPUT of a fuzz run as
/// tests/fuzz_corpus/cases/NAME.json (its error is filled in by --bless).
fn save_case(a: &[String]) {
    let [target, base, input, name, why] = a else {
        panic!("--save-case TARGET BASE INPUT NAME WHY");
    };
    let all = targets::all(&fuzzing::root());
    let t = all.iter().find(|t| t.name == target).expect("a known target");
    let (s, f, edits) = fuzzing::input_for(t, base.parse().expect("BASE"), input.parse().expect("INPUT"));
    let mut case = fuzzing::case_json(t, s, f, &edits);
    case["why"] = why.as_str().into();
    case["error"] = "".into();
    let path = fuzzing::root().join("tests/fuzz_corpus/cases").join(format!("{name}.json"));
    std::fs::create_dir_all(path.parent().expect("cases dir")).expect("cases dir");
    std::fs::write(&path, serde_json::to_string_pretty(&case).expect("json") + "\n").expect("write the case");
    println!("wrote {}", path.display());
}

// ----------------------------------------------------------------------------
// The seeds

/// seeds/hf_sharded: the micro Hugging Face directory with its tensors in
/// two shards and model.safetensors.index.json naming them.
fn write_shards(seeds: &Path) {
    use lift::formats::safetensors::{SafeTensors, TensorData, write_safetensors};
    let dir = seeds.join("hf_sharded");
    std::fs::create_dir_all(&dir).expect("hf_sharded");
    for f in ["config.json", "tokenizer.json"] {
        std::fs::copy(seeds.join("hf").join(f), dir.join(f)).expect("copy");
    }
    let st = SafeTensors::open(&seeds.join("hf/model.safetensors")).expect("micro safetensors");
    let all: Vec<(String, Vec<usize>, Vec<f32>)> = st
        .tensors()
        .iter()
        .map(|t| (t.name.clone(), t.shape.clone(), st.tensor_f32(&t.name).expect("values")))
        .collect();
    let mut map = serde_json::Map::new();
    for (i, part) in all.chunks(all.len().div_ceil(2)).enumerate() {
        let name = format!("model-0000{}-of-00002.safetensors", i + 1);
        let tensors: Vec<(&str, &[usize], TensorData)> =
            part.iter().map(|(n, s, v)| (n.as_str(), s.as_slice(), TensorData::F32(v))).collect();
        write_safetensors(&dir.join(&name), &tensors, None).expect("shard");
        for (n, _, _) in part {
            map.insert(n.clone(), name.clone().into());
        }
    }
    let index = serde_json::json!({"metadata": {}, "weight_map": map});
    std::fs::write(dir.join("model.safetensors.index.json"), index.to_string()).expect("index");
}

/// Rebuilds tests/fuzz_corpus/seeds: a micro Llama (dim 8, 2 layers, GQA,
/// llama3 RoPE scaling, untied head) with the tiny test model's tokenizer,
/// as model.bin, GGUF and a Hugging Face directory; small data files; and
/// the state.bin of a 2-step run of LIFT, full (with norms) and LoRA.
fn make_seeds() {
    use lift::formats::checkpoint::{self, Checkpoint, DType};
    use lift::formats::export;
    use lift::model::{Config, RopeScaling};
    use lift::options::{Device, Method};
    let root = fuzzing::root();
    // Relative paths: they end up in state.bin headers.
    std::env::set_current_dir(&root).expect("cd to the repository");
    let seeds = Path::new("tests/fuzz_corpus/seeds");
    let _ = std::fs::remove_dir_all(seeds);
    std::fs::create_dir_all(seeds.join("hf")).expect("seeds directory");
    let tiny = Path::new("tests/reference/tiny_gqa");
    let read = |p: &Path| std::fs::read_to_string(p).unwrap_or_else(|e| panic!("{}: {e}", p.display()));
    let tok = lift::tokenizer::Tokenizer::from_hf_json(
        &read(&tiny.join("tokenizer.json")),
        Some(&read(&tiny.join("tokenizer_config.json"))),
    )
    .expect("the tiny tokenizer");
    let scaling =
        RopeScaling { factor: 8.0, low_freq_factor: 1.0, high_freq_factor: 4.0, original_max_position_embeddings: 16 };
    let c = Config {
        vocab_size: 384,
        dim: 8,
        n_layers: 2,
        n_heads: 2,
        n_kv_heads: 1,
        head_dim: 4,
        ffn_dim: 16,
        norm_eps: 1e-5,
        rope_theta: 10000.0,
        rope_scaling: Some(scaling),
        tied_embeddings: false,
        max_seq_len: 128,
    };
    let w = lift::init::random_weights(&c, 1);
    let meta = [("source".to_string(), "fuzz seed".to_string())].into_iter().collect();
    checkpoint::save_weights(&seeds.join("micro.bin"), &c, &tok, &w, DType::F32, &meta).expect("micro.bin");
    let ck = Checkpoint::open(&seeds.join("micro.bin")).expect("micro.bin loads");
    export::export_gguf(&ck, &w, &seeds.join("micro.gguf"), true).expect("micro.gguf");
    export::export_hf(&ck, &w, &seeds.join("hf"), DType::Bf16).expect("hf");
    let _ = std::fs::remove_file(seeds.join("hf/generation_config.json"));
    write_shards(seeds);
    let examples: Vec<serde_json::Value> = (0..8)
        .map(|i| serde_json::json!({"instruction": format!("What is {i} + {}?", i * 3), "output": format!("{i} + {} = {}. The answer is {}.", i * 3, i * 4, i * 4), "answer": (i * 4).to_string()}))
        .collect();
    std::fs::write(seeds.join("data.json"), serde_json::to_string_pretty(&examples).expect("json")).expect("data.json");
    let jsonl: String = (0..6)
        .map(|i| {
            let e = serde_json::json!({"question": format!("Add {i} and {i}."), "input": "Show the sum.", "answer": format!("{i} plus {i} is {}.\n#### {}", 2 * i, 2 * i)});
            format!("{e}\n")
        })
        .collect();
    std::fs::write(seeds.join("data.jsonl"), jsonl).expect("data.jsonl");
    for (kind, name) in [(Method::Lift, "state_lift"), (Method::Full, "state_full"), (Method::Lora, "state_lora")] {
        let out = seeds.join(name);
        let o = targets::micro_options(&seeds.join("micro.bin"), &seeds.join("data.json"), kind, out.clone());
        lift::train::train(&o, None, Device::Cpu).unwrap_or_else(|e| panic!("{name}: {e:#}"));
        for f in std::fs::read_dir(&out).expect("run directory").flatten() {
            if f.file_name() != "state.bin" {
                let _ = std::fs::remove_file(f.path());
            }
        }
    }
    println!("seeds written to {}", root.join(seeds).display());
}
