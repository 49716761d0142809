//! A tokenizer's vocabulary as GGUF metadata (`tokenizer.ggml.*`), in and out.
//!
//! Reading follows what `transformers` builds from the same keys
//! (integrations/gguf/gguf_tokenizer_mapping.py), so that lift and it tokenize a
//! GGUF file alike; writing produces the keys llama.cpp and `transformers` look
//! for, for `lift export --format gguf`. Here too is the byte-level stand-in
//! tokenizer of `lift init`, which is assembled through the GGUF reader. All are
//! methods of [`Tokenizer`].

use std::collections::{HashMap, HashSet};

use anyhow::{Result, anyhow, bail};

use crate::formats::gguf::GgufValue;
use crate::formats::tokenizer_json::split_merge;
use crate::limits::quote;
use crate::tokenizer::{
    AddedToken, BpeOptions, DecodeStep, GPT2_REGEX, GPT4O_REGEX, LLAMA3_REGEX, PreTokenize, Prepend, QWEN2_REGEX, Spec,
    Tokenizer, byte_alphabet, parse_byte_token,
};

impl Tokenizer {
    /// From the vocabulary stored in a GGUF file's metadata (`tokenizer.ggml.*`).
    ///
    /// `model` is `tokenizer.ggml.model`: "gpt2" (byte-level BPE, `merges`
    /// required) or "llama" (SentencePiece BPE; without `merges` they are derived
    /// from `scores`). `pre` is `tokenizer.ggml.pre`, which picks the byte-level
    /// regex. The result is what `transformers` builds from the same file
    /// (`AutoTokenizer.from_pretrained(..., gguf_file=...)`), which is what the
    /// tests compare against.
    #[allow(clippy::too_many_arguments)]
    pub fn from_gguf_vocab(
        model: &str,
        pre: &str,
        tokens: Vec<String>,
        token_types: Vec<i32>,
        merges: Vec<String>,
        scores: Vec<f32>,
        bos_id: Option<u32>,
        eos_id: Option<u32>,
        add_bos: bool,
    ) -> Result<Tokenizer> {
        let spec = build(model, pre, tokens, token_types, merges, scores, bos_id, eos_id, add_bos)?;
        Tokenizer::try_from(spec).map_err(|e| anyhow!("GGUF tokenizer: {e}"))
    }

    /// This tokenizer as GGUF `tokenizer.ggml.*` metadata (for `lift export --format gguf`).
    pub fn to_gguf_metadata(&self) -> Vec<(String, GgufValue)> {
        gguf_metadata(&self.spec)
    }

    /// A byte-level stand-in for models made by `lift init` without a real
    /// tokenizer: one token per byte (GPT-2's byte alphabet), no merges, then
    /// `<s>` and `</s>` as BOS and EOS, padded with unused `<|extra_N|>` tokens
    /// up to `vocab` (at least 259).
    pub fn byte_level_standin(vocab: usize) -> Result<Tokenizer> {
        if vocab < 259 {
            bail!("a byte-level stand-in tokenizer needs a vocabulary of at least 259 (got {vocab})");
        }
        let alphabet = byte_alphabet();
        let mut tokens: Vec<String> = (0..256).map(|b| alphabet.to_char[b].to_string()).collect();
        tokens.push("<s>".into());
        tokens.push("</s>".into());
        // the product of the one merge below, so that the merge list is valid
        tokens.push(format!("{}{}", alphabet.to_char[b'<' as usize], alphabet.to_char[b'>' as usize]));
        for i in tokens.len()..vocab {
            tokens.push(format!("<|extra_{i}|>"));
        }
        let mut types = vec![1; 256];
        types.extend([3, 3, 1]);
        types.extend(std::iter::repeat_n(3, vocab - 259));
        // One merge that joins nothing real keeps the gpt2 loader's invariant.
        let merges = vec![format!("{} {}", alphabet.to_char[b'<' as usize], alphabet.to_char[b'>' as usize])];
        Tokenizer::from_gguf_vocab("gpt2", "gpt-2", tokens, types, merges, Vec::new(), Some(256), Some(257), false)
    }
}

