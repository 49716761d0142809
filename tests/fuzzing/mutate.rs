//! Seeded mutation of seed inputs.
//!
//! An input is a seed file plus a list of `Edit`s. Edits are of two kinds:
//! byte edits (bit flips, overwrites with extreme integers, truncation,
//! deletion, duplication and insertion of ranges) and JSON edits of the
//! file's JSON part (a key dropped, a value replaced by one of the wrong
//! type, a huge or negative number, a long string, a deep nesting). The JSON
//! part is the whole file for config.json, tokenizer.json and data files,
//! and the header of model.bin, state.bin and safetensors files, which are
//! rebuilt around the edited header (lengths and padding fixed up) so that
//! the edit reaches the checks behind the header parser.
//!
//! Everything is a function of (target, base seed, iteration): the
//! supervisor can rebuild the input a worker was on when it died, and a
//! finding is written down as its edits, which is also the format of the
//! regression corpus.

use serde_json::{Value, json};

/// splitmix64: small, fast, and the same everywhere.
pub struct Rng(u64);

impl Rng {
    pub fn new(seed: u64) -> Rng {
        Rng(seed)
    }
    pub fn next(&mut self) -> u64 {
        self.0 = self.0.wrapping_add(0x9E37_79B9_7F4A_7C15);
        let mut z = self.0;
        z = (z ^ (z >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
        z = (z ^ (z >> 27)).wrapping_mul(0x94D0_49BB_1331_11EB);
        z ^ (z >> 31)
    }
    /// Uniform in 0..n (n > 0).
    pub fn below(&mut self, n: usize) -> usize {
        (self.next() % n.max(1) as u64) as usize
    }
    pub fn chance(&mut self, p: f64) -> bool {
        (self.next() >> 11) as f64 / (1u64 << 53) as f64 <= p
    }
    pub fn pick<'a, T>(&mut self, xs: &'a [T]) -> &'a T {
        &xs[self.below(xs.len())]
    }
}

/// Where a file keeps its JSON part.
#[derive(Clone, Copy, Debug, PartialEq)]
pub enum Layout {
    /// No JSON (GGUF, JSONL): byte edits only.
    Raw,
    /// The whole file.
    Json,
    /// model.bin: "LIFTMODL", version, reserved, u64 length, JSON, padding to 64, data.
    ModelBin,
    /// state.bin: "LIFTSTAT", u64 length, JSON, records.
    StateBin,
    /// safetensors: u64 length, JSON, data.
    Safetensors,
}

/// One change to an input.
#[derive(Clone, Debug, PartialEq)]
pub enum Edit {
    /// Replace `del` bytes at `at` by `ins` (both clamped to the length).
    Bytes { at: usize, del: usize, ins: Vec<u8> },
    /// Cut the file to `len` bytes.
    Truncate(usize),
    /// Set the JSON value at a JSON pointer (RFC 6901), adding the key if missing.
    Set { path: String, value: Value },
    /// Remove the key or element at a JSON pointer.
    Remove { path: String },
}

impl Edit {
    /// As the corpus stores it. A long string made of one repeated piece is
    /// stored as the piece and a count, a deep nesting (`nest`) as its depth
    /// and what it wraps, so that a case stays a few lines.
    pub fn to_json(&self) -> Value {
        match self {
            Edit::Bytes { at, del, ins } => json!({"at": at, "del": del, "hex": hex(ins)}),
            Edit::Truncate(n) => json!({"truncate": n}),
            Edit::Set { path, value } => {
                let (inner, depth) = unnest(value);
                let mut j = match repeated(inner) {
                    Some((unit, times)) => json!({"set": path, "repeat": unit, "times": times}),
                    None => json!({"set": path, "value": inner}),
                };
                if depth > 0 {
                    j["nest"] = json!(depth);
                }
                j
            }
            Edit::Remove { path } => json!({"remove": path}),
        }
    }

    pub fn from_json(v: &Value) -> Option<Edit> {
        if let Some(n) = v.get("truncate") {
            return Some(Edit::Truncate(n.as_u64()? as usize));
        }
        if let Some(p) = v.get("set") {
            let inner = match (v.get("repeat"), v.get("times")) {
                (Some(unit), Some(n)) => Value::String(unit.as_str()?.repeat(n.as_u64()? as usize)),
                _ => v.get("value")?.clone(),
            };
            let depth = v.get("nest").and_then(Value::as_u64).unwrap_or(0) as usize;
            return Some(Edit::Set { path: p.as_str()?.to_string(), value: nest(inner, depth) });
        }
        if let Some(p) = v.get("remove") {
            return Some(Edit::Remove { path: p.as_str()?.to_string() });
        }
        let at = v.get("at")?.as_u64()? as usize;
        let del = v.get("del")?.as_u64()? as usize;
        Some(Edit::Bytes { at, del, ins: unhex(v.get("hex")?.as_str()?)? })
    }
}

