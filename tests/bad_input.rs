//! Bad input gets one line naming the file and the problem, and a non-zero
//! exit: never a panic, never a silent wrong result.

mod common;

use std::path::{Path, PathBuf};

/// Runs lift, expects failure with a one-line error containing every needle.
fn fails_with(args: &[&str], needles: &[&str]) {
    let (code, _out, err) = common::lift(args);
    assert_ne!(code, 0, "lift {args:?} should fail");
    assert!(!err.contains("panicked"), "lift {args:?} panicked: {err}");
    let lines: Vec<&str> = err.lines().filter(|l| !l.trim().is_empty()).collect();
    assert_eq!(lines.len(), 1, "lift {args:?}: want one line, got {err:?}");
    for n in needles {
        assert!(err.contains(n), "lift {args:?}: {err:?} does not mention {n:?}");
    }
}

fn tiny_dir() -> PathBuf {
    common::root().join("tests/reference/tiny_gqa")
}

/// A copy of the tiny HF model directory whose config.json is edited.
fn tiny_copy(name: &str, edit: impl Fn(&mut serde_json::Value)) -> PathBuf {
    let dir = common::scratch(name);
    for f in ["config.json", "model.safetensors", "tokenizer.json", "tokenizer_config.json"] {
        std::fs::copy(tiny_dir().join(f), dir.join(f)).unwrap();
    }
    let mut cfg: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(dir.join("config.json")).unwrap()).unwrap();
    edit(&mut cfg);
    std::fs::write(dir.join("config.json"), cfg.to_string()).unwrap();
    dir
}

fn s(p: &Path) -> &str {
    p.to_str().unwrap()
}

#[test]
fn missing_file() {
    let dir = common::scratch("bad-missing");
    let out = dir.join("m.bin");
    fails_with(&["convert", "/no/such/model.gguf", "-o", s(&out)], &["/no/such/model.gguf", "no such file"]);
    fails_with(&["generate", "--checkpoint", "/no/such/m.bin", "--prompt", "hi"], &["/no/such/m.bin", "cannot open"]);
    assert!(!out.exists());
}

#[test]
fn not_a_model_file() {
    let dir = common::scratch("bad-foreign");
    let txt = dir.join("notes.txt");
    std::fs::write(&txt, "just some text, not a model").unwrap();
    let out = dir.join("m.bin");
    fails_with(
        &["convert", s(&txt), "-o", s(&out)],
        &["notes.txt", "not a GGUF file or a Hugging Face model directory"],
    );
    fails_with(&["generate", "--checkpoint", s(&txt), "--prompt", "hi"], &["notes.txt", "not a lift model.bin"]);
    let st = tiny_dir().join("model.safetensors");
    fails_with(&["convert", s(&st), "-o", s(&out)], &["model.safetensors", "directory"]);
    assert!(!out.exists(), "no output is left behind");
}

#[test]
fn truncated_files() {
    let dir = common::scratch("bad-truncated");
    // model.bin cut short.
    let bin = dir.join("tiny.bin");
    common::convert(&tiny_dir(), &bin);
    let bytes = std::fs::read(&bin).unwrap();
    let cut = dir.join("cut.bin");
    std::fs::write(&cut, &bytes[..bytes.len() - 1000]).unwrap();
    fails_with(&["generate", "--checkpoint", s(&cut), "--prompt", "hi"], &["cut.bin", "truncated"]);
    std::fs::write(&cut, &bytes[..100]).unwrap();
    fails_with(&["generate", "--checkpoint", s(&cut), "--prompt", "hi"], &["cut.bin", "truncated"]);
    // GGUF cut short (exported from the tiny model).
    let gguf = dir.join("tiny.gguf");
    let (code, _, err) = common::lift(&["export", "--checkpoint", s(&bin), "--format", "gguf", "-o", s(&gguf)]);
    assert_eq!(code, 0, "{err}");
    let g = std::fs::read(&gguf).unwrap();
    let cut_gguf = dir.join("cut.gguf");
    std::fs::write(&cut_gguf, &g[..g.len() / 2]).unwrap();
    fails_with(&["convert", s(&cut_gguf), "-o", s(&dir.join("x.bin"))], &["cut.gguf"]);
    // safetensors cut short inside a HF directory.
    let hf = tiny_copy("bad-truncated-hf", |_| {});
    let st = std::fs::read(hf.join("model.safetensors")).unwrap();
    std::fs::write(hf.join("model.safetensors"), &st[..st.len() - 4096]).unwrap();
    fails_with(&["convert", s(&hf), "-o", s(&dir.join("y.bin"))], &["model.safetensors"]);
    assert!(!dir.join("x.bin").exists() && !dir.join("y.bin").exists());
}

