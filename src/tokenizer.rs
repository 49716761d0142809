//! Byte-pair-encoding tokenizers, reproducing Hugging Face `tokenizers` token for token.
//!
//! Llama-family models use one of two kinds of BPE tokenizer:
//!
//! - **Byte-level BPE** (GPT-2, Llama 3, SmolLM, Qwen). The text is cut into
//!   pre-tokens by a regex (words with their leading space, runs of digits,
//!   punctuation, whitespace), every UTF-8 byte of a pre-token is spelled as one
//!   printable character (GPT-2's byte alphabet: a space is `Ġ`, a newline `Ċ`),
//!   and BPE merges those characters. Any text can be encoded: the 256 byte
//!   characters are all in the vocabulary.
//! - **SentencePiece-style BPE** (Llama 2, TinyLlama, Mistral). Spaces become `▁`,
//!   one `▁` goes in front of the text, and BPE merges unicode characters. A
//!   character missing from the vocabulary falls back to its UTF-8 bytes, spelled
//!   as the tokens `<0xE4>`, `<0xB8>`, ...
//!
//! Both are a pipeline of small stages, the way `tokenizers` describes them in a
//! tokenizer.json, and this file has one function per stage, in the order the
//! text flows through them:
//!
//! 1. [`split_added`]: cut out added tokens (`<|im_start|>`, `<s>`) written in the
//!    text, so they become their own ids and never reach the stages below.
//! 2. [`normalize`]: SentencePiece's legacy `▁` handling (Llama 2's tokenizer.json).
//! 3. [`pre_tokenize`]: regex / digit / `▁` splitting, and the byte alphabet.
//! 4. [`bpe_merge`]: start from one symbol per character and merge adjacent pairs,
//!    best-ranked merge first, until no pair has a merge.
//! 5. Decoding runs the decoder steps ([`DecodeStep`]) over the token strings.
//!
//! Only the stages those models need are implemented; a tokenizer.json using
//! anything else is refused with an error naming it rather than tokenized
//! differently. `tests/tokenizer.rs` checks every stage against the real library
//! on fixtures made by `tests/make_tokenizer_fixtures.py`.

use std::cmp::Reverse;
use std::collections::{BinaryHeap, HashMap, HashSet};
use std::fmt;
use std::sync::{Arc, OnceLock, RwLock};

use anyhow::{Result, anyhow, bail};
use serde::{Deserialize, Serialize};
use serde_json::Value;

/// GPT-2's pre-tokenizer regex (also used by `tokenizers`' ByteLevel with `use_regex`).
pub const GPT2_REGEX: &str = r"'s|'t|'re|'ve|'m|'ll|'d| ?\p{L}+| ?\p{N}+| ?[^\s\p{L}\p{N}]+|\s+(?!\S)|\s+";

/// Llama 3's pre-tokenizer regex: case-insensitive contractions, a letter run may
/// take one leading non-letter, numbers in groups of at most three digits.
pub const LLAMA3_REGEX: &str = r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}{1,3}| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+";

/// Qwen 2's: Llama 3's with single digits.
const QWEN2_REGEX: &str =
    r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+";

/// GPT-4o's (also Llama 4's): words split at case changes, contractions attached.
const GPT4O_REGEX: &str = r"[^\r\n\p{L}\p{N}]?[\p{Lu}\p{Lt}\p{Lm}\p{Lo}\p{M}]*[\p{Ll}\p{Lm}\p{Lo}\p{M}]+(?i:'s|'t|'re|'ve|'m|'ll|'d)?|[^\r\n\p{L}\p{N}]?[\p{Lu}\p{Lt}\p{Lm}\p{Lo}\p{M}]+[\p{Ll}\p{Lm}\p{Lo}\p{M}]*(?i:'s|'t|'re|'ve|'m|'ll|'d)?|\p{N}{1,3}| ?[^\s\p{L}\p{N}]+[\r\n/]*|\s*[\r\n]+|\s+(?!\S)|\s+";

/// SentencePiece's visible space.
const METASPACE: char = '▁';

/// Words longer than this (in bytes) are not kept in the BPE cache: they are rare,
/// and a long one (a SentencePiece text has no pre-tokenizer, so a whole
/// paragraph is one word) would only fill it.
const CACHE_MAX_WORD: usize = 256;
/// The cache is emptied when it reaches this many words, to bound its memory.
const CACHE_CAPACITY: usize = 200_000;

/// A BPE tokenizer: the vocabulary, the merges, and the stages around them.
///
/// Serialized (as JSON inside model.bin) as its [`Spec`]; the lookup tables are
/// rebuilt when it is deserialized, so `serde_json::from_str::<Tokenizer>` gives
/// a tokenizer ready to encode.
#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(try_from = "Spec", into = "Spec")]
pub struct Tokenizer {
    spec: Spec,
    tables: Arc<Tables>,
}

/// Everything that defines a tokenizer; the rest is derived from it.
#[derive(Debug, Clone, Serialize, Deserialize)]
struct Spec {
    /// Token string of every id. Byte-level tokens are spelled in the byte alphabet.
    vocab: Vec<String>,
    /// Merges, best first: the pair `(a, b)` at index r becomes the token `a + b`.
    merges: Vec<(String, String)>,
    /// Tokens matched whole in the text before anything else happens to it.
    added_tokens: Vec<AddedToken>,
    /// Applied to each stretch of text between added tokens.
    normalizer: Vec<Normalize>,
    /// Applied in order; each step cuts every piece further (or respells it).
    pre_tokenizer: Vec<PreTokenize>,
    bpe: BpeOptions,
    /// Applied in order to the list of token strings; the result is concatenated.
    decoder: Vec<DecodeStep>,
    bos_id: Option<u32>,
    eos_id: Option<u32>,
    add_bos: bool,
}

/// A token matched literally in the text (`tokenizers`' AddedToken).
#[derive(Debug, Clone, Serialize, Deserialize)]
struct AddedToken {
    id: u32,
    content: String,
    /// Special tokens (`<s>`, `<|im_end|>`) are what `skip_special_tokens` would
    /// drop; we keep them when decoding, as `decode` does by default.
    special: bool,
    /// Matched in the normalized text (with its content normalized too) rather
    /// than in the raw text.
    normalized: bool,
    /// Absorb the whitespace on its left / right into the token.
    lstrip: bool,
    rstrip: bool,
    /// Only match when not inside a word.
    single_word: bool,
}

