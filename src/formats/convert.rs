//! Importing models: a GGUF file (llama.cpp) or a Hugging Face directory
//! (config.json + safetensors + tokenizer.json) becomes a model.bin.
//!
//! Both importers produce the same three things: a `Config`, a `Tokenizer`,
//! and a function that yields each tensor under its Hugging Face name as a
//! row-major f32 (out, in) matrix. `convert` checks every shape against the
//! config and streams the tensors into the output one at a time.

use std::collections::BTreeMap;
use std::path::Path;

use anyhow::{Context, Result, anyhow, bail};
use serde_json::Value;

use crate::formats::checkpoint::{DType, write_model_bin};
use crate::formats::gguf::GgufFile;
use crate::formats::safetensors::SafeTensors;
use crate::model::{Config, Param, RopeScaling};
use crate::tokenizer::Tokenizer;

/// What `lift convert` reports.
pub struct ConvertReport {
    pub config: Config,
    pub n_tensors: usize,
    pub n_params: usize,
    pub source: String,
}

/// A model being imported: its shape, its tokenizer and a way to read each
/// tensor (by Hugging Face name) as f32.
struct Source {
    kind: &'static str,
    config: Config,
    tokenizer: Tokenizer,
    read: TensorReader,
}

/// Reads one tensor by Hugging Face name: its shape and f32 values.
type TensorReader = Box<dyn FnMut(&str) -> Result<(Vec<usize>, Vec<f32>)>>;

