//! Importing models: a GGUF file (llama.cpp) or a Hugging Face directory
//! (config.json + safetensors + tokenizer.json) becomes a model.bin.
//!
//! Both importers produce the same three things: a `Config`, a `Tokenizer`,
//! and their `Tensors`, each looked up by its Hugging Face name and read as
//! a row-major f32 (out, in) matrix. `convert` checks every tensor's
//! presence, shape and type against the config before the output is
//! created, then streams the tensors into it one at a time.

use std::collections::BTreeMap;
use std::path::Path;

use anyhow::{Context, Result, anyhow, bail};
use serde_json::Value;

use crate::formats::checkpoint::{DType, param_count, write_model_bin};
use crate::formats::gguf::{GgufFile, GgufTensor, SUPPORTED_TYPES};
use crate::formats::safetensors::{Dtype, SafeTensor, SafeTensors};
use crate::limits::{clip, plain, quote, shorten};
use crate::model::{Config, Param, RopeScaling};
use crate::tokenizer::Tokenizer;

/// What `lift convert` reports.
pub struct ConvertReport {
    pub config: Config,
    pub n_tensors: usize,
    pub n_params: usize,
    pub source: String,
}

/// A model being imported: its shape, its tokenizer and its tensors.
struct Source {
    kind: &'static str,
    config: Config,
    tokenizer: Tokenizer,
    tensors: Box<dyn Tensors>,
}

/// The tensors of a model being imported, by Hugging Face name.
trait Tensors {
    /// How many tensors the input holds (of any name).
    fn count(&self) -> usize;
    /// Checks that tensor `name` is there, has the (row-major) shape `want`
    /// and a type lift reads; the error names the input file and the
    /// tensor under the input's own name.
    fn check(&self, name: &str, want: &[usize]) -> Result<()>;
    /// The tensor's values as f32, row-major (out, in) for a matrix.
    fn read(&self, name: &str) -> Result<Vec<f32>>;
    /// The tensor's name in the input (a GGUF's are llama.cpp's).
    fn label(&self, name: &str) -> String {
        name.to_string()
    }
}

/// Converts a GGUF file or a Hugging Face directory at `input` into a
/// model.bin at `output`. Everything about the input is checked before the
/// output is created: the config, the tokenizer against the vocabulary, and
/// every tensor's presence, shape and type, so that a bad input names the
/// input and leaves no output behind.
pub fn convert(input: &Path, output: &Path, dtype: DType) -> Result<ConvertReport> {
    let src = open_source(input)?;
    let c = src.config.clone();
    let ip = input.display();
    if src.tokenizer.vocab_size() > c.vocab_size {
        bail!(
            "{ip}: the tokenizer has {} tokens but the model's vocabulary is {}",
            src.tokenizer.vocab_size(),
            c.vocab_size
        );
    }
    // The parameter list is only built once the input is seen to hold as
    // many tensors (a corrupt layer count must not size it).
    let want = param_count(&c).unwrap_or(usize::MAX);
    if want > src.tensors.count() {
        bail!(
            "{ip}: the config ({} layers) has {want} tensors, but the input holds only {}",
            c.n_layers,
            src.tensors.count()
        );
    }
    let params = Param::all(&c);
    let list: Vec<(String, Vec<usize>)> = params.iter().map(|p| (p.name(), p.shape(&c))).collect();
    for (name, shape) in &list {
        src.tensors.check(name, shape)?;
    }
    let mut n_params = 0;
    let mut metadata = BTreeMap::new();
    metadata.insert("source".to_string(), input.display().to_string());
    metadata.insert("source_format".to_string(), src.kind.to_string());
    write_model_bin(output, &c, &src.tokenizer, &metadata, dtype, &list, |name| {
        let values = src.tensors.read(name)?;
        // A NaN or an infinity (a corrupt scale of a quantized block) would
        // make a model.bin that every other command refuses.
        if let Some((i, v)) = values.iter().enumerate().find(|(_, v)| !v.is_finite()) {
            let label = src.tensors.label(name);
            bail!("{ip}: tensor {label} holds {v} at index {i} of {}: the weights must be finite", values.len());
        }
        n_params += values.len();
        Ok(values.into())
    })?;
    Ok(ConvertReport { config: c, n_tensors: list.len(), n_params, source: src.kind.to_string() })
}

