//! lift's tokenizer against Hugging Face `tokenizers`, the reference it reproduces.
//!
//! The fixtures in tests/data/tokenizer were made by the real library
//! (tests/make_tokenizer_fixtures.py, run by hand): four small tokenizers, one per
//! family lift supports, two variants of them (GPT-2's prefix space, SentencePiece
//! spaces done by the Metaspace pre-tokenizer), two vocabularies stored as a GGUF file would store them,
//! and expected.json with the ids each gives for every input string and the text
//! decoding those ids gives back. A test here passes only if lift produces
//! exactly the same ids and the same text.

use std::fs;
use std::path::PathBuf;

use lift::tokenizer::Tokenizer;
use serde_json::Value;

fn data_dir() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("tests/data/tokenizer")
}

fn read(path: PathBuf) -> String {
    fs::read_to_string(&path).unwrap_or_else(|e| panic!("{}: {e}", path.display()))
}

fn expected() -> Value {
    serde_json::from_str(&read(data_dir().join("expected.json"))).expect("expected.json parses")
}

/// A fixture tokenizer.json.
fn hf_fixture(name: &str) -> Tokenizer {
    let json = read(data_dir().join(name).join("tokenizer.json"));
    Tokenizer::from_hf_json(&json, None).unwrap_or_else(|e| panic!("{name}: {e:#}"))
}

/// A vocabulary as the GGUF metadata stores it, as JSON with the argument names
/// of `from_gguf_vocab`.
fn gguf_from_json(v: &Value) -> Tokenizer {
    let strings = |key: &str| -> Vec<String> {
        v[key].as_array().unwrap().iter().map(|s| s.as_str().unwrap().to_string()).collect()
    };
    let id = |key: &str| v[key].as_u64().map(|x| x as u32);
    Tokenizer::from_gguf_vocab(
        v["model"].as_str().unwrap(),
        v["pre"].as_str().unwrap(),
        strings("tokens"),
        v["token_types"].as_array().unwrap().iter().map(|t| t.as_i64().unwrap() as i32).collect(),
        strings("merges"),
        v["scores"].as_array().unwrap().iter().map(|s| s.as_f64().unwrap() as f32).collect(),
        id("bos_id"),
        id("eos_id"),
        v["add_bos"].as_bool().unwrap(),
    )
    .unwrap_or_else(|e| panic!("from_gguf_vocab: {e:#}"))
}

fn gguf_fixture(name: &str) -> Tokenizer {
    let v: Value = serde_json::from_str(&read(data_dir().join(name).join("vocab.json"))).unwrap();
    gguf_from_json(&v)
}

fn inputs(expected: &Value) -> Vec<String> {
    let list = expected["inputs"].as_array().expect("inputs");
    list.iter().map(|s| s.as_str().unwrap().to_string()).collect()
}

fn short(s: &str) -> String {
    let mut t: String = s.chars().take(80).collect();
    if t.len() < s.len() {
        t.push('…');
    }
    format!("{t:?}")
}

/// Where two id lists part, with the tokens around that place spelled out.
fn diff(tok: &Tokenizer, input: &str, want: &[u32], got: &[u32]) -> String {
    let pos = want.iter().zip(got).position(|(a, b)| a != b).unwrap_or(want.len().min(got.len()));
    let around = |ids: &[u32]| {
        let lo = pos.saturating_sub(3);
        let hi = (pos + 5).min(ids.len());
        let shown: Vec<String> = ids[lo.min(hi)..hi]
            .iter()
            .map(|&id| format!("{id}:{:?}", tok.token_str(id).unwrap_or("<out of range>")))
            .collect();
        format!("[{lo}..] {}", shown.join(" "))
    };
    format!(
        "input {}\n    ids differ at position {pos} (want {} tokens, got {})\n    want {}\n    got  {}",
        short(input),
        want.len(),
        got.len(),
        around(want),
        around(got)
    )
}

/// Encode and decode every input; compare with the reference ids and text.
/// Returns the number of inputs compared; panics listing the first mismatches.
fn check_against(name: &str, tok: &Tokenizer, strings: &[String], reference: &Value) -> usize {
    let ids = reference["ids"].as_array().expect("ids");
    let decoded = reference["decoded"].as_array().expect("decoded");
    assert_eq!(ids.len(), strings.len(), "{name}: reference and inputs differ in length");
    let mut failures = Vec::new();
    for (i, input) in strings.iter().enumerate() {
        let want: Vec<u32> = ids[i].as_array().unwrap().iter().map(|x| x.as_u64().unwrap() as u32).collect();
        let got = tok.encode(input);
        if got != want {
            failures.push(format!("encode {}", diff(tok, input, &want, &got)));
        }
        let want_text = decoded[i].as_str().unwrap();
        match tok.decode(&want) {
            Ok(text) if text == want_text => {}
            Ok(text) => failures.push(format!(
                "decode of the ids of input {}\n    want {}\n    got  {}",
                short(input),
                short(want_text),
                short(&text)
            )),
            Err(e) => failures.push(format!("decode of the ids of input {}: {e}", short(input))),
        }
    }
    if !failures.is_empty() {
        let shown: Vec<&String> = failures.iter().take(8).collect();
        panic!(
            "{name}: {} of {} checks differ from Hugging Face tokenizers:\n  {}",
            failures.len(),
            2 * strings.len(),
            shown.iter().map(|s| s.as_str()).collect::<Vec<_>>().join("\n  ")
        );
    }
    println!("{name}: {} inputs encode and decode as Hugging Face tokenizers does", strings.len());
    strings.len()
}