/// Converts a GGUF file or a Hugging Face directory at `input` into a
/// model.bin at `output`.
pub fn convert(input: &Path, output: &Path, dtype: DType) -> Result<ConvertReport> {
    let mut src = open_source(input)?;
    let c = src.config.clone();
    if src.tokenizer.vocab_size() > c.vocab_size {
        bail!(
            "{}: the tokenizer has {} tokens but the model's vocabulary is {}",
            input.display(),
            src.tokenizer.vocab_size(),
            c.vocab_size
        );
    }
    let params = Param::all(&c);
    let list: Vec<(String, Vec<usize>)> = params.iter().map(|p| (p.name(), p.shape(&c))).collect();
    let mut n_params = 0;
    let mut metadata = BTreeMap::new();
    metadata.insert("source".to_string(), input.display().to_string());
    metadata.insert("source_format".to_string(), src.kind.to_string());
    let path = input.display().to_string();
    write_model_bin(output, &c, &src.tokenizer, &metadata, dtype, &list, |name| {
        let (shape, values) = (src.read)(name)?;
        let want = list.iter().find(|(n, _)| n == name).map(|(_, s)| s.clone()).unwrap_or_default();
        if shape != want {
            bail!("{path}: tensor {name} has shape {shape:?}, but the config says {want:?}");
        }
        n_params += values.len();
        Ok(values)
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
    let arch = g.require_str("general.architecture")?.to_string();
    if arch != "llama" {
        bail!("{p}: architecture {arch:?} is not supported (lift reads Llama-family models)");
    }
    let key = |k: &str| format!("{arch}.{k}");
    let tokens: Vec<String> = g.require_str_array("tokenizer.ggml.tokens")?.into_iter().map(String::from).collect();
    let dim = g.require_u64(&key("embedding_length"))? as usize;
    let n_heads = g.require_u64(&key("attention.head_count"))? as usize;
    let n_kv_heads = g.get_u64(&key("attention.head_count_kv")).map_or(n_heads, |v| v as usize);
    let head_dim = g
        .get_u64(&key("attention.key_length"))
        .or_else(|| g.get_u64(&key("rope.dimension_count")))
        .map_or(dim / n_heads.max(1), |v| v as usize);
    let has_output = g.find("output.weight").is_some();
    let mut config = Config {
        vocab_size: g.get_u64(&key("vocab_size")).map_or(tokens.len(), |v| v as usize),
        dim,
        n_layers: g.require_u64(&key("block_count"))? as usize,
        n_heads,
        n_kv_heads,
        head_dim,
        ffn_dim: g.require_u64(&key("feed_forward_length"))? as usize,
        norm_eps: g.require_f32(&key("attention.layer_norm_rms_epsilon"))?,
        rope_theta: g.get_f32(&key("rope.freq_base")).unwrap_or(10000.0),
        rope_scaling: None,
        tied_embeddings: !has_output,
        max_seq_len: g.get_u64(&key("context_length")).map_or(2048, |v| v as usize),
    };
    if let Some(kind) = g.get_str(&key("rope.scaling.type"))
        && kind != "none"
    {
        bail!("{p}: RoPE scaling {kind:?} is not supported (lift supports Llama-3 \"llama3\" scaling)");
    }
    if let Some(factor) = g.get_f32("lift.rope.llama3.factor") {
        // Written by `lift export`: the exact parameters.
        config.rope_scaling = Some(RopeScaling {
            factor,
            low_freq_factor: g.require_f32("lift.rope.llama3.low_freq_factor")?,
            high_freq_factor: g.require_f32("lift.rope.llama3.high_freq_factor")?,
            original_max_position_embeddings: g.require_u64("lift.rope.llama3.original_max_position_embeddings")?
                as usize,
        });
    } else if let Some(t) = g.find("rope_freqs.weight") {
        // llama.cpp stores Llama-3.1/3.2 scaling as per-frequency divisors.
        let factors = g.tensor_f32(t)?;
        config.rope_scaling = Some(fit_llama3_scaling(&config, &factors).with_context(|| p.clone())?);
    }
    config.validate().with_context(|| p.clone())?;

    let model = g.require_str("tokenizer.ggml.model")?.to_string();
    let pre = g.get_str("tokenizer.ggml.pre").unwrap_or("default").to_string();
    let token_types = g.get_i32_array("tokenizer.ggml.token_type").unwrap_or_default();
    let merges: Vec<String> =
        g.get_str_array("tokenizer.ggml.merges").unwrap_or_default().into_iter().map(String::from).collect();
    let scores = g.get_f32_array("tokenizer.ggml.scores").unwrap_or_default();
    let bos = g.get_u64("tokenizer.ggml.bos_token_id").map(|v| v as u32);
    let eos = g.get_u64("tokenizer.ggml.eos_token_id").map(|v| v as u32);
    let add_bos = g.get_bool("tokenizer.ggml.add_bos_token").unwrap_or(model == "llama");
    let tokenizer = Tokenizer::from_gguf_vocab(&model, &pre, tokens, token_types, merges, scores, bos, eos, add_bos)
        .with_context(|| format!("{p}: tokenizer"))?;

    let cfg = config.clone();
    let read = move |name: &str| -> Result<(Vec<usize>, Vec<f32>)> {
        let gname = gguf_name(name, cfg.tied_embeddings).ok_or_else(|| anyhow!("{p}: no GGUF name for {name}"))?;
        let t = g.find(&gname).ok_or_else(|| anyhow!("{p}: tensor {gname} is missing"))?;
        // ggml lists dimensions fastest first; PyTorch's (out, in) is the reverse.
        let shape: Vec<usize> = t.dims.iter().rev().map(|&d| d as usize).collect();
        let mut values = g.tensor_f32(t)?;
        if gname.ends_with("attn_q.weight") || gname.ends_with("attn_k.weight") {
            let heads = if gname.ends_with("attn_q.weight") { cfg.n_heads } else { cfg.n_kv_heads };
            if shape.len() != 2 || shape[0] != heads * cfg.head_dim {
                bail!("{p}: tensor {gname} has shape {shape:?}, expected ({}, {})", heads * cfg.head_dim, cfg.dim);
            }
            values = unpermute_rope_rows(&values, heads, cfg.head_dim, shape[1]);
        }
        Ok((shape, values))
    };
    Ok(Source { kind: "gguf", config, tokenizer, read: Box::new(read) })
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
    let json: Value = serde_json::from_str(&text).map_err(|e| anyhow!("{cp}: not valid JSON: {e}"))?;
    let config = hf_config(&json).with_context(|| cp.clone())?;

    let tok_path = dir.join("tokenizer.json");
    let tok_text =
        std::fs::read_to_string(&tok_path).with_context(|| format!("{}: cannot read", tok_path.display()))?;
    let tc_path = dir.join("tokenizer_config.json");
    let tc_text = std::fs::read_to_string(&tc_path).ok();
    let tokenizer =
        Tokenizer::from_hf_json(&tok_text, tc_text.as_deref()).with_context(|| format!("{}", tok_path.display()))?;

    // One file, or shards listed in model.safetensors.index.json.
    let single = dir.join("model.safetensors");
    let index = dir.join("model.safetensors.index.json");
    let mut files: Vec<SafeTensors> = Vec::new();
    let mut where_is: BTreeMap<String, usize> = BTreeMap::new();
    if single.exists() {
        files.push(SafeTensors::open(&single)?);
    } else if index.exists() {
        let ip = index.display().to_string();
        let text = std::fs::read_to_string(&index).with_context(|| format!("{ip}: cannot read"))?;
        let json: Value = serde_json::from_str(&text).map_err(|e| anyhow!("{ip}: not valid JSON: {e}"))?;
        let map = json.get("weight_map").and_then(Value::as_object).ok_or_else(|| anyhow!("{ip}: no weight_map"))?;
        let mut shard_ids: BTreeMap<String, usize> = BTreeMap::new();
        for (name, shard) in map {
            let shard = shard.as_str().ok_or_else(|| anyhow!("{ip}: weight_map entry {name} is not a file name"))?;
            let id = match shard_ids.get(shard) {
                Some(&id) => id,
                None => {
                    files.push(SafeTensors::open(&dir.join(shard))?);
                    shard_ids.insert(shard.to_string(), files.len() - 1);
                    files.len() - 1
                }
            };
            where_is.insert(name.clone(), id);
        }
    } else {
        bail!("{}: no model.safetensors or model.safetensors.index.json", dir.display());
    }
    let dir_s = dir.display().to_string();
    let read = move |name: &str| -> Result<(Vec<usize>, Vec<f32>)> {
        let id = match where_is.get(name) {
            Some(&id) => id,
            None => (0..files.len())
                .find(|&i| files[i].find(name).is_some())
                .ok_or_else(|| anyhow!("{dir_s}: tensor {name} is missing"))?,
        };
        let f = &files[id];
        let t = f.find(name).ok_or_else(|| anyhow!("{dir_s}: tensor {name} is missing"))?;
        let shape = t.shape.clone();
        Ok((shape, f.tensor_f32(name)?))
    };
    Ok(Source { kind: "huggingface", config, tokenizer, read: Box::new(read) })
}

/// Reads a Llama `config.json` (transformers 4.x or 5.x field names).
pub fn hf_config(j: &Value) -> Result<Config> {
    let arch_ok = j.get("model_type").and_then(Value::as_str) == Some("llama")
        || j.get("architectures")
            .and_then(Value::as_array)
            .is_some_and(|a| a.iter().any(|x| x.as_str() == Some("LlamaForCausalLM")));
    if !arch_ok {
        let what = j.get("model_type").and_then(Value::as_str).unwrap_or("unknown");
        bail!("model_type {what:?} is not supported (lift reads Llama-family models)");
    }
    let req = |k: &str| -> Result<usize> {
        j.get(k).and_then(Value::as_u64).map(|v| v as usize).ok_or_else(|| anyhow!("missing field {k}"))
    };
    let opt = |k: &str| j.get(k).and_then(Value::as_u64).map(|v| v as usize);
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
                other => bail!("RoPE scaling {other:?} is not supported (lift supports \"llama3\")"),
            }
        }
    };
    let config = Config {
        vocab_size: req("vocab_size")?,
        dim,
        n_layers: req("num_hidden_layers")?,
        n_heads,
        n_kv_heads: opt("num_key_value_heads").unwrap_or(n_heads),
        head_dim: opt("head_dim").unwrap_or(dim / n_heads.max(1)),
        ffn_dim: req("intermediate_size")?,
        norm_eps: j.get("rms_norm_eps").and_then(Value::as_f64).ok_or_else(|| anyhow!("missing field rms_norm_eps"))?
            as f32,
        rope_theta: theta as f32,
        rope_scaling,
        tied_embeddings: j.get("tie_word_embeddings").and_then(Value::as_bool).unwrap_or(false),
        max_seq_len: opt("max_position_embeddings").unwrap_or(2048),
    };
    config.validate()?;
    Ok(config)
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
