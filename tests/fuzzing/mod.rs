//! The fuzz harness behind tests/fuzz.rs: seeded mutation of seed inputs
//! (mutate.rs) handed to lift's loaders (targets.rs) in worker processes
//! that a supervisor watches (this file), under an allocator with a budget
//! (alloc.rs).
//!
//! A worker runs inputs i..end of one target and prints `run i` before each;
//! a caught panic or an error message that is not one short line is printed
//! as a finding, and the worker goes on. An abort (an allocation past the
//! budget, a stack overflow) ends the worker: the supervisor records the
//! input it was on and starts a new worker after it. A worker silent for
//! `watchdog` seconds is hung: it is killed, and the input is recorded.
//! Inputs are rebuilt from (target, base seed, i), so a finding is written
//! down as its seed and edits, the regression corpus's format.

pub mod alloc;
pub mod mutate;
pub mod targets;

use std::io::{BufRead, BufReader};
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::sync::Mutex;
use std::sync::mpsc;
use std::time::{Duration, Instant};

use serde_json::{Value, json};

use mutate::{Edit, Rng};
use targets::{Target, Work};

/// The live-bytes budget of a worker: far above what any seed needs (a few
/// MB), far below what would hurt the machine.
pub const WORKER_LIMIT: usize = 1 << 30;

/// The longest error message that still reads as one line.
pub const MAX_MESSAGE: usize = 600;

/// An input that takes this long is reported as slow (not a failure: the
/// time depends on the machine), so that work out of proportion to the
/// input shows up before it is a hang.
const SLOW_MS: u128 = 1000;

pub fn root() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR"))
}

pub fn work_dir() -> PathBuf {
    PathBuf::from(env!("CARGO_TARGET_TMPDIR")).join("fuzz")
}

/// An error and its causes on one line, as `lift` prints it.
pub fn one_line(e: &anyhow::Error) -> String {
    let mut parts: Vec<String> = Vec::new();
    for cause in e.chain() {
        let s = cause.to_string();
        if !parts.iter().any(|p| p.contains(&s)) {
            parts.push(s);
        }
    }
    parts.join(": ")
}

/// Whether an error message breaks the one-short-line rule.
pub fn bad_message(msg: &str) -> bool {
    msg.contains('\n') || msg.contains('\r') || msg.len() > MAX_MESSAGE
}

fn cut(s: &str, n: usize) -> String {
    match s.char_indices().nth(n) {
        Some((i, _)) => format!("{}...", &s[..i]),
        None => s.to_string(),
    }
}

// ----------------------------------------------------------------------------
// Inputs

/// Input i of a target: (seed index, file index within the seed, edits).
pub fn input_for(t: &Target, base: u64, i: u64) -> (usize, usize, Vec<Edit>) {
    let name_hash = t.name.bytes().fold(0xcbf2_9ce4_8422_2325u64, |h, b| (h ^ b as u64).wrapping_mul(0x100_0000_01b3));
    let mut rng = Rng::new(name_hash ^ base.rotate_left(17) ^ i.wrapping_mul(0x9E37_79B9_7F4A_7C15));
    let s = rng.below(t.seeds.len());
    let f = rng.below(t.seeds[s].files.len());
    let file = &t.seeds[s].files[f];
    (s, f, mutate::random_edits(&mut rng, &file.bytes, file.layout))
}

/// Writes a seed with file `f` edited into a fresh `dir`; returns what the
/// target is handed: the file for a one-file seed, else the directory.
pub fn materialize(t: &Target, s: usize, f: usize, edits: &[Edit], dir: &Path) -> PathBuf {
    let _ = std::fs::remove_dir_all(dir);
    std::fs::create_dir_all(dir).expect("scratch directory");
    let seed = &t.seeds[s];
    for (j, file) in seed.files.iter().enumerate() {
        let bytes = if j == f { mutate::apply(&file.bytes, file.layout, edits) } else { file.bytes.clone() };
        std::fs::write(dir.join(&file.name), bytes).expect("scratch file");
    }
    if seed.files.len() == 1 { dir.join(&seed.files[0].name) } else { dir.to_path_buf() }
}

/// The corpus form of an input.
pub fn case_json(t: &Target, s: usize, f: usize, edits: &[Edit]) -> Value {
    json!({
        "target": t.name,
        "seed": t.seeds[s].name,
        "file": t.seeds[s].files[f].name,
        "edits": edits.iter().map(Edit::to_json).collect::<Vec<_>>(),
    })
}

// ----------------------------------------------------------------------------
// Running one input

static PANIC: Mutex<Option<String>> = Mutex::new(None);

/// Panics are caught and their message and place kept for the report, not printed.
pub fn quiet_panics() {
    std::panic::set_hook(Box::new(|info| {
        let msg = info
            .payload()
            .downcast_ref::<&str>()
            .map(|s| s.to_string())
            .or_else(|| info.payload().downcast_ref::<String>().cloned())
            .unwrap_or_default();
        let at = info.location().map(|l| format!("{}:{}", l.file(), l.line())).unwrap_or_default();
        *PANIC.lock().unwrap_or_else(|e| e.into_inner()) = Some(format!("{at}: {msg}"));
    }));
}

