//! Reading the answer out of a model's generated text, for `lift eval`.
//!
//! The gold `answer` of an example decides how its output is read
//! (`answer_kind`):
//!
//! - a number ("72", "1.8333", "-3", "10,300"): the LAST number in the output,
//!   commas removed, correct when within 1e-3 of the gold. This is
//!   LLM-Adapters' `extract_answer_number`: `re.findall(r'-?\d+\.?\d*')` on the
//!   text with commas removed, last match, `abs(label - pred) <= 0.001`.
//!   Consequences worth knowing: "3,4" reads as 34, "1/2" as 2, "x-5" as -5.
//! - a letter A-E (AQuA): the option letter the model gives; see
//!   `extract_letter` for the rule and how it differs from LLM-Adapters.
//! - an option word of the commonsense sets: true/false (BoolQ),
//!   solution1/solution2 (PIQA), answer1..answer5 (SIQA, ARC, OpenBookQA),
//!   option1/option2 (WinoGrande), ending1..ending4 (HellaSwag): the FIRST word
//!   of that family in the output, as LLM-Adapters' `commonsense_evaluate.py`
//!   does. Two differences, both to avoid false matches: we match whole words
//!   only (theirs is a substring search, so "untrue" counts as "true"), and
//!   ignore case (theirs would miss "True").
//! - anything else: `Text`, compared as whole strings (see `extract`). None of
//!   the LLM-Adapters math or commonsense sets needs it.
//!
//! `Rule::Reference` reads answers exactly as the LIFT release's evaluation
//! scripts do (`run_math_parallel.py`, `run_commonsense_parallel.py`), for
//! numbers on lift's rule (they are the same), for letters and option words
//! on `reference_letter` and `reference_word`.

/// The families of option words; the gold answer names one member.
pub const CHOICE_FAMILIES: [&[&str]; 5] = [
    &["true", "false"],
    &["solution1", "solution2"],
    &["answer1", "answer2", "answer3", "answer4", "answer5"],
    &["option1", "option2"],
    &["ending1", "ending2", "ending3", "ending4"],
];

/// Whose rules read the answers (`--answer-rule`).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, serde::Serialize, clap::ValueEnum)]
#[serde(rename_all = "lowercase")]
pub enum Rule {
    /// lift's: the option letter the text names, option words as whole words.
    #[default]
    Lift,
    /// The LIFT release's: the first capital A-E anywhere; the first option
    /// word anywhere in the lowercased text, even inside another word.
    Reference,
}

/// How an answer is read out of generated text.
#[derive(Debug, Clone, Copy, PartialEq)]
pub enum AnswerKind {
    Number,
    /// A multiple-choice option letter, A to E.
    Letter,
    /// One word of an option-word family (an entry of CHOICE_FAMILIES).
    Choice(&'static [&'static str]),
    Text,
}

/// Decides how to read answers for this gold answer.
pub fn answer_kind(answer: &str) -> AnswerKind {
    let a = answer.trim();
    if parse_number(a).is_some() {
        return AnswerKind::Number;
    }
    if a.len() == 1 && matches!(a.as_bytes()[0].to_ascii_uppercase(), b'A'..=b'E') {
        return AnswerKind::Letter;
    }
    for family in CHOICE_FAMILIES {
        if family.iter().any(|w| w.eq_ignore_ascii_case(a)) {
            return AnswerKind::Choice(family);
        }
    }
    AnswerKind::Text
}

/// The answer the generated text gives, normalized so that it can be compared
/// with the gold: a number as written (without commas), an uppercase letter,
/// a lowercase option word, or for Text the trimmed text (after the last
/// "answer is", if any) without a final period. None when there is none.
pub fn extract(generated: &str, kind: AnswerKind) -> Option<String> {
    extract_by(Rule::Lift, generated, kind)
}

