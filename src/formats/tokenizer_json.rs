//! Hugging Face tokenizer.json, read and written.
//!
//! Reading turns a tokenizer.json (plus, when there is one, the
//! tokenizer_config.json beside it) into the tokenizer's `Spec`, one stage at a
//! time; a stage or option the tokenizer does not implement is an error that
//! names it. Writing goes the other way, for `lift export --format hf`. Both are
//! methods of [`Tokenizer`]: [`Tokenizer::from_hf_json`] and
//! [`Tokenizer::to_hf_json`].

use anyhow::{Result, anyhow, bail};
use serde_json::{Value, json};

use crate::limits::{clip, plain, quote, shorten};
use crate::tokenizer::{
    AddedToken, BpeOptions, DecodeStep, GPT2_REGEX, Normalize, PreTokenize, Prepend, Spec, Tokenizer, normalize,
};

impl Tokenizer {
    /// From a Hugging Face tokenizer.json, and optionally the tokenizer_config.json
    /// next to it, which says whether a BOS token is added (`add_bos_token`) and
    /// names the BOS and EOS tokens. Without a config (or without `add_bos_token`
    /// in it) the tokenizer.json's post-processor decides: a template that starts
    /// with a special token adds that token as BOS.
    pub fn from_hf_json(tokenizer_json: &str, tokenizer_config_json: Option<&str>) -> Result<Tokenizer> {
        let spec = parse(tokenizer_json, tokenizer_config_json)?;
        Tokenizer::try_from(spec).map_err(|e| anyhow!("tokenizer.json: {e}"))
    }

    /// This tokenizer as a Hugging Face tokenizer.json (for `lift export --format hf`).
    pub fn to_hf_json(&self) -> Result<String> {
        to_json(&self.spec)
    }
}

// ---------------------------------------------------------------------------
// Reading
// ---------------------------------------------------------------------------

