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
//! run packs the same. The batch's tensors then lay its rows end to end
//! (`make_packed_batch`): one row of N positions, every one a real token.

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

/// The tensors of a packed batch: tokens and targets (1, N), the batch's
/// rows laid end to end, and the segments, one per example, in row order.
/// Attention and positions follow the segments, not the rows, so on the CPU
/// a row's end needs no padding: every one of the N positions is a real
/// token (a (B, T) layout padded to the longest row left 19% of
/// data/math.json's positions empty). The rows stay the packing's unit:
/// what a kernel that attends within fixed-length rows would take.
pub fn make_packed_batch(examples: &[TokenizedExample], packed: &PackedBatch) -> Batch {
    let n: usize = packed.rows.iter().flatten().map(|&i| examples[i].ids.len()).sum();
    let (mut tokens, mut targets) = (Vec::with_capacity(n), vec![IGNORE; n]);
    let (mut segments, mut n_loss) = (Vec::new(), 0);
    for &i in packed.rows.iter().flatten() {
        let ex = &examples[i];
        let start = tokens.len();
        tokens.extend_from_slice(&ex.ids);
        n_loss += crate::data::write_targets(&mut targets[start..start + ex.ids.len()], ex);
        segments.push(Segment { row: 0, start, len: ex.ids.len() });
    }
    Batch { b: 1, t: n, tokens, targets, n_loss, segments }
}