/// `extract` by the rules of `rule`.
pub fn extract_by(rule: Rule, generated: &str, kind: AnswerKind) -> Option<String> {
    match (kind, rule) {
        (AnswerKind::Number, _) => last_number(generated),
        (AnswerKind::Letter, Rule::Lift) => extract_letter(generated).map(|c| c.to_string()),
        (AnswerKind::Letter, Rule::Reference) => reference_letter(generated).map(|c| c.to_string()),
        (AnswerKind::Choice(family), Rule::Lift) => first_word_of(generated, family),
        (AnswerKind::Choice(family), Rule::Reference) => reference_word(generated, family),
        (AnswerKind::Text, _) => {
            let lower = generated.to_ascii_lowercase();
            let tail = match lower.rfind("answer is") {
                Some(p) => &generated[p + "answer is".len()..],
                None => generated,
            };
            let t = tail.trim();
            let t = t.strip_suffix('.').unwrap_or(t).trim();
            if t.is_empty() { None } else { Some(t.to_string()) }
        }
    }
}

/// Whether `generated` gives the gold answer, by the rule `answer_kind(gold)` picks.
pub fn is_correct(generated: &str, gold: &str) -> bool {
    is_correct_by(Rule::Lift, generated, gold)
}

/// `is_correct` by the rules of `rule`. The reference compares letters
/// exactly (`target == predict`) and option words after lowercasing the gold.
pub fn is_correct_by(rule: Rule, generated: &str, gold: &str) -> bool {
    let kind = answer_kind(gold);
    let Some(got) = extract_by(rule, generated, kind) else {
        return false;
    };
    let gold = gold.trim();
    match (kind, rule) {
        (AnswerKind::Number, _) => match (parse_number(&got), parse_number(gold)) {
            (Some(p), Some(g)) => (p - g).abs() <= 1e-3,
            _ => false,
        },
        (AnswerKind::Letter, Rule::Reference) => got == gold,
        (AnswerKind::Letter | AnswerKind::Choice(_) | AnswerKind::Text, _) => got.eq_ignore_ascii_case(gold),
    }
}

// ----------------------------------------------------------------------------
// Numbers

/// A gold answer as a number: optional sign, digits with optional commas, an
/// optional fraction ("72", "-3", "1.8333", "10,300", "15.0"). Stricter than
/// `str::parse`, which would also take "inf", "NaN" and "1e5".
pub fn parse_number(s: &str) -> Option<f64> {
    let s: String = s.trim().chars().filter(|&c| c != ',').collect();
    let body = s.strip_prefix(['-', '+']).unwrap_or(&s);
    let (int, frac) = body.split_once('.').unwrap_or((body, ""));
    let digits = |p: &str| p.bytes().all(|b| b.is_ascii_digit());
    if int.is_empty() || !digits(int) || !digits(frac) || (body.contains('.') && frac.is_empty()) {
        return None;
    }
    s.parse().ok()
}

/// The last number in the text, as written there without its commas: an
/// optional '-' right before the digits, digits, and an optional '.' that is
/// followed by more digits (so the period ending "is 72." is not part of it).
pub fn last_number(text: &str) -> Option<String> {
    let s: Vec<u8> = text.bytes().filter(|&b| b != b',').collect();
    let mut last = None;
    let mut i = 0;
    while i < s.len() {
        if !s[i].is_ascii_digit() {
            i += 1;
            continue;
        }
        let start = if i > 0 && s[i - 1] == b'-' { i - 1 } else { i };
        while i < s.len() && s[i].is_ascii_digit() {
            i += 1;
        }
        if i + 1 < s.len() && s[i] == b'.' && s[i + 1].is_ascii_digit() {
            i += 1;
            while i < s.len() && s[i].is_ascii_digit() {
                i += 1;
            }
        }
        last = Some((start, i));
    }
    // Only ASCII bytes were kept in the match, so this is valid UTF-8.
    last.map(|(a, b)| String::from_utf8_lossy(&s[a..b]).into_owned())
}

// ----------------------------------------------------------------------------
// Option letters

/// Words that, right before a letter, say that the letter is the answer:
/// "the answer is (C)", "Answer: C", "**Answer:** C", "the correct option is D".
/// Compared with the text before the letter, lowercased, with trailing spaces,
/// '(', '[', ':', '*' and quotes removed.
const LETTER_CUES: [&str; 9] = [
    "answer",
    "answer is",
    "answer would be",
    "answer will be",
    "answer should be",
    "option",
    "option is",
    "choice",
    "choice is",
];

