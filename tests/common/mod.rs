//! Helpers shared by the integration tests.
#![allow(dead_code)]

use std::path::{Path, PathBuf};
use std::process::Command;

/// The repository root.
pub fn root() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR"))
}

/// A fresh scratch directory for one test.
pub fn scratch(name: &str) -> PathBuf {
    let dir = PathBuf::from(env!("CARGO_TARGET_TMPDIR")).join(name);
    let _ = std::fs::remove_dir_all(&dir);
    std::fs::create_dir_all(&dir).unwrap();
    dir
}

/// Runs the `lift` binary; returns (exit code, stdout, stderr).
pub fn lift(args: &[&str]) -> (i32, String, String) {
    let out = Command::new(env!("CARGO_BIN_EXE_lift")).args(args).output().expect("run lift");
    (
        out.status.code().unwrap_or(-1),
        String::from_utf8_lossy(&out.stdout).into_owned(),
        String::from_utf8_lossy(&out.stderr).into_owned(),
    )
}

/// Runs `lift convert input -o output` and panics with its stderr on failure.
pub fn convert(input: &Path, output: &Path) {
    let (code, _, err) = lift(&["convert", input.to_str().unwrap(), "-o", output.to_str().unwrap()]);
    assert_eq!(code, 0, "lift convert {} failed: {err}", input.display());
}

/// The SmolLM2-135M-Instruct GGUF fetched by `make model`. Tests that need it
/// call this: with LIFT_REQUIRE_MODELS=1 (as `make test` and CI set) a missing
/// model is a failure; otherwise the test says loudly that it did not run.
pub fn smollm2_gguf() -> Option<PathBuf> {
    let path = std::env::var("LIFT_SMOLLM2_GGUF")
        .map(PathBuf::from)
        .unwrap_or_else(|_| root().join("models/SmolLM2-135M-Instruct.Q4_1.gguf"));
    if path.exists() {
        return Some(path);
    }
    if std::env::var("LIFT_REQUIRE_MODELS").is_ok_and(|v| v == "1") {
        panic!("{} is missing: run `make model`", path.display());
    }
    eprintln!("NOT RUN: {} is missing (run `make model`, or `make test`)", path.display());
    None
}

/// SmolLM2 converted to model.bin once per test binary (in its scratch dir).
pub fn smollm2_bin() -> Option<PathBuf> {
    let gguf = smollm2_gguf()?;
    let out = PathBuf::from(env!("CARGO_TARGET_TMPDIR")).join("smollm2-135m-instruct.bin");
    static ONCE: std::sync::Mutex<bool> = std::sync::Mutex::new(false);
    let mut done = ONCE.lock().unwrap_or_else(|e| e.into_inner());
    if !*done || !out.exists() {
        convert(&gguf, &out);
        *done = true;
    }
    Some(out)
}

/// max |a - b| / max |b|: the error of `a` relative to the scale of the
/// reference `b`, so tensors with a few near-zero entries are judged fairly.
pub fn rel_err(a: &[f32], b: &[f32]) -> f64 {
    assert_eq!(a.len(), b.len(), "length mismatch");
    let scale = b.iter().fold(0.0f64, |m, &v| m.max((v as f64).abs())).max(1e-30);
    let diff = a.iter().zip(b).fold(0.0f64, |m, (&x, &y)| m.max((x as f64 - y as f64).abs()));
    diff / scale
}