// ---------------------------------------------------------------------------
// Reading
// ---------------------------------------------------------------------------

// tokenizer.ggml.token_type values (llama.cpp's llama_token_type).
const UNKNOWN: i32 = 2;
const CONTROL: i32 = 3;
const USER_DEFINED: i32 = 4;

/// `tokenizer.ggml.pre` names whose models split text like Llama 3, Qwen 2
/// and GPT-4o. Every other name gets GPT-2's regex, as in transformers.
/// ("smollm" also isolates every digit first: see `build`.)
fn pre_regex(pre: &str) -> &'static str {
    match pre {
        "llama3" | "llama-v3" | "llama-bpe" | "falcon3" | "falcon-h1" | "pixtral" | "midm-2.0" | "lfm2"
        | "jina-v5-nano" | "dbrx" | "smaug-bpe" => LLAMA3_REGEX,
        "qwen2" | "deepseek-r1-qwen" | "kormo" | "f2llmv2" | "megrez" => QWEN2_REGEX,
        "gpt-4o" | "llama4" | "kanana2" | "talkie" | "minimax-m2" => GPT4O_REGEX,
        _ => GPT2_REGEX,
    }
}

/// The `Spec` for a GGUF vocabulary: see [`Tokenizer::from_gguf_vocab`] for
/// the arguments.
#[allow(clippy::too_many_arguments)]
fn build(
    model: &str,
    pre: &str,
    tokens: Vec<String>,
    token_types: Vec<i32>,
    merge_list: Vec<String>,
    scores: Vec<f32>,
    bos_id: Option<u32>,
    eos_id: Option<u32>,
    add_bos: bool,
) -> Result<Spec> {
    let n = tokens.len();
    if !token_types.is_empty() && token_types.len() != n {
        bail!("GGUF tokenizer: {} token types for {n} tokens", token_types.len());
    }
    for (what, id) in [("bos", bos_id), ("eos", eos_id)] {
        if let Some(id) = id.filter(|&id| id as usize >= n) {
            bail!("GGUF tokenizer: {what} token id {id} is out of range (vocab {n})");
        }
    }
    let ty = |i: usize| token_types.get(i).copied().unwrap_or(1);
    let special_ids: HashSet<u32> = bos_id.into_iter().chain(eos_id).collect();

    let (vocab, merges, added_tokens, normalizer, pre_tokenizer, bpe, decoder);
    match model {
        "gpt2" => {
            if merge_list.is_empty() {
                bail!("GGUF tokenizer: a gpt2 (byte-level) vocabulary needs tokenizer.ggml.merges");
            }
            // A token with characters outside the byte alphabet is stored as
            // raw text; transformers respells it in the alphabet.
            let alphabet = byte_alphabet();
            let in_alphabet = |t: &str| t.chars().all(|c| alphabet.to_byte(c).is_some());
            vocab =
                (tokens.iter())
                    .map(|t| {
                        if in_alphabet(t) {
                            t.clone()
                        } else {
                            t.bytes().map(|b| alphabet.to_char[b as usize]).collect()
                        }
                    })
                    .collect::<Vec<String>>();
            // A control token that is not in the alphabet is a mislabel that
            // transformers leaves out; so do we.
            added_tokens = added_from_types(&tokens, &ty, &special_ids, |i| in_alphabet(&tokens[i]));
            merges = parse_merges(&merge_list)?;
            normalizer = Vec::new();
            // SmolLM's own tokenizer.json, and llama.cpp, isolate every digit
            // before the GPT-2 regex. transformers' GGUF import does not; the
            // two differ only on whitespace runs before a digit ("\n\n3" is
            // `ĊĊ 3` with the split, `Ċ Ċ 3` without). We follow the model's
            // own tokenizer, which is what it was trained on.
            pre_tokenizer = if pre == "smollm" {
                vec![
                    PreTokenize::Digits { individual: true },
                    PreTokenize::Split(pre_regex(pre).to_string()),
                    PreTokenize::ByteAlphabet,
                ]
            } else {
                vec![PreTokenize::Split(pre_regex(pre).to_string()), PreTokenize::ByteAlphabet]
            };
            bpe = BpeOptions { byte_fallback: false, unk_id: None, fuse_unk: false, ignore_merges: false };
            decoder = vec![DecodeStep::ByteLevel];
        }
        "llama" => {
            merges = if merge_list.is_empty() {
                if scores.len() != n {
                    bail!("GGUF tokenizer: {} scores for {n} tokens, and no merges", scores.len());
                }
                merges_from_scores(&tokens, &scores)?
            } else {
                parse_merges(&merge_list)?
            };
            added_tokens = added_from_types(&tokens, &ty, &special_ids, |_| true);
            vocab = tokens;
            normalizer = Vec::new();
            // transformers' LlamaTokenizer (legacy=False): one ▁ at the start
            // of the text only, no split at spaces.
            pre_tokenizer = vec![PreTokenize::Metaspace { prepend: Prepend::First, split: false }];
            bpe = BpeOptions { byte_fallback: true, unk_id: None, fuse_unk: true, ignore_merges: false };
            decoder = vec![
                DecodeStep::Replace("▁".to_string(), " ".to_string()),
                DecodeStep::ByteFallback,
                DecodeStep::Fuse,
                DecodeStep::Strip { content: ' ', start: 1, stop: 0 },
            ];
        }
        other => bail!("GGUF tokenizer model {} is not supported (only \"gpt2\" and \"llama\" BPE)", quote(other)),
    }
    Ok(Spec { vocab, merges, added_tokens, normalizer, pre_tokenizer, bpe, decoder, bos_id, eos_id, add_bos })
}