fn check_fixture(name: &str, tok: &Tokenizer) {
    let e = expected();
    check_against(name, tok, &inputs(&e), &e["tokenizers"][name]);
}

#[test]
fn gpt2_byte_level_matches_hf() {
    check_fixture("gpt2", &hf_fixture("gpt2"));
}

#[test]
fn llama3_split_regex_and_ignore_merges_match_hf() {
    check_fixture("llama3", &hf_fixture("llama3"));
}

#[test]
fn smollm_isolated_digits_match_hf() {
    check_fixture("smollm", &hf_fixture("smollm"));
}

#[test]
fn sentencepiece_byte_fallback_matches_hf() {
    check_fixture("sentencepiece", &hf_fixture("sentencepiece"));
}

/// GPT-2 with `add_prefix_space`: a space in front of every stretch of text.
#[test]
fn byte_level_prefix_space_matches_hf() {
    check_fixture("gpt2_prefix", &hf_fixture("gpt2_prefix"));
}

/// The Metaspace pre-tokenizer (split at every `▁`) and Metaspace decoder.
#[test]
fn metaspace_pre_tokenizer_and_decoder_match_hf() {
    check_fixture("metaspace", &hf_fixture("metaspace"));
}

/// A byte-level vocabulary from GGUF metadata (pre "llama-bpe"), against
/// transformers' own GGUF tokenizer import.
#[test]
fn gguf_byte_level_vocab_matches_transformers() {
    check_fixture("llama3_gguf", &gguf_fixture("llama3_gguf"));
}

/// A SentencePiece vocabulary from GGUF metadata with scores and no merges: the
/// merges are rebuilt from the scores, as transformers does.
#[test]
fn gguf_sentencepiece_vocab_without_merges_matches_transformers() {
    check_fixture("sentencepiece_gguf", &gguf_fixture("sentencepiece_gguf"));
}

/// Byte-level BPE loses nothing: decoding the ids gives the text back exactly
/// (except around added tokens that swallow whitespace, `<mask>` and `<eot>`).
#[test]
fn byte_level_round_trips_every_input() {
    let e = expected();
    for name in ["gpt2", "llama3", "smollm"] {
        let tok = hf_fixture(name);
        for s in inputs(&e).into_iter().filter(|s| !s.contains("<mask>") && !s.contains("<eot>")) {
            assert_eq!(tok.decode(&tok.encode(&s)).unwrap(), s, "{name}: round trip of {}", short(&s));
        }
    }
}

/// SentencePiece with byte fallback loses nothing either, on text that does not
/// start with a space (the decoder strips the one `▁` encoding put in front).
#[test]
fn sentencepiece_round_trips_text_not_starting_with_space() {
    let tok = hf_fixture("sentencepiece");
    for s in ["Hello, world!", "中文测试 😀 Ångström\n\ttabs  two", "x<s>y"] {
        assert_eq!(tok.decode(&tok.encode(s)).unwrap().replace("<s> ", "<s>"), s);
    }
}

#[test]
fn special_tokens_are_matched_whole() {
    let tok = hf_fixture("smollm");
    let ids = tok.encode("<|im_start|>user\nhi<|im_end|>");
    assert_eq!(ids.first(), Some(&1));
    assert_eq!(ids.last(), Some(&2));
    assert_eq!(tok.token_str(1), Some("<|im_start|>"));
}

#[test]
fn out_of_range_id_is_an_error() {
    let tok = hf_fixture("gpt2");
    let n = tok.vocab_size();
    let err = tok.decode(&[5, 70000]).unwrap_err().to_string();
    assert_eq!(err, format!("token id 70000 is out of range (vocab {n})"));
    assert!(tok.decode_token_bytes(n as u32).is_err());
}

#[test]
fn decode_token_bytes_spells_bytes() {
    let tok = hf_fixture("gpt2");
    let ids = tok.encode(" é\n");
    let bytes: Vec<u8> = ids.iter().flat_map(|&id| tok.decode_token_bytes(id).unwrap()).collect();
    assert_eq!(bytes, " é\n".as_bytes());
    let sp = hf_fixture("sentencepiece");
    let ids = sp.encode("a 中");
    let bytes: Vec<u8> = ids.iter().flat_map(|&id| sp.decode_token_bytes(id).unwrap()).collect();
    assert_eq!(bytes, " a 中".as_bytes());
}

