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

use std::borrow::Cow;
use std::collections::{BTreeMap, HashMap};
use std::fs::File;
use std::io::{BufWriter, Write};
use std::path::{Path, PathBuf};

use anyhow::{Context, Result, anyhow, bail};
use half::bf16;
use memmap2::Mmap;
use serde::{Deserialize, Serialize};

use crate::limits::{clip, plain, shorten};
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

/// Header as written: the same fields, borrowed.
#[derive(Serialize)]
struct HeaderOut<'a> {
    config: &'a Config,
    tokenizer: &'a Tokenizer,
    tensors: &'a [TensorEntry],
    metadata: &'a BTreeMap<String, String>,
}

/// An open model.bin: header parsed and validated, data memory-mapped.
pub struct Checkpoint {
    pub path: PathBuf,
    pub config: Config,
    pub tokenizer: Tokenizer,
    pub tensors: Vec<TensorEntry>,
    pub metadata: BTreeMap<String, String>,
    /// tensor name -> its index in `tensors`
    index: HashMap<String, usize>,
    map: Mmap,
    data_start: usize,
}

impl Checkpoint {
    /// Opens a model.bin and checks everything before the tensor data: the
    /// preamble, the header, the config's bounds, the tokenizer against the
    /// vocabulary, and the tensor directory against the config (every tensor
    /// one of its parameters, with the shape it gives, inside the file).
    pub fn open(path: &Path) -> Result<Checkpoint> {
        let p = path.display();
        let file = File::open(path).with_context(|| format!("{p}: cannot open"))?;
        // SAFETY: the map is read-only and lives as long as the Checkpoint; lift
        // never writes a checkpoint in place (it writes a temp file and renames),
        // so the mapped bytes do not change under us.
        let map = unsafe { Mmap::map(&file) }.with_context(|| format!("{p}: cannot map"))?;
        let (header, data_start) = parse(&map).map_err(|e| anyhow!("{p}: {e}"))?;
        let index = header.tensors.iter().enumerate().map(|(i, t)| (t.name.clone(), i)).collect();
        Ok(Checkpoint {
            path: path.to_path_buf(),
            config: header.config,
            tokenizer: header.tokenizer,
            tensors: header.tensors,
            metadata: header.metadata,
            index,
            map,
            data_start,
        })
    }

    pub fn find(&self, name: &str) -> Option<&TensorEntry> {
        self.index.get(name).and_then(|&i| self.tensors.get(i))
    }

    /// The values of one tensor, converted to f32.
    pub fn tensor_f32(&self, t: &TensorEntry) -> Result<Vec<f32>> {
        let range = usize::try_from(t.offset)
            .ok()
            .and_then(|o| o.checked_add(self.data_start))
            .and_then(|s| Some(s..s.checked_add(usize::try_from(t.nbytes).ok()?)?));
        let Some(bytes) = range.clone().and_then(|r| self.map.get(r)) else {
            bail!("{}: tensor {} lies outside the file", self.path.display(), plain(&t.name));
        };
        let values = match t.dtype {
            DType::F32 => bytes.chunks_exact(4).map(|b| f32::from_le_bytes([b[0], b[1], b[2], b[3]])).collect(),
            DType::Bf16 => bytes.chunks_exact(2).map(|b| bf16::from_le_bytes([b[0], b[1]]).to_f32()).collect(),
        };
        // The copy is made: drop the mapped pages from this process's resident
        // set, so that loading peaks at the copies plus one tensor's pages,
        // not at the copies plus the whole file.
        #[cfg(unix)]
        if let Some(r) = range {
            let page = 4096;
            let (start, end) = (r.start.div_ceil(page) * page, r.end / page * page);
            if end > start {
                // SAFETY: a read-only mapping of a file: dropped pages are read
                // back from the file if touched again, and no reference into
                // them outlives this function (`bytes` is not used below).
                let _ =
                    unsafe { self.map.unchecked_advise_range(memmap2::UncheckedAdvice::DontNeed, start, end - start) };
            }
        }
        Ok(values)
    }

    /// The dtype most tensors are stored in (what a re-save should use).
    pub fn dtype(&self) -> DType {
        let bf = self.tensors.iter().filter(|t| t.dtype == DType::Bf16).count();
        if bf * 2 > self.tensors.len() { DType::Bf16 } else { DType::F32 }
    }