/// The option letter (A-E) a generated text gives. Only uppercase letters that
/// stand alone (no letter or digit on either side) are candidates, and the
/// answer is, in order of preference:
///   1. the last candidate introduced by a cue (LETTER_CUES: "answer is", ...);
///   2. else the last one written in parentheses, "(C)";
///   3. else the last candidate, not counting the article "A" ("A man ...",
///      an uppercase A followed by a space and a lowercase letter).
///
/// LLM-Adapters reads AQuA with `re.findall(r'A|B|C|D|E', text)[0]`: the first
/// uppercase A-E anywhere, even inside a word, so "Answer: C" reads as A and
/// "The Dog ..." as D. That scores most outputs by their first capitalized
/// A-E word rather than by the option they choose; our rule reads the option
/// the text actually names, and the last one, as a model's final choice
/// usually comes after its reasoning.
pub fn extract_letter(text: &str) -> Option<char> {
    let s = text.as_bytes();
    let lower = text.to_ascii_lowercase(); // same byte positions as text
    let alnum = |i: usize| s[i].is_ascii_alphanumeric();
    let (mut cued, mut paren, mut plain) = (None, None, None);
    for i in 0..s.len() {
        if !matches!(s[i], b'A'..=b'E') || (i > 0 && alnum(i - 1)) || (i + 1 < s.len() && alnum(i + 1)) {
            continue;
        }
        let letter = s[i] as char;
        let before = lower[..i].trim_end_matches([' ', '\t', '\n', '(', '[', ':', '*', '"', '\'']);
        if LETTER_CUES.iter().any(|c| before.ends_with(c)) {
            cued = Some(letter);
        }
        if i > 0 && s[i - 1] == b'(' && i + 1 < s.len() && s[i + 1] == b')' {
            paren = Some(letter);
        }
        let article = letter == 'A' && i + 2 < s.len() && s[i + 1] == b' ' && s[i + 2].is_ascii_lowercase();
        if !article {
            plain = Some(letter);
        }
    }
    cued.or(paren).or(plain)
}

// ----------------------------------------------------------------------------
// Option words

/// The first whole word of `family` in the text, case-insensitively, returned
/// as the family spells it (lowercase).
fn first_word_of(text: &str, family: &[&str]) -> Option<String> {
    let lower = text.to_ascii_lowercase();
    let s = lower.as_bytes();
    let mut best: Option<(usize, &str)> = None;
    for &w in family {
        // The first whole-word occurrence of w.
        let mut from = 0;
        while let Some(p) = lower[from..].find(w).map(|p| p + from) {
            let end = p + w.len();
            let left_ok = p == 0 || !s[p - 1].is_ascii_alphanumeric();
            let right_ok = end == s.len() || !s[end].is_ascii_alphanumeric();
            if left_ok && right_ok {
                if best.is_none_or(|(b, _)| p < b) {
                    best = Some((p, w));
                }
                break;
            }
            from = p + 1;
        }
    }
    best.map(|(_, w)| w.to_string())
}

// ----------------------------------------------------------------------------
// The LIFT release's rules

/// The first uppercase A-E anywhere in the trimmed text, inside a word or
/// not (`re.findall(r'A|B|C|D|E', sentence.strip())[0]`): "Answer: C" reads
/// as A.
pub fn reference_letter(text: &str) -> Option<char> {
    text.trim().chars().find(|c| matches!(c, 'A'..='E'))
}

/// The leftmost word of `family` in the lowercased text, as a plain
/// substring (`re.findall(r'true|false', sentence.lower())[0]`): "untrue"
/// reads as true. Where two words start at the same place the regex takes
/// the first alternative, the family's first word.
pub fn reference_word(text: &str, family: &[&str]) -> Option<String> {
    let lower = text.to_lowercase();
    (0..lower.len())
        .filter(|&i| lower.is_char_boundary(i))
        .find_map(|i| family.iter().find(|w| lower[i..].starts_with(**w)))
        .map(|w| w.to_string())
}
