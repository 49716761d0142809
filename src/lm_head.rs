//! The LM head and the cross-entropy loss, a chunk of rows at a time.
//!
//! The head turns each of the N positions into V logits: with SmolLM2's
//! V = 49152 that is 192 KiB a row, more than the 30 blocks keep for it with
//! --recompute. Training never holds the (N, V) logits: the forward pass takes R
//! rows at a time (`ROWS`), computes their logits, their losses and, when a
//! backward pass is to follow, their dlogits and the rows of
//! dxf = dlogits @ W_head, while the chunk is at hand (llm.c's fused
//! classifier does the same on the GPU). Rows are independent, so the
//! chunking changes neither the losses nor dxf; only the head's own weight
//! gradient, a sum over rows, is summed chunk by chunk (`backward`, which
//! computes each chunk's logits again: only runs that train the head, or a
//! tied embedding, pay for that).

use crate::cpu;

/// Rows per chunk: 64 rows of logits are 12 MiB at V = 49152, and still a
/// GEMM wide enough to run at full speed.
pub const ROWS: usize = 64;

/// The head's inputs for one batch: xf (N, C) the final RMSNorm's output,
/// w (V, C) the head (or the tied embedding), targets (N), negative = ignored.
#[derive(Clone, Copy)]
pub struct HeadInput<'a> {
    pub xf: &'a [f32],
    pub w: &'a [f32],
    pub targets: &'a [i32],
    pub c: usize,
    pub v: usize,
}

/// Adds one chunk's part of the head's weight gradient, dlogits^T @ xf,
/// given dlogits (R, V), the chunk's rows of xf (R, C) and R.
pub type WeightGrad<'a> = &'a mut dyn FnMut(&[f32], &[f32], usize);

/// Where the logits go: `keep`, buf is (N, V) and keeps them all (after a
/// backward pass: the dlogits); else buf is (R, V) scratch, one chunk at a time.
pub struct Logits<'a> {
    pub buf: &'a mut [f32],
    pub keep: bool,
    pub rows: usize,
}

impl Logits<'_> {
    /// The m rows of the chunk starting at row r0.
    fn chunk(&mut self, r0: usize, m: usize, v: usize) -> &mut [f32] {
        let at = if self.keep { r0 * v } else { 0 };
        &mut self.buf[at..at + m * v]
    }
}

/// (first row, rows) of each chunk of n rows.
fn chunks(n: usize, rows: usize) -> impl Iterator<Item = (usize, usize)> {
    (0..n).step_by(rows.max(1)).map(move |r0| (r0, rows.max(1).min(n - r0)))
}

/// 1 / the number of positions with a target: each dlogit's scale.
fn inv_count(targets: &[i32]) -> f32 {
    1.0 / targets.iter().filter(|&&t| t >= 0).count().max(1) as f32
}

/// Logits (R, V) = xf (R, C) @ w^T of one chunk.
fn logits_of(lg: &mut [f32], x: &HeadInput, r0: usize, m: usize) {
    cpu::matmul_forward(lg, &x.xf[r0 * x.c..(r0 + m) * x.c], x.w, m, x.c, x.v);
}

/// The rows r0..r0+m of dxf (N, C) = dlogits (R, V) @ w (written, not added).
fn dxf_rows(dxf: &mut [f32], dlogits: &[f32], x: &HeadInput, r0: usize, m: usize) {
    let d = &mut dxf[r0 * x.c..(r0 + m) * x.c];
    d.fill(0.0);
    cpu::matmul_backward_input(d, dlogits, x.w, m, x.c, x.v);
}

/// The forward pass of the head and the loss: losses (N) and their mean
/// over the positions with a target (cpu::crossentropy_forward, a chunk at
/// a time). With dxf (N, C), also the gradient of that mean with respect to
/// xf: the head's and the loss's backward pass, done while each chunk's
/// logits are at hand.
pub fn forward(x: HeadInput, out: &mut Logits, losses: &mut [f32], mut dxf: Option<&mut [f32]>) -> f32 {
    let inv = inv_count(x.targets);
    for (r0, m) in chunks(x.targets.len(), out.rows) {
        let lg = out.chunk(r0, m, x.v);
        logits_of(lg, &x, r0, m);
        let tg = &x.targets[r0..r0 + m];
        cpu::crossentropy_losses(&mut losses[r0..r0 + m], lg, tg, x.v);
        if let Some(dxf) = dxf.as_deref_mut() {
            cpu::crossentropy_backward_rows(lg, tg, x.v, inv);
            dxf_rows(dxf, lg, &x, r0, m);
        }
    }
    cpu::crossentropy_mean(losses, x.targets)
}

/// The backward pass of the head and the loss after `forward`: each chunk's
/// dlogits (R, V) (kept logits turn into them in place, others are computed
/// again) go with their rows of xf (R, C) to `dw`, which adds the head's
/// weight gradient dlogits^T @ xf; with dxf (N, C), its rows are written too.
pub fn backward(x: HeadInput, out: &mut Logits, mut dxf: Option<&mut [f32]>, mut dw: Option<WeightGrad>) {
    let inv = inv_count(x.targets);
    for (r0, m) in chunks(x.targets.len(), out.rows) {
        let keep = out.keep;
        let lg = out.chunk(r0, m, x.v);
        if !keep {
            logits_of(lg, &x, r0, m);
        }
        cpu::crossentropy_backward_rows(lg, &x.targets[r0..r0 + m], x.v, inv);
        if let Some(dw) = dw.as_deref_mut() {
            dw(lg, &x.xf[r0 * x.c..(r0 + m) * x.c], m);
        }
        if let Some(dxf) = dxf.as_deref_mut() {
            dxf_rows(dxf, lg, &x, r0, m);
        }
    }
}
