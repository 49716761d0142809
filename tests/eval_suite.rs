//! `lift eval` over several sets (src/eval.rs), the templates (src/data.rs)
//! and bad decoding flags, on the tiny GQA Llama of tests/reference/tiny_gqa
//! (its BPE tokenizer has <s> = BOS, </s> = EOS, BOS added):
//! - --suite finds sets in both layouts, skips missing ones with a note, and
//!   the average is the unweighted mean of the per-set results;
//! - --data takes files and directories; a set with no answers is loss only,
//!   said once; --out writes one predictions file per set;
//! - the reference template's loss equals a cross-entropy computed here from
//!   the release's strings written out by hand;
//! - unknown suites and impossible decoding flags are one-line errors.

mod common;

use std::path::{Path, PathBuf};
use std::sync::OnceLock;

use lift::data::{Example, Template, Tokenization};
use lift::formats::checkpoint::Checkpoint;
use serde_json::{Value, json};

struct Fixture {
    bin: PathBuf,
    /// A datasets root: math/AddSub_test.json, math/AQuA/test.json,
    /// math/gsm8k_test.json, extra/notes_test.json (no answers), extra/train.json.
    root: PathBuf,
}

fn arithmetic(n: usize, salt: usize) -> Vec<Value> {
    (0..n)
        .map(|i| {
            let (a, b) = (3 + (i * 7 + salt) % 19, 1 + (i * 5) % 13);
            json!({ "instruction": format!("What is {a} + {b}?"), "output": format!("{a} + {b} = {}.", a + b), "answer": (a + b).to_string() })
        })
        .collect()
}

fn write(path: &Path, v: &[Value]) {
    std::fs::create_dir_all(path.parent().unwrap()).unwrap();
    std::fs::write(path, serde_json::to_string(v).unwrap()).unwrap();
}

fn fixture() -> &'static Fixture {
    static F: OnceLock<Fixture> = OnceLock::new();
    F.get_or_init(|| {
        let dir = common::scratch("eval-suite");
        let bin = dir.join("tiny.bin");
        common::convert(&common::root().join("tests/reference/tiny_gqa"), &bin);
        let root = dir.join("datasets");
        write(&root.join("math/AddSub_test.json"), &arithmetic(6, 0));
        let letters: Vec<Value> = (0..4)
            .map(
                |i| json!({ "instruction": format!("Pick one. (A) {i} (B) {}", i + 1), "answer": (["A", "B"][i % 2]) }),
            )
            .collect();
        write(&root.join("math/AQuA/test.json"), &letters);
        let gsm: Vec<Value> = (0..5)
            .map(|i| json!({ "question": format!("{i} + 1?"), "answer": format!("{i} and one\n#### {}", i + 1) }))
            .collect();
        write(&root.join("math/gsm8k_test.json"), &gsm);
        let notes: Vec<Value> =
            (0..3).map(|i| json!({ "instruction": format!("Note {i}."), "output": "Noted." })).collect();
        write(&root.join("extra/notes_test.json"), &notes);
        write(&root.join("extra/train.json"), &arithmetic(4, 1));
        Fixture { bin, root }
    })
}

fn s(p: &Path) -> &str {
    p.to_str().unwrap()
}

fn eval(extra: &[&str]) -> (i32, String, String) {
    let f = fixture();
    let mut args = vec!["eval", "--checkpoint", s(&f.bin), "--max-new-tokens", "4", "--batch-size", "3"];
    args.extend_from_slice(extra);
    common::lift(&args)
}

fn json_of(out: &str) -> Value {
    serde_json::from_str(out.trim()).unwrap_or_else(|e| panic!("{e}: {out:?}"))
}

