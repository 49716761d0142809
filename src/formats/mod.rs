//! The file formats lift reads and writes:
//!
//!   checkpoint.rs      model.bin, lift's own memory-mappable model file
//!   gguf.rs            GGUF (llama.cpp): reading, dequantization, writing
//!   safetensors.rs     Hugging Face safetensors, single or sharded
//!   tokenizer_json.rs  Hugging Face tokenizer.json: reading and writing
//!   tokenizer_gguf.rs  GGUF tokenizer vocabularies: reading and writing
//!   convert.rs         `lift convert`: a GGUF file or an HF directory -> model.bin
//!   export.rs          `lift export`: model.bin -> an HF directory or a GGUF file
//!   state.rs           state.bin, a training run's resumable state

pub mod checkpoint;
pub mod convert;
pub mod export;
pub mod gguf;
pub mod safetensors;
pub mod state;
pub mod tokenizer_gguf;
pub mod tokenizer_json;
