//! `lift export`: a model.bin out to the formats other tools read.
//! - `hf`: a Hugging Face directory (config.json, model.safetensors,
//!   tokenizer.json, tokenizer_config.json) that `transformers` loads as a
//!   LlamaForCausalLM;
//! - `gguf`: a llama.cpp GGUF file with F32 or F16 weights (norms stay F32),
//!   q/k rows permuted into llama.cpp's RoPE layout.

use std::collections::BTreeMap;
use std::path::Path;

use anyhow::{Context, Result, bail};
use half::bf16;
use serde_json::json;

use crate::formats::checkpoint::{Checkpoint, DType};
use crate::formats::gguf::{GgufValue, GgufWriteData, write_gguf};
use crate::formats::safetensors::{TensorData, write_safetensors};
use crate::model::{Config, Param, Weights};

/// The Hugging Face `config.json` of a model.
pub fn hf_config_json(c: &Config, bos: Option<u32>, eos: Option<u32>, dtype: DType) -> serde_json::Value {
    let rope_scaling = c.rope_scaling.map(|s| {
        json!({
            "rope_type": "llama3",
            "factor": s.factor,
            "low_freq_factor": s.low_freq_factor,
            "high_freq_factor": s.high_freq_factor,
            "original_max_position_embeddings": s.original_max_position_embeddings,
        })
    });
    json!({
        "architectures": ["LlamaForCausalLM"],
        "model_type": "llama",
        "vocab_size": c.vocab_size,
        "hidden_size": c.dim,
        "intermediate_size": c.ffn_dim,
        "num_hidden_layers": c.n_layers,
        "num_attention_heads": c.n_heads,
        "num_key_value_heads": c.n_kv_heads,
        "head_dim": c.head_dim,
        "hidden_act": "silu",
        "rms_norm_eps": c.norm_eps,
        "rope_theta": c.rope_theta,
        "rope_scaling": rope_scaling,
        "max_position_embeddings": c.max_seq_len,
        "tie_word_embeddings": c.tied_embeddings,
        "attention_bias": false,
        "mlp_bias": false,
        "bos_token_id": bos,
        "eos_token_id": eos,
        "torch_dtype": match dtype { DType::F32 => "float32", DType::Bf16 => "bfloat16" },
    })
}

/// Writes a Hugging Face model directory.
pub fn export_hf(ck: &Checkpoint, weights: &Weights, dir: &Path, dtype: DType) -> Result<()> {
    let c = &ck.config;
    let tok = &ck.tokenizer;
    std::fs::create_dir_all(dir).with_context(|| format!("{}: cannot create", dir.display()))?;
    let cfg = hf_config_json(c, tok.bos_id(), tok.eos_id(), dtype);
    write_text(&dir.join("config.json"), &serde_json::to_string_pretty(&cfg)?)?;

    let params = Param::all(c);
    let names: Vec<String> = params.iter().map(|p| p.name()).collect();
    let shapes: Vec<Vec<usize>> = params.iter().map(|p| p.shape(c)).collect();
    let halves: Vec<Vec<bf16>> = match dtype {
        DType::F32 => Vec::new(),
        DType::Bf16 => params.iter().map(|p| weights.get(*p).iter().map(|&v| bf16::from_f32(v)).collect()).collect(),
    };
    let tensors: Vec<(&str, &[usize], TensorData)> = (0..params.len())
        .map(|i| {
            let data = match dtype {
                DType::F32 => TensorData::F32(weights.get(params[i])),
                DType::Bf16 => TensorData::BF16(&halves[i]),
            };
            (names[i].as_str(), shapes[i].as_slice(), data)
        })
        .collect();
    let mut meta = BTreeMap::new();
    meta.insert("format".to_string(), "pt".to_string());
    write_safetensors(&dir.join("model.safetensors"), &tensors, Some(&meta))?;

    write_text(&dir.join("tokenizer.json"), &tok.to_hf_json()?)?;
    let name = |id: Option<u32>| id.and_then(|i| tok.token_str(i)).map(str::to_string);
    let tc = json!({
        "tokenizer_class": "PreTrainedTokenizerFast",
        "add_bos_token": tok.add_bos(),
        "add_eos_token": false,
        "bos_token": name(tok.bos_id()),
        "eos_token": name(tok.eos_id()),
        "model_max_length": c.max_seq_len,
        "clean_up_tokenization_spaces": false,
    });
    write_text(&dir.join("tokenizer_config.json"), &serde_json::to_string_pretty(&tc)?)?;
    let gc = json!({ "bos_token_id": tok.bos_id(), "eos_token_id": tok.eos_id(), "do_sample": false });
    write_text(&dir.join("generation_config.json"), &serde_json::to_string_pretty(&gc)?)?;
    Ok(())
}

