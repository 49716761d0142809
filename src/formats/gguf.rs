//! GGUF, llama.cpp's model file: reading (metadata, tensor index, and
//! dequantization of the common tensor types to f32) and writing (F32 and
//! F16 tensors, for `lift export --format gguf`).
//!
//! A GGUF v2/v3 file, every number little-endian:
//!
//! ```text
//! "GGUF" | version u32 | tensor count u64 | metadata count u64
//! metadata      count x (key: string, value type: u32, value)
//! tensor infos  count x (name: string, n_dims: u32, dims: n_dims x u64,
//!                        type: u32, offset: u64)
//! zero padding up to a multiple of `general.alignment` (32 if absent)
//! data          tensor i at (data start + offset_i), each offset a multiple
//!               of the alignment
//! ```
//!
//! A string is a u64 byte count and that many UTF-8 bytes, no terminator. An
//! array is an element type u32, a count u64 and the elements; an element can
//! itself be an array (again type, count, elements). Version 1 used u32
//! counts; it predates every model worth fine-tuning and is refused. Version 3
//! only added big-endian files, which lift refuses too.
//!
//! `dims` are in ggml order: dims[0] varies fastest. A weight with dims
//! [in, out] is therefore a row-major (out, in) matrix, one row per output.
//! Quantized types store each row as blocks of `block_size` values, so dims[0]
//! is always a multiple of the block size.
//!
//! Every error is one line that starts with the file's path, and a bad file
//! gives an error, never a panic or a huge allocation: every length and count
//! is checked against the bytes that are actually there before it is used.

use std::collections::{HashMap, HashSet};
use std::fmt;
use std::fs::File;
use std::io::Write;
use std::path::{Path, PathBuf};

use anyhow::{Result, anyhow, bail};
use half::{bf16, f16};
use memmap2::Mmap;
use rayon::prelude::*;

use crate::formats::checkpoint::write_atomic;
use crate::limits::{clip, plain};

// ---------------------------------------------------------------------------
// Tensor types

/// A ggml tensor type. The discriminants are the ids stored in the file.
/// Names follow ggml exactly (`Q4_K`, not `Q4K`) so they can be searched for
/// in llama.cpp.
#[allow(non_camel_case_types)]
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
#[repr(u32)]
pub enum GgmlType {
    F32 = 0,
    F16 = 1,
    Q4_0 = 2,
    Q4_1 = 3,
    Q5_0 = 6,
    Q5_1 = 7,
    Q8_0 = 8,
    Q8_1 = 9,
    Q2_K = 10,
    Q3_K = 11,
    Q4_K = 12,
    Q5_K = 13,
    Q6_K = 14,
    Q8_K = 15,
    IQ2_XXS = 16,
    IQ2_XS = 17,
    IQ3_XXS = 18,
    IQ1_S = 19,
    IQ4_NL = 20,
    IQ3_S = 21,
    IQ2_S = 22,
    IQ4_XS = 23,
    I8 = 24,
    I16 = 25,
    I32 = 26,
    I64 = 27,
    F64 = 28,
    IQ1_M = 29,
    BF16 = 30,
    TQ1_0 = 34,
    TQ2_0 = 35,
    MXFP4 = 39,
    NVFP4 = 40,
    Q1_0 = 41,
}

/// Every type ggml knows with (values per block, bytes per block), from
/// `GGML_QUANT_SIZES` in gguf-py's constants.py (QK_K = 256). We need the
/// sizes even for types we cannot dequantize, to check that each tensor lies
/// inside the file. Ids missing here (4, 5, 31..33, 36..38) were removed from
/// ggml and are refused as unknown.
const TYPES: &[(GgmlType, u64, u64)] = {
    use GgmlType::*;
    &[
        (F32, 1, 4),
        (F16, 1, 2),
        (Q4_0, 32, 2 + 16),
        (Q4_1, 32, 2 + 2 + 16),
        (Q5_0, 32, 2 + 4 + 16),
        (Q5_1, 32, 2 + 2 + 4 + 16),
        (Q8_0, 32, 2 + 32),
        (Q8_1, 32, 4 + 4 + 32),
        (Q2_K, 256, 2 + 2 + 16 + 64),
        (Q3_K, 256, 2 + 64 + 32 + 12),
        (Q4_K, 256, 2 + 2 + 12 + 128),
        (Q5_K, 256, 2 + 2 + 12 + 32 + 128),
        (Q6_K, 256, 2 + 128 + 64 + 16),
        (Q8_K, 256, 4 + 256 + 32),
        (IQ2_XXS, 256, 2 + 64),
        (IQ2_XS, 256, 2 + 64 + 8),
        (IQ3_XXS, 256, 2 + 64 + 32),
        (IQ1_S, 256, 2 + 32 + 16),
        (IQ4_NL, 32, 2 + 16),
        (IQ3_S, 256, 2 + 64 + 32 + 8 + 4),
        (IQ2_S, 256, 2 + 64 + 16),
        (IQ4_XS, 256, 2 + 2 + 128 + 4),
        (I8, 1, 1),
        (I16, 1, 2),
        (I32, 1, 4),
        (I64, 1, 8),
        (F64, 1, 8),
        (IQ1_M, 256, 32 + 16 + 8),
        (BF16, 1, 2),
        (TQ1_0, 256, 2 + 4 * 13),
        (TQ2_0, 256, 2 + 64),
        (MXFP4, 32, 1 + 16),
        (NVFP4, 64, 4 + 32),
        (Q1_0, 128, 2 + 16),
    ]
};

/// The types `tensor_f32` can dequantize: the float types and the quant
/// types real Llama GGUFs use.
pub const SUPPORTED_TYPES: &[GgmlType] = {
    use GgmlType::*;
    &[F32, F16, BF16, Q8_0, Q4_0, Q4_1, Q5_0, Q5_1, Q2_K, Q3_K, Q4_K, Q5_K, Q6_K, Q8_K]
};

impl GgmlType {
    /// The type with this id, or None for an id ggml does not (or no longer)
    /// define.
    pub fn from_id(id: u32) -> Option<GgmlType> {
        TYPES.iter().map(|t| t.0).find(|&t| t as u32 == id)
    }

    fn sizes(self) -> (u64, u64) {
        let row = TYPES.iter().find(|t| t.0 == self);
        // Every variant has a row in TYPES (a unit test checks this).
        row.map_or((1, 0), |t| (t.1, t.2))
    }

    /// How many values one block holds (1 for the plain number types).
    pub fn block_size(self) -> u64 {
        self.sizes().0
    }

    /// How many bytes one block takes.
    pub fn block_bytes(self) -> u64 {
        self.sizes().1
    }

    /// Whether `GgufFile::tensor_f32` can read this type.
    pub fn is_supported(self) -> bool {
        SUPPORTED_TYPES.contains(&self)
    }
}

