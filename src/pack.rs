//! Packed batches: the training examples of an epoch laid end to end into
//! rows of up to --max-seq-len tokens, so that a step's arithmetic goes to
//! real tokens instead of padding (on math_train_3k with SmolLM2's
//! tokenizer, random padded batches of 8 are a third padding).
//!
//! Each example keeps its own attention and positions: a row is a list of
//! segments, attention is causal within a segment and never crosses one
//! (block-diagonal, computed segment by segment, no T x T mask), RoPE
//! restarts at 0 in each, and the targets are each example's own, so the
//! loss is the token-weighted mean over exactly the target tokens the
//! padded batches have.
//!
//! A batch is a token budget (--batch-tokens): the epoch's examples, in the
//! seed's order, join the current batch while its tokens stay within the
//! budget (else they start the next one), each going first-fit into the
//! batch's rows, a new row when none has room. The
//! packing is a function of the order, so every epoch's is known at the
//! start (the step count and the schedule follow from it) and a resumed
//! run packs the same.

use crate::data::{Batch, IGNORE, Segment, TokenizedExample};

/// One batch of an epoch: for each row, the indices (into the training
/// examples) of the examples it holds, in order.
#[derive(Debug, Clone, PartialEq)]
pub struct PackedBatch {
    pub rows: Vec<Vec<usize>>,
}

/// The batches of one epoch: `order` (example indices) first-fit into rows
/// of at most `max_len` tokens, batches of about `budget` tokens.
/// `lens[i]` is example i's length.
pub fn pack_epoch(lens: &[usize], order: &[usize], max_len: usize, budget: usize) -> Vec<PackedBatch> {
    let mut batches = Vec::new();
    let (mut rows, mut used, mut tokens): (Vec<Vec<usize>>, Vec<usize>, usize) = (Vec::new(), Vec::new(), 0);
    for &i in order {
        let len = lens[i];
        if !rows.is_empty() && tokens + len > budget {
            batches.push(PackedBatch { rows: std::mem::take(&mut rows) });
            (used, tokens) = (Vec::new(), 0);
        }
        let row = match used.iter().position(|&u| u + len <= max_len) {
            Some(r) => r,
            None => {
                rows.push(Vec::new());
                used.push(0);
                rows.len() - 1
            }
        };
        rows[row].push(i);
        used[row] += len;
        tokens += len;
    }
    if !rows.is_empty() {
        batches.push(PackedBatch { rows });
    }
    batches
}

/// The tensors of a packed batch: tokens and targets (B, T) with T the
/// longest row (the rest of each row is `pad_id`, ignored), and the
/// segments, one per example, in row order.
pub fn make_packed_batch(examples: &[TokenizedExample], packed: &PackedBatch, pad_id: u32) -> Batch {
    let b = packed.rows.len();
    let t = packed.rows.iter().map(|r| r.iter().map(|&i| examples[i].ids.len()).sum::<usize>()).max().unwrap_or(0);
    let mut tokens = vec![pad_id; b * t];
    let mut targets = vec![IGNORE; b * t];
    let mut segments = Vec::new();
    let mut n_loss = 0;
    for (row, list) in packed.rows.iter().enumerate() {
        let mut start = 0;
        for &i in list {
            let ex = &examples[i];
            let at = row * t + start;
            tokens[at..at + ex.ids.len()].copy_from_slice(&ex.ids);
            n_loss += crate::data::write_targets(&mut targets[at..at + ex.ids.len()], ex);
            segments.push(Segment { row, start, len: ex.ids.len() });
            start += ex.ids.len();
        }
    }
    Batch { b, t, tokens, targets, n_loss, segments }
}

/// Tokens, target tokens and padded positions of an epoch's packing.
pub fn fill(lens: &[usize], batches: &[PackedBatch]) -> (usize, usize) {
    let (mut real, mut cells) = (0, 0);
    for p in batches {
        let rows: Vec<usize> = p.rows.iter().map(|r| r.iter().map(|&i| lens[i]).sum()).collect();
        real += rows.iter().sum::<usize>();
        cells += rows.len() * rows.iter().max().copied().unwrap_or(0);
    }
    (real, cells)
}