fn open_source(input: &Path) -> Result<Source> {
    let p = input.display();
    if !input.exists() {
        bail!("{p}: no such file or directory");
    }
    if input.is_dir() {
        return open_hf_dir(input);
    }
    let mut magic = [0u8; 4];
    {
        use std::io::Read;
        let mut f = std::fs::File::open(input).with_context(|| format!("{p}: cannot open"))?;
        let n = f.read(&mut magic).with_context(|| format!("{p}: cannot read"))?;
        if n < 4 {
            bail!("{p}: not a GGUF file or a Hugging Face model directory (file too short)");
        }
    }
    if &magic == b"GGUF" {
        return open_gguf(input);
    }
    if input.extension().is_some_and(|e| e == "safetensors") {
        bail!(
            "{p}: give the Hugging Face model directory (with config.json and tokenizer.json), not the .safetensors file"
        );
    }
    bail!("{p}: not a GGUF file or a Hugging Face model directory")
}

// ----------------------------------------------------------------------------
// GGUF

fn open_gguf(path: &Path) -> Result<Source> {
    let g = GgufFile::open(path)?;
    let p = path.display().to_string();
    let mut config = gguf_config(&g, &p)?;
    config.validate().with_context(|| p.clone())?;
    if let Some(t) = g.find("rope_freqs.weight")
        && g.get_f32("lift.rope.llama3.factor").is_none()
    {
        // llama.cpp stores Llama-3.1/3.2 scaling as per-frequency divisors.
        if t.n_elements() != (config.head_dim / 2) as u64 {
            bail!(
                "{p}: rope_freqs.weight has {} values, head_dim {} needs {}",
                t.n_elements(),
                config.head_dim,
                config.head_dim / 2
            );
        }
        let factors = g.tensor_f32(t)?;
        config.rope_scaling = Some(fit_llama3_scaling(&config, &factors).with_context(|| p.clone())?);
        config.validate().with_context(|| p.clone())?;
    }
    let tokenizer = gguf_tokenizer(&g, &p)?;
    let tensors = GgufTensors { g, p, cfg: config.clone() };
    Ok(Source { kind: "gguf", config, tokenizer, tensors: Box::new(tensors) })
}

/// The model's shape from a GGUF's `llama.*` keys (RoPE scaling only from
/// lift's own keys; `rope_freqs` is fitted by the caller). The getters'
/// errors name the file `p` already; so do the ones here.
fn gguf_config(g: &GgufFile, p: &str) -> Result<Config> {
    let arch = g.require_str("general.architecture")?.to_string();
    if arch != "llama" {
        bail!("{p}: architecture {} is not supported (lift reads Llama-family models)", quote(&arch));
    }
    let key = |k: &str| format!("{arch}.{k}");
    let size = |k: &str| -> Result<usize> { Ok(usize::try_from(g.require_u64(&key(k))?).unwrap_or(usize::MAX)) };
    let opt = |k: &str| g.get_u64(&key(k)).map(|v| usize::try_from(v).unwrap_or(usize::MAX));
    let dim = size("embedding_length")?;
    let n_heads = size("attention.head_count")?;
    let vocab_size = match opt("vocab_size") {
        Some(v) => v,
        None => g.require_str_array("tokenizer.ggml.tokens")?.len(),
    };
    let mut config = Config {
        vocab_size,
        dim,
        n_layers: size("block_count")?,
        n_heads,
        n_kv_heads: opt("attention.head_count_kv").unwrap_or(n_heads),
        head_dim: opt("attention.key_length").or_else(|| opt("rope.dimension_count")).unwrap_or(dim / n_heads.max(1)),
        ffn_dim: size("feed_forward_length")?,
        norm_eps: g.require_f32(&key("attention.layer_norm_rms_epsilon"))?,
        rope_theta: g.get_f32(&key("rope.freq_base")).unwrap_or(10000.0),
        rope_scaling: None,
        tied_embeddings: g.find("output.weight").is_none(),
        max_seq_len: opt("context_length").unwrap_or(2048),
    };
    if let Some(kind) = g.get_str(&key("rope.scaling.type"))
        && kind != "none"
    {
        bail!("{p}: RoPE scaling {} is not supported (lift supports Llama-3 \"llama3\" scaling)", quote(kind));
    }
    if let Some(factor) = g.get_f32("lift.rope.llama3.factor") {
        // Written by `lift export`: the exact parameters.
        let orig = g.require_u64("lift.rope.llama3.original_max_position_embeddings")?;
        config.rope_scaling = Some(RopeScaling {
            factor,
            low_freq_factor: g.require_f32("lift.rope.llama3.low_freq_factor")?,
            high_freq_factor: g.require_f32("lift.rope.llama3.high_freq_factor")?,
            original_max_position_embeddings: usize::try_from(orig).unwrap_or(usize::MAX),
        });
    }
    Ok(config)
}