impl fmt::Display for GgmlType {
    fn fmt(&self, f: &mut fmt::Formatter) -> fmt::Result {
        // The Debug name is the ggml name.
        fmt::Debug::fmt(self, f)
    }
}

// ---------------------------------------------------------------------------
// Metadata values

/// The type of a metadata value; the discriminants are the ids in the file.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
#[repr(u32)]
pub enum GgufValueType {
    U8 = 0,
    I8 = 1,
    U16 = 2,
    I16 = 3,
    U32 = 4,
    I32 = 5,
    F32 = 6,
    Bool = 7,
    String = 8,
    Array = 9,
    U64 = 10,
    I64 = 11,
    F64 = 12,
}

impl GgufValueType {
    pub fn from_id(id: u32) -> Option<GgufValueType> {
        use GgufValueType::*;
        let all = [U8, I8, U16, I16, U32, I32, F32, Bool, String, Array, U64, I64, F64];
        all.into_iter().find(|&t| t as u32 == id)
    }

    /// The fewest bytes a value of this type can take in the file: a string
    /// needs its u64 length, an array its u32 type and u64 count. Used to
    /// refuse counts the rest of the file cannot possibly hold.
    fn min_bytes(self) -> u64 {
        use GgufValueType::*;
        match self {
            U8 | I8 | Bool => 1,
            U16 | I16 => 2,
            U32 | I32 | F32 => 4,
            U64 | I64 | F64 | String => 8,
            Array => 12,
        }
    }
}

/// One metadata value. An array records its element type, so that an empty
/// array can be written back exactly.
#[derive(Clone, Debug, PartialEq)]
pub enum GgufValue {
    U8(u8),
    I8(i8),
    U16(u16),
    I16(i16),
    U32(u32),
    I32(i32),
    U64(u64),
    I64(i64),
    F32(f32),
    F64(f64),
    Bool(bool),
    String(String),
    Array(GgufValueType, Vec<GgufValue>),
}

impl GgufValue {
    pub fn value_type(&self) -> GgufValueType {
        use GgufValue as V;
        use GgufValueType as T;
        match self {
            V::U8(_) => T::U8,
            V::I8(_) => T::I8,
            V::U16(_) => T::U16,
            V::I16(_) => T::I16,
            V::U32(_) => T::U32,
            V::I32(_) => T::I32,
            V::U64(_) => T::U64,
            V::I64(_) => T::I64,
            V::F32(_) => T::F32,
            V::F64(_) => T::F64,
            V::Bool(_) => T::Bool,
            V::String(_) => T::String,
            V::Array(..) => T::Array,
        }
    }

    /// A string array, e.g. `tokenizer.ggml.tokens`.
    pub fn string_array<S: AsRef<str>>(items: &[S]) -> GgufValue {
        let items = items.iter().map(|s| GgufValue::String(s.as_ref().to_owned()));
        GgufValue::Array(GgufValueType::String, items.collect())
    }

    /// An i32 array, e.g. `tokenizer.ggml.token_type`.
    pub fn i32_array(items: &[i32]) -> GgufValue {
        GgufValue::Array(GgufValueType::I32, items.iter().map(|&x| GgufValue::I32(x)).collect())
    }

    /// An f32 array, e.g. `tokenizer.ggml.scores`.
    pub fn f32_array(items: &[f32]) -> GgufValue {
        GgufValue::Array(GgufValueType::F32, items.iter().map(|&x| GgufValue::F32(x)).collect())
    }

    /// Any integer type, as i128 so that every u64 and i64 fits.
    fn as_int(&self) -> Option<i128> {
        use GgufValue as V;
        Some(match *self {
            V::U8(x) => x.into(),
            V::I8(x) => x.into(),
            V::U16(x) => x.into(),
            V::I16(x) => x.into(),
            V::U32(x) => x.into(),
            V::I32(x) => x.into(),
            V::U64(x) => x.into(),
            V::I64(x) => x.into(),
            _ => return None,
        })
    }

    fn as_f32(&self) -> Option<f32> {
        match *self {
            GgufValue::F32(x) => Some(x),
            GgufValue::F64(x) => Some(x as f32),
            // A float key written as an integer (rope.freq_base = 10000) is
            // still the number the writer meant.
            _ => self.as_int().map(|x| x as f32),
        }
    }

    fn items(&self) -> Option<&[GgufValue]> {
        match self {
            GgufValue::Array(_, items) => Some(items),
            _ => None,
        }
    }

    /// "u32", "array of string", ... for error messages.
    fn describe(&self) -> String {
        match self {
            GgufValue::Array(t, _) => format!("array of {t:?}"),
            v => format!("{:?}", v.value_type()),
        }
    }
}

// ---------------------------------------------------------------------------
// The file

/// One entry of the tensor index. `offset` is relative to the start of the
/// data section (as stored in the file).
#[derive(Clone, Debug, PartialEq)]
pub struct GgufTensor {
    pub name: String,
    /// ggml order: dims[0] varies fastest.
    pub dims: Vec<u64>,
    pub dtype: GgmlType,
    pub offset: u64,
}

impl GgufTensor {
    /// The number of values (the product of dims; 1 for a 0-dim tensor).
    /// Saturates rather than overflows for dims that no file can hold.
    pub fn n_elements(&self) -> u64 {
        self.dims.iter().fold(1u64, |n, &d| n.saturating_mul(d))
    }

    /// The length of one row, dims[0].
    pub fn row_len(&self) -> u64 {
        self.dims.first().copied().unwrap_or(1)
    }

    /// The number of values and bytes, or why the dims do not describe a
    /// tensor of this type (overflow, a row that is not whole blocks).
    fn layout(&self) -> Result<(u64, u64), String> {
        let n = self.dims.iter().try_fold(1u64, |n, &d| n.checked_mul(d));
        let n = n.ok_or_else(|| format!("tensor {} has dims {:?}, too many values", plain(&self.name), self.dims))?;
        let (block, block_bytes) = self.dtype.sizes();
        if !self.row_len().is_multiple_of(block) {
            return Err(format!(
                "tensor {} has rows of {} values, not a multiple of the {} block size {}",
                plain(&self.name),
                self.row_len(),
                self.dtype,
                block
            ));
        }
        // n is a multiple of the row length, hence of the block size.
        let bytes = (n / block).checked_mul(block_bytes);
        let bytes =
            bytes.ok_or_else(|| format!("tensor {} has dims {:?}, too many bytes", plain(&self.name), self.dims))?;
        Ok((n, bytes))
    }
}

/// An open GGUF file: the parsed header and the memory-mapped data.
pub struct GgufFile {
    path: PathBuf,
    mmap: Mmap,
    version: u32,
    metadata: Vec<(String, GgufValue)>,
    metadata_index: HashMap<String, usize>,
    tensors: Vec<GgufTensor>,
    tensor_index: HashMap<String, usize>,
    alignment: u64,
    data_start: u64,
}