/// What one input did.
pub enum Outcome {
    Accepted,
    /// The one-line error.
    Refused(String),
    /// A panic (its place and message), or an error that is not one line.
    Finding(&'static str, String),
}

pub fn run_one(t: &Target, s: usize, w: &Work, input: &Path) -> Outcome {
    let r = std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| (t.run)(w, &t.seeds[s], input)));
    match r {
        Ok(Ok(())) => Outcome::Accepted,
        Ok(Err(e)) => {
            let msg = one_line(&e);
            if bad_message(&msg) { Outcome::Finding("message", cut(&msg, 300)) } else { Outcome::Refused(msg) }
        }
        Err(_) => {
            let msg = PANIC.lock().unwrap_or_else(|e| e.into_inner()).take().unwrap_or_default();
            Outcome::Finding("panic", cut(&msg, 300))
        }
    }
}

/// A worker: inputs start..end of `target` (or until `secs` have passed),
/// reporting on stdout for the supervisor.
pub fn worker(target: &str, base: u64, start: u64, end: u64, secs: f64) {
    quiet_panics();
    let all = targets::all(&root());
    let t = all.iter().find(|t| t.name == target).unwrap_or_else(|| panic!("no fuzz target {target}"));
    let scratch = work_dir().join(format!("{target}-{}", std::process::id()));
    let w = Work::new(scratch.clone(), root().join("tests/fuzz_corpus/seeds"));
    alloc::set_limit(WORKER_LIMIT);
    let t0 = Instant::now();
    let mut i = start;
    while i < end && t0.elapsed().as_secs_f64() < secs {
        println!("run {i}");
        let (s, f, edits) = input_for(t, base, i);
        let input = materialize(t, s, f, &edits, &scratch.join("in"));
        let t1 = Instant::now();
        if let Outcome::Finding(kind, detail) = run_one(t, s, &w, &input) {
            println!("{kind} {i} {}", detail.replace('\n', "\\n"));
        }
        let ms = t1.elapsed().as_millis();
        if ms >= SLOW_MS {
            println!("slow {i} {ms}");
        }
        i += 1;
    }
    println!("done");
    let _ = std::fs::remove_dir_all(&scratch);
}

// ----------------------------------------------------------------------------
// Supervising workers

pub struct Finding {
    pub iter: u64,
    pub kind: String,
    pub detail: String,
}

pub struct Report {
    pub target: String,
    pub runs: u64,
    pub secs: f64,
    pub findings: Vec<Finding>,
    /// (input, milliseconds) of the slow inputs.
    pub slow: Vec<(u64, u64)>,
}

/// Runs `runs` inputs of a target (or as many as `secs` allow) in workers,
/// restarting a worker after the input that killed it.
pub fn supervise(target: &str, base: u64, runs: u64, secs: f64, watchdog: Duration) -> Report {
    let t0 = Instant::now();
    let mut r = Report { target: target.to_string(), runs: 0, secs: 0.0, findings: Vec::new(), slow: Vec::new() };
    let mut next = 0u64;
    while next < runs && t0.elapsed().as_secs_f64() < secs {
        let left = secs - t0.elapsed().as_secs_f64();
        let mut cmd = Command::new(std::env::current_exe().expect("own path"));
        cmd.args(["--child", target, &base.to_string(), &next.to_string(), &runs.to_string(), &left.to_string()]);
        if let Some(x) = targets::extra() {
            cmd.arg("--extra").arg(x);
        }
        let mut child = cmd
            .env("RAYON_NUM_THREADS", "1")
            .stdin(Stdio::null())
            .stdout(Stdio::piped())
            .stderr(Stdio::null())
            .spawn()
            .expect("start a fuzz worker");
        let out = child.stdout.take().expect("piped stdout");
        let (tx, rx) = mpsc::channel();
        std::thread::spawn(move || {
            for line in BufReader::new(out).lines().map_while(Result::ok) {
                if tx.send(line).is_err() {
                    break;
                }
            }
        });
        let (mut current, mut oom, mut done, mut hung) = (None, None, false, false);
        loop {
            match rx.recv_timeout(watchdog) {
                Ok(line) => {
                    let mut parts = line.splitn(3, ' ');
                    let (word, num, rest) = (parts.next(), parts.next(), parts.next().unwrap_or(""));
                    let num = num.and_then(|n| n.parse::<u64>().ok());
                    match (word, num) {
                        (Some("run"), Some(i)) => {
                            current = Some(i);
                            r.runs += 1;
                        }
                        (Some("oom"), Some(n)) => oom = Some(n),
                        (Some("slow"), Some(i)) => r.slow.push((i, rest.parse().unwrap_or(0))),
                        (Some("done"), _) => done = true,
                        (Some(kind), Some(i)) => {
                            r.findings.push(Finding { iter: i, kind: kind.to_string(), detail: rest.to_string() })
                        }
                        _ => {}
                    }
                }
                Err(mpsc::RecvTimeoutError::Timeout) => {
                    hung = true;
                    let _ = child.kill();
                    break;
                }
                Err(mpsc::RecvTimeoutError::Disconnected) => break,
            }
        }
        let status = child.wait().expect("wait for the fuzz worker");
        if done {
            break;
        }
        let at = current.unwrap_or(next);
        let (kind, detail) = match (hung, oom) {
            (true, _) => ("hang", format!("no progress for {} s", watchdog.as_secs())),
            (false, Some(n)) => ("memory", format!("an allocation of {n} bytes past the {WORKER_LIMIT}-byte budget")),
            (false, None) => ("crash", format!("the worker died: {status}")),
        };
        r.findings.push(Finding { iter: at, kind: kind.to_string(), detail });
        next = at + 1;
    }
    r.secs = t0.elapsed().as_secs_f64();
    r
}

