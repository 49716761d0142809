//! The GGUF and safetensors readers and writers, checked against the
//! reference Python packages (gguf-py 0.19, safetensors) through the fixtures
//! that tests/make_format_fixtures.py made in tests/data/formats/, and against
//! files built byte by byte here from the format descriptions.
//!
//! Run: cargo test --release --test formats

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::time::Instant;

use half::{bf16, f16};
use lift::formats::gguf::{GgmlType, GgufFile, GgufValue, GgufValueType, GgufWriteData, write_gguf};
use lift::formats::safetensors::{SafeTensors, TensorData, write_safetensors};
use serde_json::Value;

// ---------------------------------------------------------------------------
// Helpers

fn fixture(name: &str) -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/data/formats").join(name)
}

/// expected.json: what gguf-py and safetensors saw in the fixtures.
fn manifest() -> Value {
    let text = std::fs::read_to_string(fixture("expected.json")).unwrap();
    serde_json::from_str(&text).unwrap()
}

/// expected.f32: the reference values, concatenated.
fn expected_values() -> Vec<f32> {
    let bytes = std::fs::read(fixture("expected.f32")).unwrap();
    bytes.chunks_exact(4).map(|b| f32::from_le_bytes([b[0], b[1], b[2], b[3]])).collect()
}

/// The slice of expected.f32 that a manifest entry's "expected": [offset,
/// count] points at, or None for a tensor without reference values.
fn expected_for<'a>(entry: &Value, all: &'a [f32]) -> Option<&'a [f32]> {
    let e = entry["expected"].as_array()?;
    let (offset, count) = (e[0].as_u64().unwrap() as usize, e[1].as_u64().unwrap() as usize);
    Some(&all[offset..offset + count])
}

/// A scratch file under target/tmp/formats (where the Python check of our
/// writers also looks).
fn tmp(name: &str) -> PathBuf {
    let dir = Path::new(env!("CARGO_TARGET_TMPDIR")).join("formats");
    std::fs::create_dir_all(&dir).unwrap();
    dir.join(name)
}

fn write_tmp(name: &str, bytes: &[u8]) -> PathBuf {
    let path = tmp(name);
    std::fs::write(&path, bytes).unwrap();
    path
}

/// Checks that `r` is an error of one line that starts with the file's path
/// and contains `needle`; returns the message.
#[track_caller]
fn expect_err<T>(r: anyhow::Result<T>, path: &Path, needle: &str) -> String {
    let msg = match r {
        Ok(_) => panic!("{}: expected an error containing {needle:?}, got Ok", path.display()),
        Err(e) => format!("{e:#}"),
    };
    assert!(msg.starts_with(&format!("{}: ", path.display())), "error does not name the file: {msg}");
    assert!(!msg.contains('\n'), "error is not one line: {msg}");
    assert!(msg.contains(needle), "error {msg:?} does not contain {needle:?}");
    msg
}

/// Bit-for-bit equality, with the first difference and the largest
/// difference in the failure message.
#[track_caller]
fn assert_same_bits(got: &[f32], want: &[f32], what: &str) {
    assert_eq!(got.len(), want.len(), "{what}: length");
    let first = got.iter().zip(want).position(|(a, b)| a.to_bits() != b.to_bits());
    if let Some(i) = first {
        let max = got.iter().zip(want).map(|(a, b)| (a - b).abs()).fold(0f32, f32::max);
        panic!("{what}: value {i} is {} but the reference is {} (max abs diff {max})", got[i], want[i]);
    }
}

/// The values `written.gguf` and `written.safetensors` hold, and that
/// make_format_fixtures.py --check-written recomputes:
/// ((i * 37) % 101 - 50) / 7 in f32.
fn written_values(n: usize) -> Vec<f32> {
    (0..n).map(|i| ((i * 37) % 101) as f32 - 50.0).map(|x| x / 7.0).collect()
}

/// A GGUF built byte by byte from the format description, for the files
/// gguf-py refuses to make (unknown types, bad offsets, ...).
struct RawGguf {
    version: u32,
    kv: Vec<Vec<u8>>,
    infos: Vec<Vec<u8>>,
    data: Vec<u8>,
}

fn gguf_string(s: &str) -> Vec<u8> {
    let mut b = (s.len() as u64).to_le_bytes().to_vec();
    b.extend_from_slice(s.as_bytes());
    b
}

impl RawGguf {
    fn new() -> RawGguf {
        RawGguf { version: 3, kv: vec![], infos: vec![], data: vec![] }
    }

    /// A metadata entry: key, value type id, and the encoded value.
    fn kv(mut self, key: &str, type_id: u32, value: &[u8]) -> RawGguf {
        let mut b = gguf_string(key);
        b.extend_from_slice(&type_id.to_le_bytes());
        b.extend_from_slice(value);
        self.kv.push(b);
        self
    }

    fn tensor(mut self, name: &str, dims: &[u64], type_id: u32, offset: u64) -> RawGguf {
        let mut b = gguf_string(name);
        b.extend_from_slice(&(dims.len() as u32).to_le_bytes());
        for d in dims {
            b.extend_from_slice(&d.to_le_bytes());
        }
        b.extend_from_slice(&type_id.to_le_bytes());
        b.extend_from_slice(&offset.to_le_bytes());
        self.infos.push(b);
        self
    }

    fn data(mut self, bytes: &[u8]) -> RawGguf {
        self.data = bytes.to_vec();
        self
    }

