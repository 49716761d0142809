//! safetensors, Hugging Face's checkpoint format: reading F32, F16 and BF16
//! tensors as f32, and writing F32 and BF16 tensors.
//!
//! ```text
//! header length N: u64 little-endian
//! header: N bytes of JSON, padded with spaces
//!   {"__metadata__": {"format": "pt"},
//!    "model.norm.weight": {"dtype": "BF16", "shape": [576], "data_offsets": [0, 1152]},
//!    ...}
//! data: the tensors, little-endian, row-major (the LAST dim varies fastest,
//!       the opposite of GGUF's dims order)
//! ```
//!
//! `data_offsets` are [begin, end) in bytes from the start of the data, which
//! is byte 8 + N of the file. The official writer packs the tensors back to
//! back, largest element size first, and pads the header to a multiple of 8,
//! so every tensor starts on a multiple of its element size.
//!
//! Every error is one line that starts with the file's path; offsets and
//! shapes are checked against the file before any tensor is read.

use std::collections::{BTreeMap, HashMap, HashSet};
use std::fmt;
use std::fs::File;
use std::io::Write;
use std::path::{Path, PathBuf};

use anyhow::{Result, anyhow, bail};
use half::{bf16, f16};
use memmap2::Mmap;
use rayon::prelude::*;
use serde::Deserialize;
use serde_json::{Map, Value, json};

use crate::formats::checkpoint::write_atomic;
use crate::limits::{clip, plain, shorten};

/// The official reader refuses headers over 100 MB; so do we, so that a
/// corrupt length cannot make us parse gigabytes of tensor data as JSON.
const MAX_HEADER_BYTES: u64 = 100_000_000;

/// The dtype of a tensor. Only F32, F16 and BF16 can be read as f32; other
/// dtypes (I64 position ids, F8 ...) are listed so that a checkpoint that
/// holds them still opens, and reading one gives a clear error.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Dtype {
    F32,
    F16,
    BF16,
    Other(String),
}

impl Dtype {
    fn parse(s: &str) -> Dtype {
        match s {
            "F32" => Dtype::F32,
            "F16" => Dtype::F16,
            "BF16" => Dtype::BF16,
            other => Dtype::Other(other.to_owned()),
        }
    }

    /// Bytes per value, where the format defines one of whole bytes.
    fn size(&self) -> Option<u64> {
        match self {
            Dtype::F32 => Some(4),
            Dtype::F16 | Dtype::BF16 => Some(2),
            Dtype::Other(s) => match s.as_str() {
                "BOOL" | "U8" | "I8" | "F8_E5M2" | "F8_E4M3" | "F8_E8M0" => Some(1),
                "U16" | "I16" => Some(2),
                "U32" | "I32" => Some(4),
                "U64" | "I64" | "F64" => Some(8),
                _ => None,
            },
        }
    }
}

impl fmt::Display for Dtype {
    fn fmt(&self, f: &mut fmt::Formatter) -> fmt::Result {
        match self {
            Dtype::F32 => f.write_str("F32"),
            Dtype::F16 => f.write_str("F16"),
            Dtype::BF16 => f.write_str("BF16"),
            Dtype::Other(s) => f.write_str(s),
        }
    }
}

/// One tensor of the header. `start..end` are absolute byte offsets in the
/// file (already checked to lie inside it).
#[derive(Clone, Debug, PartialEq)]
pub struct SafeTensor {
    pub name: String,
    /// Row-major: the last dim varies fastest.
    pub shape: Vec<usize>,
    pub dtype: Dtype,
    start: usize,
    end: usize,
}

impl SafeTensor {
    /// The number of values; saturates for a shape no file can hold (such
    /// a shape is only possible with a dtype of unknown size).
    pub fn n_elements(&self) -> usize {
        self.shape.iter().fold(1usize, |n, &d| n.saturating_mul(d))
    }
}

/// An open safetensors file: the parsed header and the memory-mapped data.
pub struct SafeTensors {
    path: PathBuf,
    mmap: Mmap,
    tensors: Vec<SafeTensor>,
    /// tensor name -> index into `tensors`
    index: HashMap<String, usize>,
    metadata: BTreeMap<String, String>,
}

/// A header entry as JSON has it; checked and turned into a `SafeTensor`.
#[derive(Deserialize)]
struct Entry {
    dtype: String,
    shape: Vec<u64>,
    data_offsets: (u64, u64),
}