#[test]
fn a_suite_finds_its_sets_in_both_layouts_and_averages_them() {
    let f = fixture();
    let (code, out, err) = eval(&["--suite", "math", "--suite-dir", s(&f.root), "--json"]);
    assert_eq!(code, 0, "{err}");
    let r = json_of(&out);
    let sets = r["sets"].as_array().unwrap();
    let names: Vec<&str> = sets.iter().map(|x| x["name"].as_str().unwrap()).collect();
    assert_eq!(names, ["AddSub", "AQuA", "GSM8K"], "the suite's order, both layouts");
    for missing in ["MultiArith", "SingleEq", "SVAMP", "MAWPS"] {
        assert!(err.lines().any(|l| l.starts_with("note: ") && l.contains(missing) && l.contains("skipped")), "{err}");
    }
    // The average is the plain mean of the sets' accuracies, each n_correct / n_answered.
    let accs: Vec<f64> =
        sets.iter().map(|x| x["n_correct"].as_f64().unwrap() / x["n_answered"].as_f64().unwrap()).collect();
    let mean = accs.iter().sum::<f64>() / 3.0;
    assert!((r["accuracy"].as_f64().unwrap() - mean).abs() < 1e-12, "{} vs {mean}", r["accuracy"]);
    assert_eq!(sets.iter().map(|x| x["n_answered"].as_u64().unwrap()).collect::<Vec<_>>(), [6, 4, 5]);
    assert_eq!(r["n"].as_u64(), Some(15));
    // (AQuA's target is its answer letter, as `answer` stands in for a missing output.)
    let losses: Vec<f64> = sets.iter().map(|x| x["loss"].as_f64().unwrap()).collect();
    assert!((r["loss"].as_f64().unwrap() - losses.iter().sum::<f64>() / 3.0).abs() < 1e-6);
    for x in sets {
        assert!(x["tokens_per_s"].as_f64().unwrap() > 0.0);
        assert!(x["accuracy_by_rule"]["reference"].is_number());
    }
}

#[test]
fn the_table_has_a_row_per_set_the_average_and_a_progress_line() {
    let f = fixture();
    let (code, out, err) = eval(&["--suite", "math", "--suite-dir", s(&f.root)]);
    assert_eq!(code, 0, "{err}");
    let rows: Vec<&str> = out.lines().collect();
    assert!(rows[0].contains("examples") && rows[0].contains("accuracy") && rows[0].contains("tokens/s"), "{out}");
    for (row, name) in rows[1..].iter().zip(["AddSub", "AQuA", "GSM8K", "average"]) {
        assert!(row.starts_with(name), "{out}");
    }
    assert_eq!(rows.len(), 5, "{out}");
    assert!(err.contains("ETA"), "a progress line with an ETA: {err}");
}

#[test]
fn data_takes_files_and_directories_and_says_once_when_a_set_has_no_answers() {
    let f = fixture();
    let out_dir = common::scratch("eval-suite-out").join("preds");
    let (extra, addsub) = (f.root.join("extra"), f.root.join("math/AddSub_test.json"));
    let (code, out, err) = eval(&["--data", s(&extra), s(&addsub), "--json", "--out", s(&out_dir)]);
    assert_eq!(code, 0, "{err}");
    let r = json_of(&out);
    let sets = r["sets"].as_array().unwrap();
    let names: Vec<&str> = sets.iter().map(|x| x["name"].as_str().unwrap()).collect();
    assert_eq!(names, ["notes", "AddSub"], "a directory gives its test sets only");
    assert!(err.contains("train.json") && err.contains("skipped"), "{err}");
    assert_eq!(err.matches("loss only").count(), 1, "said once: {err}");
    assert!(sets[0]["accuracy"].is_null() && sets[0]["loss"].is_number());
    assert_eq!(r["accuracy"], sets[1]["accuracy"], "the average is over the sets with an accuracy");
    for x in sets {
        let file = out_dir.join(format!("{}.jsonl", x["name"].as_str().unwrap()));
        let text = std::fs::read_to_string(&file).unwrap();
        let lines: Vec<Value> = text.lines().map(|l| serde_json::from_str(l).unwrap()).collect();
        assert_eq!(lines.len() as u64, x["n_answered"].as_u64().unwrap(), "{}", file.display());
        let correct = lines.iter().filter(|l| l["correct"] == true).count() as u64;
        assert_eq!(correct, x["n_correct"].as_u64().unwrap());
    }
}

// ----------------------------------------------------------------------------
// Templates

/// The LIFT release's prompts, copied by hand from src/utils/data_utils.py
/// (BASE_PROMPT) and src/eval/run_math_parallel.py (i_prompt).
const RELEASE_TRAIN: &str = "<s> Below is an instruction that describes a task. Write a response that appropriately completes the request.  \n\n### Instruction:\n{instruction}\n                \n### Response:\n";
const RELEASE_EVAL: &str = "<s> Below is an instruction that describes a task. Write a response that appropriately completes the request. \n\n### Instruction:\n{instruction}\n\n### Response:\n";