#[test]
fn unsupported_architecture() {
    let hf = tiny_copy("bad-arch", |c| {
        c["model_type"] = "gpt2".into();
        c["architectures"] = serde_json::json!(["GPT2LMHeadModel"]);
    });
    let out = common::scratch("bad-arch-out").join("m.bin");
    fails_with(&["convert", s(&hf), "-o", s(&out)], &["config.json", "gpt2", "not supported"]);
    let hf = tiny_copy("bad-rope", |c| {
        c["rope_scaling"] = serde_json::json!({"rope_type": "yarn", "factor": 4.0});
        c["rope_parameters"] = serde_json::json!({"rope_type": "yarn", "factor": 4.0, "rope_theta": 10000.0});
    });
    fails_with(&["convert", s(&hf), "-o", s(&out)], &["config.json", "yarn"]);
}

#[test]
fn unsupported_tensor_type() {
    // Export the tiny model to GGUF, then relabel one F32 tensor as IQ4_NL
    // (type 20, 32 values in 18 bytes), a type lift does not dequantize.
    let dir = common::scratch("bad-type");
    let bin = dir.join("tiny.bin");
    common::convert(&tiny_dir(), &bin);
    let gguf = dir.join("tiny.gguf");
    let (code, _, err) = common::lift(&["export", "--checkpoint", s(&bin), "--format", "gguf", "-o", s(&gguf)]);
    assert_eq!(code, 0, "{err}");
    let mut g = std::fs::read(&gguf).unwrap();
    let name = b"blk.0.attn_q.weight";
    let at = g.windows(name.len()).position(|w| w == name).expect("tensor info");
    let type_at = at + name.len() + 4 + 2 * 8; // n_dims u32, two u64 dims, then the type
    g[type_at..type_at + 4].copy_from_slice(&20u32.to_le_bytes());
    std::fs::write(&gguf, &g).unwrap();
    fails_with(&["convert", s(&gguf), "-o", s(&dir.join("x.bin"))], &["tiny.gguf", "blk.0.attn_q.weight", "IQ4_NL"]);
}

#[test]
fn config_missing_a_field() {
    let hf = tiny_copy("bad-field", |c| {
        c.as_object_mut().unwrap().remove("hidden_size");
    });
    let out = common::scratch("bad-field-out").join("m.bin");
    fails_with(&["convert", s(&hf), "-o", s(&out)], &["config.json", "hidden_size"]);
}

#[test]
fn tensor_shape_disagrees_with_config() {
    let hf = tiny_copy("bad-shape", |c| c["intermediate_size"] = 180.into());
    let out = common::scratch("bad-shape-out").join("m.bin");
    fails_with(&["convert", s(&hf), "-o", s(&out)], &["mlp.gate_proj.weight", "[176, 64]", "[180, 64]"]);
    assert!(!out.exists());
}

#[test]
fn token_id_out_of_range() {
    let bin = common::scratch("bad-token").join("tiny.bin");
    common::convert(&tiny_dir(), &bin);
    fails_with(
        &["generate", "--checkpoint", s(&bin), "--prompt-ids", "1,2,99999"],
        &["token id 99999 is out of range", "384"],
    );
    fails_with(&["generate", "--checkpoint", s(&bin), "--prompt-ids", "1,x"], &["--prompt-ids", "\"x\""]);
}

#[test]
fn every_command_has_help() {
    for cmd in ["train", "eval", "convert", "export", "tokenize", "generate"] {
        let (code, out, _) = common::lift(&[cmd, "--help"]);
        assert_eq!(code, 0, "lift {cmd} --help");
        assert!(out.contains("Usage"), "lift {cmd} --help prints usage");
    }
    let (code, out, _) = common::lift(&["--help"]);
    assert_eq!(code, 0);
    assert!(out.contains("convert") && out.contains("--checkpoint"));
}
