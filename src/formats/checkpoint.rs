//! `model.bin`, lift's own checkpoint format: one file holding the model
//! config, the tokenizer and every tensor, laid out so it can be mapped into
//! memory and read without parsing the tensor data.
//!
//! ```text
//! offset  size  field
//! 0       8     magic "LIFTMODL"
//! 8       4     version (u32 little-endian), currently 1
//! 12      4     reserved, 0
//! 16      8     header length H in bytes (u64 little-endian)
//! 24      H     header: UTF-8 JSON {"config": ..., "tokenizer": ...,
//!               "tensors": [{"name", "dtype", "shape", "offset", "nbytes"}, ...],
//!               "metadata": {...}}
//! ...           zero padding up to a multiple of 64
//! D             tensor data; each tensor starts at D + offset, offsets are
//!               multiples of 64, values little-endian f32 or bf16, row-major
//! ```
//! Tensor names are the Hugging Face names (`model.layers.0.self_attn.q_proj.weight`).

use std::collections::BTreeMap;
use std::fs::File;
use std::io::{BufWriter, Write};
use std::path::{Path, PathBuf};

use anyhow::{Context, Result, anyhow, bail};
use half::bf16;
use memmap2::Mmap;
use serde::{Deserialize, Serialize};

use crate::model::{Config, Param, Weights};
use crate::tokenizer::Tokenizer;

pub const MAGIC: &[u8; 8] = b"LIFTMODL";
pub const VERSION: u32 = 1;
const ALIGN: usize = 64;
const PREAMBLE: usize = 24;

/// How tensor values are stored in the file. In memory they are always f32.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum DType {
    F32,
    Bf16,
}

impl DType {
    pub fn size(self) -> usize {
        match self {
            DType::F32 => 4,
            DType::Bf16 => 2,
        }
    }

    pub fn parse(s: &str) -> Result<DType> {
        match s {
            "f32" => Ok(DType::F32),
            "bf16" => Ok(DType::Bf16),
            _ => bail!("unknown dtype {s:?} (expected f32 or bf16)"),
        }
    }
}

#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct TensorEntry {
    pub name: String,
    pub dtype: DType,
    pub shape: Vec<usize>,
    /// Byte offset from the start of the data section.
    pub offset: u64,
    pub nbytes: u64,
}

#[derive(Serialize, Deserialize)]
struct Header {
    config: Config,
    tokenizer: Tokenizer,
    tensors: Vec<TensorEntry>,
    #[serde(default)]
    metadata: BTreeMap<String, String>,
}

/// An open model.bin: header parsed and validated, data memory-mapped.
pub struct Checkpoint {
    pub path: PathBuf,
    pub config: Config,
    pub tokenizer: Tokenizer,
    pub tensors: Vec<TensorEntry>,
    pub metadata: BTreeMap<String, String>,
    map: Mmap,
    data_start: usize,
}

impl Checkpoint {
    pub fn open(path: &Path) -> Result<Checkpoint> {
        let p = path.display();
        let file = File::open(path).with_context(|| format!("{p}: cannot open"))?;
        // SAFETY: the map is read-only and lives as long as the Checkpoint; lift
        // never writes a checkpoint in place (it writes a temp file and renames),
        // so the mapped bytes do not change under us.
        let map = unsafe { Mmap::map(&file) }.with_context(|| format!("{p}: cannot map"))?;
        if map.len() < PREAMBLE {
            bail!("{p}: not a lift model.bin (only {} bytes)", map.len());
        }
        if &map[..8] != MAGIC {
            bail!("{p}: not a lift model.bin (bad magic); convert GGUF or Hugging Face models with `lift convert`");
        }
        let version = u32::from_le_bytes(map[8..12].try_into().unwrap());
        if version != VERSION {
            bail!("{p}: model.bin version {version} is not supported (this lift reads version {VERSION})");
        }
        let hlen = u64::from_le_bytes(map[16..24].try_into().unwrap());
        let hend = (PREAMBLE as u64).checked_add(hlen).filter(|&e| e <= map.len() as u64);
        let Some(hend) = hend else {
            bail!("{p}: header of {hlen} bytes runs past the end of the file ({} bytes; truncated?)", map.len());
        };
        let header: Header =
            serde_json::from_slice(&map[PREAMBLE..hend as usize]).map_err(|e| anyhow!("{p}: corrupt header: {e}"))?;
        header.config.validate().with_context(|| format!("{p}"))?;
        if header.tokenizer.vocab_size() > header.config.vocab_size {
            bail!(
                "{p}: the tokenizer has {} tokens but the model's vocabulary is {}",
                header.tokenizer.vocab_size(),
                header.config.vocab_size
            );
        }
        let data_start = (hend as usize).next_multiple_of(ALIGN);
        for t in &header.tensors {
            let numel: usize = t.shape.iter().product();
            if t.nbytes != (numel * t.dtype.size()) as u64 {
                bail!("{p}: tensor {} has shape {:?} but {} bytes", t.name, t.shape, t.nbytes);
            }
            let end = (data_start as u64).checked_add(t.offset).and_then(|s| s.checked_add(t.nbytes));
            if end.is_none_or(|e| e > map.len() as u64) {
                bail!("{p}: tensor {} runs past the end of the file ({} bytes; truncated?)", t.name, map.len());
            }
        }
        Ok(Checkpoint {
            path: path.to_path_buf(),
            config: header.config,
            tokenizer: header.tokenizer,
            tensors: header.tensors,
            metadata: header.metadata,
            map,
            data_start,
        })
    }

    pub fn find(&self, name: &str) -> Option<&TensorEntry> {
        self.tensors.iter().find(|t| t.name == name)
    }

