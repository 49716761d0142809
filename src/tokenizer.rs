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
//!
//! This file holds the tokenizer and nothing of the files it comes from. Turning
//! a tokenizer.json, or the vocabulary in a GGUF file, into a [`Tokenizer`] (and
//! a [`Tokenizer`] back into either) is done in formats/tokenizer_json.rs and
//! formats/tokenizer_gguf.rs, as more `impl Tokenizer` blocks; they use the
//! types here, and this file uses nothing of theirs.

use std::cmp::Reverse;
use std::collections::{BinaryHeap, HashMap};
use std::fmt;
use std::sync::{Arc, OnceLock, RwLock};

use anyhow::{Result, anyhow, bail};
use serde::{Deserialize, Serialize};

use crate::limits::{clip, quote};

/// GPT-2's pre-tokenizer regex (also used by `tokenizers`' ByteLevel with `use_regex`).
pub const GPT2_REGEX: &str = r"'s|'t|'re|'ve|'m|'ll|'d| ?\p{L}+| ?\p{N}+| ?[^\s\p{L}\p{N}]+|\s+(?!\S)|\s+";

/// Llama 3's pre-tokenizer regex: case-insensitive contractions, a letter run may
/// take one leading non-letter, numbers in groups of at most three digits.
pub const LLAMA3_REGEX: &str = r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}{1,3}| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+";

/// Qwen 2's: Llama 3's with single digits.
pub(crate) const QWEN2_REGEX: &str =
    r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+";

/// GPT-4o's (also Llama 4's): words split at case changes, contractions attached.
pub(crate) const GPT4O_REGEX: &str = r"[^\r\n\p{L}\p{N}]?[\p{Lu}\p{Lt}\p{Lm}\p{Lo}\p{M}]*[\p{Ll}\p{Lm}\p{Lo}\p{M}]+(?i:'s|'t|'re|'ve|'m|'ll|'d)?|[^\r\n\p{L}\p{N}]?[\p{Lu}\p{Lt}\p{Lm}\p{Lo}\p{M}]+[\p{Ll}\p{Lm}\p{Lo}\p{M}]*(?i:'s|'t|'re|'ve|'m|'ll|'d)?|\p{N}{1,3}| ?[^\s\p{L}\p{N}]+[\r\n/]*|\s*[\r\n]+|\s+(?!\S)|\s+";

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
    pub(crate) spec: Spec,
    tables: Arc<Tables>,
}

/// Everything that defines a tokenizer; the rest is derived from it.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub(crate) struct Spec {
    /// Token string of every id. Byte-level tokens are spelled in the byte alphabet.
    pub(crate) vocab: Vec<String>,
    /// Merges, best first: the pair `(a, b)` at index r becomes the token `a + b`.
    pub(crate) merges: Vec<(String, String)>,
    /// Tokens matched whole in the text before anything else happens to it.
    pub(crate) added_tokens: Vec<AddedToken>,
    /// Applied to each stretch of text between added tokens.
    pub(crate) normalizer: Vec<Normalize>,
    /// Applied in order; each step cuts every piece further (or respells it).
    pub(crate) pre_tokenizer: Vec<PreTokenize>,
    pub(crate) bpe: BpeOptions,
    /// Applied in order to the list of token strings; the result is concatenated.
    pub(crate) decoder: Vec<DecodeStep>,
    pub(crate) bos_id: Option<u32>,
    pub(crate) eos_id: Option<u32>,
    pub(crate) add_bos: bool,
}

/// A token matched literally in the text (`tokenizers`' AddedToken).
#[derive(Debug, Clone, Serialize, Deserialize)]
pub(crate) struct AddedToken {
    pub(crate) id: u32,
    pub(crate) content: String,
    /// Special tokens (`<s>`, `<|im_end|>`) are what `skip_special_tokens` would
    /// drop; we keep them when decoding, as `decode` does by default.
    pub(crate) special: bool,
    /// Matched in the normalized text (with its content normalized too) rather
    /// than in the raw text.
    pub(crate) normalized: bool,
    /// Absorb the whitespace on its left / right into the token.
    pub(crate) lstrip: bool,
    pub(crate) rstrip: bool,
    /// Only match when not inside a word.
    pub(crate) single_word: bool,
}

/// One normalizer step (`tokenizers`' Prepend and Replace, the two Llama 2 uses).
#[derive(Debug, Clone, Serialize, Deserialize)]
pub(crate) enum Normalize {
    /// Put this string in front of every non-empty stretch of text.
    Prepend(String),
    /// Replace every occurrence of the first string by the second.
    Replace(String, String),
}

/// One pre-tokenizer step.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub(crate) enum PreTokenize {
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
pub(crate) enum Prepend {
    Always,
    /// Only to the piece at the very start of the text: after `<s>` there is none.
    First,
    Never,
}

/// Options of the BPE model itself.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub(crate) struct BpeOptions {
    /// Spell a character missing from the vocabulary as its byte tokens `<0xXX>`.
    pub(crate) byte_fallback: bool,
    /// Otherwise, the token it becomes (none: the character is dropped, as HF does).
    pub(crate) unk_id: Option<u32>,
    /// Consecutive unknown characters become one unknown token.
    pub(crate) fuse_unk: bool,
    /// A pre-token that is itself in the vocabulary is taken whole (Llama 3).
    pub(crate) ignore_merges: bool,
}

