//! Faults while saving, and values that must not be trained on.
//!
//! - kill -9 at random points while state.bin and model.bin are written:
//!   120 trials of a writer process (this test binary, re-run as
//!   `writer_child`) that saves generation after generation through lift's
//!   own `state::save` and `save_weights`, killed a seeded random time (up
//!   to 30 ms) after it starts writing; afterwards the directory must hold a
//!   whole old or new file of each kind, and nothing else but the killed
//!   writer's temporary files;
//! - kill -9 of `lift train --save-every 1` (30 trials) after the progress
//!   line of a random step and up to 3 ms more: `--resume` must then
//!   continue to exactly the model an uninterrupted run gives, or, killed
//!   before its first save, refuse in one line;
//! - a full disk (RLIMIT_FSIZE, set by `ulimit -f` in a shell that execs
//!   lift) for convert, export and train, and a read-only output directory:
//!   one-line errors, the previous files intact, no temporary files left;
//! - a NaN weight in a checkpoint or in a saved state, an infinite learning
//!   rate, a loss that overflows: training stops with the step and the
//!   tensor named, and the last good state kept.
//!
//! The trials draw their kill points from a fixed seed; where exactly a
//! kill lands still depends on the machine's speed, so every outcome is
//! checked and none is required.

mod common;
#[allow(dead_code)]
#[path = "fuzzing/mutate.rs"]
mod mutate;

use std::borrow::Cow;
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::sync::OnceLock;
use std::time::Duration;

use anyhow::{Result, bail};
use lift::formats::checkpoint::{self, Checkpoint, DType};
use lift::formats::state::{self, Record, StateHeader, StateSource};
use lift::method::Trainable;
use lift::model::{Config, Param, Weights};
use lift::optim::{DenseState, SparseState};
use lift::options::{Method, TrainOptions};
use lift::tokenizer::Tokenizer;

use mutate::{Edit, Layout, Rng};

fn s(p: &Path) -> &str {
    p.to_str().expect("UTF-8 path")
}

/// The entries of a directory, sorted.
fn entries(dir: &Path) -> Vec<String> {
    let mut v: Vec<String> = std::fs::read_dir(dir)
        .map(|d| d.flatten().map(|e| e.file_name().to_string_lossy().into_owned()).collect())
        .unwrap_or_default();
    v.sort();
    v
}

fn temps(dir: &Path) -> Vec<String> {
    entries(dir).into_iter().filter(|n| n.contains(".tmp-")).collect()
}

/// The one error line of a failed run: the last line, the only one that
/// starts with "error:".
fn error_line(err: &str) -> &str {
    let errors: Vec<&str> = err.lines().filter(|l| l.starts_with("error")).collect();
    assert_eq!(errors.len(), 1, "want one error line: {err}");
    assert_eq!(err.lines().last(), Some(errors[0]), "the error is the last line: {err}");
    assert!(!err.contains("panicked"), "{err}");
    errors[0]
}

fn assert_mentions(line: &str, needles: &[&str]) {
    for n in needles {
        assert!(line.contains(n), "{line:?} does not mention {n:?}");
    }
}

// ----------------------------------------------------------------------------
// kill -9 of a writer of state.bin and model.bin

const WRITER_DIR: &str = "LIFT_FAULTS_WRITER_DIR";
const WRITER_START: &str = "LIFT_FAULTS_WRITER_START";

/// The shape the writer saves: the tiny test model's (about 1 MB a
/// generation, so that kills land inside writes, not only between them).
fn trial_config() -> Config {
    let text = std::fs::read_to_string(common::root().join("tests/reference/tiny_gqa/config.json")).expect("config");
    lift::formats::convert::hf_config(&serde_json::from_str(&text).expect("JSON")).expect("the tiny config")
}

/// Every value of generation g is g: a file that is whole says which
/// generation it is in every byte.
struct Generation<'c> {
    c: &'c Config,
    g: u64,
}

/// The mask of every matrix in the writer's states: 16 ascending entries.
const TRIAL_K: usize = 16;

