//! `lift export` round trips: a model written as a Hugging Face directory or
//! a GGUF file and read back by `lift convert` has the same weights, config and
//! tokenization. (That transformers loads the exports and gives the same
//! logits was checked by hand with tests/reference/check_export.py.)

mod common;

use lift::formats::checkpoint::Checkpoint;

fn round_trip(format: &str, dtype: &str, name: &str, src: &str, exact: bool) {
    let dir = common::scratch(&format!("export-{name}"));
    let bin = dir.join("a.bin");
    common::convert(&common::root().join("tests/reference").join(src), &bin);
    let out = dir.join(if format == "hf" { "hf" } else { "m.gguf" });
    let (code, _, err) = common::lift(&[
        "export",
        "--checkpoint",
        bin.to_str().unwrap(),
        "--format",
        format,
        "--dtype",
        dtype,
        "-o",
        out.to_str().unwrap(),
    ]);
    assert_eq!(code, 0, "{err}");
    let back = dir.join("b.bin");
    common::convert(&out, &back);
    let (a, b) = (Checkpoint::open(&bin).unwrap(), Checkpoint::open(&back).unwrap());
    assert_eq!(a.config, b.config, "config survives the round trip");
    let (wa, wb) = (a.load_weights().unwrap(), b.load_weights().unwrap());
    for p in lift::model::Param::all(&a.config) {
        let err = common::rel_err(wb.get(p), wa.get(p));
        // f32 is exact; bf16/f16 round each value to 8 or 11 significant bits.
        let tol = if exact { 0.0 } else { 1e-2 };
        assert!(err <= tol, "{}: rel err {err:.2e} after {format}/{dtype}", p.name());
    }
    let text = std::fs::read_to_string(common::root().join("tests/data/tokenizer_corpus.txt")).unwrap();
    assert_eq!(a.tokenizer.encode(&text), b.tokenizer.encode(&text), "tokenization survives");
    assert_eq!(
        (a.tokenizer.bos_id(), a.tokenizer.eos_id(), a.tokenizer.add_bos()),
        (b.tokenizer.bos_id(), b.tokenizer.eos_id(), b.tokenizer.add_bos())
    );
}

#[test]
fn hf_f32_round_trip() {
    round_trip("hf", "f32", "hf-f32", "tiny_gqa", true);
    round_trip("hf", "f32", "hf-f32-tied", "tiny_tied", true);
}

#[test]
fn hf_bf16_round_trip() {
    round_trip("hf", "bf16", "hf-bf16", "tiny_gqa", false);
}

#[test]
fn gguf_round_trip() {
    round_trip("gguf", "f32", "gguf-f32", "tiny_gqa", true);
    round_trip("gguf", "f32", "gguf-f32-tied", "tiny_tied", true);
    round_trip("gguf", "f16", "gguf-f16", "tiny_gqa", false);
}

/// The real SmolLM2 tokenizer (byte-level, digit split, special tokens)
/// written as tokenizer.json and read back encodes the corpus the same.
#[test]
fn smollm2_tokenizer_round_trip() {
    let Some(bin) = common::smollm2_bin() else { return };
    let tok = Checkpoint::open(&bin).unwrap().tokenizer;
    let json = tok.to_hf_json().unwrap();
    let back = lift::tokenizer::Tokenizer::from_hf_json(&json, None).unwrap();
    let text = std::fs::read_to_string(common::root().join("tests/data/tokenizer_corpus.txt")).unwrap();
    assert_eq!(tok.encode(&text), back.encode(&text));
    let ids = tok.encode(&text);
    assert_eq!(tok.decode(&ids).unwrap(), back.decode(&ids).unwrap());
}