fn hex(b: &[u8]) -> String {
    b.iter().map(|x| format!("{x:02x}")).collect()
}

fn unhex(s: &str) -> Option<Vec<u8>> {
    (0..s.len()).step_by(2).map(|i| u8::from_str_radix(s.get(i..i + 2)?, 16).ok()).collect()
}

/// `v` wrapped `depth` times, alternately in an array and in a
/// {"type": "Sequence", "a": ...} object (the shape tokenizer.json nests).
pub fn nest(mut v: Value, depth: usize) -> Value {
    for i in 0..depth {
        v = if i % 2 == 0 {
            Value::Array(vec![v])
        } else {
            let mut m = serde_json::Map::new();
            m.insert("type".into(), Value::String("Sequence".into()));
            m.insert("a".into(), v);
            Value::Object(m)
        };
    }
    v
}

/// `nest`'s inverse for deep nestings (8 levels or more): (inner, depth).
fn unnest(v: &Value) -> (&Value, usize) {
    let (mut inner, mut depth) = (v, 0usize);
    loop {
        // The wrapper of level depth-1 is an array if depth-1 is even.
        let next = match inner {
            Value::Array(a) if a.len() == 1 => a.first(),
            Value::Object(m) if m.len() == 2 && m.get("type") == Some(&json!("Sequence")) => m.get("a"),
            _ => None,
        };
        match next {
            Some(n) => {
                inner = n;
                depth += 1;
            }
            None => break,
        }
    }
    // Only a whole, alternating nesting can be rebuilt by `nest`.
    if depth >= 8 && nest(inner.clone(), depth) == *v { (inner, depth) } else { (v, 0) }
}

/// A string that is one piece of at most 4 characters repeated (100 times or more).
fn repeated(v: &Value) -> Option<(String, usize)> {
    let s = v.as_str()?;
    (1..=4).find_map(|n| {
        let unit: String = s.chars().take(n).collect();
        let times = s.len() / unit.len().max(1);
        (times >= 100 && unit.repeat(times) == s).then_some((unit, times))
    })
}

// ----------------------------------------------------------------------------
// Applying edits

/// The seed with the edits applied in order. A JSON edit on a file whose
/// JSON part no longer parses (an earlier byte edit broke it) does nothing.
pub fn apply(seed: &[u8], layout: Layout, edits: &[Edit]) -> Vec<u8> {
    let mut b = seed.to_vec();
    for e in edits {
        match e {
            Edit::Bytes { at, del, ins } => {
                let at = (*at).min(b.len());
                let end = at.saturating_add(*del).min(b.len());
                b.splice(at..end, ins.iter().copied());
            }
            Edit::Truncate(n) => b.truncate(*n),
            Edit::Set { .. } | Edit::Remove { .. } => {
                if let Some((range, mut v)) = json_part(layout, &b)
                    && edit_json(&mut v, e)
                {
                    b = rejoin(layout, &b, range, &v);
                }
            }
        }
    }
    b
}

fn le_u64(b: &[u8], at: usize) -> Option<usize> {
    Some(u64::from_le_bytes(b.get(at..at + 8)?.try_into().ok()?) as usize)
}

/// Where the JSON part lies, and its value.
pub fn json_part(layout: Layout, b: &[u8]) -> Option<(std::ops::Range<usize>, Value)> {
    let range = match layout {
        Layout::Raw => return None,
        Layout::Json => 0..b.len(),
        Layout::ModelBin => 24..24usize.checked_add(le_u64(b, 16)?)?,
        Layout::StateBin => 16..16usize.checked_add(le_u64(b, 8)?)?,
        Layout::Safetensors => 8..8usize.checked_add(le_u64(b, 0)?)?,
    };
    let v = serde_json::from_slice(b.get(range.clone())?).ok()?;
    Some((range, v))
}