impl StateSource for Generation<'_> {
    fn tensor(&self, p: Param) -> Result<Cow<'_, [f32]>> {
        Ok(Cow::Owned(vec![self.g as f32; p.shape(self.c).iter().product()]))
    }
    fn record(&self, _id: usize) -> Result<Record<'_>> {
        let g = self.g as f32;
        let s = SparseState { indices: (0..TRIAL_K as u32).collect(), m: vec![g; TRIAL_K], v: vec![g; TRIAL_K] };
        Ok(Record::Sparse(Cow::Owned(s)))
    }
    fn extra(&self, i: usize) -> Result<Cow<'_, DenseState>> {
        bail!("no extra tensor {i}")
    }
}

/// Writes generation g: state.bin, then model.bin.
fn write_generation(dir: &Path, c: &Config, tok: &Tokenizer, g: u64) {
    let o = TrainOptions::default();
    let saved = state::saved_tensors(c, Method::Lift, &[]);
    let header = StateHeader {
        step: g,
        total_steps: u64::MAX,
        mask_round: 0,
        options: o,
        tensors: saved.iter().map(|p| p.name()).collect(),
    };
    state::save(dir, c, &header, &Generation { c, g }).expect("state.bin");
    let mut w = Weights::zeros(c);
    for p in Param::all(c) {
        w.get_mut(p).fill(g as f32);
    }
    checkpoint::save_weights(&dir.join("model.bin"), c, tok, &w, DType::F32, &Default::default()).expect("model.bin");
}

/// Not a test: the writer the kill trials start and kill. Without its
/// environment variables it returns at once.
#[test]
fn writer_child() {
    let (Ok(dir), Ok(start)) = (std::env::var(WRITER_DIR), std::env::var(WRITER_START)) else { return };
    let (c, tok) = (trial_config(), Tokenizer::byte_level_standin(384).expect("tokenizer"));
    // The kill delays count from here, not from the start of the process.
    println!("ready");
    for g in start.parse::<u64>().expect("start")..u64::MAX {
        write_generation(Path::new(&dir), &c, &tok, g);
    }
}

/// Reads a child's stdout (or stderr) until a line that `stop` accepts,
/// then drains the rest in a thread, so that the child never writes to a
/// closed pipe (an error, which would end it before the kill does).
fn wait_for_line(out: impl std::io::Read + Send + 'static, stop: impl Fn(&str) -> bool) {
    use std::io::BufRead;
    let mut lines = std::io::BufReader::new(out).lines();
    for line in lines.by_ref().map_while(Result::ok) {
        if stop(&line) {
            break;
        }
    }
    std::thread::spawn(move || lines.for_each(drop));
}

/// The generation of the whole state.bin and model.bin in `dir`; panics if
/// either is torn or mixed.
fn generations(dir: &Path, c: &Config) -> (u64, u64) {
    let mut w = Weights::zeros(c);
    let saved = state::load(dir, c, &mut w).unwrap_or_else(|e| panic!("state.bin is not whole: {e:#}"));
    let g = saved.header.step;
    for p in state::saved_tensors(c, Method::Lift, &[]) {
        assert!(w.get(p).iter().all(|&x| x == g as f32), "state.bin {}: values of two generations", p.name());
    }
    let Trainable::Sparse { states } = saved.trainable else { panic!("state.bin: not a sparse state") };
    assert!(
        states.iter().all(|s| s.m.iter().chain(&s.v).all(|&x| x == g as f32)),
        "state.bin moments of two generations"
    );
    let ck = Checkpoint::open(&dir.join("model.bin")).unwrap_or_else(|e| panic!("model.bin is not whole: {e:#}"));
    let mw = ck.load_weights().unwrap_or_else(|e| panic!("model.bin is not whole: {e:#}"));
    let gm = mw.embed[0];
    for p in Param::all(c) {
        assert!(mw.get(p).iter().all(|&x| x == gm), "model.bin {}: values of two generations", p.name());
    }
    (g, gm as u64)
}