/// The alignment of the data section and of each tensor when the file does
/// not set `general.alignment`.
pub const DEFAULT_ALIGNMENT: u64 = 32;

/// Nesting limit for arrays of arrays; real files nest at most once, and the
/// limit keeps a crafted file from exhausting the stack.
const MAX_ARRAY_DEPTH: usize = 8;

/// ggml's GGML_MAX_DIMS.
const MAX_DIMS: u32 = 4;

/// ggml's GGML_MAX_NAME (64) less the terminating NUL.
const MAX_NAME_BYTES: usize = 63;

impl GgufFile {
    /// Opens and memory-maps `path`, parses the header, and checks that every
    /// tensor lies inside the file. Tensor data is only read by `tensor_f32`.
    pub fn open(path: &Path) -> Result<GgufFile> {
        let name = path.display();
        let file = File::open(path).map_err(|e| anyhow!("{name}: cannot open: {e}"))?;
        // SAFETY: the map is read-only and lives as long as `self`. Mapping is
        // undefined behaviour only if another process changes the file while
        // we hold it; like every mmap-based model loader we accept that a
        // model file is not edited while it is being read. Mapping avoids
        // copying gigabytes just to dequantize them once.
        let mmap = unsafe { Mmap::map(&file) }.map_err(|e| anyhow!("{name}: cannot map: {e}"))?;
        let header = parse_header(&mmap).map_err(|e| anyhow!("{name}: {e}"))?;
        let Header { version, metadata, tensors, alignment, data_start } = header;
        let metadata_index = metadata.iter().enumerate().map(|(i, (k, _))| (k.clone(), i)).collect();
        let tensor_index = tensors.iter().enumerate().map(|(i, t)| (t.name.clone(), i)).collect();
        Ok(GgufFile {
            path: path.to_owned(),
            mmap,
            version,
            metadata,
            metadata_index,
            tensors,
            tensor_index,
            alignment,
            data_start,
        })
    }

    pub fn path(&self) -> &Path {
        &self.path
    }

    /// The format version, 2 or 3.
    pub fn version(&self) -> u32 {
        self.version
    }

    /// The alignment of the data section (`general.alignment`, default 32).
    pub fn alignment(&self) -> u64 {
        self.alignment
    }

    /// Where the data section starts, in bytes from the start of the file.
    pub fn data_start(&self) -> u64 {
        self.data_start
    }

    /// All metadata in file order.
    pub fn metadata(&self) -> &[(String, GgufValue)] {
        &self.metadata
    }

    pub fn get(&self, key: &str) -> Option<&GgufValue> {
        self.metadata_index.get(key).map(|&i| &self.metadata[i].1)
    }

    // The `get_*` getters return None both for a missing key and for a value
    // of another type; the `require_*` twins tell the two apart in their error.

    pub fn get_str(&self, key: &str) -> Option<&str> {
        match self.get(key)? {
            GgufValue::String(s) => Some(s),
            _ => None,
        }
    }

    /// Any integer type whose value is not negative.
    pub fn get_u64(&self, key: &str) -> Option<u64> {
        self.get(key)?.as_int().and_then(|x| u64::try_from(x).ok())
    }

    /// f32 or f64 (rounded), or an integer.
    pub fn get_f32(&self, key: &str) -> Option<f32> {
        self.get(key)?.as_f32()
    }

    pub fn get_bool(&self, key: &str) -> Option<bool> {
        match self.get(key)? {
            GgufValue::Bool(b) => Some(*b),
            _ => None,
        }
    }

    pub fn get_str_array(&self, key: &str) -> Option<Vec<&str>> {
        let items = self.get(key)?.items()?;
        items
            .iter()
            .map(|v| match v {
                GgufValue::String(s) => Some(s.as_str()),
                _ => None,
            })
            .collect()
    }

    /// An array of any integer type whose values all fit in i32.
    pub fn get_i32_array(&self, key: &str) -> Option<Vec<i32>> {
        let items = self.get(key)?.items()?;
        items.iter().map(|v| v.as_int().and_then(|x| i32::try_from(x).ok())).collect()
    }

    /// An array of f32 (or f64, rounded).
    pub fn get_f32_array(&self, key: &str) -> Option<Vec<f32>> {
        let items = self.get(key)?.items()?;
        items
            .iter()
            .map(|v| match *v {
                GgufValue::F32(x) => Some(x),
                GgufValue::F64(x) => Some(x as f32),
                _ => None,
            })
            .collect()
    }

    /// The error for a `require_*` getter: missing, or there with another type.
    fn key_error(&self, key: &str, expected: &str) -> anyhow::Error {
        let name = self.path.display();
        match self.get(key) {
            None => anyhow!("{name}: metadata key {key} is missing"),
            Some(v) => anyhow!("{name}: metadata key {key} is {}, expected {expected}", v.describe()),
        }
    }

    pub fn require_str(&self, key: &str) -> Result<&str> {
        self.get_str(key).ok_or_else(|| self.key_error(key, "a string"))
    }

    pub fn require_u64(&self, key: &str) -> Result<u64> {
        self.get_u64(key).ok_or_else(|| self.key_error(key, "a non-negative integer"))
    }

    pub fn require_f32(&self, key: &str) -> Result<f32> {
        self.get_f32(key).ok_or_else(|| self.key_error(key, "a number"))
    }

    pub fn require_bool(&self, key: &str) -> Result<bool> {
        self.get_bool(key).ok_or_else(|| self.key_error(key, "a bool"))
    }

    pub fn require_str_array(&self, key: &str) -> Result<Vec<&str>> {
        self.get_str_array(key).ok_or_else(|| self.key_error(key, "an array of strings"))
    }

    pub fn require_i32_array(&self, key: &str) -> Result<Vec<i32>> {
        self.get_i32_array(key).ok_or_else(|| self.key_error(key, "an array of i32"))
    }

    pub fn require_f32_array(&self, key: &str) -> Result<Vec<f32>> {
        self.get_f32_array(key).ok_or_else(|| self.key_error(key, "an array of f32"))
    }

    /// The tensor index in file order.
    pub fn tensors(&self) -> &[GgufTensor] {
        &self.tensors
    }

    pub fn find(&self, name: &str) -> Option<&GgufTensor> {
        self.tensor_index.get(name).map(|&i| &self.tensors[i])
    }

    pub fn require_tensor(&self, name: &str) -> Result<&GgufTensor> {
        self.find(name).ok_or_else(|| anyhow!("{}: tensor {name} is missing", self.path.display()))
    }

