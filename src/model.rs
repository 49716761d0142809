//! What a Llama is: its configuration, its parameters, and the order in which
//! the forward and backward passes call the ops of `cpu.rs`.
//!
//! Shapes use fixed letters: B batch, T time, C model dim, NH query heads,
//! KVH key/value heads, HS head size, F FFN dim, V vocab, L layers.

use anyhow::{Result, bail};
use serde::{Deserialize, Serialize};

/// Llama 3.1/3.2 "llama3" RoPE frequency scaling (Hugging Face `rope_scaling`).
#[derive(Debug, Clone, Copy, PartialEq, Serialize, Deserialize)]
pub struct RopeScaling {
    pub factor: f32,
    pub low_freq_factor: f32,
    pub high_freq_factor: f32,
    pub original_max_position_embeddings: usize,
}

/// The shape of a Llama-family model. Covers SmolLM2, TinyLlama, Llama-2,
/// Llama-3 and Llama-3.2 (GQA, llama3 RoPE scaling, tied or untied head).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Config {
    pub vocab_size: usize,
    /// C, the model (residual stream) width.
    pub dim: usize,
    pub n_layers: usize,
    /// NH, query heads.
    pub n_heads: usize,
    /// KVH, key/value heads (NH for plain multi-head attention).
    pub n_kv_heads: usize,
    /// HS, the width of one head (usually C / NH).
    pub head_dim: usize,
    /// F, the SwiGLU hidden width.
    pub ffn_dim: usize,
    pub norm_eps: f32,
    pub rope_theta: f32,
    pub rope_scaling: Option<RopeScaling>,
    /// True when the LM head reuses the token embedding matrix.
    pub tied_embeddings: bool,
    /// The context length the model was trained for (informational).
    pub max_seq_len: usize,
}

impl Config {
    /// Checks the relations between fields that the ops rely on.
    pub fn validate(&self) -> Result<()> {
        let positive = [
            ("vocab_size", self.vocab_size),
            ("dim", self.dim),
            ("n_layers", self.n_layers),
            ("n_heads", self.n_heads),
            ("n_kv_heads", self.n_kv_heads),
            ("head_dim", self.head_dim),
            ("ffn_dim", self.ffn_dim),
        ];
        for (name, v) in positive {
            if v == 0 {
                bail!("model config: {name} must be positive");
            }
        }
        if self.n_heads % self.n_kv_heads != 0 {
            bail!(
                "model config: n_heads {} is not a multiple of n_kv_heads {}",
                self.n_heads,
                self.n_kv_heads
            );
        }
        if self.head_dim % 2 != 0 {
            bail!("model config: head_dim {} must be even for RoPE", self.head_dim);
        }
        if !(self.norm_eps > 0.0) || !(self.rope_theta > 0.0) {
            bail!("model config: norm_eps and rope_theta must be positive");
        }
        Ok(())
    }

    /// Width of all query heads together, NH * HS.
    pub fn q_dim(&self) -> usize {
        self.n_heads * self.head_dim
    }

    /// Width of all key (or value) heads together, KVH * HS.
    pub fn kv_dim(&self) -> usize {
        self.n_kv_heads * self.head_dim
    }
}