#[test]
fn kill_9_while_saving_leaves_the_old_or_the_new_file_whole() {
    const TRIALS: usize = 120;
    let dir = common::scratch("faults-kill-writer");
    let (c, tok) = (trial_config(), Tokenizer::byte_level_standin(384).expect("tokenizer"));
    write_generation(&dir, &c, &tok, 0);
    let mut rng = Rng::new(14);
    // The generations seen so far, of state.bin and of model.bin.
    let (mut last_s, mut last_m, mut mid_write, mut advanced) = (0u64, 0u64, 0, 0);
    for trial in 0..TRIALS {
        let mut child = Command::new(std::env::current_exe().expect("own path"))
            .args(["--exact", "writer_child", "--nocapture", "--test-threads", "1"])
            .env(WRITER_DIR, &dir)
            .env(WRITER_START, (last_s.max(last_m) + 1).to_string())
            .stdout(Stdio::piped())
            .stderr(Stdio::null())
            .spawn()
            .expect("start the writer");
        wait_for_line(child.stdout.take().expect("piped"), |l| l.ends_with("ready"));
        std::thread::sleep(Duration::from_micros(rng.below(30_000) as u64));
        child.kill().expect("SIGKILL");
        child.wait().expect("reap the writer");
        // Each file is whole, and the old or a newer one.
        let (gs, gm) = generations(&dir, &c);
        assert!(gs >= last_s, "trial {trial}: state.bin went back from generation {last_s} to {gs}");
        assert!(gm >= last_m, "trial {trial}: model.bin went back from generation {last_m} to {gm}");
        let left = temps(&dir);
        let pid = child.id();
        let known = |n: &String| [".state.bin", ".model.bin"].iter().any(|f| *n == format!("{f}.tmp-{pid}"));
        assert!(left.iter().all(known), "trial {trial}: unexpected files {:?}", entries(&dir));
        assert_eq!(entries(&dir).len(), 2 + left.len(), "trial {trial}: {:?}", entries(&dir));
        mid_write += usize::from(!left.is_empty());
        advanced += usize::from(gs > last_s);
        (last_s, last_m) = (gs, gm);
        // The next writer cleans up what this one left.
        checkpoint::remove_stale_temps(&dir);
        assert!(temps(&dir).is_empty(), "stale temporary files are removed: {:?}", entries(&dir));
    }
    // Where the kills land depends on the machine: reported, not asserted.
    println!(
        "{TRIALS} kills: {mid_write} inside a write (a temporary file left, then removed), {advanced} after a new \
         state.bin, last generations {last_s} and {last_m}"
    );
}

// ----------------------------------------------------------------------------
// kill -9 of lift train, then --resume

/// The micro model and data of the fuzz seeds.
fn seeds() -> PathBuf {
    common::root().join("tests/fuzz_corpus/seeds")
}

/// A LIFT run of the micro model, saving after every step.
fn micro_train_args(out: &Path, steps: u64) -> Vec<String> {
    let sd = seeds();
    let args = format!(
        "train --checkpoint {} --data {} --density 0.25 --filter-rank 2 --max-steps {steps} --batch-size 2 \
         --max-seq-len 256 --warmup 0 --val-size 2 --eval-every 0 --save-every 1 --device cpu --out {}",
        s(&sd.join("micro.bin")),
        s(&sd.join("data.json")),
        s(out)
    );
    args.split_whitespace().map(String::from).collect()
}

fn lift_cmd(args: &[String]) -> Command {
    let mut cmd = Command::new(env!("CARGO_BIN_EXE_lift"));
    cmd.args(args).stdout(Stdio::null()).stderr(Stdio::piped());
    cmd
}

fn run(args: &[String]) -> (i32, String) {
    let out = lift_cmd(args).output().expect("run lift");
    (out.status.code().unwrap_or(-1), String::from_utf8_lossy(&out.stderr).into_owned())
}