    /// The raw bytes of a tensor. The tensors of `tensors()` were checked
    /// when the file was opened; the checks are repeated because a
    /// `GgufTensor` can also be built by hand.
    pub fn tensor_bytes(&self, t: &GgufTensor) -> Result<&[u8]> {
        let name = self.path.display();
        let (_, bytes) = t.layout().map_err(|e| anyhow!("{name}: {e}"))?;
        let (start, end) =
            tensor_range(t, bytes, self.data_start, self.mmap.len() as u64).map_err(|e| anyhow!("{name}: {e}"))?;
        Ok(&self.mmap[start as usize..end as usize])
    }

    /// The values of tensor `t` as f32, in file order (dims[0] fastest, so a
    /// [in, out] weight comes out as a row-major (out, in) matrix).
    pub fn tensor_f32(&self, t: &GgufTensor) -> Result<Vec<f32>> {
        let bytes = self.tensor_bytes(t)?;
        let Some(dequant_blocks) = dequantizer(t.dtype) else {
            let supported: Vec<String> = SUPPORTED_TYPES.iter().map(|t| t.to_string()).collect();
            bail!(
                "{}: tensor {} has type {}, which lift cannot read (supported: {})",
                self.path.display(),
                plain(&t.name),
                t.dtype,
                supported.join(", ")
            );
        };
        let n = t.n_elements() as usize;
        let mut out = vec![0f32; n];
        if n == 0 {
            return Ok(out);
        }
        // Rows are independent, so big tensors are split into rows across
        // threads; a row is whole blocks, so each thread decodes whole blocks.
        // Small tensors stay on one thread, where the split costs more than
        // it saves.
        let row_len = t.row_len() as usize;
        let row_bytes = row_len / t.dtype.block_size() as usize * t.dtype.block_bytes() as usize;
        if n >= 1 << 16 {
            out.par_chunks_mut(row_len).zip(bytes.par_chunks(row_bytes)).for_each(|(y, x)| dequant_blocks(x, y));
        } else {
            dequant_blocks(bytes, &mut out);
        }
        Ok(out)
    }
}

/// The absolute byte range of a tensor of `bytes` bytes, or why it does not
/// fit in the file.
fn tensor_range(t: &GgufTensor, bytes: u64, data_start: u64, file_len: u64) -> Result<(u64, u64), String> {
    let start = data_start.checked_add(t.offset);
    match start.and_then(|s| Some((s, s.checked_add(bytes)?))) {
        Some((start, end)) if end <= file_len => Ok((start, end)),
        _ => Err(format!(
            "tensor {} needs {bytes} bytes at offset {}, but the file ends at {file_len} (truncated?)",
            plain(&t.name),
            data_start as u128 + t.offset as u128
        )),
    }
}

// ---------------------------------------------------------------------------
// Parsing the header

/// A read position in the file. Every read checks the length first, so a
/// truncated or corrupt file gives an error naming the offset, not a panic.
struct Cursor<'a> {
    buf: &'a [u8],
    pos: usize,
}

impl<'a> Cursor<'a> {
    fn remaining(&self) -> u64 {
        (self.buf.len() - self.pos) as u64
    }

    fn take(&mut self, n: u64) -> Result<&'a [u8], String> {
        if n > self.remaining() {
            return Err(format!(
                "needs {n} bytes at offset {}, but the file ends at {} (truncated?)",
                self.pos,
                self.buf.len()
            ));
        }
        let bytes = &self.buf[self.pos..self.pos + n as usize];
        self.pos += n as usize;
        Ok(bytes)
    }

    fn array<const N: usize>(&mut self) -> Result<[u8; N], String> {
        let mut a = [0u8; N];
        a.copy_from_slice(self.take(N as u64)?);
        Ok(a)
    }

    fn u32(&mut self) -> Result<u32, String> {
        Ok(u32::from_le_bytes(self.array()?))
    }

    fn u64(&mut self) -> Result<u64, String> {
        Ok(u64::from_le_bytes(self.array()?))
    }

    /// An array's u64 element count, refused when the rest of the file
    /// cannot hold that many elements of at least `min_bytes` each; this is
    /// what keeps a corrupt count from becoming a huge allocation.
    fn array_len(&mut self, min_bytes: u64) -> Result<u64, String> {
        let at = self.pos;
        let n = self.u64()?;
        if n.checked_mul(min_bytes).is_none_or(|need| need > self.remaining()) {
            return Err(format!(
                "array at offset {at} claims {n} elements, more than the {} bytes left in the file hold (truncated or corrupt?)",
                self.remaining()
            ));
        }
        Ok(n)
    }

    fn string(&mut self) -> Result<String, String> {
        let at = self.pos;
        let len = self.u64()?;
        if len > self.remaining() {
            return Err(format!(
                "string at offset {at} claims {len} bytes, but the file ends at {} (truncated or corrupt?)",
                self.buf.len()
            ));
        }
        let bytes = self.take(len)?;
        match std::str::from_utf8(bytes) {
            Ok(s) => Ok(s.to_owned()),
            Err(_) => Err(format!("string at offset {at} is not valid UTF-8")),
        }
    }

    fn value(&mut self, ty: GgufValueType, depth: usize) -> Result<GgufValue, String> {
        use GgufValue as V;
        use GgufValueType as T;
        Ok(match ty {
            T::U8 => V::U8(u8::from_le_bytes(self.array()?)),
            T::I8 => V::I8(i8::from_le_bytes(self.array()?)),
            T::U16 => V::U16(u16::from_le_bytes(self.array()?)),
            T::I16 => V::I16(i16::from_le_bytes(self.array()?)),
            T::U32 => V::U32(u32::from_le_bytes(self.array()?)),
            T::I32 => V::I32(i32::from_le_bytes(self.array()?)),
            T::U64 => V::U64(u64::from_le_bytes(self.array()?)),
            T::I64 => V::I64(i64::from_le_bytes(self.array()?)),
            T::F32 => V::F32(f32::from_le_bytes(self.array()?)),
            T::F64 => V::F64(f64::from_le_bytes(self.array()?)),
            T::Bool => match self.array::<1>()?[0] {
                0 => V::Bool(false),
                1 => V::Bool(true),
                b => {
                    return Err(format!("bool at offset {} is {b}, not 0 or 1", self.pos - 1));
                }
            },
            T::String => V::String(self.string()?),
            T::Array => {
                if depth >= MAX_ARRAY_DEPTH {
                    return Err(format!("arrays nested deeper than {MAX_ARRAY_DEPTH} levels"));
                }
                let elem = self.value_type()?;
                let n = self.array_len(elem.min_bytes())?;
                let mut items = Vec::with_capacity(n as usize);
                for _ in 0..n {
                    items.push(self.value(elem, depth + 1)?);
                }
                V::Array(elem, items)
            }
        })
    }

    fn value_type(&mut self) -> Result<GgufValueType, String> {
        let at = self.pos;
        let id = self.u32()?;
        GgufValueType::from_id(id).ok_or_else(|| format!("unknown value type {id} at offset {at}"))
    }
}