/// One normalizer step (`tokenizers`' Prepend and Replace, the two Llama 2 uses).
#[derive(Debug, Clone, Serialize, Deserialize)]
enum Normalize {
    /// Put this string in front of every non-empty stretch of text.
    Prepend(String),
    /// Replace every occurrence of the first string by the second.
    Replace(String, String),
}

/// One pre-tokenizer step.
#[derive(Debug, Clone, Serialize, Deserialize)]
enum PreTokenize {
    /// Cut each piece into the regex's matches and the gaps between them, all kept
    /// (`tokenizers`' Split with behavior "Isolated", and ByteLevel's own regex).
    Split(String),
    /// Isolate every digit (`individual`) or every run of digits (`Digits`).
    Digits { individual: bool },
    /// Prepend a space to each piece that does not start with one, so the first
    /// word is spelled like any other (ByteLevel's `add_prefix_space`).
    PrefixSpace,
    /// Respell each byte as its character in GPT-2's byte alphabet.
    ByteAlphabet,
    /// SentencePiece spaces: `' '` becomes `▁`, a `▁` is put in front (see
    /// [`Prepend`]), and with `split` the piece is cut before every `▁`.
    Metaspace { prepend: Prepend, split: bool },
}

/// When the Metaspace pre-tokenizer puts a `▁` in front of a piece (one that
/// does not already start with one).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
enum Prepend {
    Always,
    /// Only to the piece at the very start of the text: after `<s>` there is none.
    First,
    Never,
}

/// Options of the BPE model itself.
#[derive(Debug, Clone, Serialize, Deserialize)]
struct BpeOptions {
    /// Spell a character missing from the vocabulary as its byte tokens `<0xXX>`.
    byte_fallback: bool,
    /// Otherwise, the token it becomes (none: the character is dropped, as HF does).
    unk_id: Option<u32>,
    /// Consecutive unknown characters become one unknown token.
    fuse_unk: bool,
    /// A pre-token that is itself in the vocabulary is taken whole (Llama 3).
    ignore_merges: bool,
}

/// One decoder step, working on the list of token strings (`tokenizers`' decoders).
#[derive(Debug, Clone, Serialize, Deserialize)]
enum DecodeStep {
    /// Byte-alphabet characters back to bytes, then bytes to UTF-8 (invalid
    /// sequences become U+FFFD); fuses everything into one string.
    ByteLevel,
    /// Replace every occurrence of the first string by the second in each token.
    Replace(String, String),
    /// Runs of `<0xXX>` tokens back to the text their bytes spell.
    ByteFallback,
    /// Concatenate all tokens into one.
    Fuse,
    /// Remove up to `start` leading and `stop` trailing `content` chars of each token.
    Strip { content: char, start: usize, stop: usize },
    /// `▁` to space, except in the first token (when a `▁` was prepended).
    Metaspace { strip_first: bool },
}

/// Lookup tables derived from a [`Spec`].
struct Tables {
    token_to_id: HashMap<String, u32>,
    /// `(left id, right id)` -> `(rank, merged id)`.
    merges: HashMap<(u32, u32), (u32, u32)>,
    /// The id of `<0xXX>` for every byte, where the vocabulary has it.
    byte_tokens: [Option<u32>; 256],
    /// Compiled regexes of the `Split` steps, in order.
    regexes: Vec<fancy_regex::Regex>,
    /// Added tokens matched in the raw text, and in the normalized text.
    raw_matcher: AddedMatcher,
    normalized_matcher: AddedMatcher,
    /// Word -> ids; BPE is the expensive stage and natural text repeats words.
    cache: RwLock<HashMap<String, Vec<u32>>>,
}

impl fmt::Debug for Tables {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("Tables { .. }")
    }
}

impl TryFrom<Spec> for Tokenizer {
    type Error = anyhow::Error;
    fn try_from(spec: Spec) -> Result<Tokenizer> {
        let tables = Arc::new(Tables::build(&spec)?);
        Ok(Tokenizer { spec, tables })
    }
}

impl From<Tokenizer> for Spec {
    fn from(t: Tokenizer) -> Spec {
        t.spec
    }
}