/// A tokenizer.json, with the tokenizer_config.json next to it when given, as
/// the `Spec` it describes.
fn parse(json: &str, config: Option<&str>) -> Result<Spec> {
    let root: Value = serde_json::from_str(json)
        .map_err(|e| anyhow!("tokenizer.json is not valid JSON: {}", shorten(&e.to_string())))?;
    let model = root.get("model").ok_or_else(|| anyhow!("tokenizer.json has no \"model\""))?;
    let kind = str_field(model, "type").unwrap_or("BPE");
    if kind != "BPE" {
        bail!("tokenizer.json: model type {} is not supported (only BPE)", plain(kind));
    }
    for key in ["continuing_subword_prefix", "end_of_word_suffix"] {
        if str_field(model, key).is_some_and(|s| !s.is_empty()) {
            bail!("tokenizer.json: BPE option {key} is not supported");
        }
    }
    if model.get("dropout").and_then(Value::as_f64).is_some_and(|d| d > 0.0) {
        bail!("tokenizer.json: BPE dropout is not supported");
    }

    // Vocabulary: the model's, then added tokens (which may extend it).
    let vocab = model
        .get("vocab")
        .and_then(Value::as_object)
        .ok_or_else(|| anyhow!("tokenizer.json: model.vocab is missing or not an object"))?;
    let mut ids: Vec<(u64, &str)> = Vec::with_capacity(vocab.len());
    for (token, id) in vocab {
        let id = id.as_u64().ok_or_else(|| anyhow!("tokenizer.json: vocab id of {} is not a number", quote(token)))?;
        ids.push((id, token));
    }
    let mut added_tokens = Vec::new();
    for a in root.get("added_tokens").and_then(Value::as_array).into_iter().flatten() {
        let content =
            str_field(a, "content").ok_or_else(|| anyhow!("tokenizer.json: an added token has no content"))?;
        let id = a
            .get("id")
            .and_then(Value::as_u64)
            .ok_or_else(|| anyhow!("tokenizer.json: added token {} has no id", quote(content)))?;
        ids.push((id, content));
        let special = bool_field(a, "special", false);
        added_tokens.push(AddedToken {
            id: u32::try_from(id).unwrap_or(u32::MAX),
            content: content.to_string(),
            special,
            normalized: bool_field(a, "normalized", !special),
            lstrip: bool_field(a, "lstrip", false),
            rstrip: bool_field(a, "rstrip", false),
            single_word: bool_field(a, "single_word", false),
        });
    }
    let mut by_id: Vec<Option<String>> = vec![None; id_space(&ids)?];
    for (id, token) in ids {
        by_id[id as usize] = Some(token.to_string());
    }
    // An id nobody uses decodes to nothing, as in tokenizers (where it is skipped).
    let mut vocab: Vec<String> = by_id.into_iter().map(Option::unwrap_or_default).collect();
    // tokenizers spells a normalized added token in its normalized form
    // (`<nt>` as `▁<nt>` under Llama 2's normalizer), which is what decoding
    // it gives back.
    let normalizer = parse_normalizer(root.get("normalizer").unwrap_or(&Value::Null))?;
    for a in added_tokens.iter().filter(|a| a.normalized) {
        if let Some(slot) = vocab.get_mut(a.id as usize) {
            *slot = normalize(&normalizer, &a.content);
        }
    }

    let mut merges = Vec::new();
    for m in model.get("merges").and_then(Value::as_array).into_iter().flatten() {
        merges.push(parse_merge(m).map_err(|e| anyhow!("tokenizer.json: {e}"))?);
    }

    let token_id = |name: &str| -> Option<u32> { vocab.iter().rposition(|t| t == name).map(|i| i as u32) };
    let unk_id = match str_field(model, "unk_token") {
        Some(unk) => Some(
            token_id(unk)
                .ok_or_else(|| anyhow!("tokenizer.json: unk_token {} is not in the vocabulary", quote(unk)))?,
        ),
        None => None,
    };
    let bpe = BpeOptions {
        byte_fallback: bool_field(model, "byte_fallback", false),
        unk_id,
        fuse_unk: bool_field(model, "fuse_unk", false),
        ignore_merges: bool_field(model, "ignore_merges", false),
    };

    let pre_tokenizer = parse_pre_tokenizer(root.get("pre_tokenizer").unwrap_or(&Value::Null))?;
    let decoder = parse_decoder(root.get("decoder").unwrap_or(&Value::Null))?;
    if decoder.is_empty() {
        bail!("tokenizer.json has no decoder");
    }

    // BOS/EOS: named by the config; BOS added if the config says so, or else
    // if the post-processor's template starts with a special token.
    let config: Option<Value> = match config {
        Some(c) => Some(
            serde_json::from_str(c)
                .map_err(|e| anyhow!("tokenizer_config.json is not valid JSON: {}", shorten(&e.to_string())))?,
        ),
        None => None,
    };
    let template_bos = template_first_special(root.get("post_processor")).and_then(|name| token_id(&name));
    let named = |key: &str| -> Result<Option<u32>> {
        let Some(v) = config.as_ref().and_then(|c| c.get(key)) else {
            return Ok(None);
        };
        // Either "<s>" or {"content": "<s>", ...}; null means none.
        let name = match v {
            Value::Null => return Ok(None),
            Value::String(s) => s.as_str(),
            v => str_field(v, "content")
                .ok_or_else(|| anyhow!("tokenizer_config.json: {key} is neither a string nor has a content"))?,
        };
        token_id(name)
            .map(Some)
            .ok_or_else(|| anyhow!("tokenizer_config.json: {key} {} is not in the vocabulary", quote(name)))
    };
    let bos_id = named("bos_token")?.or(template_bos);
    let eos_id = named("eos_token")?;
    let add_bos = match config.as_ref().and_then(|c| c.get("add_bos_token")) {
        Some(v) => v.as_bool().unwrap_or(false),
        None => template_bos.is_some(),
    };
    if add_bos && bos_id.is_none() {
        bail!("tokenizer_config.json: add_bos_token is true but no bos_token is named");
    }

    Ok(Spec { vocab, merges, added_tokens, normalizer, pre_tokenizer, bpe, decoder, bos_id, eos_id, add_bos })
}

/// How many ids the vocabulary spans (the largest id + 1). Ids may leave
/// gaps, but a span far beyond the tokens there are is a corrupt file, and
/// refusing it keeps the table of ids in proportion to the file: at most
/// twice the tokens, plus 1024.
fn id_space(ids: &[(u64, &str)]) -> Result<usize> {
    let limit = 2 * ids.len() as u64 + 1024;
    match ids.iter().max_by_key(|(id, _)| *id) {
        None => Ok(0),
        Some(&(id, _)) if id < limit => Ok(id as usize + 1),
        Some(&(id, token)) => bail!(
            "tokenizer.json: token {} has id {id}, far beyond the {} tokens there are (ids must be below {limit})",
            quote(token),
            ids.len()
        ),
    }
}