struct Header {
    version: u32,
    metadata: Vec<(String, GgufValue)>,
    tensors: Vec<GgufTensor>,
    alignment: u64,
    data_start: u64,
}

/// Parses and checks everything before the data section. Errors are
/// returned without the file name, which `open` adds.
fn parse_header(buf: &[u8]) -> Result<Header, String> {
    let mut c = Cursor { buf, pos: 0 };
    if buf.len() < 4 || &buf[..4] != b"GGUF" {
        let magic = &buf[..buf.len().min(4)];
        return Err(format!("not a GGUF file (magic \"{}\", expected \"GGUF\")", magic.escape_ascii()));
    }
    c.pos = 4;
    let version = c.u32().map_err(|e| format!("header: {e}"))?;
    match version {
        2 | 3 => {}
        1 => return Err("GGUF version 1 is not supported (only versions 2 and 3)".into()),
        // Big-endian files (a v3 feature) show up as a byte-swapped version.
        v if v.swap_bytes() == 2 || v.swap_bytes() == 3 => {
            return Err("big-endian GGUF, which lift cannot read".into());
        }
        v => {
            return Err(format!("GGUF version {v} is not supported (only versions 2 and 3)"));
        }
    }
    let n_tensors = c.u64().map_err(|e| format!("header: {e}"))?;
    let n_kv = c.u64().map_err(|e| format!("header: {e}"))?;
    // The counts are not trusted for allocation: the smallest metadata entry
    // (empty key 8, type 4, u8 1) takes 13 bytes and the smallest tensor info
    // (empty name 8, n_dims 4, type 4, offset 8) 24, which caps how many the
    // file can hold. A count that is too big shows up as an entry the file
    // runs out in, and the error then gives the count.
    let mut metadata = Vec::with_capacity(n_kv.min(c.remaining() / 13) as usize);
    let mut seen = HashSet::new();
    for i in 0..n_kv {
        let key = c.string().map_err(|e| format!("metadata entry {i} of {n_kv}: key: {e}"))?;
        let value = c
            .value_type()
            .and_then(|ty| c.value(ty, 0))
            .map_err(|e| format!("metadata key {} (entry {i} of {n_kv}): {e}", plain(&key)))?;
        if !seen.insert(key.clone()) {
            return Err(format!("metadata key {} appears twice", plain(&key)));
        }
        metadata.push((key, value));
    }

    let mut tensors = Vec::with_capacity(n_tensors.min(c.remaining() / 24) as usize);
    let mut seen = HashSet::new();
    for i in 0..n_tensors {
        let t = read_tensor_info(&mut c).map_err(|e| format!("tensor info {i} of {n_tensors}: {e}"))?;
        if !seen.insert(t.name.clone()) {
            return Err(format!("tensor {} appears twice", plain(&t.name)));
        }
        tensors.push(t);
    }

    let alignment = match metadata.iter().find(|(k, _)| k == "general.alignment") {
        None => DEFAULT_ALIGNMENT,
        Some((_, v)) => match v.as_int() {
            Some(a) if a > 0 && (a as u64).is_power_of_two() && a <= u32::MAX as i128 => a as u64,
            _ => return Err(format!("general.alignment is {}, not a power of two", clip(&format!("{v:?}")))),
        },
    };
    // The data section starts at the next multiple of the alignment; c.pos
    // is at most the file length, so this cannot overflow.
    let data_start = (c.pos as u64).div_ceil(alignment) * alignment;
    let file_len = buf.len() as u64;
    for t in &tensors {
        let (_, bytes) = t.layout()?;
        if !t.offset.is_multiple_of(alignment) {
            return Err(format!(
                "tensor {} is at offset {}, not a multiple of the alignment {alignment}",
                plain(&t.name),
                t.offset
            ));
        }
        tensor_range(t, bytes, data_start, file_len)?;
    }
    Ok(Header { version, metadata, tensors, alignment, data_start })
}

fn read_tensor_info(c: &mut Cursor) -> Result<GgufTensor, String> {
    let name = c.string()?;
    let with_name = |e: String| format!("tensor {}: {e}", plain(&name));
    let n_dims = c.u32().map_err(with_name)?;
    if n_dims > MAX_DIMS {
        return Err(with_name(format!("{n_dims} dims, more than ggml's {MAX_DIMS}")));
    }
    let mut dims = Vec::with_capacity(n_dims as usize);
    for _ in 0..n_dims {
        dims.push(c.u64().map_err(with_name)?);
    }
    let type_id = c.u32().map_err(with_name)?;
    let dtype = GgmlType::from_id(type_id)
        .ok_or_else(|| with_name(format!("unknown tensor type id {type_id} (a newer or removed ggml type)")))?;
    let offset = c.u64().map_err(with_name)?;
    Ok(GgufTensor { name, dims, dtype, offset })
}

// ---------------------------------------------------------------------------
// Dequantization
//
// One function per type decodes whole blocks: `x` holds n blocks and `y` gets
// their n * block_size values. Each follows `dequantize_row_*` in ggml's
// ggml-quants.c, and multiplies and adds in the same order (no fused
// multiply-add), so the results equal ggml's and gguf-py's bit for bit.

/// Decodes whole blocks: (blocks, values out).
type DequantFn = fn(&[u8], &mut [f32]);

fn dequantizer(t: GgmlType) -> Option<DequantFn> {
    use GgmlType::*;
    Some(match t {
        F32 => dequant_f32,
        F16 => dequant_f16,
        BF16 => dequant_bf16,
        Q8_0 => dequant_q8_0,
        Q4_0 => dequant_q4_0,
        Q4_1 => dequant_q4_1,
        Q5_0 => dequant_q5_0,
        Q5_1 => dequant_q5_1,
        Q2_K => dequant_q2_k,
        Q3_K => dequant_q3_k,
        Q4_K => dequant_q4_k,
        Q5_K => dequant_q5_k,
        Q6_K => dequant_q6_k,
        Q8_K => dequant_q8_k,
        _ => return None,
    })
}

/// The f16 at byte i of a block (the scales of every quant type).
fn f16_at(b: &[u8], i: usize) -> f32 {
    f16::from_le_bytes([b[i], b[i + 1]]).to_f32()
}

fn dequant_f32(x: &[u8], y: &mut [f32]) {
    for (b, y) in x.chunks_exact(4).zip(y) {
        *y = f32::from_le_bytes([b[0], b[1], b[2], b[3]]);
    }
}

fn dequant_f16(x: &[u8], y: &mut [f32]) {
    for (b, y) in x.chunks_exact(2).zip(y) {
        *y = f16_at(b, 0);
    }
}