    /// Every model parameter in f32 (their shapes were checked by `open`).
    /// A non-finite value is an error naming its tensor: a NaN weight would
    /// only make every output NaN, and training would spread it.
    pub fn load_weights(&self) -> Result<Weights> {
        let p = self.path.display();
        let w = Weights::try_from_fn(&self.config, |param| {
            let name = param.name();
            let t = self.find(&name).ok_or_else(|| anyhow!("tensor {name} is missing"))?;
            let values = self.tensor_f32(t)?;
            if let Some((i, v)) = values.iter().enumerate().find(|(_, v)| !v.is_finite()) {
                bail!("tensor {name} holds {v} at index {i} of {}: the weights must be finite", values.len());
            }
            Ok(values)
        });
        w.map_err(|e| anyhow!("{p}: {e}"))
    }
}

/// The header of a model.bin image and where its tensor data starts, checked.
/// Errors come without the file name, which `open` adds.
fn parse(map: &[u8]) -> Result<(Header, usize)> {
    let (Some(magic), Some(version), Some(hlen)) = (map.get(..8), le_u32(map, 8), le_u64(map, 16)) else {
        bail!("not a lift model.bin (only {} bytes)", map.len());
    };
    if magic != MAGIC {
        bail!("not a lift model.bin (bad magic); convert GGUF or Hugging Face models with `lift convert`");
    }
    if version != VERSION {
        bail!("model.bin version {version} is not supported (this lift reads version {VERSION})");
    }
    let json = usize::try_from(hlen).ok().and_then(|n| map.get(PREAMBLE..PREAMBLE.checked_add(n)?));
    let Some(json) = json else {
        bail!("header of {hlen} bytes runs past the end of the file ({} bytes; truncated?)", map.len());
    };
    let header: Header =
        serde_json::from_slice(json).map_err(|e| anyhow!("corrupt header: {}", shorten(&e.to_string())))?;
    let c = &header.config;
    c.validate()?;
    if header.tokenizer.vocab_size() > c.vocab_size {
        bail!(
            "the tokenizer has {} tokens but the model's vocabulary is {}",
            header.tokenizer.vocab_size(),
            c.vocab_size
        );
    }
    let data_start = (PREAMBLE + json.len()).next_multiple_of(ALIGN);
    check_directory(c, &header.tensors, data_start as u64, map.len() as u64)?;
    Ok((header, data_start))
}

/// How many tensors a model of this config has: the embedding, nine per
/// layer (two norms, seven linear weights), the final norm, and the LM head
/// unless it is tied. `Param::all` lists them.
pub fn param_count(c: &Config) -> Option<usize> {
    c.n_layers.checked_mul(9)?.checked_add(if c.tied_embeddings { 2 } else { 3 })
}

/// The tensor directory is exactly the config's parameters: each once, with
/// the shape the config gives it, stored in as many bytes as that shape
/// needs, inside the file. The count is compared first, so that the
/// parameter list is only built for as many tensors as the file lists.
fn check_directory(c: &Config, tensors: &[TensorEntry], data_start: u64, file_len: u64) -> Result<()> {
    let want = param_count(c).unwrap_or(usize::MAX);
    if tensors.len() != want {
        bail!(
            "the config ({} layers, {} LM head) has {want} tensors, but the file lists {}",
            c.n_layers,
            if c.tied_embeddings { "tied" } else { "separate" },
            tensors.len()
        );
    }
    let mut index: HashMap<&str, &TensorEntry> = HashMap::with_capacity(tensors.len());
    for t in tensors {
        if index.insert(&t.name, t).is_some() {
            bail!("tensor {} is listed twice", plain(&t.name));
        }
    }
    for param in Param::all(c) {
        let name = param.name();
        let t = index.get(name.as_str()).ok_or_else(|| anyhow!("tensor {name} is missing"))?;
        let shape = param.shape(c);
        if t.shape != shape {
            bail!("tensor {name} has shape {}, but the config says {shape:?}", clip(&format!("{:?}", t.shape)));
        }
        // The shape is the config's, whose bounds keep this product small.
        let nbytes = shape.iter().product::<usize>() as u64 * t.dtype.size() as u64;
        if t.nbytes != nbytes {
            bail!("tensor {name} has shape {shape:?} but {} bytes (expected {nbytes})", t.nbytes);
        }
        let end = data_start.checked_add(t.offset).and_then(|s| s.checked_add(t.nbytes));
        if end.is_none_or(|e| e > file_len) {
            bail!("tensor {name} runs past the end of the file ({file_len} bytes; truncated?)");
        }
    }
    Ok(())
}

fn le_u32(b: &[u8], at: usize) -> Option<u32> {
    Some(u32::from_le_bytes(b.get(at..at + 4)?.try_into().ok()?))
}

