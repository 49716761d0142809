//! experiments/reproduce.py and report.py (the reproduction driver): a bad
//! plan fails before anything runs, naming what is wrong; the report's
//! statistics equal ones computed here from the same runs.

use std::path::{Path, PathBuf};
use std::process::Command;

use serde_json::{Value, json};

fn root() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR"))
}

fn tmp(name: &str) -> PathBuf {
    let d = root().join("target/tmp/reproduce").join(name);
    let _ = std::fs::remove_dir_all(&d);
    std::fs::create_dir_all(&d).unwrap();
    d
}

fn python() -> String {
    std::env::var("PYTHON").unwrap_or_else(|_| "python3".into())
}

/// Runs the driver on `plan` (written to `dir`); (exit code, stderr).
fn run_plan(dir: &Path, plan: &Value) -> (i32, String) {
    let path = dir.join("plan.json");
    std::fs::write(&path, plan.to_string()).unwrap();
    let results = dir.join("results");
    let out = Command::new(python())
        .current_dir(root())
        .args(["experiments/reproduce.py", "--plan"])
        .arg(&path)
        .arg("--results")
        .arg(&results)
        .output()
        .expect("python3 runs");
    (out.status.code().unwrap_or(-1), String::from_utf8_lossy(&out.stderr).into_owned())
}

/// Runs a Python snippet that imports the driver, with `arg` as sys.argv[1];
/// the JSON it prints.
fn run_script(script: &str, arg: &Path) -> Value {
    let out = Command::new(python()).current_dir(root()).args(["-c", script]).arg(arg).output().expect("python3 runs");
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    serde_json::from_slice(&out.stdout).unwrap()
}

/// The committed quick plan, as the base of the bad ones, with every file
/// it names replaced by one that exists everywhere (Cargo.toml): each test
/// breaks one thing, and only that thing may be reported.
fn quick_plan() -> Value {
    let text = std::fs::read_to_string(root().join("experiments/plans/quick.json")).unwrap();
    let mut plan: Value = serde_json::from_str(&text).unwrap();
    plan["model"] = json!("Cargo.toml");
    plan["train_data"] = json!("Cargo.toml");
    for ev in plan["evals"].as_object_mut().unwrap().values_mut() {
        if let Some(files) = ev.get_mut("files") {
            *files = json!(["Cargo.toml"]);
        }
    }
    plan
}

#[test]
fn an_unknown_method_fails_before_any_run() {
    let dir = tmp("unknown_method");
    let mut plan = quick_plan();
    plan["methods"]["adalora"] = json!({"method": "adalora", "lr_grid": [1e-4]});
    let (code, err) = run_plan(&dir, &plan);
    assert_ne!(code, 0);
    assert!(err.contains("adalora") && err.lines().count() == 1, "one line naming the method: {err}");
    assert!(!dir.join("results/runs").exists(), "nothing ran");
}

#[test]
fn a_missing_data_set_fails_before_any_run() {
    let dir = tmp("missing_set");
    let mut plan = quick_plan();
    plan["evals"]["math"]["files"].as_array_mut().unwrap().push(json!("../shared/datasets/math/SVAMP_test.json"));
    let (code, err) = run_plan(&dir, &plan);
    assert_ne!(code, 0);
    assert!(err.contains("SVAMP_test.json") && err.contains("does not exist"), "{err}");
    assert!(!dir.join("results/runs").exists(), "nothing ran");
}

#[test]
fn a_method_without_a_grid_and_a_plan_without_base_fail() {
    let dir = tmp("no_grid");
    let mut plan = quick_plan();
    plan["methods"]["lora"].as_object_mut().unwrap().remove("lr_grid");
    let (code, err) = run_plan(&dir, &plan);
    assert!(code != 0 && err.contains("\"lora\" has no lr_grid"), "{err}");
    let mut plan = quick_plan();
    plan["methods"].as_object_mut().unwrap().remove("base");
    let (code, err) = run_plan(&dir, &plan);
    assert!(code != 0 && err.contains("base"), "{err}");
}

