//! The file formats lift reads and writes, apart from the training itself:
//!
//!   checkpoint.rs      model.bin, lift's own memory-mappable model file
//!   gguf.rs            GGUF (llama.cpp): reading, dequantization, writing
//!   safetensors.rs     Hugging Face safetensors, single or sharded
//!   tokenizer_json.rs  Hugging Face tokenizer.json (+ tokenizer_config.json) <-> a tokenizer
//!   tokenizer_gguf.rs  GGUF `tokenizer.ggml.*` vocabulary metadata <-> a tokenizer
//!   convert.rs         `lift convert`: a GGUF file or an HF directory -> model.bin
//!   export.rs          `lift export`: model.bin -> an HF directory or a GGUF file

pub mod checkpoint;
pub mod convert;
pub mod export;
pub mod gguf;
pub mod safetensors;
pub mod tokenizer_gguf;
pub mod tokenizer_json;