fn example(instruction: &str, input: &str, output: &str) -> Example {
    Example { instruction: instruction.into(), input: input.into(), target: Some(output.into()), answer: None }
}

#[test]
fn the_reference_template_is_the_release_s_strings() {
    let e = example("Add 2 and 3.", "", "2 + 3 = 5.");
    assert_eq!(Template::Reference.train_prompt(&e), RELEASE_TRAIN.replace("{instruction}", "Add 2 and 3."));
    assert_eq!(Template::Reference.eval_prompt(&e), RELEASE_EVAL.replace("{instruction}", "Add 2 and 3."));
    // With an input, the release trains on the input in the instruction's
    // place, and evaluates on the instruction.
    let with_input = example("Add them.", "2 and 3", "5");
    assert_eq!(Template::Reference.train_prompt(&with_input), RELEASE_TRAIN.replace("{instruction}", "2 and 3"));
    assert_eq!(Template::Reference.eval_prompt(&with_input), RELEASE_EVAL.replace("{instruction}", "Add them."));
    assert_eq!(Template::Alpaca.train_prompt(&with_input), with_input.prompt());
    assert_eq!(Template::Alpaca.eval_prompt(&with_input), with_input.prompt());

    // Tokenized as the release's preprocess: prompt + output + " " + EOS text
    // as one string, the prompt's share from the prompt encoded alone.
    let bytes = |t: &str| t.bytes().map(u32::from).collect::<Vec<u32>>();
    let t = Tokenization { encode: &bytes, bos: Some(1000), eos: 1001, eos_text: "</s>".into(), max_seq_len: 4096 };
    let e = example("Add 2 and 3.", "", "2 + 3 = 5.</s>");
    let tok = Template::Reference.tokenize(&e, &t);
    let prompt = RELEASE_TRAIN.replace("{instruction}", "Add 2 and 3.");
    let mut want = vec![1000];
    want.extend(bytes(&format!("{prompt}2 + 3 = 5. </s>")));
    assert_eq!(tok.ids, want, "\"</s>\" in the output is dropped, the EOS text appended after a space");
    assert_eq!(tok.n_prompt, 1 + prompt.len());
}

/// `--template plain`: the instruction (and the input on its own line) is
/// the prompt with nothing around it; the output follows it, then the EOS.
#[test]
fn the_plain_template_adds_nothing() {
    let bytes = |t: &str| t.bytes().map(u32::from).collect::<Vec<u32>>();
    let t = Tokenization { encode: &bytes, bos: Some(1000), eos: 1001, eos_text: "</s>".into(), max_seq_len: 4096 };
    let e = example("The quick brown fox", "", " jumps over the dog.");
    assert_eq!(Template::Plain.train_prompt(&e), "The quick brown fox");
    assert_eq!(Template::Plain.eval_prompt(&e), "The quick brown fox");
    let tok = Template::Plain.tokenize(&e, &t);
    let mut want = vec![1000];
    want.extend(bytes("The quick brown fox"));
    want.extend(bytes(" jumps over the dog."));
    want.push(1001);
    assert_eq!(tok.ids, want);
    assert_eq!(tok.n_prompt, 1 + "The quick brown fox".len(), "the loss starts at the output");
    assert_eq!(Template::Plain.eval_prompt(&example("Add them.", "2 and 3", "5")), "Add them.\n2 and 3");
}