/// A fake finished run: only what report.py reads.
fn fake_run(results: &Path, label: &str, seed: u64, lr: f64, math: &[(&str, f64)], general_loss: f64) {
    let dir = results.join("runs").join(label).join(format!("lr{lr}-s{seed}"));
    std::fs::create_dir_all(&dir).unwrap();
    let sets: Vec<Value> = math.iter().map(|(n, a)| json!({"name": n, "accuracy": a, "loss": 1.0})).collect();
    let avg = math.iter().map(|(_, a)| a).sum::<f64>() / math.len() as f64;
    let train =
        json!({"optimizer_state_bytes": 1 << 20, "trainable_values": 1000, "wall_s": 60.0, "peak_rss_bytes": 1 << 30});
    let r = json!({
        "label": label, "method": label, "lr": lr, "seed": seed, "commit": "test",
        "lr_choice": if seed == 0 { json!({"grid": [lr], "val_loss": {format!("{lr}"): 0.5}, "chosen": lr}) } else { Value::Null },
        "train": if label == "base" { Value::Null } else { train },
        "evals": {
            "math": {"accuracy": avg, "loss": 1.0, "sets": sets},
            "general": {"accuracy": null, "loss": general_loss, "sets": [{"name": "general", "accuracy": null, "loss": general_loss}]},
        },
    });
    std::fs::write(dir.join("results.json"), r.to_string()).unwrap();
}

#[test]
fn the_report_s_mean_and_sd_are_those_of_the_seeds() {
    let dir = tmp("report");
    let plan = json!({
        "name": "test", "model": "m", "train_data": "d", "train_examples": 1, "val_examples": 1, "seeds": [0, 1, 2],
        "methods": {"base": {"method": "base"}, "lift": {"lr_grid": [1e-4]}, "full": {"lr_grid": [1e-5]}},
        "evals": {"math": {"role": "target"}, "general": {"role": "retention", "generate": false}},
    });
    std::fs::write(dir.join("plan.json"), plan.to_string()).unwrap();
    fake_run(&dir, "base", 0, 0.0, &[("A", 0.10), ("B", 0.20)], 3.0);
    let lift = [[0.30, 0.50], [0.40, 0.50], [0.20, 0.80]];
    for (seed, acc) in lift.iter().enumerate() {
        fake_run(&dir, "lift", seed as u64, 1e-4, &[("A", acc[0]), ("B", acc[1])], 3.1 + seed as f64 * 0.1);
        fake_run(&dir, "full", seed as u64, 1e-5, &[("A", 0.1), ("B", 0.1)], 3.5);
    }
    let out = Command::new(python()).current_dir(root()).arg("experiments/report.py").arg(&dir).output().unwrap();
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    let r: Value = serde_json::from_str(&std::fs::read_to_string(dir.join("results.json")).unwrap()).unwrap();

    // Sample mean and standard deviation (n - 1) of each set and of the average.
    let stat = |v: &[f64]| {
        let m = v.iter().sum::<f64>() / v.len() as f64;
        (m, (v.iter().map(|x| (x - m).powi(2)).sum::<f64>() / (v.len() - 1) as f64).sqrt())
    };
    let a: Vec<f64> = lift.iter().map(|x| x[0]).collect();
    let avg: Vec<f64> = lift.iter().map(|x| (x[0] + x[1]) / 2.0).collect();
    let m = &r["methods"]["lift"]["evals"]["math"];
    for (got, want) in [(&m["sets"]["A"]["accuracy"], stat(&a)), (&m["accuracy"], stat(&avg))] {
        assert!((got[0].as_f64().unwrap() - want.0).abs() < 1e-12, "{got} vs {want:?}");
        assert!((got[1].as_f64().unwrap() - want.1).abs() < 1e-12, "{got} vs {want:?}");
        assert_eq!(got[2], 3);
    }
    // LIFT is better than full by far more than two standard errors; full's
    // general loss rose more than LIFT's (3.5 vs 3.2 +- 0.1).
    let v = r["verdicts"].as_object().unwrap();
    let a_lines = v.iter().find(|(k, _)| k.starts_with("(a)")).unwrap().1.to_string();
    assert!(a_lines.contains("LIFT vs Full FT on math: better"), "{a_lines}");
    let b_lines = v.iter().find(|(k, _)| k.starts_with("(b)")).unwrap().1.to_string();
    assert!(b_lines.contains("general loss, LIFT vs full: better"), "{b_lines}");
    let md = std::fs::read_to_string(dir.join("results.md")).unwrap();
    assert!(md.contains("| lift | 0.0001 | 3 |"), "{md}");
    assert!(dir.join("gain_vs_retention.svg").exists() && dir.join("accuracy_per_set.svg").exists());
}