impl SafeTensors {
    /// Opens and memory-maps `path`, parses the JSON header and checks every
    /// tensor's offsets against its shape and the file length.
    pub fn open(path: &Path) -> Result<SafeTensors> {
        let name = path.display();
        let file = File::open(path).map_err(|e| anyhow!("{name}: cannot open: {e}"))?;
        // SAFETY: the map is read-only and lives as long as `self`. Mapping is
        // undefined behaviour only if another process changes the file while
        // we hold it; like every mmap-based checkpoint loader we accept that a
        // checkpoint is not edited while it is being read.
        let mmap = unsafe { Mmap::map(&file) }.map_err(|e| anyhow!("{name}: cannot map: {e}"))?;
        let (tensors, metadata) = parse_header(&mmap).map_err(|e| anyhow!("{name}: {e}"))?;
        let index = tensors.iter().enumerate().map(|(i, t)| (t.name.clone(), i)).collect();
        Ok(SafeTensors { path: path.to_owned(), mmap, tensors, index, metadata })
    }

    pub fn path(&self) -> &Path {
        &self.path
    }

    /// All tensors, in the order of their data in the file.
    pub fn tensors(&self) -> &[SafeTensor] {
        &self.tensors
    }

    pub fn find(&self, name: &str) -> Option<&SafeTensor> {
        self.index.get(name).and_then(|&i| self.tensors.get(i))
    }

    /// The `__metadata__` map (empty when the file has none).
    pub fn metadata(&self) -> &BTreeMap<String, String> {
        &self.metadata
    }

    /// The values of tensor `name` as f32, row-major.
    pub fn tensor_f32(&self, name: &str) -> Result<Vec<f32>> {
        let path = self.path.display();
        let t = self.find(name).ok_or_else(|| anyhow!("{path}: tensor {} is missing", plain(name)))?;
        let bytes = self
            .mmap
            .get(t.start..t.end)
            .ok_or_else(|| anyhow!("{path}: tensor {} lies outside the file", plain(name)))?;
        let convert: fn(&[u8], &mut [f32]) = match t.dtype {
            Dtype::F32 => |x, y| {
                for (b, y) in x.chunks_exact(4).zip(y) {
                    *y = f32::from_le_bytes([b[0], b[1], b[2], b[3]]);
                }
            },
            Dtype::F16 => |x, y| {
                for (b, y) in x.chunks_exact(2).zip(y) {
                    *y = f16::from_le_bytes([b[0], b[1]]).to_f32();
                }
            },
            Dtype::BF16 => |x, y| {
                for (b, y) in x.chunks_exact(2).zip(y) {
                    *y = bf16::from_le_bytes([b[0], b[1]]).to_f32();
                }
            },
            Dtype::Other(ref d) => {
                bail!(
                    "{path}: tensor {} has dtype {}, which lift cannot read (supported: F32, F16, BF16)",
                    plain(name),
                    plain(d)
                )
            }
        };
        // The sizes were checked at open, so bytes holds exactly n values.
        let n = t.n_elements();
        let size = bytes.len() / n.max(1);
        let mut out = vec![0f32; n];
        // Big tensors (the embedding is tens of millions of values) are
        // converted in parallel chunks; the conversion is per value.
        const CHUNK: usize = 1 << 16;
        out.par_chunks_mut(CHUNK).zip(bytes.par_chunks(CHUNK * size.max(1))).for_each(|(y, x)| convert(x, y));
        Ok(out)
    }
}

/// Parses and checks the header; errors come without the file name, which
/// `open` adds.
fn parse_header(buf: &[u8]) -> Result<(Vec<SafeTensor>, BTreeMap<String, String>), String> {
    let file_len = buf.len() as u64;
    if file_len < 8 {
        return Err(format!("not a safetensors file (only {file_len} bytes, no header length)"));
    }
    let mut len = [0u8; 8];
    len.copy_from_slice(&buf[..8]);
    let n = u64::from_le_bytes(len);
    if n > MAX_HEADER_BYTES || n > file_len - 8 {
        return Err(format!(
            "header length {n} does not fit in a file of {file_len} bytes (not a safetensors file, or truncated?)"
        ));
    }
    let data_start = 8 + n;
    let header = std::str::from_utf8(&buf[8..data_start as usize])
        .map_err(|_| "header is not UTF-8 (not a safetensors file?)".to_string())?;
    let header: Map<String, Value> = serde_json::from_str(header)
        .map_err(|e| format!("header is not a JSON object: {}", shorten(&e.to_string())))?;

    let mut metadata = BTreeMap::new();
    let mut tensors = Vec::new();
    for (name, value) in header {
        let q = plain(&name);
        if name == "__metadata__" {
            // The format allows only string values here.
            metadata = serde_json::from_value(value)
                .map_err(|e| format!("__metadata__ is not a map of strings to strings: {}", shorten(&e.to_string())))?;
            continue;
        }
        let entry: Entry = serde_json::from_value(value)
            .map_err(|e| format!("tensor {q}: bad header entry: {}", shorten(&e.to_string())))?;
        let dtype = Dtype::parse(&entry.dtype);
        let (begin, end) = entry.data_offsets;
        if begin > end || end > file_len - data_start {
            return Err(format!(
                "tensor {q} has data_offsets [{begin}, {end}], but the data section is {} bytes (truncated?)",
                file_len - data_start
            ));
        }
        let n = entry.shape.iter().try_fold(1u64, |n, &d| n.checked_mul(d));
        // Dtypes of sub-byte or unknown size are only range-checked.
        if let Some(size) = dtype.size() {
            let bytes = n.and_then(|n| n.checked_mul(size));
            if bytes != Some(end - begin) {
                return Err(format!(
                    "tensor {q} has shape {} of {}, but data_offsets [{begin}, {end}] hold {} bytes",
                    clip(&format!("{:?}", entry.shape)),
                    plain(&dtype.to_string()),
                    end - begin
                ));
            }
        }
        // begin <= end <= file length, so these fit in usize.
        tensors.push(SafeTensor {
            name,
            shape: entry.shape.iter().map(|&d| d as usize).collect(),
            dtype,
            start: (data_start + begin) as usize,
            end: (data_start + end) as usize,
        });
    }
    tensors.sort_by_key(|t| t.start);
    Ok((tensors, metadata))
}