/// The file around a new JSON part: lengths rewritten, model.bin's data
/// kept at the next multiple of 64 after the header, as its writer puts it.
fn rejoin(layout: Layout, b: &[u8], range: std::ops::Range<usize>, v: &Value) -> Vec<u8> {
    let json = serde_json::to_vec(v).unwrap_or_default();
    let len = (json.len() as u64).to_le_bytes();
    let mut out = Vec::with_capacity(b.len() + json.len());
    match layout {
        Layout::Raw => return b.to_vec(),
        Layout::Json => return json,
        Layout::ModelBin => {
            out.extend_from_slice(&b[..16]);
            out.extend_from_slice(&len);
            out.extend_from_slice(&json);
            out.resize(out.len().next_multiple_of(64), 0);
            out.extend_from_slice(b.get(range.end.next_multiple_of(64)..).unwrap_or_default());
        }
        Layout::StateBin => {
            out.extend_from_slice(&b[..8]);
            out.extend_from_slice(&len);
            out.extend_from_slice(&json);
            out.extend_from_slice(&b[range.end..]);
        }
        Layout::Safetensors => {
            out.extend_from_slice(&len);
            out.extend_from_slice(&json);
            out.extend_from_slice(&b[range.end..]);
        }
    }
    out
}

/// Splits "/a/b~1c" into its unescaped parts.
fn pointer_parts(path: &str) -> Vec<String> {
    path.split('/').skip(1).map(|p| p.replace("~1", "/").replace("~0", "~")).collect()
}

fn escape(part: &str) -> String {
    part.replace('~', "~0").replace('/', "~1")
}

/// Applies a Set or Remove; false when the path does not lead anywhere.
fn edit_json(root: &mut Value, e: &Edit) -> bool {
    let (path, value) = match e {
        Edit::Set { path, value } => (path, Some(value)),
        Edit::Remove { path } => (path, None),
        _ => return false,
    };
    let mut parts = pointer_parts(path);
    let Some(last) = parts.pop() else {
        if let Some(v) = value {
            *root = v.clone();
            return true;
        }
        return false;
    };
    let parent_path: String = parts.iter().map(|p| format!("/{}", escape(p))).collect();
    let Some(parent) = root.pointer_mut(&parent_path) else { return false };
    match (parent, value) {
        (Value::Object(m), Some(v)) => {
            m.insert(last, v.clone());
        }
        (Value::Object(m), None) => {
            m.remove(&last);
        }
        (Value::Array(a), v) => {
            let Ok(i) = last.parse::<usize>() else { return false };
            match v {
                Some(v) if i < a.len() => a[i] = v.clone(),
                None if i < a.len() => {
                    a.remove(i);
                }
                _ => return false,
            }
        }
        _ => return false,
    }
    true
}

// ----------------------------------------------------------------------------
// Choosing edits

/// Integers that break size arithmetic: zero, one, the edges of the signed
/// and unsigned 16/32/64-bit ranges, 2^53 + 1 (the first integer an f64
/// loses), and powers of two that look like sizes.
const EXTREMES: [u64; 16] = [
    0,
    1,
    2,
    0x7fff,
    0xffff,
    0x7fff_ffff,
    0x8000_0000,
    0xffff_ffff,
    0x1_0000_0000,
    (1 << 53) + 1,
    0x7fff_ffff_ffff_ffff,
    0x8000_0000_0000_0000,
    u64::MAX,
    u64::MAX - 1,
    1 << 31 | 1 << 30,
    65535 * 9 + 3,
];

/// 1 to 4 random edits of a seed file.
pub fn random_edits(rng: &mut Rng, seed: &[u8], layout: Layout) -> Vec<Edit> {
    let json = json_part(layout, seed).map(|(_, v)| v);
    let n = 1 + rng.below(4);
    let mut edits = Vec::with_capacity(n);
    for _ in 0..n {
        let structural = json.is_some() && rng.chance(if layout == Layout::Json { 0.8 } else { 0.6 });
        match &json {
            Some(v) if structural => edits.push(json_edit(rng, v)),
            _ => edits.push(byte_edit(rng, seed)),
        }
    }
    edits
}

/// An offset, half the time in the first 512 bytes (where headers are).
fn offset(rng: &mut Rng, len: usize) -> usize {
    if rng.chance(0.5) { rng.below(len.min(512) + 1) } else { rng.below(len + 1) }
}