/// Control and unknown tokens (and the BOS/EOS tokens) become special added
/// tokens, user-defined ones (`<think>`) plain added tokens: all matched whole
/// in the raw text, as llama.cpp and transformers do.
fn added_from_types(
    tokens: &[String],
    ty: &dyn Fn(usize) -> i32,
    special_ids: &HashSet<u32>,
    control_ok: impl Fn(usize) -> bool,
) -> Vec<AddedToken> {
    let mut added = Vec::new();
    for (i, t) in tokens.iter().enumerate() {
        let special = match ty(i) {
            CONTROL => control_ok(i),
            UNKNOWN => true,
            _ => special_ids.contains(&(i as u32)),
        };
        if special || ty(i) == USER_DEFINED {
            added.push(AddedToken {
                id: i as u32,
                content: t.clone(),
                special,
                normalized: false,
                lstrip: false,
                rstrip: false,
                single_word: false,
            });
        }
    }
    added
}

fn parse_merges(merges: &[String]) -> Result<Vec<(String, String)>> {
    merges.iter().map(|m| split_merge(m).map_err(|e| anyhow!("GGUF tokenizer: {e}"))).collect()
}

/// Merges for a SentencePiece vocabulary that stores only scores: every way of
/// cutting a token into two tokens is a merge, ranked by the token's score
/// (best first), then by longer left part, then longer right part; ties keep
/// the vocabulary's order, and within one token the pairs go by the ids of
/// their parts. This is transformers' `generate_merges`, order for order.
///
/// The cuts of a token are found with two tries (its prefixes that are
/// tokens, its suffixes that are tokens) in one walk each, so a long token
/// costs its length, not its length squared. A vocabulary whose cuts would
/// spell far more text than the vocabulary itself is refused: every prefix
/// of "aaaa..." being a token would otherwise make merges cubic in its size.
fn merges_from_scores(tokens: &[String], scores: &[f32]) -> Result<Vec<(String, String)>> {
    // {token: id} keeps the last id of a repeated token, {token: score} its
    // first position and last score, as Python dicts built from the lists.
    let mut id_of: HashMap<&str, usize> = HashMap::with_capacity(tokens.len());
    let mut score_of: HashMap<&str, f32> = HashMap::with_capacity(tokens.len());
    let mut order: Vec<&str> = Vec::with_capacity(tokens.len());
    for (i, (t, &score)) in tokens.iter().zip(scores).enumerate() {
        id_of.insert(t, i);
        if score_of.insert(t, score).is_none() {
            order.push(t);
        }
    }
    let forward = Trie::new(order.iter().map(|t| t.bytes()));
    let backward = Trie::new(order.iter().map(|t| t.bytes().rev()));
    let vocab_bytes: usize = order.iter().map(|t| t.len()).sum();
    let mut budget = 64 * vocab_bytes + (1 << 20);
    // (left, right, score, chars in left, chars in right)
    let mut all: Vec<(&str, &str, f32, usize, usize)> = Vec::new();
    for t in order {
        let suffix_cuts: HashSet<usize> =
            backward.prefix_lens(t.bytes().rev()).into_iter().map(|k| t.len() - k).collect();
        let mut local = Vec::new();
        for cut in forward.prefix_lens(t.bytes()) {
            if cut == 0 || cut >= t.len() || !suffix_cuts.contains(&cut) || !t.is_char_boundary(cut) {
                continue;
            }
            let (l, r) = t.split_at(cut);
            if let (Some(&li), Some(&ri)) = (id_of.get(l), id_of.get(r)) {
                local.push((li, ri, l, r));
            }
        }
        budget = budget.checked_sub(local.len() * t.len()).ok_or_else(|| {
            anyhow!("GGUF tokenizer: the scores of these {} tokens imply too many merges (tokens made of many smaller tokens)", tokens.len())
        })?;
        local.sort_by_key(|&(li, ri, _, _)| (li, ri));
        for (_, _, l, r) in local {
            let score = score_of.get(t).copied().unwrap_or_default();
            all.push((l, r, score, l.chars().count(), r.chars().count()));
        }
    }
    // Descending, stable: Python's sorted(..., reverse=True) keeps ties in order.
    all.sort_by(|x, y| y.2.total_cmp(&x.2).then(y.3.cmp(&x.3)).then(y.4.cmp(&x.4)));
    Ok(all.into_iter().map(|(l, r, ..)| (l.to_string(), r.to_string())).collect())
}

