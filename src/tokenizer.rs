//! (being written) temporary stand-in
use serde::{Deserialize, Serialize};
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct Tokenizer {
    pub vocab: Vec<String>,
}
impl Tokenizer {
    pub fn vocab_size(&self) -> usize {
        self.vocab.len()
    }
}