    /// The file: header, metadata, tensor infos, zero padding to 32, data.
    fn bytes(&self) -> Vec<u8> {
        let mut b = b"GGUF".to_vec();
        b.extend_from_slice(&self.version.to_le_bytes());
        b.extend_from_slice(&(self.infos.len() as u64).to_le_bytes());
        b.extend_from_slice(&(self.kv.len() as u64).to_le_bytes());
        self.kv.iter().chain(&self.infos).for_each(|x| b.extend_from_slice(x));
        b.resize(b.len().div_ceil(32) * 32, 0);
        b.extend_from_slice(&self.data);
        b
    }

    fn write(&self, name: &str) -> PathBuf {
        write_tmp(name, &self.bytes())
    }
}

fn f32_bytes(v: &[f32]) -> Vec<u8> {
    v.iter().flat_map(|x| x.to_le_bytes()).collect()
}

// ---------------------------------------------------------------------------
// GGUF: reading what gguf-py wrote

/// Our tensor index (names, ggml-order dims, types, absolute data offsets,
/// byte sizes) and data section start equal gguf.GGUFReader's.
#[test]
fn gguf_tensor_index_equals_gguf_py() {
    let m = &manifest()["gguf"];
    let path = fixture(m["file"].as_str().unwrap());
    let f = GgufFile::open(&path).unwrap();
    assert_eq!(f.version() as u64, m["version"].as_u64().unwrap());
    assert_eq!(f.alignment(), m["alignment"].as_u64().unwrap());
    assert_eq!(f.data_start(), m["data_start"].as_u64().unwrap());
    let want = m["tensors"].as_array().unwrap();
    assert_eq!(f.tensors().len(), want.len());
    for (t, w) in f.tensors().iter().zip(want) {
        assert_eq!(t.name, w["name"].as_str().unwrap());
        let dims: Vec<u64> = w["dims"].as_array().unwrap().iter().map(|d| d.as_u64().unwrap()).collect();
        assert_eq!(t.dims, dims, "{}", t.name);
        assert_eq!(t.dtype.to_string(), w["type"].as_str().unwrap(), "{}", t.name);
        assert_eq!(f.data_start() + t.offset, w["data_offset"].as_u64().unwrap(), "{}", t.name);
        assert_eq!(f.tensor_bytes(t).unwrap().len() as u64, w["n_bytes"].as_u64().unwrap(), "{}", t.name);
        assert_eq!(f.find(&t.name), Some(t));
    }
}

/// Every tensor of every supported type dequantizes to exactly the values of
/// gguf.quants.dequantize (numpy's d * q for Q8_K, which gguf-py lacks). The
/// comparison is bit for bit: our functions multiply and add in the same
/// order as gguf-py and ggml, in f32, so no tolerance is needed.
#[test]
fn gguf_dequantization_equals_gguf_py() {
    let m = &manifest()["gguf"];
    let f = GgufFile::open(&fixture(m["file"].as_str().unwrap())).unwrap();
    let all = expected_values();
    let mut types_checked = vec![];
    for w in m["tensors"].as_array().unwrap() {
        let Some(want) = expected_for(w, &all) else {
            continue;
        };
        let t = f.find(w["name"].as_str().unwrap()).unwrap();
        let got = f.tensor_f32(t).unwrap();
        assert_same_bits(&got, want, &format!("tensor {} ({})", t.name, t.dtype));
        types_checked.push(t.dtype);
    }
    // Every type we claim to support has a reference tensor in the fixture.
    for t in lift::formats::gguf::SUPPORTED_TYPES {
        assert!(types_checked.contains(t), "no reference values for {t}");
    }
}

/// Tensors of 2^16 values and more are dequantized in parallel, a row per
/// task; the result is the same. The fixture's Q4_K and Q6_K tensors (3 rows
/// of 512) are repeated 100 times to make 153600 values.
#[test]
fn gguf_parallel_dequantization_equals_gguf_py() {
    let m = &manifest()["gguf"];
    let f = GgufFile::open(&fixture("quants.gguf")).unwrap();
    let all = expected_values();
    for name in ["q4_k", "q6_k"] {
        let w = m["tensors"].as_array().unwrap().iter().find(|t| t["name"] == name).unwrap();
        let t = f.find(name).unwrap();
        let bytes = f.tensor_bytes(t).unwrap().repeat(100);
        let dtype = t.dtype as u32;
        let path = RawGguf::new().tensor(name, &[512, 300], dtype, 0).data(&bytes).write(&format!("big_{name}.gguf"));
        let big = GgufFile::open(&path).unwrap();
        let got = big.tensor_f32(&big.tensors()[0]).unwrap();
        let want = expected_for(w, &all).unwrap().repeat(100);
        assert_same_bits(&got, &want, &format!("{name} x 100"));
    }
}

/// A tensor of a type we cannot dequantize is an error naming the file, the
/// tensor, its type and what is supported; the rest of the file still reads.
#[test]
fn gguf_unsupported_type_is_named() {
    let path = fixture("quants.gguf");
    let f = GgufFile::open(&path).unwrap();
    let t = f.find("iq2_xxs").unwrap();
    assert_eq!(t.dtype, GgmlType::IQ2_XXS);
    let msg = expect_err(f.tensor_f32(t), &path, "tensor iq2_xxs has type IQ2_XXS, which lift cannot read");
    assert!(msg.contains("supported: F32, F16, BF16, Q8_0"), "{msg}");
}