/// Writes a GGUF file (llama architecture) with F32 or F16 matrices.
pub fn export_gguf(ck: &Checkpoint, weights: &Weights, path: &Path, f16: bool) -> Result<()> {
    let c = &ck.config;
    let mut meta: Vec<(String, GgufValue)> = Vec::new();
    let mut put = |k: &str, v: GgufValue| meta.push((k.to_string(), v));
    put("general.architecture", GgufValue::String("llama".into()));
    put("general.name", GgufValue::String(ck.metadata.get("source").cloned().unwrap_or_else(|| "lift export".into())));
    put("general.file_type", GgufValue::U32(if f16 { 1 } else { 0 }));
    put("llama.vocab_size", GgufValue::U32(c.vocab_size as u32));
    put("llama.context_length", GgufValue::U32(c.max_seq_len as u32));
    put("llama.embedding_length", GgufValue::U32(c.dim as u32));
    put("llama.block_count", GgufValue::U32(c.n_layers as u32));
    put("llama.feed_forward_length", GgufValue::U32(c.ffn_dim as u32));
    put("llama.attention.head_count", GgufValue::U32(c.n_heads as u32));
    put("llama.attention.head_count_kv", GgufValue::U32(c.n_kv_heads as u32));
    put("llama.attention.key_length", GgufValue::U32(c.head_dim as u32));
    put("llama.attention.value_length", GgufValue::U32(c.head_dim as u32));
    put("llama.rope.dimension_count", GgufValue::U32(c.head_dim as u32));
    put("llama.rope.freq_base", GgufValue::F32(c.rope_theta));
    put("llama.attention.layer_norm_rms_epsilon", GgufValue::F32(c.norm_eps));
    meta.extend(ck.tokenizer.to_gguf_metadata());

    // Tensors in llama.cpp's names and layout.
    let mut owned: Vec<(String, Vec<u64>, Vec<f32>, bool)> = Vec::new(); // name, dims, values, f16?
    for p in Param::all(c) {
        let gname =
            crate::formats::convert::gguf_name(&p.name(), c.tied_embeddings).expect("every param has a GGUF name");
        let shape = p.shape(c);
        let mut values = weights.get(p).to_vec();
        if gname.ends_with("attn_q.weight") || gname.ends_with("attn_k.weight") {
            let heads = if gname.ends_with("attn_q.weight") { c.n_heads } else { c.n_kv_heads };
            values = crate::formats::convert::permute_rope_rows(&values, heads, c.head_dim, shape[1]);
        }
        let dims: Vec<u64> = shape.iter().rev().map(|&d| d as u64).collect();
        owned.push((gname, dims, values, f16 && shape.len() == 2));
    }
    if let Some(sc) = c.rope_scaling {
        // lift's own keys keep the exact parameters (llama.cpp ignores them).
        meta.push(("lift.rope.llama3.factor".into(), GgufValue::F32(sc.factor)));
        meta.push(("lift.rope.llama3.low_freq_factor".into(), GgufValue::F32(sc.low_freq_factor)));
        meta.push(("lift.rope.llama3.high_freq_factor".into(), GgufValue::F32(sc.high_freq_factor)));
        meta.push((
            "lift.rope.llama3.original_max_position_embeddings".into(),
            GgufValue::U32(sc.original_max_position_embeddings as u32),
        ));
    }
    if c.rope_scaling.is_some() {
        // llama.cpp reads Llama-3 scaling as per-frequency divisors.
        let plain = Config { rope_scaling: None, ..c.clone() }.rope_inv_freq();
        let scaled = c.rope_inv_freq();
        let factors: Vec<f32> = plain.iter().zip(&scaled).map(|(p, s)| (p / s) as f32).collect();
        owned.push(("rope_freqs.weight".into(), vec![factors.len() as u64], factors, false));
    }
    let tensors: Vec<(&str, &[u64], GgufWriteData)> = owned
        .iter()
        .map(|(n, d, v, h)| (n.as_str(), d.as_slice(), if *h { GgufWriteData::F16(v) } else { GgufWriteData::F32(v) }))
        .collect();
    write_gguf(path, &meta, &tensors)
}

fn write_text(path: &Path, text: &str) -> Result<()> {
    std::fs::write(path, text).with_context(|| format!("{}: cannot write", path.display()))
}

/// Checks an export target before any work.
pub fn check_target(path: &Path, format: &str) -> Result<()> {
    if format == "hf" && path.is_file() {
        bail!("{}: is a file; --format hf writes a directory", path.display());
    }
    if format == "gguf" && path.is_dir() {
        bail!("{}: is a directory; --format gguf writes a file", path.display());
    }
    Ok(())
}