/// `lift eval --template reference --no-generate`: each set's loss is the
/// mean over its target tokens of -log p, computed here per example from the
/// release's training string and the model's logits.
#[test]
fn the_reference_template_loss_equals_an_independent_cross_entropy() {
    let f = fixture();
    let addsub = f.root.join("math/AddSub_test.json");
    let (code, out, err) = eval(&["--data", s(&addsub), "--template", "reference", "--no-generate", "--json"]);
    assert_eq!(code, 0, "{err}");
    let got = json_of(&out)["sets"][0]["loss"].as_f64().unwrap();

    let ck = Checkpoint::open(&f.bin).unwrap();
    let tok = &ck.tokenizer;
    let mut model = lift::model::Model::new(ck.config.clone(), ck.load_weights().unwrap());
    let (mut sum, mut count) = (0.0f64, 0usize);
    for e in arithmetic(6, 0) {
        let prompt = RELEASE_TRAIN.replace("{instruction}", e["instruction"].as_str().unwrap());
        let whole = format!("{prompt}{} </s>", e["output"].as_str().unwrap());
        let mut ids = vec![tok.bos_id().unwrap()];
        let n_prompt = 1 + tok.encode(&prompt).len();
        ids.extend(tok.encode(&whole));
        model.ensure_rope(ids.len());
        let mut acts = lift::model::Activations::new(&model.config, 1, ids.len());
        model.forward(&mut acts, &ids, None).unwrap();
        let v = model.config.vocab_size;
        for pos in n_prompt - 1..ids.len() - 1 {
            let row = &acts.logits[pos * v..(pos + 1) * v];
            let max = row.iter().fold(f64::NEG_INFINITY, |m, &x| m.max(x as f64));
            let lse = max + row.iter().map(|&x| (x as f64 - max).exp()).sum::<f64>().ln();
            sum += lse - row[ids[pos + 1] as usize] as f64;
            count += 1;
        }
    }
    let want = sum / count as f64;
    println!("reference-template loss {got:.6}, independent {want:.6} over {count} tokens");
    assert!((got - want).abs() < 1e-5 * want, "{got} vs {want}");
}

#[test]
fn training_takes_the_reference_template() {
    let f = fixture();
    let out = common::scratch("eval-suite-train").join("out");
    let data = f.root.join("extra/train.json");
    let args = [
        "train",
        "--checkpoint",
        s(&f.bin),
        "--data",
        s(&data),
        "--out",
        s(&out),
        "--template",
        "reference",
        "--max-steps",
        "1",
        "--val-size",
        "0",
        "--batch-size",
        "2",
        "--eval-every",
        "0",
        "--save-every",
        "0",
    ];
    let (code, _, err) = common::lift(&args);
    assert_eq!(code, 0, "{err}");
    assert!(out.join("model.bin").exists());
}

// ----------------------------------------------------------------------------
// Bad input: one line, no panic

fn fails(cmd: &str, extra: &[&str], needle: &str) {
    let f = fixture();
    let addsub = f.root.join("math/AddSub_test.json");
    let mut args = vec![cmd, "--checkpoint", s(&f.bin)];
    if cmd == "eval" {
        args.extend(["--data", s(&addsub)]);
    } else {
        args.extend(["--prompt", "Hello"]);
    }
    args.extend_from_slice(extra);
    let (code, _, err) = common::lift(&args);
    assert_ne!(code, 0, "{cmd} {extra:?} should fail: {err}");
    assert!(!err.contains("panicked"), "{err}");
    let errors: Vec<&str> = err.lines().filter(|l| l.starts_with("error")).collect();
    assert_eq!(errors.len(), 1, "one error line: {err}");
    assert!(errors[0].contains(needle), "{:?} does not mention {needle:?}", errors[0]);
}

#[test]
fn bad_decoding_flags_and_suites_are_one_line_errors() {
    for cmd in ["eval", "generate"] {
        fails(cmd, &["--num-beams", "0"], "--num-beams");
        fails(cmd, &["--top-p", "0"], "--top-p");
        fails(cmd, &["--top-p", "1.5"], "--top-p");
        fails(cmd, &["--top-p", "-0.2"], "--top-p");
        fails(cmd, &["--top-k", "0"], "--top-k");
        fails(cmd, &["--temperature", "-1"], "--temperature");
        fails(cmd, &["--num-beams", "4", "--temperature", "0.7"], "--num-beams");
    }
    let f = fixture();
    let (code, _, err) = common::lift(&["eval", "--checkpoint", s(&f.bin), "--suite", "algebra"]);
    assert_ne!(code, 0);
    assert!(
        err.trim().starts_with("error:") && err.contains("unknown suite") && err.contains("math, commonsense"),
        "{err}"
    );
    let empty = common::scratch("eval-suite-empty");
    let (code, _, err) =
        common::lift(&["eval", "--checkpoint", s(&f.bin), "--suite", "commonsense", "--suite-dir", s(&empty)]);
    assert_ne!(code, 0);
    assert!(err.lines().filter(|l| l.starts_with("error:")).count() == 1 && err.contains("--suite-dir"), "{err}");
    assert!(!err.contains("panicked"));
}