/// Compares one of our values with its expected.json form: {"type", "value"}
/// with gguf-py's type names, "elem" for arrays, floats as repr strings.
#[track_caller]
fn check_value(ours: &GgufValue, want: &Value, key: &str) {
    let type_name = |t: GgufValueType| match t {
        GgufValueType::U8 => "UINT8",
        GgufValueType::I8 => "INT8",
        GgufValueType::U16 => "UINT16",
        GgufValueType::I16 => "INT16",
        GgufValueType::U32 => "UINT32",
        GgufValueType::I32 => "INT32",
        GgufValueType::U64 => "UINT64",
        GgufValueType::I64 => "INT64",
        GgufValueType::F32 => "FLOAT32",
        GgufValueType::F64 => "FLOAT64",
        GgufValueType::Bool => "BOOL",
        GgufValueType::String => "STRING",
        GgufValueType::Array => "ARRAY",
    };
    assert_eq!(type_name(ours.value_type()), want["type"], "{key}: type");
    let same = |v: &GgufValue, w: &Value| -> bool {
        let float = |w: &Value| w.as_str().and_then(|s| s.parse::<f64>().ok());
        match *v {
            GgufValue::U8(x) => w.as_u64() == Some(x as u64),
            GgufValue::U16(x) => w.as_u64() == Some(x as u64),
            GgufValue::U32(x) => w.as_u64() == Some(x as u64),
            GgufValue::U64(x) => w.as_u64() == Some(x),
            GgufValue::I8(x) => w.as_i64() == Some(x as i64),
            GgufValue::I16(x) => w.as_i64() == Some(x as i64),
            GgufValue::I32(x) => w.as_i64() == Some(x as i64),
            GgufValue::I64(x) => w.as_i64() == Some(x),
            GgufValue::F32(x) => float(w) == Some(x as f64),
            GgufValue::F64(x) => float(w) == Some(x),
            GgufValue::Bool(x) => w.as_bool() == Some(x),
            GgufValue::String(ref s) => w.as_str() == Some(s.as_str()),
            GgufValue::Array(..) => unreachable!(),
        }
    };
    match ours {
        GgufValue::Array(elem, items) => {
            assert_eq!(type_name(*elem), want["elem"], "{key}: element type");
            let w = want["value"].as_array().unwrap();
            assert_eq!(items.len(), w.len(), "{key}: length");
            for (i, (v, w)) in items.iter().zip(w).enumerate() {
                if let GgufValue::Array(..) = v {
                    check_value(v, w, &format!("{key}[{i}]"));
                } else {
                    assert!(same(v, w), "{key}[{i}]: {v:?} vs {w}");
                }
            }
        }
        v => assert!(same(v, &want["value"]), "{key}: {v:?} vs {}", want["value"]),
    }
}

/// Every metadata value of every scalar and array type (nested arrays
/// included) reads back as gguf-py wrote it, in file order.
#[test]
fn gguf_metadata_equals_what_gguf_py_wrote() {
    let m = &manifest()["gguf"];
    let f = GgufFile::open(&fixture("quants.gguf")).unwrap();
    let want = m["metadata"].as_object().unwrap();
    let keys: Vec<&str> = f.metadata().iter().map(|(k, _)| k.as_str()).collect();
    // serde_json sorts object keys, so compare the key sets, then values.
    let mut sorted = keys.clone();
    sorted.sort();
    assert_eq!(sorted, want.keys().map(|k| k.as_str()).collect::<Vec<_>>());
    assert_eq!(keys[0], "general.architecture", "file order");
    for (key, value) in f.metadata() {
        check_value(value, &want[key], key);
    }
}

/// The typed getters accept any integer width, refuse values that do not
/// fit, and the require_* twins name the file and the key.
#[test]
fn gguf_getters_convert_and_require_names_key() {
    let path = fixture("quants.gguf");
    let f = GgufFile::open(&path).unwrap();
    assert_eq!(f.get_u64("test.u8"), Some(200));
    assert_eq!(f.get_u64("test.u16"), Some(60000));
    assert_eq!(f.get_u64("test.u64"), Some((1 << 63) + 12345));
    assert_eq!(f.get_u64("test.i8"), None, "negative");
    assert_eq!(f.require_u64("llama.block_count").unwrap(), 2);
    assert_eq!(f.get_f32("test.f32"), Some(0.1f32));
    assert_eq!(f.get_f32("test.f64"), Some(0.1f32));
    assert_eq!(f.get_f32("test.u8"), Some(200.0));
    assert_eq!(f.get_bool("test.bool_true"), Some(true));
    assert_eq!(f.get_bool("test.bool_false"), Some(false));
    assert_eq!(f.get_str("test.string"), Some("héllo wörld ✓"));
    assert_eq!(f.get_str("test.empty_string"), Some(""));
    assert_eq!(f.require_str("general.architecture").unwrap(), "llama");
    assert_eq!(f.get_str_array("test.arr_string").unwrap(), ["a", "", "ü€"]);
    assert_eq!(f.get_i32_array("test.arr_i32").unwrap(), [-1, 0, i32::MAX]);
    assert_eq!(f.get_i32_array("test.arr_u8").unwrap(), [0, 255, 7]);
    assert_eq!(f.get_i32_array("test.arr_u32"), None, "4294967295 does not fit in i32");
    assert_eq!(f.get_f32_array("test.arr_f32").unwrap(), [0.5, -1.25, 3e-8]);
    assert_eq!(f.get_str("test.u8"), None, "wrong type");
    assert_eq!(f.get("no.such.key"), None);

    expect_err(f.require_u64("llama.context_length"), &path, "metadata key llama.context_length is missing");
    expect_err(f.require_str("test.u32"), &path, "metadata key test.u32 is U32, expected a string");
    expect_err(f.require_str_array("test.arr_i32"), &path, "is array of I32, expected an array of strings");
    expect_err(f.require_tensor("blk.0.attn_q.weight"), &path, "tensor blk.0.attn_q.weight is missing");
}