/// A merge is "a b" (older files) or ["a", "b"].
fn parse_merge(m: &Value) -> Result<(String, String)> {
    match m {
        Value::String(s) => split_merge(s),
        Value::Array(pair) => match pair.as_slice() {
            [Value::String(a), Value::String(b)] => Ok((a.clone(), b.clone())),
            _ => bail!("merge {} is not a pair of strings", clip(&m.to_string())),
        },
        _ => bail!("merge {} is neither \"a b\" nor [\"a\", \"b\"]", clip(&m.to_string())),
    }
}

pub(super) fn split_merge(s: &str) -> Result<(String, String)> {
    let mut parts = s.split(' ');
    match (parts.next(), parts.next(), parts.next()) {
        (Some(a), Some(b), None) => Ok((a.to_string(), b.to_string())),
        _ => bail!("merge {} is not two tokens separated by one space", quote(s)),
    }
}

fn parse_normalizer(v: &Value) -> Result<Vec<Normalize>> {
    let mut steps = Vec::new();
    match type_of(v) {
        None => {}
        Some("Sequence") => {
            for n in v.get("normalizers").and_then(Value::as_array).into_iter().flatten() {
                steps.extend(parse_normalizer(n)?);
            }
        }
        Some("Prepend") => steps.push(Normalize::Prepend(
            str_field(v, "prepend")
                .ok_or_else(|| anyhow!("tokenizer.json: Prepend normalizer without prepend"))?
                .to_string(),
        )),
        Some("Replace") => {
            let (from, to) = replace_args(v)?;
            steps.push(Normalize::Replace(from, to));
        }
        Some(other) => bail!("tokenizer.json: normalizer {} is not supported", plain(other)),
    }
    Ok(steps)
}

fn parse_pre_tokenizer(v: &Value) -> Result<Vec<PreTokenize>> {
    let mut steps = Vec::new();
    match type_of(v) {
        None => {}
        Some("Sequence") => {
            for p in v.get("pretokenizers").and_then(Value::as_array).into_iter().flatten() {
                steps.extend(parse_pre_tokenizer(p)?);
            }
        }
        Some("ByteLevel") => {
            if bool_field(v, "add_prefix_space", false) {
                steps.push(PreTokenize::PrefixSpace);
            }
            if bool_field(v, "use_regex", true) {
                steps.push(PreTokenize::Split(GPT2_REGEX.to_string()));
            }
            steps.push(PreTokenize::ByteAlphabet);
        }
        Some("Split") => {
            let behavior = str_field(v, "behavior").unwrap_or("Isolated");
            if behavior != "Isolated" || bool_field(v, "invert", false) {
                bail!(
                    "tokenizer.json: Split pre-tokenizer with behavior {} (invert {}) is not supported",
                    plain(behavior),
                    bool_field(v, "invert", false)
                );
            }
            let pattern = v.get("pattern");
            let regex =
                match (pattern.and_then(|p| str_field(p, "Regex")), pattern.and_then(|p| str_field(p, "String"))) {
                    (Some(r), _) => r.to_string(),
                    (None, Some(s)) => fancy_regex::escape(s).into_owned(),
                    _ => bail!("tokenizer.json: Split pre-tokenizer without a pattern"),
                };
            steps.push(PreTokenize::Split(regex));
        }
        Some("Digits") => steps.push(PreTokenize::Digits { individual: bool_field(v, "individual_digits", false) }),
        Some("Metaspace") => {
            if str_field(v, "replacement").is_some_and(|r| r != "▁") {
                bail!("tokenizer.json: Metaspace with a replacement other than ▁ is not supported");
            }
            steps.push(PreTokenize::Metaspace { prepend: prepend_scheme(v)?, split: bool_field(v, "split", true) });
        }
        Some(other) => bail!("tokenizer.json: pre-tokenizer {} is not supported", plain(other)),
    }
    Ok(steps)
}

fn parse_decoder(v: &Value) -> Result<Vec<DecodeStep>> {
    let mut steps = Vec::new();
    match type_of(v) {
        None => {}
        Some("Sequence") => {
            for d in v.get("decoders").and_then(Value::as_array).into_iter().flatten() {
                steps.extend(parse_decoder(d)?);
            }
        }
        Some("ByteLevel") => steps.push(DecodeStep::ByteLevel),
        Some("Replace") => {
            let (from, to) = replace_args(v)?;
            steps.push(DecodeStep::Replace(from, to));
        }
        Some("ByteFallback") => steps.push(DecodeStep::ByteFallback),
        Some("Fuse") => steps.push(DecodeStep::Fuse),
        Some("Strip") => {
            let content = str_field(v, "content").and_then(|s| s.chars().next()).unwrap_or(' ');
            let count = |key| v.get(key).and_then(Value::as_u64).unwrap_or(0) as usize;
            steps.push(DecodeStep::Strip { content, start: count("start"), stop: count("stop") });
        }
        Some("Metaspace") => {
            if str_field(v, "replacement").is_some_and(|r| r != "▁") {
                bail!("tokenizer.json: Metaspace decoder with a replacement other than ▁ is not supported");
            }
            steps.push(DecodeStep::Metaspace { strip_first: prepend_scheme(v)? != Prepend::Never });
        }
        Some(other) => bail!("tokenizer.json: decoder {} is not supported", plain(other)),
    }
    Ok(steps)
}

