//! lift: LIFT (Low-rank Informed Sparse Fine-Tuning) for Llama-family models.
//!
//! The crate is both the `lift` binary's engine and a library the tests use.
//! Read it in this order: `model` (what a Llama is), `cpu` (how each op is
//! computed), `checkpoint` (the model.bin format), `convert` (GGUF and Hugging
//! Face import), `tokenizer`, `data` (the prompt template, loss mask and
//! batches), `generate`, `answer` (reading answers out of generated text).

pub mod answer;
pub mod bench;
pub mod cpu;
pub mod cpu_trainer;
pub mod cuda;
pub mod data;
pub mod eval;
pub mod formats;
pub mod generate;
pub mod init;
pub mod lora;
pub mod method;
pub mod model;
pub mod optim;
pub mod options;
pub mod plot;
pub mod rng;
pub mod select;
pub mod tokenizer;
pub mod train;
pub mod trainer;