/// Version 2 differs from 3 only in allowing big-endian files, so a v3 file
/// relabelled as v2 reads the same.
#[test]
fn gguf_v2_reads_like_v3() {
    let mut bytes = std::fs::read(fixture("quants.gguf")).unwrap();
    bytes[4..8].copy_from_slice(&2u32.to_le_bytes());
    let v2 = GgufFile::open(&write_tmp("v2.gguf", &bytes)).unwrap();
    let v3 = GgufFile::open(&fixture("quants.gguf")).unwrap();
    assert_eq!(v2.version(), 2);
    assert_eq!(v2.tensors(), v3.tensors());
    assert_eq!(v2.metadata(), v3.metadata());
    let t = v3.find("q4_k").unwrap();
    assert_eq!(v2.tensor_f32(t).unwrap(), v3.tensor_f32(t).unwrap());
}

// ---------------------------------------------------------------------------
// GGUF: bad input

/// The hand-built files below are right when nothing is broken, so each
/// failure comes from the one thing each test breaks.
#[test]
fn gguf_hand_built_file_reads() {
    let values = [1.0f32, -2.0, 3.5, 0.25];
    let path = RawGguf::new()
        .kv("general.alignment", 4, &32u32.to_le_bytes())
        // An array (9) of one array (9) of one i32 (5): [[-3]].
        .kv(
            "x.nested",
            9,
            &[
                9u32.to_le_bytes().as_slice(),
                &1u64.to_le_bytes(),
                &5u32.to_le_bytes(),
                &1u64.to_le_bytes(),
                &(-3i32).to_le_bytes(),
            ]
            .concat(),
        )
        .tensor("t", &[4], 0, 0)
        .data(&f32_bytes(&values))
        .write("hand.gguf");
    let f = GgufFile::open(&path).unwrap();
    assert_eq!(f.tensor_f32(f.find("t").unwrap()).unwrap(), values);
    let nested = GgufValue::Array(GgufValueType::Array, vec![GgufValue::i32_array(&[-3])]);
    assert_eq!(f.get("x.nested"), Some(&nested));
}

#[test]
fn gguf_not_a_gguf_file() {
    let path = fixture("tensors.safetensors");
    expect_err(GgufFile::open(&path), &path, "not a GGUF file (magic");
    let path = write_tmp("empty.gguf", b"");
    expect_err(GgufFile::open(&path), &path, "not a GGUF file");
    let path = tmp("does_not_exist.gguf");
    expect_err(GgufFile::open(&path), &path, "cannot open");
}

#[test]
fn gguf_unsupported_versions() {
    let mut raw = RawGguf::new();
    raw.version = 1;
    let path = raw.write("v1.gguf");
    expect_err(GgufFile::open(&path), &path, "GGUF version 1 is not supported");
    raw.version = 4;
    let path = raw.write("v4.gguf");
    expect_err(GgufFile::open(&path), &path, "GGUF version 4 is not supported");
    raw.version = 3u32.swap_bytes();
    let path = raw.write("big_endian.gguf");
    expect_err(GgufFile::open(&path), &path, "big-endian GGUF");
}

#[test]
fn gguf_unknown_tensor_type() {
    let path = RawGguf::new().tensor("t", &[32], 99, 0).data(&[0; 128]).write("unknown_type.gguf");
    expect_err(GgufFile::open(&path), &path, "tensor t: unknown tensor type id 99");
}

#[test]
fn gguf_tensor_data_past_the_end() {
    // 32 x 4 f32 need 512 bytes; the data section (at 96, after a 65-byte
    // header and tensor info) has 100.
    let path = RawGguf::new().tensor("t", &[32, 4], 0, 0).data(&[0; 100]).write("past_end.gguf");
    expect_err(
        GgufFile::open(&path),
        &path,
        "tensor t needs 512 bytes at offset 96, but the file ends at 196 (truncated?)",
    );
    // An offset so large that offset + size overflows u64.
    let path = RawGguf::new().tensor("t", &[32], 0, u64::MAX - 31).data(&[0; 128]).write("offset_overflow.gguf");
    expect_err(GgufFile::open(&path), &path, "tensor t needs 128 bytes at offset");
}

#[test]
fn gguf_absurd_counts_and_lengths() {
    let mut bytes = RawGguf::new().tensor("t", &[4], 0, 0).data(&[0; 16]).bytes();
    bytes[8..16].copy_from_slice(&u64::MAX.to_le_bytes());
    let path = write_tmp("huge_tensor_count.gguf", &bytes);
    expect_err(GgufFile::open(&path), &path, "tensor info 1 of 18446744073709551615: ");

    let mut bytes = RawGguf::new().kv("k", 4, &[0; 4]).bytes();
    bytes[16..24].copy_from_slice(&(1u64 << 40).to_le_bytes());
    let path = write_tmp("huge_kv_count.gguf", &bytes);
    expect_err(
        GgufFile::open(&path),
        &path,
        "metadata key  (entry 2 of 1099511627776): needs 4 bytes at offset 62, but the file ends at 64",
    );

    // A string value claiming 2^60 bytes.
    let path = RawGguf::new().kv("k", 8, &(1u64 << 60).to_le_bytes()).write("huge_string.gguf");
    expect_err(
        GgufFile::open(&path),
        &path,
        "metadata key k (entry 0 of 1): string at offset 37 claims 1152921504606846976 bytes",
    );

    // An array of 2^62 u32.
    let value = [4u32.to_le_bytes().as_slice(), &(1u64 << 62).to_le_bytes()].concat();
    let path = RawGguf::new().kv("k", 9, &value).write("huge_array.gguf");
    expect_err(
        GgufFile::open(&path),
        &path,
        "metadata key k (entry 0 of 1): array at offset 41 claims 4611686018427387904 elements",
    );

    // Arrays of arrays nested 100 deep.
    let mut value = vec![];
    for _ in 0..100 {
        value.extend_from_slice(&9u32.to_le_bytes());
        value.extend_from_slice(&1u64.to_le_bytes());
    }
    let path = RawGguf::new().kv("k", 9, &value).write("deep_array.gguf");
    expect_err(GgufFile::open(&path), &path, "nested deeper than");

    let path = RawGguf::new().tensor("t", &[1, 1, 1, 1, 1], 0, 0).data(&[0; 4]).write("five_dims.gguf");
    expect_err(GgufFile::open(&path), &path, "tensor t: 5 dims, more than ggml's 4");

    let path = RawGguf::new().tensor("t", &[1 << 32, 1 << 32], 0, 0).data(&[0; 4]).write("dims_overflow.gguf");
    expect_err(GgufFile::open(&path), &path, "too many values");
}