/// One decoder step, working on the list of token strings (`tokenizers`' decoders).
#[derive(Debug, Clone, Serialize, Deserialize)]
pub(crate) enum DecodeStep {
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
pub(crate) fn normalize(steps: &[Normalize], text: &str) -> String {
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
pub(crate) fn parse_byte_token(token: &str) -> Option<u8> {
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
        for (what, id) in [("BOS", spec.bos_id), ("EOS", spec.eos_id), ("unknown", spec.bpe.unk_id)] {
            if let Some(id) = id.filter(|&id| id as usize >= n) {
                bail!("the {what} token id {id} is out of range (vocab {n})");
            }
        }
        let mut token_to_id = HashMap::with_capacity(n);
        for (id, token) in spec.vocab.iter().enumerate() {
            // With duplicates, the last id wins, as in a {token: id} dict.
            token_to_id.insert(token.clone(), id as u32);
        }
        for a in &spec.added_tokens {
            if a.id as usize >= n {
                bail!("added token {} has id {}, out of range (vocab {n})", quote(&a.content), a.id);
            }
            token_to_id.insert(a.content.clone(), a.id);
        }

        let mut merges = HashMap::with_capacity(spec.merges.len());
        for (rank, (a, b)) in spec.merges.iter().enumerate() {
            let id = |t: &str| {
                let missing =
                    || anyhow!("merge {} {}: token {} is not in the vocabulary", quote(a), quote(b), quote(t));
                token_to_id.get(t).copied().ok_or_else(missing)
            };
            let (a_id, b_id, new_id) = (id(a)?, id(b)?, id(&format!("{a}{b}"))?);
            // A repeated pair keeps its last rank, as tokenizers' HashMap insert does.
            merges.insert((a_id, b_id), (rank as u32, new_id));
        }

        let mut byte_tokens = [None; 256];
        for (b, slot) in byte_tokens.iter_mut().enumerate() {
            *slot = token_to_id.get(&format!("<0x{b:02X}>")).copied();
        }

        check_literals(spec)?;
        let mut regexes = Vec::new();
        for step in &spec.pre_tokenizer {
            if let PreTokenize::Split(pattern) = step {
                let re = compile_split(pattern)?;
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

/// The longest string a normalizer or decoder step may insert. Real ones
/// are a character (`▁`, a space); a long one would multiply the text, once
/// per match, at every encode or decode.
const MAX_STEP_TEXT: usize = 64;

/// Normalizer and decoder strings: short, and a Replace has something to replace.
fn check_literals(spec: &Spec) -> Result<()> {
    let mut texts: Vec<(&str, &str, bool)> = Vec::new(); // (step, text, may be empty)
    for n in &spec.normalizer {
        match n {
            Normalize::Prepend(p) => texts.push(("Prepend normalizer", p, true)),
            Normalize::Replace(a, b) => {
                texts.extend([("Replace normalizer", a.as_str(), false), ("Replace normalizer", b, true)])
            }
        }
    }
    for d in &spec.decoder {
        if let DecodeStep::Replace(a, b) = d {
            texts.extend([("Replace decoder", a.as_str(), false), ("Replace decoder", b.as_str(), true)]);
        }
    }
    for (step, text, may_be_empty) in texts {
        if text.len() > MAX_STEP_TEXT || (text.is_empty() && !may_be_empty) {
            bail!("{step} with the string {}: want 1 to {MAX_STEP_TEXT} bytes", quote(text));
        }
    }
    Ok(())
}

/// The longest pre-tokenizer regex accepted, and its deepest nesting of
/// groups. Real ones are a few hundred bytes and nest twice; the regex
/// parser recurses once per group, so a file could otherwise overflow the
/// stack with "((((...".
const MAX_REGEX_BYTES: usize = 4096;
const MAX_REGEX_NESTING: usize = 32;

/// A `Split` step's regex, compiled after its size and nesting are checked.
fn compile_split(pattern: &str) -> Result<fancy_regex::Regex> {
    let (mut depth, mut deepest, mut escaped) = (0usize, 0usize, false);
    for c in pattern.chars() {
        match c {
            _ if escaped => escaped = false,
            '\\' => escaped = true,
            '(' | '[' => depth += 1,
            ')' | ']' => depth = depth.saturating_sub(1),
            _ => {}
        }
        deepest = deepest.max(depth);
    }
    if pattern.len() > MAX_REGEX_BYTES || deepest > MAX_REGEX_NESTING {
        bail!(
            "pre-tokenizer regex {} is too large ({} bytes, nesting {deepest}; at most {MAX_REGEX_BYTES} and {MAX_REGEX_NESTING})",
            quote(pattern),
            pattern.len()
        );
    }
    fancy_regex::Regex::new(pattern)
        .map_err(|e| anyhow!("pre-tokenizer regex {} does not compile: {}", quote(pattern), clip(&e.to_string())))
}

// ---------------------------------------------------------------------------
// GPT-2's byte alphabet
// ---------------------------------------------------------------------------

/// GPT-2's spelling of bytes as printable characters, so that a byte-level
/// vocabulary is a list of ordinary strings: the printable Latin-1 bytes stand
/// for themselves, the other 68 (controls, space, 0x7F-0xA0, 0xAD) for
/// U+0100 onwards in byte order. So a space is `Ġ` (U+0120), a newline `Ċ`.
pub(crate) struct ByteAlphabet {
    pub(crate) to_char: [char; 256],
    /// Indexed by code point, for the 324 characters below U+0144.
    from_char: [Option<u8>; 324],
}

impl ByteAlphabet {
    pub(crate) fn to_byte(&self, c: char) -> Option<u8> {
        self.from_char.get(c as usize).copied().flatten()
    }
}

pub(crate) fn byte_alphabet() -> &'static ByteAlphabet {
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
}
