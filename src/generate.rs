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

/// Greedy decoding of several prompts at once: the prompts are left-padded
/// to the same length (the padding masked out of attention), so every step
/// runs all rows through the weights together, which is what makes batched
/// evaluation fast. Returns the new tokens of each prompt, each stopping after
/// its EOS. RoPE scores depend only on distances between positions, so a
/// row's shift by its padding does not change its results.
pub fn greedy_batch(model: &mut Model, prompts: &[Vec<u32>], max_new: usize, eos: Option<u32>) -> Vec<Vec<u32>> {
    let b = prompts.len();
    let longest = prompts.iter().map(Vec::len).max().unwrap_or(0);
    if b == 0 || longest == 0 || max_new == 0 {
        return vec![Vec::new(); b];
    }
    let pad = eos.unwrap_or(0);
    let cap = longest + max_new;
    model.ensure_rope(cap);
    let mut cache = KvCache::new(&model.config, b, cap);
    let mut tokens = Vec::with_capacity(b * longest);
    for (row, p) in prompts.iter().enumerate() {
        cache.starts[row] = longest - p.len();
        tokens.extend(std::iter::repeat_n(pad, longest - p.len()));
        tokens.extend_from_slice(p);
    }
    let v = model.config.vocab_size;
    let mut logits = model.forward_cached(&mut cache, &tokens);
    let mut out: Vec<Vec<u32>> = vec![Vec::new(); b];
    let mut done: Vec<bool> = prompts.iter().map(Vec::is_empty).collect();
    for step in 0..max_new {
        let mut next = vec![pad; b];
        for row in 0..b {
            if done[row] {
                continue;
            }
            let id = argmax(&logits[row * v..(row + 1) * v]);
            out[row].push(id);
            next[row] = id;
            done[row] = Some(id) == eos;
        }
        if done.iter().all(|&d| d) || step + 1 == max_new {
            break;
        }
        logits = model.forward_cached(&mut cache, &next);
    }
    out
}