#[test]
fn gguf_inconsistent_headers() {
    let cases: Vec<(&str, RawGguf, &str)> = vec![
        ("bad_value_type", RawGguf::new().kv("k", 13, &[0; 8]), "metadata key k (entry 0 of 1): unknown value type 13"),
        (
            "bad_bool",
            RawGguf::new().kv("k", 7, &[2]),
            "metadata key k (entry 0 of 1): bool at offset 37 is 2, not 0 or 1",
        ),
        (
            "bad_utf8",
            RawGguf::new().kv("k", 8, &[2, 0, 0, 0, 0, 0, 0, 0, 0xff, 0xfe]),
            "metadata key k (entry 0 of 1): string at offset 37 is not valid UTF-8",
        ),
        ("duplicate_key", RawGguf::new().kv("k", 0, &[1]).kv("k", 0, &[2]), "metadata key k appears twice"),
        (
            "duplicate_tensor",
            RawGguf::new().tensor("t", &[4], 0, 0).tensor("t", &[4], 0, 32).data(&[0; 64]),
            "tensor t appears twice",
        ),
        (
            "bad_alignment",
            RawGguf::new().kv("general.alignment", 4, &3u32.to_le_bytes()),
            "general.alignment is U32(3), not a power of two",
        ),
        (
            "misaligned_offset",
            RawGguf::new().tensor("t", &[4], 0, 4).data(&[0; 64]),
            "tensor t is at offset 4, not a multiple of the alignment 32",
        ),
        (
            "partial_block",
            RawGguf::new().tensor("t", &[48], GgmlType::Q4_0 as u32, 0).data(&[0; 64]),
            "tensor t has rows of 48 values, not a multiple of the Q4_0 block size 32",
        ),
    ];
    for (name, raw, needle) in cases {
        let path = raw.write(&format!("{name}.gguf"));
        expect_err(GgufFile::open(&path), &path, needle);
    }
}

/// Cutting the fixture anywhere before the end of its last tensor gives an
/// error naming the file, and the message says in which part the file ends.
/// Every cut in the header and metadata is tried, and every 61st in the data
/// (each try writes a file, about a millisecond).
#[test]
fn gguf_every_truncation_is_an_error() {
    let m = &manifest()["gguf"];
    let bytes = std::fs::read(fixture("quants.gguf")).unwrap();
    let data_end = m["tensors"]
        .as_array()
        .unwrap()
        .iter()
        .map(|t| t["data_offset"].as_u64().unwrap() + t["n_bytes"].as_u64().unwrap())
        .max()
        .unwrap() as usize;
    let info_start = m["tensor_info_start"].as_u64().unwrap() as usize;
    let data_start = m["data_start"].as_u64().unwrap() as usize;
    let path = tmp("truncated.gguf");
    for len in (0..data_start).chain((data_start..data_end).step_by(61)).chain([data_end - 1]) {
        std::fs::write(&path, &bytes[..len]).unwrap();
        expect_err(GgufFile::open(&path), &path, "");
    }
    // Past the last tensor only padding is cut.
    std::fs::write(&path, &bytes[..data_end]).unwrap();
    GgufFile::open(&path).unwrap();

    let cut = |len: usize| {
        std::fs::write(&path, &bytes[..len]).unwrap();
        GgufFile::open(&path).map(|_| ())
    };
    expect_err(cut(12), &path, "header: needs 8 bytes at offset 8, but the file ends at 12 (truncated?)");
    expect_err(
        cut(100),
        &path,
        "metadata entry 2 of 28: key: string at offset 89 claims 7 bytes, but the file ends at 100",
    );
    expect_err(
        cut(108),
        &path,
        "metadata key test.i8 (entry 2 of 28): needs 1 bytes at offset 108, but the file ends at 108",
    );
    expect_err(
        cut(info_start + 10),
        &path,
        "tensor info 0 of 17: string at offset 1110 claims 3 bytes, but the file ends at 1120",
    );
    expect_err(
        cut(data_start + 100),
        &path,
        "tensor f32 needs 768 bytes at offset 1888, but the file ends at 1988 (truncated?)",
    );
}