#[test]
fn kill_9_during_training_then_resume_continues_exactly_or_refuses() {
    const TRIALS: usize = 30;
    const STEPS: u64 = 6;
    let dir = common::scratch("faults-kill-train");
    let reference = dir.join("reference");
    let (code, err) = run(&micro_train_args(&reference, STEPS));
    assert_eq!(code, 0, "{err}");
    let want = std::fs::read(reference.join("model.bin")).expect("the reference model");
    let mut rng = Rng::new(9);
    let (mut refused, mut resumed) = (0, 0);
    for trial in 0..TRIALS {
        // Killed after the progress line of step k (0: at once), then a few
        // hundred microseconds more, often inside the save that follows it.
        let k = rng.below(STEPS as usize + 1) as u64;
        let out = dir.join(format!("run{trial}"));
        let mut child = lift_cmd(&micro_train_args(&out, STEPS)).spawn().expect("start lift");
        let step = format!("step {k}/");
        wait_for_line(child.stderr.take().expect("piped"), move |l| k == 0 || l.starts_with(&step));
        std::thread::sleep(Duration::from_micros(rng.below(3000) as u64));
        child.kill().expect("SIGKILL");
        child.wait().expect("reap lift");
        let mut args = micro_train_args(&out, STEPS);
        args.extend(["--resume".to_string(), s(&out).to_string()]);
        let (code, err) = run(&args);
        // After step 2 is reported, the save of step 1 is done.
        assert!(k < 2 || out.join("state.bin").exists(), "trial {trial}: no state.bin after step {k}");
        if out.join("state.bin").exists() {
            assert_eq!(code, 0, "trial {trial}: the resume fails: {err}");
            let got = std::fs::read(out.join("model.bin")).expect("the resumed model");
            assert!(got == want, "trial {trial}: the resumed run's model.bin differs from the uninterrupted one's");
            assert!(temps(&out).is_empty(), "trial {trial}: temporary files left: {:?}", entries(&out));
            resumed += 1;
        } else {
            assert_ne!(code, 0, "trial {trial}: a resume without state.bin must fail");
            assert_mentions(error_line(&err), &["state.bin", "cannot read"]);
            refused += 1;
        }
    }
    println!(
        "{TRIALS} kills of lift train: {resumed} resumed to the uninterrupted model exactly, {refused} refused (no state yet)"
    );
}

// ----------------------------------------------------------------------------
// A full disk: RLIMIT_FSIZE

/// The unit of `ulimit -f` in this system's sh, found by writing through a
/// limit of one unit (POSIX says 512 bytes; bash outside POSIX mode uses 1024).
fn ulimit_unit() -> u64 {
    static UNIT: OnceLock<u64> = OnceLock::new();
    *UNIT.get_or_init(|| {
        let dir = common::scratch("faults-ulimit");
        let probe = dir.join("probe");
        let script = format!("trap '' XFSZ; ulimit -f 1; head -c 5000 /dev/zero > {}", s(&probe));
        let _ = Command::new("sh").args(["-c", &script]).status();
        std::fs::metadata(&probe).map(|m| m.len()).unwrap_or(512).max(1)
    })
}

/// Runs lift with files limited to `bytes` (rounded down to the ulimit
/// unit); writes past it fail with EFBIG, as on a full disk.
fn run_limited(bytes: u64, args: &[String]) -> (i32, String) {
    let blocks = (bytes / ulimit_unit()).max(1);
    let script = "trap '' XFSZ; ulimit -f \"$1\"; shift; exec \"$@\"";
    let out = Command::new("sh")
        .args(["-c", script, "sh", &blocks.to_string(), env!("CARGO_BIN_EXE_lift")])
        .args(args)
        .stdout(Stdio::null())
        .output()
        .expect("run lift under ulimit");
    (out.status.code().unwrap_or(-1), String::from_utf8_lossy(&out.stderr).into_owned())
}

fn strings(args: &[&str]) -> Vec<String> {
    args.iter().map(|a| a.to_string()).collect()
}