impl Tokenizer {
    /// From a Hugging Face tokenizer.json, and optionally the tokenizer_config.json
    /// next to it, which says whether a BOS token is added (`add_bos_token`) and
    /// names the BOS and EOS tokens. Without a config (or without `add_bos_token`
    /// in it) the tokenizer.json's post-processor decides: a template that starts
    /// with a special token adds that token as BOS.
    pub fn from_hf_json(tokenizer_json: &str, tokenizer_config_json: Option<&str>) -> Result<Tokenizer> {
        let spec = hf_json::parse(tokenizer_json, tokenizer_config_json)?;
        Tokenizer::try_from(spec).map_err(|e| anyhow!("tokenizer.json: {e}"))
    }

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
        let spec = gguf_vocab::build(model, pre, tokens, token_types, merges, scores, bos_id, eos_id, add_bos)?;
        Tokenizer::try_from(spec).map_err(|e| anyhow!("GGUF tokenizer: {e}"))
    }

    /// Number of ids, added tokens included.
    pub fn vocab_size(&self) -> usize {
        self.spec.vocab.len()
    }

    pub fn bos_id(&self) -> Option<u32> {
        self.spec.bos_id
    }

    pub fn eos_id(&self) -> Option<u32> {
        self.spec.eos_id
    }

    /// Whether a BOS token should go in front of a sequence. [`Tokenizer::encode`]
    /// never adds it; the caller does.
    pub fn add_bos(&self) -> bool {
        self.spec.add_bos
    }

    /// The token's string as the vocabulary spells it (`Ġthe`, `▁the`, `<0x0A>`).
    pub fn token_str(&self, id: u32) -> Option<&str> {
        self.spec.vocab.get(id as usize).map(String::as_str)
    }

    /// The id of a token spelled as in the vocabulary.
    pub fn token_id(&self, token: &str) -> Option<u32> {
        self.tables.token_to_id.get(token).copied()
    }

    /// This tokenizer as a Hugging Face tokenizer.json (for `lift export --format hf`).
    pub fn to_hf_json(&self) -> Result<String> {
        hf_write::to_json(&self.spec)
    }

    /// This tokenizer as GGUF `tokenizer.ggml.*` metadata (for `lift export --format gguf`).
    pub fn to_gguf_metadata(&self) -> Vec<(String, crate::formats::gguf::GgufValue)> {
        hf_write::gguf_metadata(&self.spec)
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

    /// Text to ids. Never adds BOS. Special tokens written in the text
    /// (`<|im_start|>`) become their ids.
    pub fn encode(&self, text: &str) -> Vec<u32> {
        let mut ids = Vec::with_capacity(text.len() / 3);
        for segment in split_added(text, true, &self.tables.raw_matcher) {
            match segment {
                Segment::Added(id) => ids.push(id),
                Segment::Text { text, at_start } => self.encode_text(text, at_start, &mut ids),
            }
        }
        ids
    }

    /// One stretch of text without raw-matched added tokens: normalize, cut out
    /// normalized added tokens, pre-tokenize, BPE each pre-token.
    fn encode_text(&self, text: &str, at_start: bool, ids: &mut Vec<u32>) {
        let normalized = normalize(&self.spec.normalizer, text);
        for segment in split_added(&normalized, at_start, &self.tables.normalized_matcher) {
            match segment {
                Segment::Added(id) => ids.push(id),
                Segment::Text { text, at_start } => {
                    let pieces = pre_tokenize(&self.spec.pre_tokenizer, &self.tables, text, at_start);
                    for piece in &pieces {
                        self.bpe_word(piece, ids);
                    }
                }
            }
        }
    }

    /// BPE of one pre-token, through the cache.
    fn bpe_word(&self, word: &str, ids: &mut Vec<u32>) {
        let t = &self.tables;
        if self.spec.bpe.ignore_merges
            && let Some(&id) = t.token_to_id.get(word)
        {
            ids.push(id);
            return;
        }
        let cacheable = word.len() < CACHE_MAX_WORD;
        // A poisoned lock only means another thread panicked mid-insert; the
        // cache is just an optimisation, so go on without it.
        if cacheable
            && let Ok(cache) = t.cache.read()
            && let Some(hit) = cache.get(word)
        {
            ids.extend_from_slice(hit);
            return;
        }
        let symbols = initial_symbols(&self.spec.bpe, t, word);
        let merged = bpe_merge(symbols, &t.merges);
        ids.extend_from_slice(&merged);
        if cacheable && let Ok(mut cache) = t.cache.write() {
            if cache.len() >= CACHE_CAPACITY {
                cache.clear();
            }
            cache.insert(word.to_string(), merged);
        }
    }

    /// Ids to text, special tokens included (as `tokenizers`' `decode(ids)`).
    pub fn decode(&self, ids: &[u32]) -> Result<String> {
        let mut tokens = Vec::with_capacity(ids.len());
        for &id in ids {
            tokens.push(self.checked_token(id)?.to_string());
        }
        for step in &self.spec.decoder {
            tokens = step.apply(tokens);
        }
        Ok(tokens.concat())
    }

    /// The bytes one token stands for, for streaming output: concatenate them and
    /// print what is valid UTF-8 so far. This skips the decoder's whole-sequence
    /// steps: a SentencePiece text's first token keeps its leading space (the
    /// `▁` that encoding put in front), which the caller may drop.
    pub fn decode_token_bytes(&self, id: u32) -> Result<Vec<u8>> {
        let token = self.checked_token(id)?;
        let byte_level = self.spec.decoder.iter().any(|s| matches!(s, DecodeStep::ByteLevel));
        let byte_fallback = self.spec.decoder.iter().any(|s| matches!(s, DecodeStep::ByteFallback));
        if byte_level {
            return Ok(byte_level_bytes(token));
        }
        if byte_fallback && let Some(b) = parse_byte_token(token) {
            return Ok(vec![b]);
        }
        let mut s = token.to_string();
        for step in &self.spec.decoder {
            match step {
                DecodeStep::Replace(from, to) => s = s.replace(from.as_str(), to),
                DecodeStep::Metaspace { .. } => s = s.replace(METASPACE, " "),
                _ => {}
            }
        }
        Ok(s.into_bytes())
    }

    fn checked_token(&self, id: u32) -> Result<&str> {
        self.token_str(id).ok_or_else(|| anyhow!("token id {id} is out of range (vocab {})", self.vocab_size()))
    }
}

// ---------------------------------------------------------------------------
// Stage 1: added tokens
// ---------------------------------------------------------------------------

/// The added tokens matched in one kind of text (raw or normalized), as
/// `tokenizers`' AddedVocabulary does with a leftmost-longest Aho-Corasick.
struct AddedMatcher {
    /// (pattern, token) for every added token of this kind; the pattern is the
    /// token's content, normalized for a normalized token.
    patterns: Vec<(String, AddedToken)>,
    /// Whether some pattern starts with this byte: positions whose byte starts
    /// none are skipped without comparing strings.
    first_bytes: [bool; 256],
}

impl AddedMatcher {
    fn new(patterns: Vec<(String, AddedToken)>) -> AddedMatcher {
        let mut first_bytes = [false; 256];
        for (p, _) in &patterns {
            if let Some(&b) = p.as_bytes().first() {
                first_bytes[b as usize] = true;
            }
        }
        AddedMatcher { patterns, first_bytes }
    }

    /// The leftmost match starting at or after `from`, the longest among those
    /// starting there: (start, end, index into `patterns`).
    fn find(&self, text: &str, from: usize) -> Option<(usize, usize, usize)> {
        let bytes = text.as_bytes();
        for start in from..bytes.len() {
            if !self.first_bytes[bytes[start] as usize] {
                continue;
            }
            let rest = &bytes[start..];
            let best = (self.patterns.iter().enumerate())
                .filter(|(_, (p, _))| rest.starts_with(p.as_bytes()))
                .max_by_key(|(i, (p, _))| (p.len(), Reverse(*i)));
            if let Some((i, (p, _))) = best {
                return Some((start, start + p.len(), i));
            }
        }
        None
    }
}

/// A stretch of text between added tokens, or an added token.
enum Segment<'a> {
    Added(u32),
    /// `at_start`: the stretch begins at the very start of the input text.
    Text {
        text: &'a str,
        at_start: bool,
    },
}