/// The tokenizer from a GGUF's `tokenizer.ggml.*` keys (`p` names the file).
fn gguf_tokenizer(g: &GgufFile, p: &str) -> Result<Tokenizer> {
    let tokens: Vec<String> = g.require_str_array("tokenizer.ggml.tokens")?.into_iter().map(String::from).collect();
    let model = g.require_str("tokenizer.ggml.model")?.to_string();
    let pre = g.get_str("tokenizer.ggml.pre").unwrap_or("default").to_string();
    let token_types = g.get_i32_array("tokenizer.ggml.token_type").unwrap_or_default();
    let merges: Vec<String> =
        g.get_str_array("tokenizer.ggml.merges").unwrap_or_default().into_iter().map(String::from).collect();
    let scores = g.get_f32_array("tokenizer.ggml.scores").unwrap_or_default();
    let id = |key: &str| -> Result<Option<u32>> {
        match g.get_u64(key) {
            None => Ok(None),
            Some(v) => u32::try_from(v).map(Some).map_err(|_| anyhow!("{p}: {key} is {v}, not a token id")),
        }
    };
    let (bos, eos) = (id("tokenizer.ggml.bos_token_id")?, id("tokenizer.ggml.eos_token_id")?);
    let add_bos = g.get_bool("tokenizer.ggml.add_bos_token").unwrap_or(model == "llama");
    Tokenizer::from_gguf_vocab(&model, &pre, tokens, token_types, merges, scores, bos, eos, add_bos)
        .with_context(|| format!("{p}: tokenizer"))
}

/// A GGUF's tensors under their Hugging Face names.
struct GgufTensors {
    g: GgufFile,
    p: String,
    cfg: Config,
}

impl GgufTensors {
    fn find(&self, name: &str) -> Result<(String, &GgufTensor)> {
        let p = &self.p;
        let gname = gguf_name(name, self.cfg.tied_embeddings).ok_or_else(|| anyhow!("{p}: no GGUF name for {name}"))?;
        let t = self.g.find(&gname).ok_or_else(|| anyhow!("{p}: tensor {gname} is missing"))?;
        Ok((gname, t))
    }
}

impl Tensors for GgufTensors {
    fn count(&self) -> usize {
        self.g.tensors().len()
    }

    fn label(&self, name: &str) -> String {
        gguf_name(name, self.cfg.tied_embeddings).unwrap_or_else(|| name.to_string())
    }

    fn check(&self, name: &str, want: &[usize]) -> Result<()> {
        let (gname, t) = self.find(name)?;
        // ggml lists dimensions fastest first; PyTorch's (out, in) is the reverse.
        let shape: Vec<u64> = t.dims.iter().rev().copied().collect();
        if !shape.iter().map(|&d| d as usize).eq(want.iter().copied()) {
            bail!("{}: tensor {gname} has shape {shape:?}, but the config says {want:?}", self.p);
        }
        if !t.dtype.is_supported() {
            let supported: Vec<String> = SUPPORTED_TYPES.iter().map(|t| t.to_string()).collect();
            bail!(
                "{}: tensor {gname} has type {}, which lift cannot read (supported: {})",
                self.p,
                t.dtype,
                supported.join(", ")
            );
        }
        Ok(())
    }