/// Extending a method's lr grid keeps its finished runs (made when the
/// digest still held the grid), trains only the new value, and a winning
/// new value supersedes the old choice; an edited training flag is still
/// refused. The driver's functions are called on fake run directories.
#[test]
fn an_extended_grid_keeps_old_runs_and_supersedes_the_old_choice() {
    let dir = tmp("extended_grid");
    let script = r#"
import json, sys
from pathlib import Path
sys.path.insert(0, "experiments")
import reproduce as R
plan = json.loads(Path("experiments/plans/cpu.json").read_text())
plan["results"] = Path(sys.argv[1])
old = [0.0001, 0.0003, 0.001]
plan["methods"]["lift"]["lr_grid"] = old
out = {}
for lr, v in zip(old, [0.83, 0.70, 0.585]):
    d = R.run_dir(plan, "lift", lr, 0)
    d.mkdir(parents=True)
    (d / "val.json").write_text(json.dumps({"loss": v}))
d1 = R.run_dir(plan, "lift", 0.001, 0)
legacy = R.protocol(plan, "lift", old)
(d1 / "results.json").write_text(json.dumps({"lr": 0.001, "seed": 0, "lr_choice": {"grid": old}, "protocol": legacy}))
out["old"] = R.chosen_lr(plan, "lift")
plan["methods"]["lift"]["lr_grid"] = old + [0.003]
out["extended"] = R.chosen_lr(plan, "lift")
d3 = R.run_dir(plan, "lift", 0.003, 0)
d3.mkdir(parents=True)
(d3 / "val.json").write_text(json.dumps({"loss": 0.55}))
out["unfinished"] = R.chosen_lr(plan, "lift")
R.supersede(plan, "lift", 0.003)
out["old_files"] = sorted(p.name for p in d1.iterdir())
(d3 / "results.json").write_text(json.dumps({"lr": 0.003, "seed": 0, "protocol": R.protocol(plan, "lift")}))
out["new"] = R.chosen_lr(plan, "lift")
plan["train_flags"] = plan["train_flags"] + ["--lr-warmup", "9"]
try:
    R.finished(plan, "lift", d3)
    out["edited"] = "accepted"
except R.PlanError:
    out["edited"] = "refused"
print(json.dumps(out))
"#;
    let got = run_script(script, &dir.join("results"));
    assert_eq!(got["old"], json!(0.001), "the old grid's choice: {got}");
    assert_eq!(got["extended"], Value::Null, "3e-3 not trained yet: no choice: {got}");
    assert_eq!(got["unfinished"], Value::Null, "3e-3 wins but has no results yet: {got}");
    assert_eq!(got["old_files"], json!(["results-superseded.json", "val.json"]), "{got}");
    assert_eq!(got["new"], json!(0.003), "{got}");
    assert_eq!(got["edited"], json!("refused"), "{got}");
}

/// A run whose summary says training finished but whose model.bin is gone
/// (a fresh clone: weights are not committed) is trained again, not
/// evaluated from a missing file; an interrupted summary is never done.
#[test]
fn a_finished_summary_without_its_weights_is_trained_again() {
    let dir = tmp("weights_gone");
    let script = r#"
import json, sys
from pathlib import Path
sys.path.insert(0, "experiments")
import reproduce as R
d = Path(sys.argv[1])
d.mkdir(parents=True, exist_ok=True)
out = {"empty": R.trained(d)}
(d / "summary.json").write_text(json.dumps({"interrupted": False}))
out["no_weights"] = R.trained(d)
(d / "model.bin").write_bytes(b"x")
out["both"] = R.trained(d)
(d / "summary.json").write_text(json.dumps({"interrupted": True}))
out["interrupted"] = R.trained(d)
print(json.dumps(out))
"#;
    let got = run_script(script, &dir.join("run"));
    assert_eq!(got, json!({"empty": false, "no_weights": false, "both": true, "interrupted": false}));
}