/// Stage 1: cut the text at the added tokens it contains.
///
/// `at_start` says whether `text` itself begins the input. The options follow
/// `tokenizers`: `single_word` tokens only match outside words (a rejected match
/// is skipped, not retried one character later), `lstrip`/`rstrip` tokens swallow
/// the whitespace next to them.
fn split_added<'a>(text: &'a str, at_start: bool, m: &AddedMatcher) -> Vec<Segment<'a>> {
    let mut out = Vec::new();
    if m.patterns.is_empty() {
        if !text.is_empty() {
            out.push(Segment::Text { text, at_start });
        }
        return out;
    }
    let mut done = 0; // end of the last match taken
    let mut search = 0;
    while let Some((mut start, mut end, i)) = m.find(text, search) {
        search = end;
        let (_, token) = &m.patterns[i];
        if token.single_word {
            let before_is_word = text[..start].chars().next_back().is_some_and(is_word_char);
            let after_is_word = text[end..].chars().next().is_some_and(is_word_char);
            if before_is_word || after_is_word {
                continue;
            }
        }
        if token.lstrip {
            let trimmed = text[..start].trim_end_matches(char::is_whitespace).len();
            start = trimmed.max(done);
        }
        if token.rstrip {
            let rest = &text[end..];
            end += rest.len() - rest.trim_start_matches(char::is_whitespace).len();
            search = end;
        }
        if done < start {
            out.push(Segment::Text { text: &text[done..start], at_start: at_start && done == 0 });
        }
        out.push(Segment::Added(token.id));
        done = end;
    }
    if done < text.len() {
        out.push(Segment::Text { text: &text[done..], at_start: at_start && done == 0 });
    }
    out
}

/// Whether `c` is `\w` for the regex crate, which `tokenizers` uses to decide
/// `single_word` (letters, marks, decimal digits, connectors: `é` and `\u{301}`
/// are word characters, `½` and `²` are not). Asking the same regex engine is
/// the simplest way to agree with it on every code point.
fn is_word_char(c: char) -> bool {
    static WORD: OnceLock<Option<fancy_regex::Regex>> = OnceLock::new();
    let Some(re) = WORD.get_or_init(|| fancy_regex::Regex::new(r"^\w$").ok()) else {
        return c.is_alphanumeric() || c == '_';
    };
    let mut buf = [0u8; 4];
    re.is_match(c.encode_utf8(&mut buf)).unwrap_or(false)
}

// ---------------------------------------------------------------------------
// Stage 2: normalizer
// ---------------------------------------------------------------------------

/// Stage 2: the normalizer steps, applied to one stretch of text between added
/// tokens. Llama 2's legacy files do their `▁` handling here: Prepend("▁") then
/// Replace(" ", "▁"), so every stretch — also the one after `<s>` — gets a `▁`.
fn normalize(steps: &[Normalize], text: &str) -> String {
    let mut s = text.to_string();
    for step in steps {
        match step {
            Normalize::Prepend(p) => {
                if !s.is_empty() {
                    s.insert_str(0, p);
                }
            }
            Normalize::Replace(from, to) => {
                if !from.is_empty() {
                    s = s.replace(from.as_str(), to);
                }
            }
        }
    }
    s
}

// ---------------------------------------------------------------------------
// Stage 3: pre-tokenizer
// ---------------------------------------------------------------------------

/// Stage 3: cut the text into the words BPE works on, and respell them in the
/// alphabet the vocabulary uses. Each step works on every piece the previous
/// step made; `at_start` follows the first piece (Metaspace's "first" scheme
/// needs it). Empty pieces are dropped.
fn pre_tokenize(steps: &[PreTokenize], t: &Tables, text: &str, at_start: bool) -> Vec<String> {
    let mut pieces = vec![text.to_string()];
    let mut regexes = t.regexes.iter();
    for step in steps {
        let mut next = Vec::with_capacity(pieces.len());
        match step {
            PreTokenize::Split(_) => {
                // Tables::build compiled one regex per Split step, in order.
                let Some(re) = regexes.next() else { continue };
                for p in &pieces {
                    split_regex(re, p, &mut next);
                }
            }
            PreTokenize::Digits { individual } => {
                for p in &pieces {
                    split_digits(p, *individual, &mut next);
                }
            }
            PreTokenize::PrefixSpace => {
                for p in pieces.drain(..) {
                    next.push(if p.starts_with(' ') { p } else { format!(" {p}") });
                }
            }
            PreTokenize::ByteAlphabet => {
                let alphabet = byte_alphabet();
                for p in &pieces {
                    next.push(p.bytes().map(|b| alphabet.to_char[b as usize]).collect());
                }
            }
            PreTokenize::Metaspace { prepend, split } => {
                for (i, p) in pieces.iter().enumerate() {
                    let mut s = p.replace(' ', "▁");
                    let wanted = match prepend {
                        Prepend::Always => true,
                        Prepend::First => i == 0 && at_start,
                        Prepend::Never => false,
                    };
                    if wanted && !s.starts_with(METASPACE) {
                        s.insert(0, METASPACE);
                    }
                    if *split {
                        split_before_metaspace(&s, &mut next);
                    } else {
                        next.push(s);
                    }
                }
            }
        }
        pieces = next.into_iter().filter(|p| !p.is_empty()).collect();
    }
    pieces
}

/// The regex's matches and the gaps between them, in order.
fn split_regex(re: &fancy_regex::Regex, text: &str, out: &mut Vec<String>) {
    let mut last = 0;
    for m in re.find_iter(text) {
        let Ok(m) = m else {
            // The backtracking engine gave up (its step limit, on a pathological
            // input). Keep the rest as one piece rather than lose text.
            break;
        };
        if m.start() > last {
            out.push(text[last..m.start()].to_string());
        }
        if m.end() > m.start() {
            out.push(m.as_str().to_string());
        }
        last = m.end();
    }
    if last < text.len() {
        out.push(text[last..].to_string());
    }
}

/// Digits isolated (one piece each, or one per run), text between them kept.
/// "Digit" is Rust's `char::is_numeric`, which is what `tokenizers` uses, so
/// `½`, `²` and `٣` count too.
fn split_digits(text: &str, individual: bool, out: &mut Vec<String>) {
    let mut current = String::new();
    let mut current_is_digits = false;
    for c in text.chars() {
        let digit = c.is_numeric();
        let boundary = !current.is_empty() && (digit != current_is_digits || (digit && individual));
        if boundary {
            out.push(std::mem::take(&mut current));
        }
        current.push(c);
        current_is_digits = digit;
    }
    if !current.is_empty() {
        out.push(current);
    }
}