#[test]
fn a_full_disk_gives_one_line_and_keeps_the_previous_files() {
    let dir = common::scratch("faults-full-disk");
    let tiny = common::root().join("tests/reference/tiny_gqa");

    // convert: the old model.bin stays as it was.
    let bin = dir.join("m.bin");
    common::convert(&tiny, &bin);
    let before = std::fs::read(&bin).expect("m.bin");
    let (code, err) = run_limited(64 << 10, &strings(&["convert", s(&tiny), "-o", s(&bin)]));
    assert_ne!(code, 0, "{err}");
    assert_mentions(error_line(&err), &[s(&bin), "write failed", "File too large"]);
    assert_eq!(std::fs::read(&bin).expect("m.bin"), before, "the previous model.bin is intact");
    assert_eq!(entries(&dir), ["m.bin"], "no temporary file is left");

    // export: the old GGUF stays as it was.
    let gguf = dir.join("m.gguf");
    let export = strings(&["export", "--checkpoint", s(&bin), "--format", "gguf", "-o", s(&gguf)]);
    let (code, err) = run(&export);
    assert_eq!(code, 0, "{err}");
    let gguf_before = std::fs::read(&gguf).expect("m.gguf");
    let (code, err) = run_limited(64 << 10, &export);
    assert_ne!(code, 0, "{err}");
    assert_mentions(error_line(&err), &[s(&gguf), "cannot write", "File too large"]);
    assert_eq!(std::fs::read(&gguf).expect("m.gguf"), gguf_before, "the previous GGUF is intact");
    assert_eq!(entries(&dir), ["m.bin", "m.gguf"], "no temporary file is left");

    // train: a save of state.bin that does not fit leaves the old one.
    let out = dir.join("run");
    let (code, err) = run(&micro_train_args(&out, 2));
    assert_eq!(code, 0, "{err}");
    let state_before = std::fs::read(out.join("state.bin")).expect("state.bin");
    let mut args = micro_train_args(&out, 4);
    args.extend(["--resume".to_string(), s(&out).to_string()]);
    let (code, err) = run_limited(state_before.len() as u64 / 2, &args);
    assert_ne!(code, 0, "{err}");
    assert_mentions(error_line(&err), &[s(&out.join("state.bin")), "cannot save", "File too large"]);
    assert_eq!(std::fs::read(out.join("state.bin")).expect("state.bin"), state_before, "the old state.bin is intact");
    assert!(temps(&out).is_empty(), "temporary files left: {:?}", entries(&out));
    let (code, err) = run(&args);
    assert_eq!(code, 0, "the kept state still resumes: {err}");

    // train: state.bin (9 KB) fits, model.bin (36 KB) does not.
    let out = dir.join("run2");
    let (code, err) = run_limited(20 << 10, &micro_train_args(&out, 2));
    assert_ne!(code, 0, "{err}");
    assert_mentions(error_line(&err), &[s(&out.join("model.bin")), "write failed", "File too large"]);
    assert!(!out.join("model.bin").exists() && temps(&out).is_empty(), "{:?}", entries(&out));
    let c = Checkpoint::open(&seeds().join("micro.bin")).expect("micro").config.clone();
    let mut w = Checkpoint::open(&seeds().join("micro.bin")).expect("micro").load_weights().expect("weights");
    let saved = state::load(&out, &c, &mut w).expect("the state saved before model.bin is whole");
    assert_eq!(saved.header.step, 2);
}

// ----------------------------------------------------------------------------
// A read-only output directory

/// Runs lift so that `dir` is read-only to it: with `chmod 555`, and when
/// the tests run as root (whom permissions do not stop) as user nobody.
/// None when the tests run as root but cannot switch users.
fn run_read_only(dir: &Path, args: &[String]) -> Option<(i32, String)> {
    use std::os::unix::fs::{MetadataExt, PermissionsExt};
    use std::os::unix::process::CommandExt;
    std::fs::set_permissions(dir, std::fs::Permissions::from_mode(0o555)).expect("chmod");
    let probe = dir.parent().expect("parent").join(".whoami");
    std::fs::write(&probe, b"").expect("probe");
    let root = std::fs::metadata(&probe).map(|m| m.uid() == 0).unwrap_or(false);
    let mut cmd = lift_cmd(args);
    if root {
        cmd.uid(65534).gid(65534);
    }
    let r = match cmd.output() {
        Ok(o) => Some((o.status.code().unwrap_or(-1), String::from_utf8_lossy(&o.stderr).into_owned())),
        Err(e) => {
            eprintln!("NOT RUN: cannot run lift as user nobody ({e})");
            None
        }
    };
    std::fs::set_permissions(dir, std::fs::Permissions::from_mode(0o755)).expect("chmod back");
    r
}