fn le_u64(b: &[u8], at: usize) -> Option<u64> {
    Some(u64::from_le_bytes(b.get(at..at + 8)?.try_into().ok()?))
}

/// Why writing a model.bin stopped: reading a tensor from its source failed
/// (that error names the input), or the output could not be written.
enum WriteError {
    Source(anyhow::Error),
    Output(anyhow::Error),
}

impl From<std::io::Error> for WriteError {
    fn from(e: std::io::Error) -> WriteError {
        WriteError::Output(e.into())
    }
}

/// Writes a model.bin with the given tensors, fetching each tensor's f32
/// values only when it is written, so a converter never holds more than one
/// tensor in memory (borrowed, where the caller holds it already: a trainer
/// writing its weights). The file appears atomically: it is written next to
/// `path` under a temporary name, flushed to disk and renamed at the end; on
/// any failure the temporary file is removed and `path` is left as it was.
/// An error from `fetch` is returned as it is (it is the input's); an error
/// writing names `path`.
pub fn write_model_bin<'s>(
    path: &Path,
    config: &Config,
    tokenizer: &Tokenizer,
    metadata: &BTreeMap<String, String>,
    dtype: DType,
    tensors: &[(String, Vec<usize>)],
    mut fetch: impl FnMut(&str) -> Result<Cow<'s, [f32]>>,
) -> Result<()> {
    let pd = path.display();
    let mut entries = Vec::with_capacity(tensors.len());
    let mut offset = 0u64;
    for (name, shape) in tensors {
        let nbytes = shape.iter().try_fold(dtype.size() as u64, |n, &d| n.checked_mul(d as u64));
        let end = nbytes.and_then(|n| offset.checked_add(n));
        let (Some(nbytes), Some(end)) = (nbytes, end) else {
            bail!("{pd}: tensor {name} of shape {shape:?} is too large to write");
        };
        entries.push(TensorEntry { name: name.clone(), dtype, shape: shape.clone(), offset, nbytes });
        offset = end.next_multiple_of(ALIGN as u64);
    }
    // Borrowed, not a cloned Header: SmolLM2's tokenizer is ~100K strings.
    let header = HeaderOut { config, tokenizer, tensors: &entries, metadata };
    let json_len = json_size(&header)?;
    remove_stale_temps(path);
    let tmp = tmp_path(path);
    let result = (|| -> Result<(), WriteError> {
        let file = File::create(&tmp).map_err(|e| {
            let what = format!("cannot create the temporary file {} beside it", tmp.display());
            WriteError::Output(anyhow::Error::new(e).context(what))
        })?;
        let mut out = BufWriter::with_capacity(1 << 20, file);
        out.write_all(MAGIC)?;
        out.write_all(&VERSION.to_le_bytes())?;
        out.write_all(&0u32.to_le_bytes())?;
        out.write_all(&(json_len as u64).to_le_bytes())?;
        serde_json::to_writer(&mut out, &header).map_err(std::io::Error::from)?;
        let mut pos = PREAMBLE + json_len;
        pad_to(&mut out, &mut pos)?;
        for t in &entries {
            let values = fetch(&t.name).map_err(WriteError::Source)?;
            if values.len() as u64 * dtype.size() as u64 != t.nbytes {
                let e = anyhow!(
                    "tensor {} has {} values, its shape {:?} needs more or fewer",
                    t.name,
                    values.len(),
                    t.shape
                );
                return Err(WriteError::Source(e));
            }
            pos += write_values(&mut out, &values, dtype)?;
            pad_to(&mut out, &mut pos)?;
        }
        out.into_inner().map_err(|e| e.into_error())?.sync_all()?;
        std::fs::rename(&tmp, path)?;
        sync_dir(path);
        Ok(())
    })();
    result.map_err(|e| {
        let _ = std::fs::remove_file(&tmp);
        match e {
            WriteError::Source(e) => e,
            WriteError::Output(e) => e.context(format!("{pd}: write failed")),
        }
    })
}

/// The bytes of a value's JSON, counted without keeping them.
fn json_size(value: &impl Serialize) -> Result<usize> {
    struct Count(usize);
    impl Write for Count {
        fn write(&mut self, b: &[u8]) -> std::io::Result<usize> {
            self.0 += b.len();
            Ok(b.len())
        }
        fn flush(&mut self) -> std::io::Result<()> {
            Ok(())
        }
    }
    let mut n = Count(0);
    serde_json::to_writer(&mut n, value)?;
    Ok(n.0)
}