    /// The values of one tensor, converted to f32.
    pub fn tensor_f32(&self, t: &TensorEntry) -> Vec<f32> {
        let start = self.data_start + t.offset as usize;
        let bytes = &self.map[start..start + t.nbytes as usize];
        match t.dtype {
            DType::F32 => bytes.chunks_exact(4).map(|b| f32::from_le_bytes(b.try_into().unwrap())).collect(),
            DType::Bf16 => {
                bytes.chunks_exact(2).map(|b| bf16::from_bits(u16::from_le_bytes([b[0], b[1]])).to_f32()).collect()
            }
        }
    }

    /// The dtype most tensors are stored in (what a re-save should use).
    pub fn dtype(&self) -> DType {
        let bf = self.tensors.iter().filter(|t| t.dtype == DType::Bf16).count();
        if bf * 2 > self.tensors.len() { DType::Bf16 } else { DType::F32 }
    }

    /// Every model parameter in f32, each checked against the config's shape.
    pub fn load_weights(&self) -> Result<Weights> {
        let c = &self.config;
        let p = self.path.display();
        let mut w = Weights::zeros(c);
        for param in Param::all(c) {
            let name = param.name();
            let t = self.find(&name).ok_or_else(|| anyhow!("{p}: tensor {name} is missing"))?;
            let want = param.shape(c);
            if t.shape != want {
                bail!("{p}: tensor {name} has shape {:?}, the config says {want:?}", t.shape);
            }
            w.get_mut(param).copy_from_slice(&self.tensor_f32(t));
        }
        Ok(w)
    }
}

/// Writes a model.bin with the given tensors, fetching each tensor's f32
/// values only when it is written, so a converter never holds more than one
/// tensor in memory. The file appears atomically: it is written next to
/// `path` under a temporary name and renamed at the end.
pub fn write_model_bin(
    path: &Path,
    config: &Config,
    tokenizer: &Tokenizer,
    metadata: &BTreeMap<String, String>,
    dtype: DType,
    tensors: &[(String, Vec<usize>)],
    mut fetch: impl FnMut(&str) -> Result<Vec<f32>>,
) -> Result<()> {
    let mut entries = Vec::with_capacity(tensors.len());
    let mut offset = 0u64;
    for (name, shape) in tensors {
        let nbytes = (shape.iter().product::<usize>() * dtype.size()) as u64;
        entries.push(TensorEntry { name: name.clone(), dtype, shape: shape.clone(), offset, nbytes });
        offset = (offset + nbytes).next_multiple_of(ALIGN as u64);
    }
    let header =
        Header { config: config.clone(), tokenizer: tokenizer.clone(), tensors: entries, metadata: metadata.clone() };
    let json = serde_json::to_vec(&header)?;
    let tmp = tmp_path(path);
    let result = (|| -> Result<()> {
        let file = File::create(&tmp).with_context(|| format!("{}: cannot create", tmp.display()))?;
        let mut out = BufWriter::with_capacity(1 << 20, file);
        out.write_all(MAGIC)?;
        out.write_all(&VERSION.to_le_bytes())?;
        out.write_all(&0u32.to_le_bytes())?;
        out.write_all(&(json.len() as u64).to_le_bytes())?;
        out.write_all(&json)?;
        let mut pos = PREAMBLE + json.len();
        pad_to(&mut out, &mut pos)?;
        for t in &header.tensors {
            let values = fetch(&t.name)?;
            if values.len() * dtype.size() != t.nbytes as usize {
                bail!(
                    "tensor {} has {} values, its shape {:?} needs {}",
                    t.name,
                    values.len(),
                    t.shape,
                    t.nbytes as usize / dtype.size()
                );
            }
            let bytes: Vec<u8> = match dtype {
                DType::F32 => values.iter().flat_map(|v| v.to_le_bytes()).collect(),
                DType::Bf16 => values.iter().flat_map(|&v| bf16::from_f32(v).to_bits().to_le_bytes()).collect(),
            };
            out.write_all(&bytes)?;
            pos += bytes.len();
            pad_to(&mut out, &mut pos)?;
        }
        out.into_inner().map_err(|e| e.into_error())?.sync_all()?;
        Ok(())
    })();
    match result {
        Ok(()) => std::fs::rename(&tmp, path).with_context(|| format!("{}: cannot write", path.display())),
        Err(e) => {
            let _ = std::fs::remove_file(&tmp);
            Err(e.context(format!("{}: write failed", path.display())))
        }
    }
}

/// Saves a model's weights (e.g. after fine-tuning) as a model.bin.
pub fn save_weights(
    path: &Path,
    config: &Config,
    tokenizer: &Tokenizer,
    weights: &Weights,
    dtype: DType,
    metadata: &BTreeMap<String, String>,
) -> Result<()> {
    let params = Param::all(config);
    let list: Vec<(String, Vec<usize>)> = params.iter().map(|p| (p.name(), p.shape(config))).collect();
    write_model_bin(path, config, tokenizer, metadata, dtype, &list, |name| {
        let p = params.iter().find(|p| p.name() == name).expect("name from the same list");
        Ok(weights.get(*p).to_vec())
    })
}

/// `dir/.name.tmp-PID` beside the destination, so the rename stays on one filesystem.
pub fn tmp_path(path: &Path) -> PathBuf {
    let name = path.file_name().map(|n| n.to_string_lossy().into_owned()).unwrap_or_default();
    path.with_file_name(format!(".{name}.tmp-{}", std::process::id()))
}

fn pad_to(out: &mut impl Write, pos: &mut usize) -> Result<()> {
    let target = pos.next_multiple_of(ALIGN);
    out.write_all(&vec![0u8; target - *pos])?;
    *pos = target;
    Ok(())
}