/// The tokens' bytes (or their reversed bytes) as a trie: which prefixes of
/// a string are tokens, found in one walk along it.
struct Trie {
    /// (node, byte) -> child node; node 0 is the root.
    next: HashMap<(u32, u8), u32>,
    /// Whether a token ends at each node.
    ends: Vec<bool>,
}

impl Trie {
    fn new<W: Iterator<Item = u8>>(words: impl Iterator<Item = W>) -> Trie {
        let mut t = Trie { next: HashMap::new(), ends: vec![false] };
        for word in words {
            let mut node = 0u32;
            for b in word {
                let fresh = t.ends.len() as u32;
                node = *t.next.entry((node, b)).or_insert(fresh);
                if node == fresh {
                    t.ends.push(false);
                }
            }
            t.ends[node as usize] = true;
        }
        t
    }

    /// The lengths of the prefixes of `bytes` that are tokens, ascending.
    fn prefix_lens(&self, bytes: impl Iterator<Item = u8>) -> Vec<usize> {
        let (mut node, mut out) = (0u32, Vec::new());
        for (i, b) in bytes.enumerate() {
            match self.next.get(&(node, b)) {
                Some(&n) => node = n,
                None => break,
            }
            if self.ends[node as usize] {
                out.push(i + 1);
            }
        }
        out
    }
}