fn byte_edit(rng: &mut Rng, seed: &[u8]) -> Edit {
    let len = seed.len();
    let at = offset(rng, len);
    match rng.below(8) {
        0 => {
            let old = seed.get(at).copied().unwrap_or(0);
            Edit::Bytes { at, del: 1, ins: vec![old ^ (1 << rng.below(8))] }
        }
        1 => Edit::Bytes { at, del: 1, ins: vec![*rng.pick(&[0u8, 0xff, 0x7f, 0x80, b'"', b'{', b'[', b'\n'])] },
        2 | 3 => {
            // an integer overwrite, often aligned to its width
            let width = *rng.pick(&[2usize, 4, 8, 8]);
            let at = if rng.chance(0.5) { at / width * width } else { at };
            let v = *rng.pick(&EXTREMES);
            Edit::Bytes { at, del: width, ins: v.to_le_bytes()[..width].to_vec() }
        }
        4 => Edit::Truncate(rng.below(len + 1)),
        5 => Edit::Bytes { at, del: 1 + rng.below(64.min(len.max(1))), ins: Vec::new() },
        6 => {
            // a range copied elsewhere
            let from = rng.below(len + 1);
            let n = 1 + rng.below(256);
            let ins = seed.get(from..(from + n).min(len)).unwrap_or_default().to_vec();
            Edit::Bytes { at, del: 0, ins }
        }
        _ => Edit::Bytes { at, del: 0, ins: (0..1 + rng.below(16)).map(|_| rng.next() as u8).collect() },
    }
}

/// A random node of a JSON tree, as a pointer and its value: a walk from
/// the root that stops at each level with probability 1/4 (never at the
/// root), so top-level keys are hit often and deep ones sometimes.
fn random_node<'a>(rng: &mut Rng, root: &'a Value) -> (String, &'a Value) {
    let (mut path, mut v) = (String::new(), root);
    loop {
        let stop = !path.is_empty() && rng.chance(0.25);
        match v {
            Value::Object(m) if !m.is_empty() && !stop => {
                let (k, child) = m.iter().nth(rng.below(m.len())).expect("index below len");
                path.push('/');
                path.push_str(&escape(k));
                v = child;
            }
            Value::Array(a) if !a.is_empty() && !stop => {
                let i = rng.below(a.len());
                path.push_str(&format!("/{i}"));
                v = &a[i];
            }
            _ => return (path, v),
        }
    }
}

fn json_edit(rng: &mut Rng, root: &Value) -> Edit {
    let (path, old) = random_node(rng, root);
    if rng.chance(0.2) && !path.is_empty() {
        return Edit::Remove { path };
    }
    let value = if rng.chance(0.2) {
        // some other node's value: a wrong type or size that looks real
        random_node(rng, root).1.clone()
    } else {
        new_value(rng, old)
    };
    Edit::Set { path, value }
}

/// A replacement for `old`: a near or extreme number, the wrong type, a
/// long string, a deep nesting, an array cut or doubled.
fn new_value(rng: &mut Rng, old: &Value) -> Value {
    match rng.below(8) {
        0 | 1 => match old.as_i64() {
            Some(n) if rng.chance(0.6) => {
                json!(*rng.pick(&[n.wrapping_add(1), n.wrapping_sub(1), n.wrapping_mul(2), n / 2, n.wrapping_neg(), 0]))
            }
            _ => match rng.below(4) {
                0 => json!(-(rng.below(1 << 20) as i64) - 1),
                1 => json!(*rng.pick(&[1e308, -1e308, 1e-310, 0.5, -0.0, 3.4e38])),
                _ => json!(*rng.pick(&EXTREMES)),
            },
        },
        2 => rng.pick(&[json!(""), json!("x"), json!(true), Value::Null, json!([]), json!({}), json!(0)]).clone(),
        3 => {
            let n = *rng.pick(&[300usize, 5000, 100_000]);
            let unit = *rng.pick(&["a", "é", " ", "\u{0}", "▁", "<s>", "(", "\\"]);
            json!(unit.repeat(n))
        }
        4 => nest(old.clone(), *rng.pick(&[20usize, 100, 127, 129, 2000])),
        5 => match old {
            Value::Array(a) if !a.is_empty() => {
                let mut a = a.clone();
                if rng.chance(0.5) {
                    a.truncate(rng.below(a.len()));
                } else {
                    a.extend_from_within(..);
                }
                Value::Array(a)
            }
            Value::String(s) => json!(format!("{s}{s}")),
            other => Value::Array(vec![other.clone()]),
        },
        6 => json!(*rng.pick(&EXTREMES)),
        _ => Value::Array(vec![old.clone(), old.clone()]),
    }
}