/// model.bin stores the tokenizer as JSON; what comes back must encode the same.
#[test]
fn serde_round_trip_keeps_encodings() {
    let e = expected();
    for name in ["gpt2", "llama3", "smollm", "sentencepiece"] {
        let tok = hf_fixture(name);
        let json = serde_json::to_string(&tok).unwrap();
        let back: Tokenizer = serde_json::from_str(&json).unwrap();
        assert_eq!(back.vocab_size(), tok.vocab_size());
        for s in inputs(&e) {
            assert_eq!(back.encode(&s), tok.encode(&s), "{name}: {}", short(&s));
        }
    }
    let tok = gguf_fixture("sentencepiece_gguf");
    let back: Tokenizer = serde_json::from_str(&serde_json::to_string(&tok).unwrap()).unwrap();
    assert_eq!(back.encode(" Hello <s>world"), tok.encode(" Hello <s>world"));
    assert_eq!((back.bos_id(), back.eos_id(), back.add_bos()), (tok.bos_id(), tok.eos_id(), tok.add_bos()));
}

#[test]
fn tokenizer_config_decides_bos() {
    let json = read(data_dir().join("sentencepiece/tokenizer.json"));
    let config = r#"{"add_bos_token": true, "bos_token": "<s>", "eos_token": {"content": "</s>"}}"#;
    let tok = Tokenizer::from_hf_json(&json, Some(config)).unwrap();
    assert_eq!((tok.bos_id(), tok.eos_id(), tok.add_bos()), (Some(1), Some(2), true));
    let tok = Tokenizer::from_hf_json(&json, None).unwrap();
    assert!(!tok.add_bos());
    let err = Tokenizer::from_hf_json(&json, Some(r#"{"bos_token": "<nope>"}"#)).unwrap_err();
    assert!(err.to_string().contains("<nope>"), "{err}");
}

#[test]
fn malformed_input_is_an_error_not_a_panic() {
    let bad = [
        "",
        "{",
        "[]",
        r#"{"model": {"type": "Unigram", "vocab": []}}"#,
        r#"{"model": {"type": "BPE", "vocab": {"a": 0}, "merges": ["a b"]}, "decoder": {"type": "ByteLevel"}}"#,
        r#"{"model": {"type": "BPE", "vocab": {"a": "x"}}}"#,
        r#"{"model": {"type": "BPE", "vocab": {"a": 0}}, "pre_tokenizer": {"type": "Split", "pattern": {"Regex": "("}, "behavior": "Isolated"}, "decoder": {"type": "Fuse"}}"#,
        r#"{"model": {"type": "BPE", "vocab": {"a": 0}}, "normalizer": {"type": "NFKC"}, "decoder": {"type": "Fuse"}}"#,
    ];
    for json in bad {
        let err = Tokenizer::from_hf_json(json, None);
        assert!(err.is_err(), "accepted {json}");
        let msg = err.unwrap_err().to_string();
        println!("{msg}");
        assert!(!msg.contains('\n'), "error is not one line: {msg}");
    }
    let tokens = vec!["a".to_string()];
    assert!(
        Tokenizer::from_gguf_vocab("t5", "default", tokens.clone(), vec![1], vec![], vec![0.0], None, None, false)
            .is_err()
    );
    assert!(
        Tokenizer::from_gguf_vocab("gpt2", "default", tokens.clone(), vec![1], vec![], vec![], None, None, false)
            .is_err()
    );
    assert!(
        Tokenizer::from_gguf_vocab("gpt2", "default", tokens, vec![1], vec!["a b".into()], vec![], None, None, false)
            .is_err()
    );
}

/// By hand, not in CI: compare with transformers on random strings and with the
/// real SmolLM2 vocabulary read from its GGUF. Make the data with
/// `tests/make_tokenizer_fixtures.py --fuzz 3000`, then run
/// `LIFT_TOKENIZER_FUZZ=/tmp/lift_tokenizer_fuzz.json cargo test --release --test tokenizer -- --ignored --nocapture`.
#[test]
#[ignore]
fn fuzz_against_reference_dump() {
    let Ok(path) = std::env::var("LIFT_TOKENIZER_FUZZ") else {
        println!("LIFT_TOKENIZER_FUZZ not set; nothing to compare");
        return;
    };
    let e: Value = serde_json::from_str(&read(PathBuf::from(path))).unwrap();
    let strings = inputs(&e);
    for name in ["gpt2", "llama3", "smollm", "sentencepiece", "gpt2_prefix", "metaspace"] {
        check_against(name, &hf_fixture(name), &strings, &e["tokenizers"][name]);
    }
    for name in ["llama3_gguf", "sentencepiece_gguf"] {
        check_against(name, &gguf_fixture(name), &strings, &e["tokenizers"][name]);
    }
    if e.get("smollm2_vocab").is_some() {
        let tok = gguf_from_json(&e["smollm2_vocab"]);
        check_against("smollm2_gguf", &tok, &strings, &e["smollm2_gguf"]);
        // Speed: the whole batch as one text, and again (warm cache).
        let text = strings.concat();
        for round in ["cold", "warm"] {
            let t0 = std::time::Instant::now();
            let n = tok.encode(&text).len();
            let s = t0.elapsed().as_secs_f64();
            println!(
                "smollm2 encode ({round}): {} bytes -> {n} tokens in {s:.3}s, {:.2} MB/s",
                text.len(),
                text.len() as f64 / s / 1e6
            );
        }
    }
}