/// Metaspace's prepend_scheme, or the older add_prefix_space flag.
fn prepend_scheme(v: &Value) -> Result<Prepend> {
    match str_field(v, "prepend_scheme") {
        Some("always") => Ok(Prepend::Always),
        Some("first") => Ok(Prepend::First),
        Some("never") => Ok(Prepend::Never),
        Some(other) => bail!("tokenizer.json: Metaspace prepend_scheme {} is unknown", quote(other)),
        None if bool_field(v, "add_prefix_space", true) => Ok(Prepend::Always),
        None => Ok(Prepend::Never),
    }
}

/// Replace's arguments; only a literal pattern is supported.
fn replace_args(v: &Value) -> Result<(String, String)> {
    let from = v
        .get("pattern")
        .and_then(|p| str_field(p, "String"))
        .ok_or_else(|| anyhow!("tokenizer.json: Replace is supported with a String pattern only"))?;
    let to = str_field(v, "content").ok_or_else(|| anyhow!("tokenizer.json: Replace without content"))?;
    Ok((from.to_string(), to.to_string()))
}

/// The special token a TemplateProcessing post-processor puts first, if any.
fn template_first_special(v: Option<&Value>) -> Option<String> {
    let v = v?;
    match type_of(v) {
        Some("TemplateProcessing") => {
            let first = v.get("single")?.as_array()?.first()?;
            Some(str_field(first.get("SpecialToken")?, "id")?.to_string())
        }
        Some("Sequence") => v.get("processors")?.as_array()?.iter().find_map(|p| template_first_special(Some(p))),
        _ => None,
    }
}

fn type_of(v: &Value) -> Option<&str> {
    if v.is_null() { None } else { Some(str_field(v, "type").unwrap_or("?")) }
}

fn str_field<'a>(v: &'a Value, key: &str) -> Option<&'a str> {
    v.get(key).and_then(Value::as_str)
}

fn bool_field(v: &Value, key: &str, default: bool) -> bool {
    v.get(key).and_then(Value::as_bool).unwrap_or(default)
}

// ---------------------------------------------------------------------------
// Writing
// ---------------------------------------------------------------------------