/// Writes values little-endian in `dtype`, converted a block at a time (a
/// whole-tensor byte copy would be 108 MiB for SmolLM2's embedding); returns
/// the bytes written.
pub(crate) fn write_values(out: &mut impl Write, values: &[f32], dtype: DType) -> std::io::Result<usize> {
    let mut bytes = Vec::with_capacity(1 << 18);
    for block in values.chunks(1 << 16) {
        bytes.clear();
        match dtype {
            DType::F32 => bytes.extend(block.iter().flat_map(|v| v.to_le_bytes())),
            DType::Bf16 => bytes.extend(block.iter().flat_map(|&v| bf16::from_f32(v).to_bits().to_le_bytes())),
        }
        out.write_all(&bytes)?;
    }
    Ok(values.len() * dtype.size())
}

/// Writes `path` through a temporary file beside it (`tmp_path`), flushed
/// and renamed into place when `write` is done: a reader sees the old file
/// or the whole new one, never a part, and on an error (a full disk) the
/// temporary file is removed and `path` is left as it was.
pub fn write_atomic(path: &Path, write: impl FnOnce(&mut BufWriter<File>) -> std::io::Result<()>) -> Result<()> {
    let pd = path.display();
    remove_stale_temps(path);
    let tmp = tmp_path(path);
    let result = (|| -> Result<()> {
        let file = File::create(&tmp)
            .with_context(|| format!("cannot create the temporary file {} beside it", tmp.display()))?;
        let mut w = BufWriter::with_capacity(1 << 20, file);
        write(&mut w)?;
        w.into_inner().map_err(|e| e.into_error())?.sync_all()?;
        std::fs::rename(&tmp, path)?;
        sync_dir(path);
        Ok(())
    })();
    result.map_err(|e| {
        let _ = std::fs::remove_file(&tmp);
        e.context(format!("{pd}: cannot write"))
    })
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
    let mut next = params.iter();
    write_model_bin(path, config, tokenizer, metadata, dtype, &list, |name| {
        // Tensors are fetched in the order of the list.
        let p = next.next().filter(|p| p.name() == name).ok_or_else(|| anyhow!("tensor {name} out of order"))?;
        Ok(Cow::Borrowed(weights.get(*p)))
    })
}

/// `dir/.name.tmp-PID` beside the destination, so the rename stays on one filesystem.
pub fn tmp_path(path: &Path) -> PathBuf {
    let name = path.file_name().map(|n| n.to_string_lossy().into_owned()).unwrap_or_default();
    path.with_file_name(format!(".{name}.tmp-{}", std::process::id()))
}

/// Removes the temporary files (`tmp_path`) that a killed lift left beside
/// `path` (or, for a directory, beside any file in it), and only those whose
/// process is gone, so that a live writer's file is never touched. Whether a
/// process lives is read from /proc; without it nothing is removed.
pub fn remove_stale_temps(path: &Path) {
    if !Path::new("/proc/self").exists() {
        return;
    }
    let (dir, only) = if path.is_dir() { (path, None) } else { (parent_dir(path), path.file_name()) };
    let Ok(entries) = std::fs::read_dir(dir) else { return };
    for e in entries.flatten() {
        let name = e.file_name().to_string_lossy().into_owned();
        // ".NAME.tmp-PID"
        let Some((base, pid)) = name.strip_prefix('.').and_then(|n| n.rsplit_once(".tmp-")) else { continue };
        if only.is_some_and(|o| o.to_string_lossy() != base) {
            continue;
        }
        let Ok(pid) = pid.parse::<u32>() else { continue };
        if pid != std::process::id() && !Path::new(&format!("/proc/{pid}")).exists() {
            let _ = std::fs::remove_file(e.path());
        }
    }
}

/// The directory a file is in ("." for a bare name).
fn parent_dir(path: &Path) -> &Path {
    path.parent().filter(|d| !d.as_os_str().is_empty()).unwrap_or(Path::new("."))
}

/// Flushes a directory entry change (the rename) to disk, where the
/// platform allows; a failure here loses nothing that was not already safe.
fn sync_dir(path: &Path) {
    if let Ok(d) = File::open(parent_dir(path)) {
        let _ = d.sync_all();
    }
}

fn pad_to(out: &mut impl Write, pos: &mut usize) -> std::io::Result<()> {
    let target = pos.next_multiple_of(ALIGN);
    out.write_all(&vec![0u8; target - *pos])?;
    *pos = target;
    Ok(())
}
