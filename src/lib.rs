//! lift: LIFT (Low-rank Informed Sparse Fine-Tuning) for Llama-family models.
//!
//! The crate is both the `lift` binary's engine and a library the tests use.
//! Read it in this order: `model` (what a Llama is), `cpu` (how each op is
//! computed), `checkpoint` (the model.bin format), `convert` (GGUF and Hugging
//! Face import), `tokenizer`, `generate`.

pub mod checkpoint;
pub mod convert;
pub mod cpu;
pub mod generate;
pub mod gguf;
pub mod lift;
pub mod model;
pub mod safetensors;
pub mod tokenizer;