fn dequant_bf16(x: &[u8], y: &mut [f32]) {
    for (b, y) in x.chunks_exact(2).zip(y) {
        *y = bf16::from_le_bytes([b[0], b[1]]).to_f32();
    }
}

/// Q8_0, 34 bytes for 32 values: scale d (f16), then 32 i8 q.
/// value = q * d.
fn dequant_q8_0(x: &[u8], y: &mut [f32]) {
    for (b, y) in x.chunks_exact(34).zip(y.chunks_exact_mut(32)) {
        let d = f16_at(b, 0);
        for (q, y) in b[2..].iter().zip(y) {
            *y = (*q as i8) as f32 * d;
        }
    }
}

/// Q4_0, 18 bytes for 32 values: scale d (f16), then 16 bytes of 4-bit q.
/// Byte j holds value j in its low nibble and value j + 16 in its high one.
/// value = (q - 8) * d.
fn dequant_q4_0(x: &[u8], y: &mut [f32]) {
    for (b, y) in x.chunks_exact(18).zip(y.chunks_exact_mut(32)) {
        let d = f16_at(b, 0);
        let qs = &b[2..18];
        for j in 0..16 {
            y[j] = ((qs[j] & 0x0F) as i32 - 8) as f32 * d;
            y[j + 16] = ((qs[j] >> 4) as i32 - 8) as f32 * d;
        }
    }
}

/// Q4_1, 20 bytes for 32 values: scale d and minimum m (f16), then the
/// nibbles as in Q4_0. value = q * d + m.
fn dequant_q4_1(x: &[u8], y: &mut [f32]) {
    for (b, y) in x.chunks_exact(20).zip(y.chunks_exact_mut(32)) {
        let (d, m) = (f16_at(b, 0), f16_at(b, 2));
        let qs = &b[4..20];
        for j in 0..16 {
            y[j] = (qs[j] & 0x0F) as f32 * d + m;
            y[j + 16] = (qs[j] >> 4) as f32 * d + m;
        }
    }
}

/// Q5_0, 22 bytes for 32 values: scale d (f16), the fifth bits qh (u32, bit
/// j for value j), then the low nibbles as in Q4_0. value = (q - 16) * d.
fn dequant_q5_0(x: &[u8], y: &mut [f32]) {
    for (b, y) in x.chunks_exact(22).zip(y.chunks_exact_mut(32)) {
        let d = f16_at(b, 0);
        let qh = u32::from_le_bytes([b[2], b[3], b[4], b[5]]);
        let qs = &b[6..22];
        for j in 0..16 {
            let h0 = ((qh >> j) & 1) << 4;
            let h1 = ((qh >> (j + 16)) & 1) << 4;
            y[j] = (((qs[j] & 0x0F) as u32 | h0) as i32 - 16) as f32 * d;
            y[j + 16] = (((qs[j] >> 4) as u32 | h1) as i32 - 16) as f32 * d;
        }
    }
}

/// Q5_1, 24 bytes for 32 values: d and m (f16), qh (u32), nibbles.
/// value = q * d + m.
fn dequant_q5_1(x: &[u8], y: &mut [f32]) {
    for (b, y) in x.chunks_exact(24).zip(y.chunks_exact_mut(32)) {
        let (d, m) = (f16_at(b, 0), f16_at(b, 2));
        let qh = u32::from_le_bytes([b[4], b[5], b[6], b[7]]);
        let qs = &b[8..24];
        for j in 0..16 {
            let h0 = ((qh >> j) & 1) << 4;
            let h1 = ((qh >> (j + 16)) & 1) << 4;
            y[j] = ((qs[j] & 0x0F) as u32 | h0) as f32 * d + m;
            y[j + 16] = ((qs[j] >> 4) as u32 | h1) as f32 * d + m;
        }
    }
}

// The K-quants pack 256 values ("super-block") as sub-blocks of 16 or 32
// values, each with its own small integer scale (and minimum), which are in
// turn scaled by the f16 d (and dmin) of the super-block.

/// Q2_K, 84 bytes: scales[16], qs[64], d, dmin. Sub-block g of 16 values
/// has scale d * (scales[g] & 15) and minimum dmin * (scales[g] >> 4). The
/// 2-bit q are spread over two halves of 128 values: in half h, value
/// 32 * s + l is bits 2s..2s+1 of qs[32h + l]. value = dl * q - ml.
fn dequant_q2_k(x: &[u8], y: &mut [f32]) {
    for (b, y) in x.chunks_exact(84).zip(y.chunks_exact_mut(256)) {
        let (scales, qs) = (&b[0..16], &b[16..80]);
        let (d, dmin) = (f16_at(b, 80), f16_at(b, 82));
        for (e, y) in y.iter_mut().enumerate() {
            let (h, s, l) = (e / 128, (e % 128) / 32, e % 32);
            let q = (qs[32 * h + l] >> (2 * s)) & 3;
            let sc = scales[e / 16];
            let dl = d * (sc & 0x0F) as f32;
            let ml = dmin * (sc >> 4) as f32;
            *y = dl * q as f32 - ml;
        }
    }
}

/// Q3_K, 110 bytes: hmask[32], qs[64], scales[12], d. The low 2 bits of q
/// lie as in Q2_K; the third bit of value 32 * j + l (j = 4h + s) is bit j of
/// hmask[l], and a clear bit subtracts 4. The sixteen 6-bit sub-block scales
/// are packed as low nibbles in scales[0..8] (value i: byte i % 8, nibble
/// i / 8) and high 2-bit pairs in scales[8..12] (byte 8 + i % 4, pair i / 4),
/// and are offset by 32. value = d * (scale - 32) * q.
fn dequant_q3_k(x: &[u8], y: &mut [f32]) {
    for (b, y) in x.chunks_exact(110).zip(y.chunks_exact_mut(256)) {
        let (hmask, qs, packed) = (&b[0..32], &b[32..96], &b[96..108]);
        let d = f16_at(b, 108);
        let mut dl = [0f32; 16];
        for (i, dl) in dl.iter_mut().enumerate() {
            let low = (packed[i % 8] >> (4 * (i / 8))) & 0x0F;
            let high = (packed[8 + i % 4] >> (2 * (i / 4))) & 3;
            *dl = d * ((low | (high << 4)) as i32 - 32) as f32;
        }
        for (e, y) in y.iter_mut().enumerate() {
            let (h, s, l) = (e / 128, (e % 128) / 32, e % 32);
            let low = ((qs[32 * h + l] >> (2 * s)) & 3) as i32;
            let high_set = (hmask[l] >> (4 * h + s)) & 1 == 1;
            let q = if high_set { low } else { low - 4 };
            *y = dl[e / 16] * q as f32;
        }
    }
}