/// Overwriting any single header byte (with 0xFF, 0x00 or its top bit
/// flipped, in turn) may or may not leave a valid file, but never makes open
/// or dequantizing panic (or allocate without bound, which would abort).
#[test]
fn gguf_corrupt_header_bytes_never_panic() {
    let m = &manifest()["gguf"];
    let bytes = std::fs::read(fixture("quants.gguf")).unwrap();
    let data_start = m["data_start"].as_u64().unwrap() as usize;
    let path = tmp("corrupt.gguf");
    let mut opened = 0;
    let changes: [fn(u8) -> u8; 3] = [|_| 0xFF, |_| 0x00, |b| b ^ 0x80];
    for pos in 0..data_start {
        let mut b = bytes.clone();
        b[pos] = changes[pos % 3](b[pos]);
        std::fs::write(&path, &b).unwrap();
        match GgufFile::open(&path) {
            Ok(f) => {
                opened += 1;
                for t in f.tensors() {
                    let _ = f.tensor_f32(t);
                }
            }
            Err(e) => assert!(format!("{e:#}").starts_with(&path.display().to_string())),
        }
    }
    // Flipping bytes inside values, names and padding leaves the file valid.
    assert!(opened > 0);
}

// ---------------------------------------------------------------------------
// GGUF: writing

fn written_gguf_metadata() -> Vec<(String, GgufValue)> {
    let kv = |k: &str, v: GgufValue| (k.to_string(), v);
    vec![
        kv("general.architecture", GgufValue::String("llama".into())),
        kv("lift.u8", GgufValue::U8(7)),
        kv("lift.i8", GgufValue::I8(-7)),
        kv("lift.u16", GgufValue::U16(65535)),
        kv("lift.i16", GgufValue::I16(-32768)),
        kv("lift.u32", GgufValue::U32(u32::MAX)),
        kv("lift.i32", GgufValue::I32(-5)),
        kv("lift.u64", GgufValue::U64(u64::MAX)),
        kv("lift.i64", GgufValue::I64(i64::MIN)),
        kv("lift.f32", GgufValue::F32(0.1)),
        kv("lift.f64", GgufValue::F64(0.1)),
        kv("lift.bool", GgufValue::Bool(true)),
        kv("lift.string", GgufValue::String("lift ✓".into())),
        kv("lift.tokens", GgufValue::string_array(&["<s>", "</s>", "Ġthe"])),
        kv("lift.scores", GgufValue::f32_array(&[0.0, -1.5])),
        kv("lift.token_type", GgufValue::i32_array(&[1, 3, 1])),
        kv("lift.empty", GgufValue::i32_array(&[])),
        kv(
            "lift.nested",
            GgufValue::Array(GgufValueType::Array, vec![GgufValue::i32_array(&[1, 2]), GgufValue::i32_array(&[3])]),
        ),
    ]
}

/// write_gguf's output reads back through our reader: metadata in order with
/// general.alignment first, tensors 32-byte aligned, F32 exact and F16
/// rounded as `half` rounds. The same file, target/tmp/formats/written.gguf,
/// is what `make_format_fixtures.py --check-written` reads with gguf-py.
#[test]
fn gguf_writer_output_reads_back() {
    let metadata = written_gguf_metadata();
    let (w, h, b) = (written_values(24), written_values(64), written_values(5));
    let tensors = [
        ("w.f32", &[8u64, 3][..], GgufWriteData::F32(&w)),
        ("w.f16", &[16, 2, 2][..], GgufWriteData::F16(&h)),
        ("b", &[5][..], GgufWriteData::F32(&b)),
    ];
    let path = tmp("written.gguf");
    write_gguf(&path, &metadata, &tensors).unwrap();

    let f = GgufFile::open(&path).unwrap();
    assert_eq!(f.version(), 3);
    assert_eq!(f.metadata()[0], ("general.alignment".to_string(), GgufValue::U32(32)));
    assert_eq!(&f.metadata()[1..], &metadata[..]);
    let names: Vec<&str> = f.tensors().iter().map(|t| t.name.as_str()).collect();
    assert_eq!(names, ["w.f32", "w.f16", "b"]);
    for t in f.tensors() {
        assert_eq!((f.data_start() + t.offset) % 32, 0, "{} is aligned", t.name);
    }
    let t = f.find("w.f16").unwrap();
    assert_eq!((t.dims.as_slice(), t.dtype), (&[16u64, 2, 2][..], GgmlType::F16));
    let h16: Vec<f32> = h.iter().map(|&x| f16::from_f32(x).to_f32()).collect();
    assert_same_bits(&f.tensor_f32(t).unwrap(), &h16, "w.f16");
    assert_same_bits(&f.tensor_f32(f.find("w.f32").unwrap()).unwrap(), &w, "w.f32");
    assert_same_bits(&f.tensor_f32(f.find("b").unwrap()).unwrap(), &b, "b");
}

#[test]
fn gguf_writer_refuses_bad_input() {
    let path = tmp("bad_write.gguf");
    let v = [1.0f32; 6];
    let bad_dims = [("t", &[4u64, 2][..], GgufWriteData::F32(&v))];
    expect_err(write_gguf(&path, &[], &bad_dims), &path, "tensor t has 6 values, which does not match its dims [4, 2]");
    let twice = [("t", &[6u64][..], GgufWriteData::F32(&v)), ("t", &[6u64][..], GgufWriteData::F16(&v))];
    expect_err(write_gguf(&path, &[], &twice), &path, "tensor t given twice");
    let mixed = GgufValue::Array(GgufValueType::I32, vec![GgufValue::I32(1), GgufValue::F32(2.0)]);
    expect_err(write_gguf(&path, &[("k".into(), mixed)], &[]), &path, "metadata key k: array of I32 holds a F32");
    let dup = vec![("k".to_string(), GgufValue::U8(1)), ("k".to_string(), GgufValue::U8(2))];
    expect_err(write_gguf(&path, &dup, &[]), &path, "metadata key k given twice");
    let five = [("t", &[1u64, 1, 1, 2, 3][..], GgufWriteData::F32(&v))];
    expect_err(write_gguf(&path, &[], &five), &path, "tensor t has 5 dims, more than ggml's 4");
    let long = "x".repeat(64);
    let long_name = [(long.as_str(), &[6u64][..], GgufWriteData::F32(&v))];
    expect_err(write_gguf(&path, &[], &long_name), &path, "is longer than ggml's 63 bytes");
    let missing_dir = tmp("no/such/dir.gguf");
    expect_err(write_gguf(&missing_dir, &[], &[]), &missing_dir, "cannot create");
}