#[test]
fn a_read_only_directory_gives_one_line_and_keeps_the_previous_files() {
    use std::os::unix::fs::PermissionsExt;
    let dir = common::scratch("faults-read-only");
    // user nobody must be able to reach the scratch directory
    std::fs::set_permissions(&dir, std::fs::Permissions::from_mode(0o755)).expect("chmod");
    let ro = dir.join("ro");
    std::fs::create_dir(&ro).expect("ro");
    let bin = ro.join("m.bin");
    let args = strings(&["convert", s(&common::root().join("tests/reference/tiny_gqa")), "-o", s(&bin)]);
    let Some((code, err)) = run_read_only(&ro, &args) else { return };
    assert_ne!(code, 0, "{err}");
    assert_mentions(error_line(&err), &[s(&bin), "Permission denied"]);
    assert!(entries(&ro).is_empty(), "nothing is written: {:?}", entries(&ro));

    // A run directory made read-only: --resume refuses before any work.
    let out = dir.join("run");
    let (code, err) = run(&micro_train_args(&out, 2));
    assert_eq!(code, 0, "{err}");
    let before: Vec<(String, Vec<u8>)> =
        entries(&out).into_iter().map(|n| (n.clone(), std::fs::read(out.join(&n)).expect("read"))).collect();
    let mut args = micro_train_args(&out, 4);
    args.extend(["--resume".to_string(), s(&out).to_string()]);
    let Some((code, err)) = run_read_only(&out, &args) else { return };
    assert_ne!(code, 0, "{err}");
    assert_mentions(error_line(&err), &[s(&out), "not writable", "Permission denied"]);
    let after: Vec<(String, Vec<u8>)> =
        entries(&out).into_iter().map(|n| (n.clone(), std::fs::read(out.join(&n)).expect("read"))).collect();
    assert!(before == after, "the run directory is unchanged");
}

// ----------------------------------------------------------------------------
// Non-finite values

/// The micro model.bin with its header JSON edited, and `bytes` overwritten.
fn edited_micro(dir: &Path, json: &[Edit], bytes: &[Edit]) -> PathBuf {
    let seed = std::fs::read(seeds().join("micro.bin")).expect("micro.bin");
    let edits: Vec<Edit> = json.iter().chain(bytes).cloned().collect();
    let path = dir.join("model.bin");
    std::fs::write(&path, mutate::apply(&seed, Layout::ModelBin, &edits)).expect("write");
    path
}

/// The byte offset in the micro model.bin of value `i` of tensor `name`.
fn value_offset(name: &str, i: usize) -> usize {
    let ck = Checkpoint::open(&seeds().join("micro.bin")).expect("micro");
    let bytes = std::fs::read(seeds().join("micro.bin")).expect("micro");
    let hlen = u64::from_le_bytes(bytes[16..24].try_into().expect("8 bytes")) as usize;
    (24 + hlen).next_multiple_of(64) + ck.find(name).expect("tensor").offset as usize + 4 * i
}

fn with(args: Vec<String>, flag: &str, value: &str) -> Vec<String> {
    let mut a = args;
    match a.iter().position(|x| x == flag) {
        Some(i) => a[i + 1] = value.to_string(),
        None => a.extend([flag.to_string(), value.to_string()]),
    }
    a
}

#[test]
fn a_nan_weight_in_a_checkpoint_stops_before_training() {
    let dir = common::scratch("faults-nan-checkpoint");
    let at = value_offset("model.layers.1.mlp.up_proj.weight", 7);
    let bin = edited_micro(&dir, &[], &[Edit::Bytes { at, del: 4, ins: f32::NAN.to_le_bytes().to_vec() }]);
    let out = dir.join("out");
    let (code, err) = run(&with(micro_train_args(&out, 2), "--checkpoint", s(&bin)));
    assert_ne!(code, 0, "{err}");
    assert_mentions(error_line(&err), &[s(&bin), "model.layers.1.mlp.up_proj.weight", "NaN", "index 7"]);
    assert!(!out.exists(), "nothing is written");
    for cmd in [
        strings(&["eval", "--checkpoint", s(&bin), "--data", s(&seeds().join("data.json"))]),
        strings(&["generate", "--checkpoint", s(&bin), "--prompt", "hi"]),
    ] {
        let (code, err) = run(&cmd);
        assert_ne!(code, 0, "{err}");
        assert_mentions(error_line(&err), &[s(&bin), "up_proj", "NaN"]);
    }
}