/// Tensor data for `write_safetensors`.
#[derive(Clone, Copy, Debug)]
pub enum TensorData<'a> {
    F32(&'a [f32]),
    BF16(&'a [bf16]),
}

impl TensorData<'_> {
    fn len(&self) -> usize {
        match self {
            TensorData::F32(v) => v.len(),
            TensorData::BF16(v) => v.len(),
        }
    }

    fn elem_bytes(&self) -> usize {
        match self {
            TensorData::F32(_) => 4,
            TensorData::BF16(_) => 2,
        }
    }

    fn dtype(&self) -> &'static str {
        match self {
            TensorData::F32(_) => "F32",
            TensorData::BF16(_) => "BF16",
        }
    }
}

/// Writes a safetensors file that the official library loads. `tensors` are
/// (name, row-major shape, data). As the official writer does, the tensors
/// are packed back to back (its loader refuses gaps), larger element size
/// first, after a header padded with spaces to a multiple of 8, so each
/// tensor starts on a multiple of its element size.
pub fn write_safetensors(
    path: &Path,
    tensors: &[(&str, &[usize], TensorData)],
    metadata: Option<&BTreeMap<String, String>>,
) -> Result<()> {
    let name = path.display();
    let mut seen = HashSet::new();
    for (tname, shape, data) in tensors {
        if *tname == "__metadata__" || !seen.insert(*tname) {
            bail!("{name}: tensor name {tname} is used twice or reserved");
        }
        let n = shape.iter().try_fold(1usize, |n, &d| n.checked_mul(d));
        if n != Some(data.len()) {
            bail!("{name}: tensor {tname} has {} values, which does not match its shape {shape:?}", data.len());
        }
    }
    // A stable sort keeps the caller's order within each dtype.
    let mut order: Vec<&(&str, &[usize], TensorData)> = tensors.iter().collect();
    order.sort_by_key(|(_, _, data)| std::cmp::Reverse(data.elem_bytes()));

    let mut header = Map::new();
    if let Some(m) = metadata {
        header.insert("__metadata__".into(), json!(m));
    }
    let mut offset = 0usize;
    for (tname, shape, data) in &order {
        let end = offset + data.len() * data.elem_bytes();
        header.insert(tname.to_string(), json!({"dtype": data.dtype(), "shape": shape, "data_offsets": [offset, end]}));
        offset = end;
    }
    let mut header = serde_json::to_vec(&header).map_err(|e| anyhow!("{name}: cannot encode header: {e}"))?;
    header.resize(header.len().div_ceil(8) * 8, b' ');

    write_atomic(path, |w| {
        w.write_all(&(header.len() as u64).to_le_bytes())?;
        w.write_all(&header)?;
        // Convert in chunks so a big tensor never needs a second full-size copy.
        let mut buf = Vec::new();
        for (_, _, data) in &order {
            match data {
                TensorData::F32(v) => {
                    for chunk in v.chunks(1 << 16) {
                        buf.clear();
                        buf.extend(chunk.iter().flat_map(|x| x.to_le_bytes()));
                        w.write_all(&buf)?;
                    }
                }
                TensorData::BF16(v) => {
                    for chunk in v.chunks(1 << 16) {
                        buf.clear();
                        buf.extend(chunk.iter().flat_map(|x| x.to_le_bytes()));
                        w.write_all(&buf)?;
                    }
                }
            }
        }
        Ok(())
    })
}
