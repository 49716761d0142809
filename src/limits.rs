//! What a file may ask for, and how its values appear in an error.
//!
//! Every count and shape that lift reads from a file is checked before a
//! buffer is sized from it: against the bytes the file actually holds where
//! the format allows (a tensor must lie inside its file), and against the
//! bounds here where it does not (a config.json says how many layers there
//! are before any tensor is looked at). The bounds are far above every
//! Llama-family model (Llama-3.1-405B: width 16384, 126 layers, FFN 53248,
//! vocabulary 128256) and far below what would overflow a product of them.
//!
//! A value from a file that goes into an error message is `quote`d: a
//! corrupt file can hold a 100,000-character token, and the error should
//! still be one readable line.

/// The model width, and the width of all query (or key/value) heads together.
pub const MAX_DIM: usize = 1 << 17;
/// The SwiGLU hidden width.
pub const MAX_FFN_DIM: usize = 1 << 20;
/// Transformer blocks.
pub const MAX_LAYERS: usize = 1 << 12;
/// Query heads, and key/value heads.
pub const MAX_HEADS: usize = 1 << 12;
/// The width of one head.
pub const MAX_HEAD_DIM: usize = 1 << 12;
/// Token ids.
pub const MAX_VOCAB: usize = 1 << 23;
/// The context length a config may state (and RoPE scaling's original one).
pub const MAX_CONTEXT: usize = 1 << 26;

/// How many characters of a value an error message shows.
const QUOTE_CHARS: usize = 48;

/// A value from a file as an error message shows it in quotes: Rust-quoted
/// (so control characters are visible), cut to its first characters with
/// its length after it when it is long.
pub fn quote(s: &str) -> String {
    match s.char_indices().nth(QUOTE_CHARS) {
        None => format!("{s:?}"),
        Some((cut, _)) => format!("{:?}... ({} bytes)", &s[..cut], s.len()),
    }
}

/// A name from a file (a tensor name, a metadata key) as an error message
/// shows it: as it is when short and printable, else as `quote` does.
pub fn plain(s: &str) -> String {
    if s.chars().count() <= QUOTE_CHARS && !s.chars().any(char::is_control) { s.to_string() } else { quote(s) }
}

/// Text already formatted for a message (a JSON value, a shape) cut to its
/// first characters, with its length after it when it is long.
pub fn clip(s: &str) -> String {
    match s.char_indices().nth(QUOTE_CHARS) {
        None => s.to_string(),
        Some((cut, _)) => format!("{}... ({} bytes)", &s[..cut], s.len()),
    }
}

/// A message from a parser (serde_json's echo the value they choke on) cut
/// to its head and its tail, which says where the problem is: at most
/// about 300 bytes.
pub fn shorten(msg: &str) -> String {
    if msg.len() <= 300 {
        return msg.to_string();
    }
    let head = floor_boundary(msg, 200);
    let tail = (msg.len() - 64..msg.len()).find(|&i| msg.is_char_boundary(i)).unwrap_or(msg.len());
    format!("{} ... {}", &msg[..head], &msg[tail..])
}

/// The largest char boundary of `s` at or below `at`.
fn floor_boundary(s: &str, at: usize) -> usize {
    (0..=at.min(s.len())).rev().find(|&i| s.is_char_boundary(i)).unwrap_or(0)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn quote_cuts_long_values_and_keeps_short_ones() {
        assert_eq!(quote("<s>"), "\"<s>\"");
        let long = "é".repeat(100_000);
        let q = quote(&long);
        assert!(q.len() < 200 && q.ends_with("(200000 bytes)"), "{q}");
        assert_eq!(clip("[1, 2]"), "[1, 2]");
        let serde = format!("invalid type: string \"{}\", expected u32 at line 1 column 9", "x".repeat(5000));
        assert!(shorten(&serde).len() < 300 && shorten(&serde).ends_with("at line 1 column 9"));
        assert!(shorten(&"▁".repeat(1000)).len() < 300);
        assert_eq!(plain("blk.0.attn_q.weight"), "blk.0.attn_q.weight");
        assert_eq!(plain("a\nb"), "\"a\\nb\"");
    }
}