// ---------------------------------------------------------------------------
// Writing
// ---------------------------------------------------------------------------

/// tokenizer.ggml.* keys, as llama.cpp and transformers read them.
fn gguf_metadata(spec: &Spec) -> Vec<(String, GgufValue)> {
    let byte_level = spec.decoder.iter().any(|d| matches!(d, DecodeStep::ByteLevel));
    let pre = if spec.pre_tokenizer.iter().any(|p| matches!(p, PreTokenize::Digits { individual: true })) {
        "smollm"
    } else if spec.pre_tokenizer.iter().any(|p| matches!(p, PreTokenize::Split(r) if r == LLAMA3_REGEX)) {
        "llama-bpe"
    } else if byte_level {
        "gpt-2"
    } else {
        "default"
    };
    let added: HashMap<u32, bool> = spec.added_tokens.iter().map(|a| (a.id, a.special)).collect();
    let types: Vec<i32> = (0..spec.vocab.len() as u32)
        .map(|id| match added.get(&id) {
            _ if Some(id) == spec.bpe.unk_id => 2,
            Some(true) => 3,
            Some(false) => 4,
            None if !byte_level && parse_byte_token(&spec.vocab[id as usize]).is_some() => 6,
            None => 1,
        })
        .collect();
    let mut meta = vec![
        ("tokenizer.ggml.model".to_string(), GgufValue::String(if byte_level { "gpt2" } else { "llama" }.into())),
        ("tokenizer.ggml.pre".to_string(), GgufValue::String(pre.into())),
        ("tokenizer.ggml.tokens".to_string(), GgufValue::string_array(&spec.vocab)),
        ("tokenizer.ggml.token_type".to_string(), GgufValue::i32_array(&types)),
        ("tokenizer.ggml.add_bos_token".to_string(), GgufValue::Bool(spec.add_bos)),
        ("tokenizer.ggml.add_eos_token".to_string(), GgufValue::Bool(false)),
    ];
    if byte_level {
        let merges: Vec<String> = spec.merges.iter().map(|(a, b)| format!("{a} {b}")).collect();
        meta.push(("tokenizer.ggml.merges".into(), GgufValue::string_array(&merges)));
    } else {
        // SentencePiece-style models merge by score: a token made by the
        // merge of rank r scores -r, so earlier merges win, as in the merge list.
        let mut scores = vec![-1e9f32; spec.vocab.len()];
        let index: HashMap<&str, usize> = spec.vocab.iter().enumerate().map(|(i, t)| (t.as_str(), i)).collect();
        for (rank, (a, b)) in spec.merges.iter().enumerate() {
            if let Some(&id) = index.get(format!("{a}{b}").as_str())
                && scores[id] == -1e9
            {
                scores[id] = -(rank as f32);
            }
        }
        meta.push(("tokenizer.ggml.scores".into(), GgufValue::f32_array(&scores)));
    }
    for (key, id) in [
        ("tokenizer.ggml.bos_token_id", spec.bos_id),
        ("tokenizer.ggml.eos_token_id", spec.eos_id),
        ("tokenizer.ggml.unknown_token_id", spec.bpe.unk_id),
    ] {
        if let Some(id) = id {
            meta.push((key.to_string(), GgufValue::U32(id)));
        }
    }
    meta
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn merges_from_scores_prefers_higher_score_then_longer_left() {
        let tokens = ["a", "b", "c", "ab", "bc", "abc"].map(String::from);
        let scores = [0.0, 0.0, 0.0, -1.0, -2.0, -3.0];
        let m = merges_from_scores(&tokens, &scores).unwrap();
        let m: Vec<(&str, &str)> = m.iter().map(|(a, b)| (a.as_str(), b.as_str())).collect();
        assert_eq!(m, [("a", "b"), ("b", "c"), ("ab", "c"), ("a", "bc")]);
    }
}