/// Cut before every `▁`, each `▁` starting the piece after it.
fn split_before_metaspace(text: &str, out: &mut Vec<String>) {
    let mut start = 0;
    for (i, _) in text.match_indices(METASPACE) {
        if i > start {
            out.push(text[start..i].to_string());
        }
        start = i;
    }
    if start < text.len() {
        out.push(text[start..].to_string());
    }
}

// ---------------------------------------------------------------------------
// Stage 4: BPE
// ---------------------------------------------------------------------------

/// The symbols BPE starts from: one id per character of the word. A character
/// missing from the vocabulary becomes its byte tokens (byte fallback) or the
/// unknown token, and is dropped when there is neither, all as `tokenizers` does
/// (including its quirk that a pending unknown token is written after byte
/// tokens that follow it).
fn initial_symbols(opt: &BpeOptions, t: &Tables, word: &str) -> Vec<u32> {
    let mut symbols = Vec::with_capacity(word.len());
    let mut pending_unk: Option<u32> = None;
    let mut buf = [0u8; 4];
    for c in word.chars() {
        let s: &str = c.encode_utf8(&mut buf);
        if let Some(&id) = t.token_to_id.get(s) {
            symbols.extend(pending_unk.take());
            symbols.push(id);
            continue;
        }
        if opt.byte_fallback {
            let bytes: Option<Vec<u32>> = s.bytes().map(|b| t.byte_tokens[b as usize]).collect();
            if let Some(bytes) = bytes {
                symbols.extend(bytes);
                continue;
            }
        }
        if let Some(unk) = opt.unk_id
            && !(opt.fuse_unk && pending_unk.is_some())
        {
            symbols.extend(pending_unk.take());
            pending_unk = Some(unk);
        }
    }
    symbols.extend(pending_unk);
    symbols
}

/// Stage 4: merge adjacent symbols, always the pair with the best (lowest) merge
/// rank next, the leftmost among equals, until no adjacent pair has a merge.
///
/// This is `tokenizers`' algorithm, step for step, since other orders give other
/// tokens in corner cases: a heap of candidate merges keyed by (rank, position),
/// and a linked list of the symbols still alive. A heap entry whose pair has
/// since changed is recognised by the merged token it would make and skipped.
/// The naive twin — rescan all pairs after every merge — gives the same result in
/// O(n²); the heap makes long words (a SentencePiece paragraph) O(n log n).
fn bpe_merge(mut ids: Vec<u32>, merges: &HashMap<(u32, u32), (u32, u32)>) -> Vec<u32> {
    const NONE: usize = usize::MAX;
    let n = ids.len();
    if n < 2 {
        return ids;
    }
    let mut prev: Vec<usize> = (0..n).map(|i| if i == 0 { NONE } else { i - 1 }).collect();
    let mut next: Vec<usize> = (0..n).map(|i| if i + 1 == n { NONE } else { i + 1 }).collect();
    let mut alive = vec![true; n];
    // Min-heap of (rank, position of the left symbol, merged id).
    let mut heap = BinaryHeap::with_capacity(n);
    for i in 0..n - 1 {
        if let Some(&(rank, new_id)) = merges.get(&(ids[i], ids[i + 1])) {
            heap.push(Reverse((rank, i, new_id)));
        }
    }
    while let Some(Reverse((_, pos, new_id))) = heap.pop() {
        if !alive[pos] || next[pos] == NONE {
            continue;
        }
        let right = next[pos];
        match merges.get(&(ids[pos], ids[right])) {
            Some(&(_, id)) if id == new_id => {}
            _ => continue, // stale: one of the two symbols has merged since
        }
        ids[pos] = new_id;
        alive[right] = false;
        next[pos] = next[right];
        if next[pos] != NONE {
            prev[next[pos]] = pos;
        }
        if prev[pos] != NONE {
            let p = prev[pos];
            if let Some(&(rank, id)) = merges.get(&(ids[p], ids[pos])) {
                heap.push(Reverse((rank, p, id)));
            }
        }
        if next[pos] != NONE
            && let Some(&(rank, id)) = merges.get(&(ids[pos], ids[next[pos]]))
        {
            heap.push(Reverse((rank, pos, id)));
        }
    }
    (0..n).filter(|&i| alive[i]).map(|i| ids[i]).collect()
}

// ---------------------------------------------------------------------------
// Stage 5: decoder
// ---------------------------------------------------------------------------

impl DecodeStep {
    /// One decoder step over the token strings, as `tokenizers`' decode_chain.
    fn apply(&self, tokens: Vec<String>) -> Vec<String> {
        match self {
            DecodeStep::ByteLevel => {
                let bytes: Vec<u8> = tokens.iter().flat_map(|t| byte_level_bytes(t)).collect();
                vec![String::from_utf8_lossy(&bytes).into_owned()]
            }
            DecodeStep::Replace(from, to) => tokens.into_iter().map(|t| t.replace(from.as_str(), to)).collect(),
            DecodeStep::ByteFallback => byte_fallback(tokens),
            DecodeStep::Fuse => vec![tokens.concat()],
            DecodeStep::Strip { content, start, stop } => {
                tokens.into_iter().map(|t| strip(&t, *content, *start, *stop)).collect()
            }
            DecodeStep::Metaspace { strip_first } => (tokens.iter().enumerate())
                .map(|(i, t)| {
                    // tokenizers drops every ▁ of the first token, not just the
                    // leading one; we do the same.
                    (t.chars())
                        .filter_map(|c| match c {
                            METASPACE if i == 0 && *strip_first => None,
                            METASPACE => Some(' '),
                            c => Some(c),
                        })
                        .collect()
                })
                .collect(),
        }
    }
}

/// A byte-level token's bytes. A token with a character outside the byte
/// alphabet (an added token like `<｜end▁of▁sentence｜>`) stands for its own UTF-8.
fn byte_level_bytes(token: &str) -> Vec<u8> {
    let alphabet = byte_alphabet();
    let bytes: Option<Vec<u8>> = token.chars().map(|c| alphabet.to_byte(c)).collect();
    bytes.unwrap_or_else(|| token.as_bytes().to_vec())
}