    fn read(&self, name: &str) -> Result<Vec<f32>> {
        let (gname, t) = self.find(name)?;
        let mut values = self.g.tensor_f32(t)?;
        let (q, k) = (gname.ends_with("attn_q.weight"), gname.ends_with("attn_k.weight"));
        if q || k {
            let heads = if q { self.cfg.n_heads } else { self.cfg.n_kv_heads };
            let (rows, cols) = (heads * self.cfg.head_dim, self.cfg.dim);
            if values.len() != rows * cols {
                bail!("{}: tensor {gname} has {} values, expected ({rows}, {cols})", self.p, values.len());
            }
            values = unpermute_rope_rows(&values, heads, self.cfg.head_dim, cols);
        }
        Ok(values)
    }
}

/// The llama.cpp name of a Hugging Face tensor name.
pub fn gguf_name(hf: &str, tied: bool) -> Option<String> {
    let fixed = match hf {
        "model.embed_tokens.weight" => Some("token_embd.weight"),
        "model.norm.weight" => Some("output_norm.weight"),
        "lm_head.weight" if !tied => Some("output.weight"),
        _ => None,
    };
    if let Some(f) = fixed {
        return Some(f.to_string());
    }
    let rest = hf.strip_prefix("model.layers.")?;
    let (l, part) = rest.split_once('.')?;
    let g = match part {
        "input_layernorm.weight" => "attn_norm",
        "self_attn.q_proj.weight" => "attn_q",
        "self_attn.k_proj.weight" => "attn_k",
        "self_attn.v_proj.weight" => "attn_v",
        "self_attn.o_proj.weight" => "attn_output",
        "post_attention_layernorm.weight" => "ffn_norm",
        "mlp.gate_proj.weight" => "ffn_gate",
        "mlp.up_proj.weight" => "ffn_up",
        "mlp.down_proj.weight" => "ffn_down",
        _ => return None,
    };
    Some(format!("blk.{l}.{g}.weight"))
}

/// Undoes llama.cpp's reordering of q/k rows. Hugging Face rotates element i
/// of a head with element i + HS/2; llama.cpp rotates neighbours (2i, 2i+1),
/// so its converter interleaves the two halves of each head. Here row
/// h*HS + a*HS/2 + i (a in {0, 1}) is taken back from row h*HS + 2i + a.
/// w is (heads*HS, cols).
pub fn unpermute_rope_rows(w: &[f32], heads: usize, hs: usize, cols: usize) -> Vec<f32> {
    let half = hs / 2;
    let mut out = vec![0.0f32; w.len()];
    for h in 0..heads {
        for a in 0..2 {
            for i in 0..half {
                let dst = (h * hs + a * half + i) * cols;
                let src = (h * hs + 2 * i + a) * cols;
                out[dst..dst + cols].copy_from_slice(&w[src..src + cols]);
            }
        }
    }
    out
}

/// llama.cpp's q/k row order from Hugging Face's: the inverse of
/// `unpermute_rope_rows` (row h*HS + 2i + a comes from row h*HS + a*HS/2 + i).
pub fn permute_rope_rows(w: &[f32], heads: usize, hs: usize, cols: usize) -> Vec<f32> {
    let half = hs / 2;
    let mut out = vec![0.0f32; w.len()];
    for h in 0..heads {
        for a in 0..2 {
            for i in 0..half {
                let dst = (h * hs + 2 * i + a) * cols;
                let src = (h * hs + a * half + i) * cols;
                out[dst..dst + cols].copy_from_slice(&w[src..src + cols]);
            }
        }
    }
    out
}

