//! Greedy decoding with a KV cache: the prompt is run once, then each new
//! token costs one position of work.

use crate::model::{KvCache, Model};

/// The index of the largest logit; the first one wins a tie, as torch.argmax.
pub fn argmax(logits: &[f32]) -> u32 {
    let mut best = 0;
    for (i, &v) in logits.iter().enumerate() {
        if v > logits[best] {
            best = i;
        }
    }
    best as u32
}

/// Generates up to `max_new` tokens after `prompt` by always taking the most
/// likely next token, stopping after `eos` (which is included in the output).
/// `on_token` sees each new token as it is produced (for streaming output).
pub fn greedy(
    model: &mut Model,
    prompt: &[u32],
    max_new: usize,
    eos: Option<u32>,
    mut on_token: impl FnMut(u32),
) -> Vec<u32> {
    if prompt.is_empty() || max_new == 0 {
        return Vec::new();
    }
    let cap = prompt.len() + max_new;
    model.ensure_rope(cap);
    let mut cache = KvCache::new(&model.config, 1, cap);
    let mut logits = model.forward_cached(&mut cache, prompt);
    let mut out = Vec::with_capacity(max_new);
    loop {
        let next = argmax(&logits);
        out.push(next);
        on_token(next);
        if Some(next) == eos || out.len() == max_new {
            return out;
        }
        logits = model.forward_cached(&mut cache, &[next]);
    }
}