/// The 6-bit scale and minimum of sub-block j (0..8) of Q4_K and Q5_K, packed
/// into 12 bytes: for j < 4 the low 6 bits of bytes j and j + 4; for j >= 4
/// a nibble of byte j + 4 and the top 2 bits of bytes j - 4 and j.
/// (`get_scale_min_k4` in ggml.)
fn scale_min_k4(j: usize, q: &[u8]) -> (u8, u8) {
    if j < 4 {
        (q[j] & 63, q[j + 4] & 63)
    } else {
        let sc = (q[j + 4] & 0x0F) | ((q[j - 4] >> 6) << 4);
        let m = (q[j + 4] >> 4) | ((q[j] >> 6) << 4);
        (sc, m)
    }
}

/// Q4_K, 144 bytes: d, dmin, scales[12], qs[128]. Eight sub-blocks of 32;
/// sub-blocks 2i and 2i + 1 are the low and high nibbles of qs[32i..32i+32].
/// value = d * sc * q - dmin * m.
fn dequant_q4_k(x: &[u8], y: &mut [f32]) {
    for (b, y) in x.chunks_exact(144).zip(y.chunks_exact_mut(256)) {
        let (d, dmin) = (f16_at(b, 0), f16_at(b, 2));
        let (scales, qs) = (&b[4..16], &b[16..144]);
        for (j, y) in y.chunks_exact_mut(32).enumerate() {
            let (sc, m) = scale_min_k4(j, scales);
            let (dl, ml) = (d * sc as f32, dmin * m as f32);
            let q = &qs[32 * (j / 2)..32 * (j / 2) + 32];
            let shift = 4 * (j % 2);
            for (q, y) in q.iter().zip(y) {
                *y = dl * ((q >> shift) & 0x0F) as f32 - ml;
            }
        }
    }
}

/// Q5_K, 176 bytes: d, dmin, scales[12], qh[32], qs[128]. As Q4_K, plus a
/// fifth bit: for value l of sub-block j, bit j of qh[l].
fn dequant_q5_k(x: &[u8], y: &mut [f32]) {
    for (b, y) in x.chunks_exact(176).zip(y.chunks_exact_mut(256)) {
        let (d, dmin) = (f16_at(b, 0), f16_at(b, 2));
        let (scales, qh, qs) = (&b[4..16], &b[16..48], &b[48..176]);
        for (j, y) in y.chunks_exact_mut(32).enumerate() {
            let (sc, m) = scale_min_k4(j, scales);
            let (dl, ml) = (d * sc as f32, dmin * m as f32);
            let q = &qs[32 * (j / 2)..32 * (j / 2) + 32];
            let shift = 4 * (j % 2);
            for l in 0..32 {
                let q = ((q[l] >> shift) & 0x0F) | (((qh[l] >> j) & 1) << 4);
                y[l] = dl * q as f32 - ml;
            }
        }
    }
}

/// Q6_K, 210 bytes: ql[128], qh[64], scales[16] (i8), d. In half h of 128
/// values, value 32 * s + l takes its low 4 bits from ql[64h + l + 32 (s % 2)]
/// (low nibble for s < 2, high for s >= 2) and its high 2 bits from bits
/// 2s..2s+1 of qh[32h + l]. Sub-blocks are 16 values.
/// value = d * scale * (q - 32).
fn dequant_q6_k(x: &[u8], y: &mut [f32]) {
    for (b, y) in x.chunks_exact(210).zip(y.chunks_exact_mut(256)) {
        let (ql, qh, scales) = (&b[0..128], &b[128..192], &b[192..208]);
        let d = f16_at(b, 208);
        for (e, y) in y.iter_mut().enumerate() {
            let (h, s, l) = (e / 128, (e % 128) / 32, e % 32);
            let low = (ql[64 * h + l + 32 * (s % 2)] >> (4 * (s / 2))) & 0x0F;
            let high = (qh[32 * h + l] >> (2 * s)) & 3;
            let q = (low | (high << 4)) as i32 - 32;
            *y = d * (scales[e / 16] as i8) as f32 * q as f32;
        }
    }
}

/// Q8_K, 292 bytes: d (f32), qs[256] (i8), then 16 i16 block sums that only
/// ggml's dot products use. value = d * q.
fn dequant_q8_k(x: &[u8], y: &mut [f32]) {
    for (b, y) in x.chunks_exact(292).zip(y.chunks_exact_mut(256)) {
        let d = f32::from_le_bytes([b[0], b[1], b[2], b[3]]);
        for (q, y) in b[4..260].iter().zip(y) {
            *y = d * (*q as i8) as f32;
        }
    }
}

// ---------------------------------------------------------------------------
// Writing