/// Prints a report and writes each distinct finding as a corpus-style case
/// under the work directory; returns the number of distinct findings.
pub fn print_report(t: &Target, base: u64, r: &Report) -> usize {
    let mut seen: Vec<String> = Vec::new();
    for f in &r.findings {
        // One report per place: a panic's location, or the message's shape.
        let key: String =
            format!("{} {}", f.kind, f.detail.chars().filter(|c| !c.is_ascii_digit()).take(80).collect::<String>());
        if seen.contains(&key) {
            continue;
        }
        seen.push(key);
        let (s, fi, edits) = input_for(t, base, f.iter);
        let mut case = case_json(t, s, fi, &edits);
        case["finding"] = json!(format!("{}: {}", f.kind, f.detail));
        let dir = work_dir().join("findings");
        let _ = std::fs::create_dir_all(&dir);
        let path = dir.join(format!("{}-{base}-{}.json", t.name, f.iter));
        let _ = std::fs::write(&path, serde_json::to_string_pretty(&case).unwrap_or_default());
        println!("  FINDING {} input {} ({}): {} -> {}", t.name, f.iter, f.kind, f.detail, path.display());
    }
    let mut slow = r.slow.clone();
    slow.sort_by_key(|&(_, ms)| std::cmp::Reverse(ms));
    for &(i, ms) in slow.iter().take(3) {
        let (s, fi, edits) = input_for(t, base, i);
        let case = case_json(t, s, fi, &edits);
        println!("  slow {} input {i}: {ms} ms: {}", t.name, cut(&case.to_string(), 200));
    }
    println!(
        "fuzz {:<15} {:>7} runs in {:>6.1} s ({:>6.0} runs/s), {} findings ({} distinct)",
        r.target,
        r.runs,
        r.secs,
        r.runs as f64 / r.secs.max(1e-9),
        r.findings.len(),
        seen.len()
    );
    seen.len()
}

// ----------------------------------------------------------------------------
// The regression corpus

/// One committed case: an input (seed + edits) and the error it must give,
/// with `$IN` standing for the directory the input is written to.
pub struct Case {
    pub path: PathBuf,
    pub json: Value,
}

pub fn cases() -> Vec<Case> {
    let dir = root().join("tests/fuzz_corpus/cases");
    let mut paths: Vec<PathBuf> = std::fs::read_dir(&dir)
        .map(|d| d.flatten().map(|e| e.path()).filter(|p| p.extension().is_some_and(|x| x == "json")).collect())
        .unwrap_or_default();
    paths.sort();
    paths
        .into_iter()
        .map(|p| {
            let text = std::fs::read_to_string(&p).unwrap_or_else(|e| panic!("{}: {e}", p.display()));
            let json = serde_json::from_str(&text).unwrap_or_else(|e| panic!("{}: {e}", p.display()));
            Case { path: p, json }
        })
        .collect()
}

/// Runs a case; the error it gave with the input directory written `$IN`,
/// or what went wrong instead.
pub fn run_case(all: &[Target], c: &Case, w: &Work) -> Result<String, String> {
    let j = &c.json;
    let field = |k: &str| j[k].as_str().ok_or_else(|| format!("no \"{k}\""));
    let t = all.iter().find(|t| Ok(t.name) == field("target")).ok_or("unknown target")?;
    let s = t.seeds.iter().position(|s| Ok(s.name.as_str()) == field("seed")).ok_or("unknown seed")?;
    let f = t.seeds[s].files.iter().position(|f| Ok(f.name.as_str()) == field("file")).ok_or("unknown file")?;
    let edits: Option<Vec<Edit>> = j["edits"].as_array().ok_or("no edits")?.iter().map(Edit::from_json).collect();
    let dir = w.scratch.join("in");
    let input = materialize(t, s, f, &edits.ok_or("a malformed edit")?, &dir);
    match run_one(t, s, w, &input) {
        Outcome::Accepted => Err("accepted (it must be refused)".into()),
        Outcome::Finding(kind, detail) => Err(format!("{kind}: {detail}")),
        Outcome::Refused(msg) => Ok(msg.replace(&dir.display().to_string(), "$IN")),
    }
}