/// `<0xAB>` -> 0xAB (hex digits of either case, as tokenizers' ByteFallback).
fn parse_byte_token(token: &str) -> Option<u8> {
    let hex = token.strip_prefix("<0x")?.strip_suffix('>')?;
    if token.len() != 6 {
        return None;
    }
    u8::from_str_radix(hex, 16).ok()
}

/// Runs of byte tokens become the text they spell; a run that is not valid
/// UTF-8 becomes one U+FFFD per byte (not per invalid sequence), as tokenizers.
fn byte_fallback(tokens: Vec<String>) -> Vec<String> {
    fn flush(bytes: &mut Vec<u8>, out: &mut Vec<String>) {
        if bytes.is_empty() {
            return;
        }
        match String::from_utf8(std::mem::take(bytes)) {
            Ok(s) => out.push(s),
            Err(e) => out.extend(e.as_bytes().iter().map(|_| "\u{FFFD}".to_string())),
        }
    }
    let mut out = Vec::with_capacity(tokens.len());
    let mut bytes = Vec::new();
    for t in tokens {
        match parse_byte_token(&t) {
            Some(b) => bytes.push(b),
            None => {
                flush(&mut bytes, &mut out);
                out.push(t);
            }
        }
    }
    flush(&mut bytes, &mut out);
    out
}

fn strip(token: &str, content: char, start: usize, stop: usize) -> String {
    let chars: Vec<char> = token.chars().collect();
    let from = chars.iter().take(start).take_while(|&&c| c == content).count();
    let rest = &chars[from..];
    let cut = rest.iter().rev().take(stop).take_while(|&&c| c == content).count();
    rest[..rest.len() - cut].iter().collect()
}

// ---------------------------------------------------------------------------
// Lookup tables
// ---------------------------------------------------------------------------

impl Tables {
    /// Index the spec, checking what encode relies on: merges name existing
    /// tokens, added token ids are in range, regexes compile.
    fn build(spec: &Spec) -> Result<Tables> {
        let n = spec.vocab.len();
        if n > u32::MAX as usize {
            bail!("vocabulary has {n} tokens, more than ids can number");
        }
        let mut token_to_id = HashMap::with_capacity(n);
        for (id, token) in spec.vocab.iter().enumerate() {
            // With duplicates, the last id wins, as in a {token: id} dict.
            token_to_id.insert(token.clone(), id as u32);
        }
        for a in &spec.added_tokens {
            if a.id as usize >= n {
                bail!("added token {:?} has id {}, out of range (vocab {n})", a.content, a.id);
            }
            token_to_id.insert(a.content.clone(), a.id);
        }

        let mut merges = HashMap::with_capacity(spec.merges.len());
        for (rank, (a, b)) in spec.merges.iter().enumerate() {
            let id = |t: &str| {
                token_to_id
                    .get(t)
                    .copied()
                    .ok_or_else(|| anyhow!("merge {a:?} {b:?}: token {t:?} is not in the vocabulary"))
            };
            let (a_id, b_id, new_id) = (id(a)?, id(b)?, id(&format!("{a}{b}"))?);
            // A repeated pair keeps its last rank, as tokenizers' HashMap insert does.
            merges.insert((a_id, b_id), (rank as u32, new_id));
        }

        let mut byte_tokens = [None; 256];
        for (b, slot) in byte_tokens.iter_mut().enumerate() {
            *slot = token_to_id.get(&format!("<0x{b:02X}>")).copied();
        }

        let mut regexes = Vec::new();
        for step in &spec.pre_tokenizer {
            if let PreTokenize::Split(pattern) = step {
                let re = fancy_regex::Regex::new(pattern)
                    .map_err(|e| anyhow!("pre-tokenizer regex {pattern:?} does not compile: {e}"))?;
                regexes.push(re);
            }
        }

        let (mut raw, mut normalized) = (Vec::new(), Vec::new());
        for a in &spec.added_tokens {
            if a.content.is_empty() {
                continue;
            }
            if a.normalized {
                normalized.push((normalize(&spec.normalizer, &a.content), a.clone()));
            } else {
                raw.push((a.content.clone(), a.clone()));
            }
        }

        Ok(Tables {
            token_to_id,
            merges,
            byte_tokens,
            regexes,
            raw_matcher: AddedMatcher::new(raw),
            normalized_matcher: AddedMatcher::new(normalized),
            cache: RwLock::new(HashMap::new()),
        })
    }
}

// ---------------------------------------------------------------------------
// GPT-2's byte alphabet
// ---------------------------------------------------------------------------

/// GPT-2's spelling of bytes as printable characters, so that a byte-level
/// vocabulary is a list of ordinary strings: the printable Latin-1 bytes stand
/// for themselves, the other 68 (controls, space, 0x7F-0xA0, 0xAD) for
/// U+0100 onwards in byte order. So a space is `Ġ` (U+0120), a newline `Ċ`.
struct ByteAlphabet {
    to_char: [char; 256],
    /// Indexed by code point, for the 324 characters below U+0144.
    from_char: [Option<u8>; 324],
}

impl ByteAlphabet {
    fn to_byte(&self, c: char) -> Option<u8> {
        self.from_char.get(c as usize).copied().flatten()
    }
}

fn byte_alphabet() -> &'static ByteAlphabet {
    static ALPHABET: OnceLock<ByteAlphabet> = OnceLock::new();
    ALPHABET.get_or_init(|| {
        let mut to_char = ['\0'; 256];
        let mut from_char = [None; 324];
        let mut next_free = 256u32;
        for b in 0..=255u8 {
            let printable = matches!(b, b'!'..=b'~' | 0xA1..=0xAC | 0xAE..=0xFF);
            let code = if printable {
                b as u32
            } else {
                next_free += 1;
                next_free - 1
            };
            // Every code here is below U+0144, a valid char.
            let c = char::from_u32(code).unwrap_or('\0');
            to_char[b as usize] = c;
            from_char[code as usize] = Some(b);
        }
        ByteAlphabet { to_char, from_char }
    })
}

// ---------------------------------------------------------------------------
// tokenizer.json
// ---------------------------------------------------------------------------