/// Tensor data for `write_gguf`. Both take f32 values; F16 rounds them to
/// f16 (nearest, ties to even) on the way out.
#[derive(Clone, Copy, Debug)]
pub enum GgufWriteData<'a> {
    F32(&'a [f32]),
    F16(&'a [f32]),
}

/// The alignment `write_gguf` uses, written as `general.alignment`.
const WRITE_ALIGNMENT: u64 = 32;

/// Writes a GGUF v3 file (atomically: see `write_atomic`). `tensors` are
/// (name, dims in ggml order, data);
/// each tensor starts at a multiple of 32 bytes. `general.alignment` is
/// always written by us (as u32 32), so a `general.alignment` entry in
/// `metadata` (say, copied from another file) is dropped.
pub fn write_gguf(
    path: &Path,
    metadata: &[(String, GgufValue)],
    tensors: &[(&str, &[u64], GgufWriteData)],
) -> Result<()> {
    let name = path.display();
    let alignment = ("general.alignment".to_string(), GgufValue::U32(WRITE_ALIGNMENT as u32));
    let metadata: Vec<&(String, GgufValue)> =
        std::iter::once(&alignment).chain(metadata.iter().filter(|(k, _)| k != "general.alignment")).collect();

    let mut header = Vec::new();
    header.extend_from_slice(b"GGUF");
    header.extend_from_slice(&3u32.to_le_bytes());
    header.extend_from_slice(&(tensors.len() as u64).to_le_bytes());
    header.extend_from_slice(&(metadata.len() as u64).to_le_bytes());
    let mut seen = HashSet::new();
    for (key, value) in &metadata {
        if !seen.insert(key.as_str()) {
            bail!("{name}: metadata key {key} given twice");
        }
        put_string(&mut header, key);
        header.extend_from_slice(&(value.value_type() as u32).to_le_bytes());
        put_value(&mut header, value).map_err(|e| anyhow!("{name}: metadata key {key}: {e}"))?;
    }

    // Tensor infos: offsets are relative to the data section and padded so
    // each tensor starts on the alignment.
    let mut seen = HashSet::new();
    let mut offset = 0u64;
    for (tname, dims, data) in tensors {
        if !seen.insert(*tname) {
            bail!("{name}: tensor {tname} given twice");
        }
        let (values, dtype, elem_bytes) = match data {
            GgufWriteData::F32(v) => (v.len(), GgmlType::F32, 4),
            GgufWriteData::F16(v) => (v.len(), GgmlType::F16, 2),
        };
        // ggml (and so llama.cpp) stores names in 64 bytes with a NUL and
        // allows at most 4 dims; a file outside that would not load there.
        if tname.len() > MAX_NAME_BYTES {
            bail!("{name}: tensor name {tname} is longer than ggml's {MAX_NAME_BYTES} bytes");
        }
        if dims.len() > MAX_DIMS as usize {
            bail!("{name}: tensor {tname} has {} dims, more than ggml's {MAX_DIMS}", dims.len());
        }
        let expected = dims.iter().try_fold(1u64, |n, &d| n.checked_mul(d));
        if expected != Some(values as u64) {
            bail!("{name}: tensor {tname} has {values} values, which does not match its dims {dims:?}");
        }
        put_string(&mut header, tname);
        header.extend_from_slice(&(dims.len() as u32).to_le_bytes());
        for d in *dims {
            header.extend_from_slice(&d.to_le_bytes());
        }
        header.extend_from_slice(&(dtype as u32).to_le_bytes());
        header.extend_from_slice(&offset.to_le_bytes());
        offset = (offset + values as u64 * elem_bytes).div_ceil(WRITE_ALIGNMENT) * WRITE_ALIGNMENT;
    }
    pad_to(&mut header, WRITE_ALIGNMENT);

    write_atomic(path, |w| {
        w.write_all(&header)?;
        // Convert in chunks so a 500 MB tensor never needs a second 500 MB copy.
        let mut buf = Vec::new();
        for (_, _, data) in tensors {
            let written = match *data {
                GgufWriteData::F32(v) => {
                    for chunk in v.chunks(1 << 16) {
                        buf.clear();
                        buf.extend(chunk.iter().flat_map(|x| x.to_le_bytes()));
                        w.write_all(&buf)?;
                    }
                    v.len() as u64 * 4
                }
                GgufWriteData::F16(v) => {
                    for chunk in v.chunks(1 << 16) {
                        buf.clear();
                        buf.extend(chunk.iter().flat_map(|&x| f16::from_f32(x).to_le_bytes()));
                        w.write_all(&buf)?;
                    }
                    v.len() as u64 * 2
                }
            };
            let padding = written.div_ceil(WRITE_ALIGNMENT) * WRITE_ALIGNMENT - written;
            w.write_all(&vec![0u8; padding as usize])?;
        }
        Ok(())
    })
}

fn put_string(out: &mut Vec<u8>, s: &str) {
    out.extend_from_slice(&(s.len() as u64).to_le_bytes());
    out.extend_from_slice(s.as_bytes());
}

/// Appends a value without its type id (the caller writes that, since array
/// elements do not repeat it).
fn put_value(out: &mut Vec<u8>, v: &GgufValue) -> Result<(), String> {
    use GgufValue as V;
    match v {
        V::U8(x) => out.extend_from_slice(&x.to_le_bytes()),
        V::I8(x) => out.extend_from_slice(&x.to_le_bytes()),
        V::U16(x) => out.extend_from_slice(&x.to_le_bytes()),
        V::I16(x) => out.extend_from_slice(&x.to_le_bytes()),
        V::U32(x) => out.extend_from_slice(&x.to_le_bytes()),
        V::I32(x) => out.extend_from_slice(&x.to_le_bytes()),
        V::U64(x) => out.extend_from_slice(&x.to_le_bytes()),
        V::I64(x) => out.extend_from_slice(&x.to_le_bytes()),
        V::F32(x) => out.extend_from_slice(&x.to_le_bytes()),
        V::F64(x) => out.extend_from_slice(&x.to_le_bytes()),
        V::Bool(x) => out.push(*x as u8),
        V::String(s) => put_string(out, s),
        V::Array(elem, items) => {
            out.extend_from_slice(&(*elem as u32).to_le_bytes());
            out.extend_from_slice(&(items.len() as u64).to_le_bytes());
            for item in items {
                // The file stores one element type for the whole array.
                if item.value_type() != *elem {
                    return Err(format!("array of {elem:?} holds a {}", item.describe()));
                }
                put_value(out, item)?;
            }
        }
    }
    Ok(())
}

fn pad_to(out: &mut Vec<u8>, alignment: u64) {
    let len = (out.len() as u64).div_ceil(alignment) * alignment;
    out.resize(len as usize, 0);
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn gguf_every_type_has_sizes() {
        for t in TYPES.iter().map(|t| t.0) {
            assert!(t.block_bytes() > 0, "{t}");
            assert_eq!(GgmlType::from_id(t as u32), Some(t));
        }
        for t in SUPPORTED_TYPES {
            assert!(dequantizer(*t).is_some(), "{t}");
        }
    }

    /// The block sizes in TYPES match the block layouts the dequantizers
    /// read (ggml's `static_assert(sizeof(block_q4_K) == ...)` in spirit).
    #[test]
    fn gguf_block_sizes_match_layouts() {
        use GgmlType::*;
        let expected = [
            (Q8_0, 34),
            (Q4_0, 18),
            (Q4_1, 20),
            (Q5_0, 22),
            (Q5_1, 24),
            (Q2_K, 84),
            (Q3_K, 110),
            (Q4_K, 144),
            (Q5_K, 176),
            (Q6_K, 210),
            (Q8_K, 292),
        ];
        for (t, bytes) in expected {
            assert_eq!(t.block_bytes(), bytes, "{t}");
        }
    }

    /// Q8_K has no gguf-py reference, so check one hand-made block:
    /// value = d * q.
    #[test]
    fn gguf_q8_k_by_hand() {
        let mut block = vec![0u8; 292];
        block[0..4].copy_from_slice(&0.5f32.to_le_bytes());
        for i in 0..256 {
            block[4 + i] = (i as i32 - 128) as i8 as u8;
        }
        let mut y = vec![0f32; 256];
        dequant_q8_k(&block, &mut y);
        for (i, y) in y.iter().enumerate() {
            assert_eq!(*y, (i as f32 - 128.0) * 0.5);
        }
    }

    /// The cursor refuses a count that the rest of the buffer cannot hold,
    /// before allocating anything.
    #[test]
    fn gguf_cursor_refuses_absurd_counts() {
        let mut buf = u64::MAX.to_le_bytes().to_vec();
        buf.extend_from_slice(&[0; 16]);
        let mut c = Cursor { buf: &buf, pos: 0 };
        assert!(c.array_len(1).is_err());
        let mut c = Cursor { buf: &buf, pos: 0 };
        assert!(c.string().is_err());
    }
}