/// A `Spec` as tokenizer.json text: the reverse of [`parse`].
fn to_json(spec: &Spec) -> Result<String> {
    // model.vocab: every id with a distinct, non-empty spelling.
    let mut vocab = serde_json::Map::new();
    for (id, t) in spec.vocab.iter().enumerate() {
        if !t.is_empty() && !vocab.contains_key(t) {
            vocab.insert(t.clone(), json!(id));
        }
    }
    let merges: Vec<Value> = spec.merges.iter().map(|(a, b)| json!([a, b])).collect();
    let unk = spec.bpe.unk_id.and_then(|id| spec.vocab.get(id as usize).cloned());
    let model = json!({
        "type": "BPE", "dropout": null, "unk_token": unk,
        "continuing_subword_prefix": null, "end_of_word_suffix": null,
        "fuse_unk": spec.bpe.fuse_unk, "byte_fallback": spec.bpe.byte_fallback,
        "ignore_merges": spec.bpe.ignore_merges, "vocab": vocab, "merges": merges,
    });
    let added: Vec<Value> = spec
        .added_tokens
        .iter()
        .map(|a| {
            json!({"id": a.id, "content": a.content, "single_word": a.single_word, "lstrip": a.lstrip,
                   "rstrip": a.rstrip, "normalized": a.normalized, "special": a.special})
        })
        .collect();
    let seq = |key: &str, items: Vec<Value>| -> Value {
        match items.len() {
            0 => Value::Null,
            1 => items.into_iter().next().unwrap_or(Value::Null),
            _ => json!({"type": "Sequence", key: items}),
        }
    };
    let normalizer: Vec<Value> = spec
        .normalizer
        .iter()
        .map(|n| match n {
            Normalize::Prepend(p) => json!({"type": "Prepend", "prepend": p}),
            Normalize::Replace(a, b) => json!({"type": "Replace", "pattern": {"String": a}, "content": b}),
        })
        .collect();
    let decoder: Vec<Value> = spec
        .decoder
        .iter()
        .map(|d| match d {
            DecodeStep::ByteLevel => {
                json!({"type": "ByteLevel", "add_prefix_space": true, "trim_offsets": true, "use_regex": true})
            }
            DecodeStep::Replace(a, b) => json!({"type": "Replace", "pattern": {"String": a}, "content": b}),
            DecodeStep::ByteFallback => json!({"type": "ByteFallback"}),
            DecodeStep::Fuse => json!({"type": "Fuse"}),
            DecodeStep::Strip { content, start, stop } => {
                json!({"type": "Strip", "content": content.to_string(), "start": start, "stop": stop})
            }
            DecodeStep::Metaspace { strip_first } => json!({"type": "Metaspace", "replacement": "▁",
                "prepend_scheme": if *strip_first { "always" } else { "never" }, "split": true}),
        })
        .collect();
    let post = match (spec.add_bos, spec.bos_id) {
        (true, Some(bos)) => {
            let name = spec.vocab.get(bos as usize).map_or("", String::as_str);
            json!({
                "type": "TemplateProcessing",
                "single": [{"SpecialToken": {"id": name, "type_id": 0}}, {"Sequence": {"id": "A", "type_id": 0}}],
                "pair": [{"SpecialToken": {"id": name, "type_id": 0}}, {"Sequence": {"id": "A", "type_id": 0}},
                         {"SpecialToken": {"id": name, "type_id": 1}}, {"Sequence": {"id": "B", "type_id": 1}}],
                "special_tokens": {name: {"id": name, "ids": [bos], "tokens": [name]}},
            })
        }
        _ => Value::Null,
    };
    let root = json!({
        "version": "1.0", "truncation": null, "padding": null,
        "added_tokens": added,
        "normalizer": seq("normalizers", normalizer),
        "pre_tokenizer": seq("pretokenizers", pre_tokenizer_json(&spec.pre_tokenizer)?),
        "post_processor": post,
        "decoder": seq("decoders", decoder),
        "model": model,
    });
    Ok(serde_json::to_string(&root)?)
}

/// The pre-tokenizer steps as tokenizers' JSON. ByteLevel's own prefix space
/// comes before its regex split, so [PrefixSpace, Split(GPT-2), ByteAlphabet]
/// must be written as one ByteLevel, not as a Split and a ByteLevel.
fn pre_tokenizer_json(steps: &[PreTokenize]) -> Result<Vec<Value>> {
    let byte_level = |prefix: bool, regex: bool| json!({"type": "ByteLevel", "add_prefix_space": prefix, "trim_offsets": true, "use_regex": regex});
    let mut out = Vec::new();
    let mut i = 0;
    while i < steps.len() {
        match (&steps[i], steps.get(i + 1), steps.get(i + 2)) {
            (PreTokenize::PrefixSpace, Some(PreTokenize::Split(r)), Some(PreTokenize::ByteAlphabet))
                if r == GPT2_REGEX =>
            {
                out.push(byte_level(true, true));
                i += 3;
            }
            (PreTokenize::PrefixSpace, Some(PreTokenize::ByteAlphabet), _) => {
                out.push(byte_level(true, false));
                i += 2;
            }
            (PreTokenize::PrefixSpace, _, _) => bail!("cannot write this pre-tokenizer as tokenizer.json"),
            (PreTokenize::Split(r), _, _) => {
                out.push(json!({"type": "Split", "pattern": {"Regex": r}, "behavior": "Isolated", "invert": false}));
                i += 1;
            }
            (PreTokenize::Digits { individual }, _, _) => {
                out.push(json!({"type": "Digits", "individual_digits": individual}));
                i += 1;
            }
            (PreTokenize::ByteAlphabet, _, _) => {
                out.push(byte_level(false, false));
                i += 1;
            }
            (PreTokenize::Metaspace { prepend, split }, _, _) => {
                let scheme = match prepend {
                    Prepend::Always => "always",
                    Prepend::First => "first",
                    Prepend::Never => "never",
                };
                out.push(json!({"type": "Metaspace", "replacement": "▁", "prepend_scheme": scheme, "split": split}));
                i += 1;
            }
        }
    }
    Ok(out)
}