/// A general.alignment passed in (say, copied from the input model) is
/// replaced by the one the writer actually uses.
#[test]
fn gguf_writer_owns_general_alignment() {
    let path = tmp("alignment.gguf");
    let metadata = [("general.alignment".to_string(), GgufValue::U32(64))];
    let v = [2.0f32; 3];
    write_gguf(&path, &metadata, &[("t", &[3], GgufWriteData::F32(&v))]).unwrap();
    let f = GgufFile::open(&path).unwrap();
    assert_eq!(f.metadata().len(), 1);
    assert_eq!(f.get_u64("general.alignment"), Some(32));
    assert_eq!(f.tensor_f32(&f.tensors()[0]).unwrap(), v);
}

// ---------------------------------------------------------------------------
// safetensors

/// Every F32/F16/BF16 tensor that safetensors.torch.save_file wrote reads as
/// torch's .float() of it, bit for bit (widening is exact); shapes, dtypes
/// and __metadata__ match too.
#[test]
fn safetensors_values_equal_torch() {
    let m = &manifest()["safetensors"];
    let path = fixture(m["file"].as_str().unwrap());
    let f = SafeTensors::open(&path).unwrap();
    let all = expected_values();
    let want_meta: BTreeMap<String, String> = serde_json::from_value(m["metadata"].clone()).unwrap();
    assert_eq!(f.metadata(), &want_meta);
    let entries = m["tensors"].as_array().unwrap();
    assert_eq!(f.tensors().len(), entries.len());
    for w in entries {
        let name = w["name"].as_str().unwrap();
        let t = f.find(name).unwrap();
        let shape: Vec<usize> = w["shape"].as_array().unwrap().iter().map(|d| d.as_u64().unwrap() as usize).collect();
        assert_eq!(t.shape, shape, "{name}");
        assert_eq!(t.dtype.to_string(), w["dtype"].as_str().unwrap(), "{name}");
        if let Some(want) = expected_for(w, &all) {
            assert_same_bits(&f.tensor_f32(name).unwrap(), want, name);
        }
    }
    expect_err(
        f.tensor_f32("ids"),
        &path,
        "tensor ids has dtype I64, which lift cannot read (supported: F32, F16, BF16)",
    );
    expect_err(f.tensor_f32("nope"), &path, "tensor nope is missing");
}

/// write_safetensors's output reads back through our reader, with the data
/// packed as the official loader demands: header padded to 8, tensors back
/// to back, F32 before BF16 so each starts on a multiple of its size. The
/// same file, target/tmp/formats/written.safetensors, is what
/// `make_format_fixtures.py --check-written` loads with safetensors.
#[test]
fn safetensors_writer_output_reads_back() {
    let (a, c) = (written_values(12), written_values(3));
    let b: Vec<bf16> = written_values(10).iter().map(|&x| bf16::from_f32(x)).collect();
    let tensors = [
        ("a.f32", &[3usize, 4][..], TensorData::F32(&a)),
        ("b.bf16", &[2, 5][..], TensorData::BF16(&b)),
        ("c.f32", &[3][..], TensorData::F32(&c)),
    ];
    let meta = BTreeMap::from([("format".to_string(), "pt".to_string()), ("writer".to_string(), "lift".to_string())]);
    let path = tmp("written.safetensors");
    write_safetensors(&path, &tensors, Some(&meta)).unwrap();

    let f = SafeTensors::open(&path).unwrap();
    assert_eq!(f.metadata(), &meta);
    assert_same_bits(&f.tensor_f32("a.f32").unwrap(), &a, "a.f32");
    assert_same_bits(&f.tensor_f32("c.f32").unwrap(), &c, "c.f32");
    let b32: Vec<f32> = b.iter().map(|x| x.to_f32()).collect();
    assert_same_bits(&f.tensor_f32("b.bf16").unwrap(), &b32, "b.bf16");
    assert_eq!(f.find("b.bf16").unwrap().shape, [2, 5]);

    // The layout, read straight from the bytes.
    let bytes = std::fs::read(&path).unwrap();
    let n = u64::from_le_bytes(bytes[..8].try_into().unwrap()) as usize;
    assert_eq!(n % 8, 0, "header padded to 8");
    let header: Value = serde_json::from_slice(&bytes[8..8 + n]).unwrap();
    let offsets = |name: &str| {
        let o = header[name]["data_offsets"].as_array().unwrap();
        (o[0].as_u64().unwrap(), o[1].as_u64().unwrap())
    };
    assert_eq!(offsets("a.f32"), (0, 48));
    assert_eq!(offsets("c.f32"), (48, 60));
    assert_eq!(offsets("b.bf16"), (60, 80));
    assert_eq!(bytes.len(), 8 + n + 80);
}