/// Reading a Hugging Face tokenizer.json into a [`Spec`].
mod hf_json {
    use super::*;

    pub(super) fn parse(json: &str, config: Option<&str>) -> Result<Spec> {
        let root: Value = serde_json::from_str(json).map_err(|e| anyhow!("tokenizer.json is not valid JSON: {e}"))?;
        let model = root.get("model").ok_or_else(|| anyhow!("tokenizer.json has no \"model\""))?;
        let kind = str_field(model, "type").unwrap_or("BPE");
        if kind != "BPE" {
            bail!("tokenizer.json: model type {kind} is not supported (only BPE)");
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
        let mut by_id: Vec<Option<String>> = Vec::new();
        let mut put = |id: u64, token: &str| -> Result<()> {
            let i = usize::try_from(id)
                .ok()
                .filter(|&i| i < (1 << 31))
                .ok_or_else(|| anyhow!("tokenizer.json: token {token:?} has id {id}, too large"))?;
            if by_id.len() <= i {
                by_id.resize(i + 1, None);
            }
            by_id[i] = Some(token.to_string());
            Ok(())
        };
        let vocab = model
            .get("vocab")
            .and_then(Value::as_object)
            .ok_or_else(|| anyhow!("tokenizer.json: model.vocab is missing or not an object"))?;
        for (token, id) in vocab {
            let id = id.as_u64().ok_or_else(|| anyhow!("tokenizer.json: vocab id of {token:?} is not a number"))?;
            put(id, token)?;
        }
        let mut added_tokens = Vec::new();
        for a in root.get("added_tokens").and_then(Value::as_array).into_iter().flatten() {
            let content =
                str_field(a, "content").ok_or_else(|| anyhow!("tokenizer.json: an added token has no content"))?;
            let id = a
                .get("id")
                .and_then(Value::as_u64)
                .ok_or_else(|| anyhow!("tokenizer.json: added token {content:?} has no id"))?;
            put(id, content)?;
            let special = bool_field(a, "special", false);
            added_tokens.push(AddedToken {
                id: id as u32,
                content: content.to_string(),
                special,
                normalized: bool_field(a, "normalized", !special),
                lstrip: bool_field(a, "lstrip", false),
                rstrip: bool_field(a, "rstrip", false),
                single_word: bool_field(a, "single_word", false),
            });
        }
        // An id nobody uses decodes to nothing, as in tokenizers (where it is skipped).
        let mut vocab: Vec<String> = by_id.into_iter().map(Option::unwrap_or_default).collect();
        // tokenizers spells a normalized added token in its normalized form
        // (`<nt>` as `▁<nt>` under Llama 2's normalizer), which is what decoding
        // it gives back.
        let normalizer = parse_normalizer(root.get("normalizer").unwrap_or(&Value::Null))?;
        for a in added_tokens.iter().filter(|a| a.normalized) {
            vocab[a.id as usize] = normalize(&normalizer, &a.content);
        }

        let mut merges = Vec::new();
        for m in model.get("merges").and_then(Value::as_array).into_iter().flatten() {
            merges.push(parse_merge(m).map_err(|e| anyhow!("tokenizer.json: {e}"))?);
        }

        let token_id = |name: &str| -> Option<u32> { vocab.iter().rposition(|t| t == name).map(|i| i as u32) };
        let unk_id = match str_field(model, "unk_token") {
            Some(unk) => Some(
                token_id(unk).ok_or_else(|| anyhow!("tokenizer.json: unk_token {unk:?} is not in the vocabulary"))?,
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
            Some(c) => {
                Some(serde_json::from_str(c).map_err(|e| anyhow!("tokenizer_config.json is not valid JSON: {e}"))?)
            }
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
                .ok_or_else(|| anyhow!("tokenizer_config.json: {key} {name:?} is not in the vocabulary"))
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

    /// A merge is "a b" (older files) or ["a", "b"].
    pub(super) fn parse_merge(m: &Value) -> Result<(String, String)> {
        match m {
            Value::String(s) => split_merge(s),
            Value::Array(pair) => match pair.as_slice() {
                [Value::String(a), Value::String(b)] => Ok((a.clone(), b.clone())),
                _ => bail!("merge {m} is not a pair of strings"),
            },
            _ => bail!("merge {m} is neither \"a b\" nor [\"a\", \"b\"]"),
        }
    }

    pub(super) fn split_merge(s: &str) -> Result<(String, String)> {
        let mut parts = s.split(' ');
        match (parts.next(), parts.next(), parts.next()) {
            (Some(a), Some(b), None) => Ok((a.to_string(), b.to_string())),
            _ => bail!("merge {s:?} is not two tokens separated by one space"),
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
            Some(other) => bail!("tokenizer.json: normalizer {other} is not supported"),
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
                        "tokenizer.json: Split pre-tokenizer with behavior {behavior} (invert {}) is not supported",
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
            Some(other) => bail!("tokenizer.json: pre-tokenizer {other} is not supported"),
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
            Some(other) => bail!("tokenizer.json: decoder {other} is not supported"),
        }
        Ok(steps)
    }

    /// Metaspace's prepend_scheme, or the older add_prefix_space flag.
    fn prepend_scheme(v: &Value) -> Result<Prepend> {
        match str_field(v, "prepend_scheme") {
            Some("always") => Ok(Prepend::Always),
            Some("first") => Ok(Prepend::First),
            Some("never") => Ok(Prepend::Never),
            Some(other) => bail!("tokenizer.json: Metaspace prepend_scheme {other:?} is unknown"),
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
}

// ---------------------------------------------------------------------------
// Writing tokenizer.json and GGUF metadata
// ---------------------------------------------------------------------------

/// The inverse of `hf_json` and `gguf_vocab`: a [`Spec`] written back out in
/// the two formats lift exports.
mod hf_write {
    use super::*;
    use crate::formats::gguf::GgufValue;
    use serde_json::json;

    pub(super) fn to_json(spec: &Spec) -> Result<String> {
        // model.vocab: every id with a distinct, non-empty spelling.
        let mut vocab = serde_json::Map::new();
        for (id, t) in spec.vocab.iter().enumerate() {
            if !t.is_empty() && !vocab.contains_key(t) {
                vocab.insert(t.clone(), json!(id));
            }
        }
        let merges: Vec<Value> = spec.merges.iter().map(|(a, b)| json!([a, b])).collect();
        let unk = spec.bpe.unk_id.map(|id| spec.vocab[id as usize].clone());
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
                let name = &spec.vocab[bos as usize];
                json!({
                    "type": "TemplateProcessing",
                    "single": [{"SpecialToken": {"id": name, "type_id": 0}}, {"Sequence": {"id": "A", "type_id": 0}}],
                    "pair": [{"SpecialToken": {"id": name, "type_id": 0}}, {"Sequence": {"id": "A", "type_id": 0}},
                             {"SpecialToken": {"id": name, "type_id": 1}}, {"Sequence": {"id": "B", "type_id": 1}}],
                    "special_tokens": {name.as_str(): {"id": name, "ids": [bos], "tokens": [name]}},
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
                    out.push(
                        json!({"type": "Split", "pattern": {"Regex": r}, "behavior": "Isolated", "invert": false}),
                    );
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
                    out.push(
                        json!({"type": "Metaspace", "replacement": "▁", "prepend_scheme": scheme, "split": split}),
                    );
                    i += 1;
                }
            }
        }
        Ok(out)
    }

    /// tokenizer.ggml.* keys, as llama.cpp and transformers read them.
    pub(super) fn gguf_metadata(spec: &Spec) -> Vec<(String, GgufValue)> {
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
}

// ---------------------------------------------------------------------------
// GGUF vocabulary
// ---------------------------------------------------------------------------

/// Building a [`Spec`] from GGUF tokenizer metadata, the way `transformers`
/// does (integrations/gguf/gguf_tokenizer_mapping.py), so the two agree.
mod gguf_vocab {
    use super::*;

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

    #[allow(clippy::too_many_arguments)]
    pub(super) fn build(
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
                vocab = (tokens.iter())
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
                    merges_from_scores(&tokens, &scores)
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
            other => bail!("GGUF tokenizer model {other:?} is not supported (only \"gpt2\" and \"llama\" BPE)"),
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
        merges.iter().map(|m| hf_json::split_merge(m).map_err(|e| anyhow!("GGUF tokenizer: {e}"))).collect()
    }

    /// Merges for a SentencePiece vocabulary that stores only scores: every way of
    /// cutting a token into two tokens is a merge, ranked by the token's score
    /// (best first), then by longer left part, then longer right part; ties keep
    /// the vocabulary's order, and within one token the pairs go by the ids of
    /// their parts. This is transformers' `generate_merges`, order for order.
    pub(super) fn merges_from_scores(tokens: &[String], scores: &[f32]) -> Vec<(String, String)> {
        // {token: id} keeps the last id of a repeated token, {token: score} its
        // first position and last score, as Python dicts built from the lists.
        let mut id_of: HashMap<&str, usize> = HashMap::with_capacity(tokens.len());
        let mut score_of: HashMap<&str, f32> = HashMap::with_capacity(tokens.len());
        let mut order: Vec<&str> = Vec::with_capacity(tokens.len());
        for (i, t) in tokens.iter().enumerate() {
            id_of.insert(t, i);
            if score_of.insert(t, scores[i]).is_none() {
                order.push(t);
            }
        }
        // (left, right, score, chars in left, chars in right)
        let mut all: Vec<(&str, &str, f32, usize, usize)> = Vec::new();
        for t in order {
            let mut local = Vec::new();
            for (cut, _) in t.char_indices().skip(1) {
                let (l, r) = t.split_at(cut);
                if let (Some(&li), Some(&ri)) = (id_of.get(l), id_of.get(r)) {
                    local.push((li, ri, l, r));
                }
            }
            local.sort_by_key(|&(li, ri, _, _)| (li, ri));
            for (_, _, l, r) in local {
                all.push((l, r, score_of[t], l.chars().count(), r.chars().count()));
            }
        }
        // Descending, stable: Python's sorted(..., reverse=True) keeps ties in order.
        all.sort_by(|x, y| y.2.total_cmp(&x.2).then(y.3.cmp(&x.3)).then(y.4.cmp(&x.4)));
        all.into_iter().map(|(l, r, ..)| (l.to_string(), r.to_string())).collect()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn byte_alphabet_is_gpt2s() {
        let a = byte_alphabet();
        assert_eq!(a.to_char[b' ' as usize], 'Ġ');
        assert_eq!(a.to_char[b'\n' as usize], 'Ċ');
        assert_eq!(a.to_char[b'A' as usize], 'A');
        for b in 0..=255u8 {
            assert_eq!(a.to_byte(a.to_char[b as usize]), Some(b));
        }
    }

    #[test]
    fn digits_are_isolated_like_tokenizers() {
        let mut out = Vec::new();
        split_digits("ab123c4½", true, &mut out);
        assert_eq!(out, ["ab", "1", "2", "3", "c", "4", "½"]);
        out.clear();
        split_digits("ab123c4½", false, &mut out);
        assert_eq!(out, ["ab", "123", "c", "4½"]);
    }

    #[test]
    fn gpt2_regex_leaves_last_space_to_next_word() {
        let re = fancy_regex::Regex::new(GPT2_REGEX).unwrap();
        let mut out = Vec::new();
        split_regex(&re, "a   b  ", &mut out);
        assert_eq!(out, ["a", "  ", " b", "  "]);
    }

    #[test]
    fn strip_and_byte_fallback_decoders() {
        assert_eq!(strip("  a ", ' ', 1, 0), " a ");
        let toks = ["<0xE4>", "<0xB8>", "<0xAD>", "x", "<0xE4>"].map(String::from).to_vec();
        assert_eq!(byte_fallback(toks), ["中", "x", "\u{FFFD}"]);
    }

    #[test]
    fn merges_from_scores_prefers_higher_score_then_longer_left() {
        let tokens = ["a", "b", "c", "ab", "bc", "abc"].map(String::from);
        let scores = [0.0, 0.0, 0.0, -1.0, -2.0, -3.0];
        let m = gguf_vocab::merges_from_scores(&tokens, &scores);
        let m: Vec<(&str, &str)> = m.iter().map(|(a, b)| (a.as_str(), b.as_str())).collect();
        assert_eq!(m, [("a", "b"), ("b", "c"), ("ab", "c"), ("a", "bc")]);
    }
}