#[test]
fn a_nan_in_a_saved_state_refuses_the_resume_and_keeps_the_state() {
    let dir = common::scratch("faults-nan-state");
    let out = dir.join("run");
    let (code, err) = run(&micro_train_args(&out, 2));
    assert_eq!(code, 0, "{err}");
    let path = out.join("state.bin");
    let mut b = std::fs::read(&path).expect("state.bin");
    let hlen = u64::from_le_bytes(b[8..16].try_into().expect("8 bytes")) as usize;
    // value 2 of the first saved tensor (model.layers.0.self_attn.q_proj.weight)
    b[16 + hlen + 8..16 + hlen + 12].copy_from_slice(&f32::INFINITY.to_le_bytes());
    std::fs::write(&path, &b).expect("write");
    let mut args = micro_train_args(&out, 4);
    args.extend(["--resume".to_string(), s(&out).to_string()]);
    let (code, err) = run(&args);
    assert_ne!(code, 0, "{err}");
    assert_mentions(
        error_line(&err),
        &[s(&path), "step 2", "model.layers.0.self_attn.q_proj.weight", "inf", "index 2"],
    );
    assert_eq!(std::fs::read(&path).expect("state.bin"), b, "the state is kept as it was");
}

#[test]
fn an_infinite_learning_rate_is_refused() {
    let dir = common::scratch("faults-lr");
    for lr in ["inf", "NaN", "0"] {
        let out = dir.join(format!("out-{lr}"));
        let (code, err) = run(&with(micro_train_args(&out, 2), "--lr", lr));
        assert_ne!(code, 0, "--lr {lr}: {err}");
        assert_mentions(error_line(&err), &["--lr"]);
        assert!(!out.exists());
    }
}

#[test]
fn a_loss_that_overflows_stops_with_the_step_and_keeps_the_last_good_state() {
    // Weights of 3e38 in the LM head: finite, but the logits overflow.
    let dir = common::scratch("faults-overflow");
    let ck = Checkpoint::open(&seeds().join("micro.bin")).expect("micro");
    let head = ck.find("lm_head.weight").expect("an untied head");
    let big: Vec<u8> = (0..head.nbytes / 4).flat_map(|_| 3e38f32.to_le_bytes()).collect();
    let at = value_offset("lm_head.weight", 0);
    let bin = edited_micro(&dir, &[], &[Edit::Bytes { at, del: big.len(), ins: big }]);
    let out = dir.join("out");
    let (code, err) = run(&with(with(micro_train_args(&out, 3), "--checkpoint", s(&bin)), "--val-size", "0"));
    assert_ne!(code, 0, "{err}");
    let line = error_line(&err);
    assert_mentions(line, &["at step 1", "stopped", "The last good state (step 0)", s(&out)]);
    let mut w = Checkpoint::open(&bin).expect("the edited model").load_weights().expect("finite weights");
    let saved = state::load(&out, &ck.config, &mut w).expect("the last good state is whole");
    assert_eq!(saved.header.step, 0);
    assert!(!out.join("model.bin").exists(), "no model.bin from a diverged run");
}

// ----------------------------------------------------------------------------
// One-line errors that name the file

#[test]
fn eval_without_an_eos_token_names_the_model() {
    let dir = common::scratch("faults-no-eos");
    let bin =
        edited_micro(&dir, &[Edit::Set { path: "/tokenizer/eos_id".into(), value: serde_json::Value::Null }], &[]);
    let (code, err) = run(&strings(&["eval", "--checkpoint", s(&bin), "--data", s(&seeds().join("data.json"))]));
    assert_ne!(code, 0, "{err}");
    assert_mentions(error_line(&err), &[s(&bin), "no EOS token"]);
}

#[test]
fn a_resume_with_unsorted_mask_indices_is_refused() {
    let dir = common::scratch("faults-mask");
    let run_dir = dir.join("run");
    std::fs::create_dir_all(&run_dir).expect("run dir");
    let mut b = std::fs::read(seeds().join("state_lift/state.bin")).expect("seed state");
    // The first record's first two indices, swapped (see tests/fuzz_corpus/cases/state_bin-mask-unsorted.json).
    let at = 5853;
    let (i0, i1) = (b[at..at + 4].to_vec(), b[at + 4..at + 8].to_vec());
    b[at..at + 4].copy_from_slice(&i1);
    b[at + 4..at + 8].copy_from_slice(&i0);
    std::fs::write(run_dir.join("state.bin"), &b).expect("write");
    let mut args = micro_train_args(&run_dir, 3);
    args.extend(["--resume".to_string(), s(&run_dir).to_string()]);
    let (code, err) = run(&args);
    assert_ne!(code, 0, "{err}");
    assert_mentions(error_line(&err), &["state.bin", "optimizer record 0", "q_proj", "not ascending and unique"]);
}