#[test]
fn safetensors_writer_refuses_bad_input() {
    let path = tmp("bad_write.safetensors");
    let v = [1.0f32; 6];
    let bad = [("t", &[4usize, 2][..], TensorData::F32(&v))];
    expect_err(
        write_safetensors(&path, &bad, None),
        &path,
        "tensor t has 6 values, which does not match its shape [4, 2]",
    );
    let twice = [("t", &[6usize][..], TensorData::F32(&v)), ("t", &[6usize][..], TensorData::F32(&v))];
    expect_err(write_safetensors(&path, &twice, None), &path, "tensor name t is used twice or reserved");
}

/// A safetensors file from a header given as text and `data_len` zero bytes.
fn raw_safetensors(name: &str, header: &str, data_len: usize) -> PathBuf {
    let mut b = (header.len() as u64).to_le_bytes().to_vec();
    b.extend_from_slice(header.as_bytes());
    b.resize(b.len() + data_len, 0);
    write_tmp(name, &b)
}

#[test]
fn safetensors_bad_input() {
    let ok = r#"{"t": {"dtype": "F32", "shape": [2, 2], "data_offsets": [0, 16]}}"#;
    let path = raw_safetensors("ok.safetensors", ok, 16);
    assert_eq!(SafeTensors::open(&path).unwrap().tensor_f32("t").unwrap(), [0.0; 4]);

    let cases = [
        ("not_json", "{\"t\": [1, 2", 0, "header is not a JSON object"),
        ("json_array", "[1, 2, 3]", 0, "header is not a JSON object"),
        (
            "no_dtype",
            r#"{"t": {"shape": [2], "data_offsets": [0, 8]}}"#,
            8,
            "tensor t: bad header entry: missing field `dtype`",
        ),
        (
            "bad_shape",
            r#"{"t": {"dtype": "F32", "shape": [-2], "data_offsets": [0, 8]}}"#,
            8,
            "tensor t: bad header entry",
        ),
        ("past_end", ok, 12, "tensor t has data_offsets [0, 16], but the data section is 12 bytes (truncated?)"),
        ("reversed", r#"{"t": {"dtype": "F32", "shape": [0], "data_offsets": [8, 0]}}"#, 8, "data_offsets [8, 0]"),
        (
            "wrong_size",
            r#"{"t": {"dtype": "BF16", "shape": [2, 2], "data_offsets": [0, 16]}}"#,
            16,
            "tensor t has shape [2, 2] of BF16, but data_offsets [0, 16] hold 16 bytes",
        ),
        (
            "shape_overflow",
            r#"{"t": {"dtype": "F32", "shape": [4294967296, 4294967296], "data_offsets": [0, 16]}}"#,
            16,
            "tensor t has shape [4294967296, 4294967296]",
        ),
        ("bad_metadata", r#"{"__metadata__": {"n": 1}}"#, 0, "__metadata__ is not a map of strings to strings"),
    ];
    for (name, header, data_len, needle) in cases {
        let path = raw_safetensors(&format!("{name}.safetensors"), header, data_len);
        expect_err(SafeTensors::open(&path), &path, needle);
    }

    let path = write_tmp("short.safetensors", &[1, 2, 3]);
    expect_err(SafeTensors::open(&path), &path, "not a safetensors file (only 3 bytes");
    let mut b = u64::MAX.to_le_bytes().to_vec();
    b.extend_from_slice(b"{}");
    let path = write_tmp("huge_header.safetensors", &b);
    expect_err(SafeTensors::open(&path), &path, "header length 18446744073709551615 does not fit");
    let path = fixture("quants.gguf");
    expect_err(SafeTensors::open(&path), &path, "header length");
    let path = tmp("does_not_exist.safetensors");
    expect_err(SafeTensors::open(&path), &path, "cannot open");
}

/// Cutting the fixture anywhere gives an error naming the file.
#[test]
fn safetensors_every_truncation_is_an_error() {
    let bytes = std::fs::read(fixture("tensors.safetensors")).unwrap();
    let path = tmp("truncated.safetensors");
    for len in 0..bytes.len() {
        std::fs::write(&path, &bytes[..len]).unwrap();
        expect_err(SafeTensors::open(&path), &path, "");
    }
}

// ---------------------------------------------------------------------------
// A real model, by hand

/// Reads every tensor of a real GGUF and reports the time. Not run by
/// default (the model is not in git):
///
///     LIFT_REAL_GGUF=models/SmolLM2-135M-Instruct.Q4_1.gguf \
///         cargo test --release --test formats -- --ignored --nocapture
///
/// With LIFT_DUMP_DIR set, also writes each tensor's values as
/// DIR/<name>.f32 for comparison with gguf.quants.dequantize.
#[test]
#[ignore]
fn real_gguf_reads_every_tensor() {
    let path = PathBuf::from(std::env::var("LIFT_REAL_GGUF").expect("set LIFT_REAL_GGUF"));
    let start = Instant::now();
    let f = GgufFile::open(&path).unwrap();
    let opened = start.elapsed();
    let mut n = 0;
    for t in f.tensors() {
        n += f.tensor_f32(t).unwrap().len();
    }
    let read = start.elapsed() - opened;
    println!(
        "{}: opened in {opened:?}, {} tensors ({n} values) dequantized in {read:?}",
        path.display(),
        f.tensors().len()
    );
    if let Ok(dir) = std::env::var("LIFT_DUMP_DIR") {
        std::fs::create_dir_all(&dir).unwrap();
        for t in f.tensors() {
            std::fs::write(Path::new(&dir).join(format!("{}.f32", t.name)), f32_bytes(&f.tensor_f32(t).unwrap()))
                .unwrap();
        }
    }
}