/// Recovers the "llama3" RoPE scaling parameters from llama.cpp's
/// `rope_freqs` tensor (one divisor per frequency), by checking the standard
/// Llama-3.1/3.2 settings against it.
fn fit_llama3_scaling(c: &Config, factors: &[f32]) -> Result<RopeScaling> {
    let factor = factors.iter().fold(1.0f32, |m, &v| m.max(v));
    // Llama 3.1 and 3.2 use low 1, high 4, original context 8192. With low and
    // high fixed, one blended frequency also gives the original context:
    // s = (orig / wavelen - lo) / (hi - lo) where 1/f = (1 - s)/factor + s.
    let base = Config { rope_scaling: None, ..c.clone() }.rope_inv_freq();
    let mut candidates = vec![8192usize, 4096, 2048];
    for (f, b) in factors.iter().zip(&base) {
        let inv = 1.0 / *f as f64;
        if *f > 1.0 + 1e-4 && *f < factor - 1e-4 && factor > 1.0 {
            let s = (inv - 1.0 / factor as f64) / (1.0 - 1.0 / factor as f64);
            let wavelen = 2.0 * std::f64::consts::PI / b;
            candidates.push(((s * 3.0 + 1.0) * wavelen).round() as usize);
        }
    }
    for (lo, hi, orig) in candidates.into_iter().map(|o| (1.0, 4.0, o)) {
        let s =
            RopeScaling { factor, low_freq_factor: lo, high_freq_factor: hi, original_max_position_embeddings: orig };
        let probe = Config { rope_scaling: Some(s), ..c.clone() };
        let plain = Config { rope_scaling: None, ..c.clone() };
        let (scaled, base) = (probe.rope_inv_freq(), plain.rope_inv_freq());
        let ok = factors.len() == base.len()
            && factors.iter().zip(base.iter().zip(&scaled)).all(|(&f, (b, s))| ((b / s) as f32 - f).abs() <= 1e-3 * f);
        if ok {
            return Ok(s);
        }
    }
    bail!("rope_freqs does not match Llama-3 \"llama3\" scaling; this RoPE variant is not supported")
}

// ----------------------------------------------------------------------------
// Hugging Face directory

fn open_hf_dir(dir: &Path) -> Result<Source> {
    let cfg_path = dir.join("config.json");
    let cp = cfg_path.display().to_string();
    let text = std::fs::read_to_string(&cfg_path).with_context(|| format!("{cp}: cannot read"))?;
    let json: Value =
        serde_json::from_str(&text).map_err(|e| anyhow!("{cp}: not valid JSON: {}", shorten(&e.to_string())))?;
    let config = hf_config(&json).with_context(|| cp.clone())?;

    let tok_path = dir.join("tokenizer.json");
    let tok_text =
        std::fs::read_to_string(&tok_path).with_context(|| format!("{}: cannot read", tok_path.display()))?;
    let tc_path = dir.join("tokenizer_config.json");
    let tc_text = std::fs::read_to_string(&tc_path).ok();
    let tokenizer = Tokenizer::from_hf_json(&tok_text, tc_text.as_deref()).map_err(|e| {
        // The parser names the file it means by its bare name: name it by its path.
        let msg = e.to_string();
        match msg.strip_prefix("tokenizer_config.json") {
            Some(rest) => anyhow!("{}{rest}", tc_path.display()),
            None => anyhow!(
                "{}{}",
                tok_path.display(),
                msg.strip_prefix("tokenizer.json").map_or(format!(": {msg}"), str::to_string)
            ),
        }
    })?;

    let tensors = open_safetensors(dir)?;
    Ok(Source { kind: "huggingface", config, tokenizer, tensors: Box::new(tensors) })
}

