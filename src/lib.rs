//! lift: LIFT (Low-rank Informed Sparse Fine-Tuning) for Llama-family models.
//!
//! The crate is both the `lift` binary's engine and a library the tests use.
//! Imports point one way, from the commands down to the ops (the README's
//! "Layout" lists the files from the top; tests/architecture.rs keeps it so).
//! To follow one training step, read in this order (the README's "Reading
//! the code" walks it in detail):
//!
//!   options      what a run is configured by (the flags' types and defaults)
//!   train        the loop: prepare, train_loop, finish
//!   method       what each method trains: mask plans, the host state
//!   select       principal weights: the rank-r approximation and top-k
//!   trainer      the Trainer trait; cpu_trainer and cuda::trainer implement it
//!   model, cpu   what a Llama is, and how each op is computed on the CPU
//!   lm_head      the LM head and the loss, a chunk of rows at a time
//!   optim, lora  sparse and dense AdamW; the LoRA adapter
//!   formats      model.bin, state.bin, GGUF, safetensors, tokenizer files
//!   data         the prompt template, loss mask and batches
//!   cuda         the same model, selection and optimizers on a GPU
//!
//! and around them: eval and answer (lift eval), generate, tokenizer, init,
//! plot, rng, bench (lift bench), limits (what a file may ask for).

pub mod answer;
pub mod bench;
pub mod cpu;
pub mod cpu_trainer;
pub mod cuda;
pub mod data;
pub mod decode;
pub mod dora;
pub mod eval;
pub mod formats;
pub mod generate;
pub mod init;
pub mod limits;
pub mod lm_head;
pub mod lora;
pub mod matvec;
pub mod method;
pub mod model;
pub mod optim;
pub mod options;
pub mod pack;
pub mod plot;
pub mod rng;
pub mod select;
pub mod tokenizer;
pub mod train;
pub mod trainer;
