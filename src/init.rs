//! `lift init`: a randomly initialized model of a named shape, for tests and
//! benchmarks on machines that cannot download real weights. Linear weights
//! and embeddings are N(0, 0.02^2) (Hugging Face's `initializer_range`), norms
//! are ones. The tokenizer is a real checkpoint's (`--tokenizer-from`) or a
//! byte-level stand-in.

use std::path::PathBuf;

use anyhow::{Result, bail};
use clap::Args;
use rayon::prelude::*;

use crate::formats::checkpoint::{self, Checkpoint, DType};
use crate::model::{Config, Param, RopeScaling, Weights};
use crate::rng::Rng;
use crate::tokenizer::Tokenizer;

/// The shapes `--config` knows, as (name, config).
pub fn named_config(name: &str) -> Result<Config> {
    let llama3_rope = Some(RopeScaling {
        factor: 32.0,
        low_freq_factor: 1.0,
        high_freq_factor: 4.0,
        original_max_position_embeddings: 8192,
    });
    let base = |vocab, dim, layers, heads, kv, hs, ffn, theta: f32, scaling, tied, max| Config {
        vocab_size: vocab,
        dim,
        n_layers: layers,
        n_heads: heads,
        n_kv_heads: kv,
        head_dim: hs,
        ffn_dim: ffn,
        norm_eps: 1e-5,
        rope_theta: theta,
        rope_scaling: scaling,
        tied_embeddings: tied,
        max_seq_len: max,
    };
    Ok(match name {
        // two layers, GQA, a head size that is not a multiple of 32's tile
        "tiny" => base(512, 128, 2, 4, 2, 32, 320, 10000.0, None, true, 2048),
        // small enough for CPU runs, large enough for the randomized SVD path
        "small" => base(512, 256, 4, 8, 4, 32, 768, 10000.0, llama3_rope, false, 2048),
        "smollm2-135m" => base(49152, 576, 30, 9, 3, 64, 1536, 100000.0, None, true, 8192),
        "llama-3.2-1b" => base(128256, 2048, 16, 32, 8, 64, 8192, 500000.0, llama3_rope, true, 131072),
        "llama-3.2-3b" => base(128256, 3072, 28, 24, 8, 128, 8192, 500000.0, llama3_rope, true, 131072),
        "llama-3-8b" => base(128256, 4096, 32, 32, 8, 128, 14336, 500000.0, None, false, 8192),
        other => bail!(
            "--config {other}: unknown shape (known: tiny, small, smollm2-135m, llama-3.2-1b, llama-3.2-3b, llama-3-8b)"
        ),
    })
}

/// Random weights of a config, reproducible from `seed`: tensor i is filled
/// by its own stream, in parallel chunks of 2^20 values, each chunk its own
/// stream too, so the result does not depend on the thread count.
pub fn random_weights(c: &Config, seed: u64) -> Weights {
    let mut w = Weights::zeros(c);
    for (i, p) in Param::all(c).into_iter().enumerate() {
        let t = w.get_mut(p);
        match p {
            Param::AttnNorm(_) | Param::MlpNorm(_) | Param::Norm => t.fill(1.0),
            _ => t.par_chunks_mut(1 << 20).enumerate().for_each(|(j, chunk)| {
                let mut rng = Rng::stream(seed ^ ((i as u64) << 40), j as u64);
                rng.fill_normal(chunk);
                chunk.iter_mut().for_each(|x| *x *= 0.02);
            }),
        }
    }
    w
}

#[derive(Args)]
pub struct InitArgs {
    /// The shape: tiny, small, smollm2-135m, llama-3.2-1b, llama-3.2-3b, llama-3-8b.
    #[arg(long)]
    pub config: String,
    /// Where to write the model.bin.
    #[arg(short, long)]
    pub output: PathBuf,
    /// Take the tokenizer of this model.bin (its vocabulary must fit the
    /// shape's); default: a byte-level stand-in.
    #[arg(long)]
    pub tokenizer_from: Option<PathBuf>,
    /// Storage type of the tensors.
    #[arg(long, default_value = "f32", value_parser = ["f32", "bf16"])]
    pub dtype: String,
    #[arg(long, default_value_t = 0)]
    pub seed: u64,
}

pub fn run(a: &InitArgs) -> Result<()> {
    let t0 = std::time::Instant::now();
    let mut c = named_config(&a.config)?;
    let tok = match &a.tokenizer_from {
        Some(p) => {
            let ck = Checkpoint::open(p)?;
            if ck.tokenizer.vocab_size() > c.vocab_size {
                c.vocab_size = ck.tokenizer.vocab_size();
            }
            ck.tokenizer
        }
        None => Tokenizer::byte_level_standin(c.vocab_size)?,
    };
    c.validate()?;
    let w = random_weights(&c, a.seed);
    let mut meta = std::collections::BTreeMap::new();
    meta.insert("init".to_string(), format!("random N(0, 0.02), seed {}, shape {}", a.seed, a.config));
    checkpoint::save_weights(&a.output, &c, &tok, &w, DType::parse(&a.dtype)?, &meta)?;
    eprintln!(
        "wrote {} ({}, {:.1}M parameters, {}, {:.1}s)",
        a.output.display(),
        a.config,
        w.num_params() as f64 / 1e6,
        a.dtype,
        t0.elapsed().as_secs_f64()
    );
    Ok(())
}