/// A Hugging Face directory's tensors: model.safetensors, or the shards
/// that model.safetensors.index.json lists (files in the directory itself).
fn open_safetensors(dir: &Path) -> Result<HfTensors> {
    let single = dir.join("model.safetensors");
    let index = dir.join("model.safetensors.index.json");
    let mut t = HfTensors { files: Vec::new(), where_is: BTreeMap::new(), dir: dir.display().to_string() };
    if single.exists() {
        t.files.push(SafeTensors::open(&single)?);
        return Ok(t);
    }
    if !index.exists() {
        bail!("{}: no model.safetensors or model.safetensors.index.json", dir.display());
    }
    let ip = index.display().to_string();
    let text = std::fs::read_to_string(&index).with_context(|| format!("{ip}: cannot read"))?;
    let json: Value =
        serde_json::from_str(&text).map_err(|e| anyhow!("{ip}: not valid JSON: {}", shorten(&e.to_string())))?;
    let map = json.get("weight_map").and_then(Value::as_object).ok_or_else(|| anyhow!("{ip}: no weight_map"))?;
    let mut shard_ids: BTreeMap<&str, usize> = BTreeMap::new();
    for (name, shard) in map {
        let shard =
            shard
                .as_str()
                .filter(|f| Path::new(f).file_name().is_some_and(|n| n == std::ffi::OsStr::new(f)))
                .ok_or_else(|| anyhow!("{ip}: weight_map entry {} is not the name of a file beside it", plain(name)))?;
        let id = match shard_ids.get(shard) {
            Some(&id) => id,
            None => {
                if !dir.join(shard).is_file() {
                    bail!(
                        "{ip}: weight_map entry {} names {}, which is not a file in {}",
                        plain(name),
                        quote(shard),
                        dir.display()
                    );
                }
                t.files.push(SafeTensors::open(&dir.join(shard))?);
                shard_ids.insert(shard, t.files.len() - 1);
                t.files.len() - 1
            }
        };
        t.where_is.insert(name.clone(), id);
    }
    Ok(t)
}

/// The tensors of one or more safetensors files.
struct HfTensors {
    files: Vec<SafeTensors>,
    /// tensor name -> index into `files` (from the index; else searched)
    where_is: BTreeMap<String, usize>,
    dir: String,
}

impl HfTensors {
    fn find(&self, name: &str) -> Result<(&SafeTensors, &SafeTensor)> {
        let file = match self.where_is.get(name) {
            Some(&id) => self.files.get(id),
            None => self.files.iter().find(|f| f.find(name).is_some()),
        };
        file.and_then(|f| Some((f, f.find(name)?))).ok_or_else(|| anyhow!("{}: tensor {name} is missing", self.dir))
    }
}

impl Tensors for HfTensors {
    fn count(&self) -> usize {
        self.files.iter().map(|f| f.tensors().len()).sum()
    }

    fn check(&self, name: &str, want: &[usize]) -> Result<()> {
        let (f, t) = self.find(name)?;
        let p = f.path().display();
        if t.shape != want {
            bail!("{p}: tensor {name} has shape {:?}, but the config says {want:?}", t.shape);
        }
        if let Dtype::Other(d) = &t.dtype {
            bail!("{p}: tensor {name} has dtype {}, which lift cannot read (supported: F32, F16, BF16)", plain(d));
        }
        Ok(())
    }

    fn read(&self, name: &str) -> Result<Vec<f32>> {
        self.find(name)?.0.tensor_f32(name)
    }
}

/// Reads a Llama `config.json` (transformers 4.x or 5.x field names).
pub fn hf_config(j: &Value) -> Result<Config> {
    let arch_ok = j.get("model_type").and_then(Value::as_str) == Some("llama")
        || j.get("architectures")
            .and_then(Value::as_array)
            .is_some_and(|a| a.iter().any(|x| x.as_str() == Some("LlamaForCausalLM")));
    if !arch_ok {
        let what = j.get("model_type").and_then(Value::as_str).unwrap_or("unknown");
        bail!("model_type {} is not supported (lift reads Llama-family models)", quote(what));
    }
    let opt = |k: &str| -> Result<Option<usize>> { size_field(j, k) };
    let req = |k: &str| -> Result<usize> { opt(k)?.ok_or_else(|| anyhow!("missing field {k}")) };
    let dim = req("hidden_size")?;
    let n_heads = req("num_attention_heads")?;
    // transformers 5 moves rope_theta and rope_scaling into rope_parameters.
    let rope = j.get("rope_parameters").or_else(|| j.get("rope_scaling")).filter(|v| !v.is_null());
    let theta = j
        .get("rope_theta")
        .and_then(Value::as_f64)
        .or_else(|| rope.and_then(|r| r.get("rope_theta")).and_then(Value::as_f64))
        .unwrap_or(10000.0);
    let rope_scaling = match rope {
        None => None,
        Some(r) => {
            let kind = r.get("rope_type").or_else(|| r.get("type")).and_then(Value::as_str).unwrap_or("default");
            match kind {
                "default" => None,
                "llama3" => {
                    let f = |k: &str| -> Result<f64> {
                        r.get(k).and_then(Value::as_f64).ok_or_else(|| anyhow!("rope scaling: missing field {k}"))
                    };
                    Some(RopeScaling {
                        factor: f("factor")? as f32,
                        low_freq_factor: f("low_freq_factor")? as f32,
                        high_freq_factor: f("high_freq_factor")? as f32,
                        original_max_position_embeddings: f("original_max_position_embeddings")? as usize,
                    })
                }
                other => bail!("RoPE scaling {} is not supported (lift supports \"llama3\")", quote(other)),
            }
        }
    };
    let config = Config {
        vocab_size: req("vocab_size")?,
        dim,
        n_layers: req("num_hidden_layers")?,
        n_heads,
        n_kv_heads: opt("num_key_value_heads")?.unwrap_or(n_heads),
        head_dim: opt("head_dim")?.unwrap_or(dim / n_heads.max(1)),
        ffn_dim: req("intermediate_size")?,
        norm_eps: j.get("rms_norm_eps").and_then(Value::as_f64).ok_or_else(|| anyhow!("missing field rms_norm_eps"))?
            as f32,
        rope_theta: theta as f32,
        rope_scaling,
        tied_embeddings: j.get("tie_word_embeddings").and_then(Value::as_bool).unwrap_or(false),
        max_seq_len: opt("max_position_embeddings")?.unwrap_or(2048),
    };
    config.validate()?;
    Ok(config)
}

/// An integer field of config.json: absent or null is None, anything but a
/// non-negative integer is an error naming the field.
fn size_field(j: &Value, key: &str) -> Result<Option<usize>> {
    match j.get(key) {
        None | Some(Value::Null) => Ok(None),
        Some(v) => match v.as_u64() {
            Some(n) => Ok(Some(usize::try_from(n).unwrap_or(usize::MAX))),
            None => bail!("field {key} is {}, not a non-negative integer", clip(&v.to_string())),
        },
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::model::Linear;

    /// llama.cpp's converter permutes rows with
    /// reshape(heads, 2, HS/2, cols).swapaxes(1, 2); doing that by hand and
    /// then undoing it must give the original back.
    #[test]
    fn unpermute_inverts_llama_cpp_permute() {
        let (heads, hs, cols) = (3, 8, 5);
        let w: Vec<f32> = (0..heads * hs * cols).map(|i| i as f32).collect();
        let mut permuted = vec![0.0; w.len()];
        for h in 0..heads {
            for a in 0..2 {
                for i in 0..hs / 2 {
                    // (h, a, i) in the source lands at (h, i, a).
                    let src = (h * hs + a * hs / 2 + i) * cols;
                    let dst = (h * hs + i * 2 + a) * cols;
                    permuted[dst..dst + cols].copy_from_slice(&w[src..src + cols]);
                }
            }
        }
        assert_ne!(permuted, w);
        assert_eq!(unpermute_rope_rows(&permuted, heads, hs, cols), w);
        assert_eq!(permute_rope_rows(&w, heads, hs, cols), permuted);
    }

    #[test]
    fn linear_names_round_trip_to_gguf() {
        for w in Linear::ALL {
            assert!(gguf_name(&w.hf_name(3), false).unwrap().starts_with("blk.3."));
        }
        assert_eq!(gguf_name("lm_head.weight", true), None);
    }
}
