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
//!
//! A position without a target (a prompt token, padding) has loss 0 and
//! dlogits 0, so its logits change nothing: the chunked head gathers the
//! R rows of the next chunk from the positions that have a target and
//! skips the others. On instruction data that is most positions (about 60%
//! of math_train_3k's), and the head is a fifth of SmolLM2's step.

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

/// One chunk's rows with a target, gathered: xf (R, C), dxf (R, C),
/// targets (R), losses (R).
#[derive(Default)]
pub struct Gathered {
    x: Vec<f32>,
    dx: Vec<f32>,
    targets: Vec<i32>,
    losses: Vec<f32>,
}

impl Gathered {
    /// Room for chunks of `rows` rows of C floats.
    pub fn fit(&mut self, rows: usize, c: usize) {
        self.x.resize(rows * c, 0.0);
        self.dx.resize(rows * c, 0.0);
        self.targets.resize(rows, -1);
        self.losses.resize(rows, 0.0);
    }

    pub fn bytes(&self) -> usize {
        4 * (self.x.capacity() + self.dx.capacity() + self.targets.capacity() + self.losses.capacity())
    }

    /// Copies the rows of [r0, r1) that have a target; returns how many.
    fn gather(&mut self, x: &HeadInput, r0: usize, r1: usize) -> usize {
        let c = x.c;
        let mut m = 0;
        for i in Gathered::positions(x, r0, r1) {
            self.x[m * c..(m + 1) * c].copy_from_slice(&x.xf[i * c..(i + 1) * c]);
            self.targets[m] = x.targets[i];
            m += 1;
        }
        m
    }

    /// Gathers the rows of [r0, r1) that have a target and writes their
    /// logits (m, V) to the front of buf; returns m.
    fn logits(&mut self, x: &HeadInput, buf: &mut [f32], r0: usize, r1: usize) -> usize {
        let m = self.gather(x, r0, r1);
        logits_of(&mut buf[..m * x.v], &self.x[..m * x.c], x.w, m, x.c, x.v);
        m
    }

    /// The positions in [r0, r1) of the gathered rows, in order.
    fn positions<'t>(x: &HeadInput<'t>, r0: usize, r1: usize) -> impl Iterator<Item = usize> + 't {
        let t = x.targets;
        (r0..r1).filter(move |&i| t[i] >= 0)
    }

    /// Writes the gathered rows' losses back to their positions in [r0, r1).
    fn scatter_losses(&self, x: &HeadInput, r0: usize, r1: usize, losses: &mut [f32]) {
        for (j, i) in Gathered::positions(x, r0, r1).enumerate() {
            losses[i] = self.losses[j];
        }
    }

    /// Writes the gathered rows of dxf back to their rows in [r0, r1).
    fn scatter_dx(&self, x: &HeadInput, r0: usize, r1: usize, dxf: &mut [f32]) {
        let c = x.c;
        for (j, i) in Gathered::positions(x, r0, r1).enumerate() {
            dxf[i * c..(i + 1) * c].copy_from_slice(&self.dx[j * c..(j + 1) * c]);
        }
    }
}

/// Where the logits go: `keep`, buf is (N, V) and keeps them all (after a
/// backward pass: the dlogits); else buf is (R, V) scratch, one chunk at a
/// time, of the rows gathered in `gathered`.
pub struct Logits<'a> {
    pub buf: &'a mut [f32],
    pub keep: bool,
    pub rows: usize,
    pub gathered: &'a mut Gathered,
}

/// (first row, rows) of each chunk of n rows.
fn chunks(n: usize, rows: usize) -> impl Iterator<Item = (usize, usize)> {
    (0..n).step_by(rows.max(1)).map(move |r0| (r0, rows.max(1).min(n - r0)))
}

/// Row ranges [r0, r1) that each hold `rows` positions with a target (the
/// last one what is left), covering every position with one.
fn target_chunks(targets: &[i32], rows: usize) -> impl Iterator<Item = (usize, usize)> + '_ {
    let mut r0 = 0;
    std::iter::from_fn(move || {
        let mut seen = 0;
        let mut r1 = r0;
        while r1 < targets.len() && seen < rows.max(1) {
            seen += (targets[r1] >= 0) as usize;
            r1 += 1;
        }
        let chunk = (seen > 0).then_some((r0, r1));
        r0 = r1;
        chunk
    })
}

/// 1 / the number of positions with a target: each dlogit's scale.
fn inv_count(targets: &[i32]) -> f32 {
    1.0 / targets.iter().filter(|&&t| t >= 0).count().max(1) as f32
}

/// logits (R, V) = x (R, C) @ w^T.
fn logits_of(lg: &mut [f32], x: &[f32], w: &[f32], m: usize, c: usize, v: usize) {
    cpu::matmul_forward(lg, x, w, m, c, v);
}

/// d (R, C) = dlogits (R, V) @ w (written, not added).
fn dx_of(d: &mut [f32], dlogits: &[f32], w: &[f32], m: usize, c: usize, v: usize) {
    d.fill(0.0);
    cpu::matmul_backward_input(d, dlogits, w, m, c, v);
}

/// The forward pass of the head and the loss: losses (N) and their mean
/// over the positions with a target (cpu::crossentropy_forward, a chunk at
/// a time). With dxf (N, C), also the gradient of that mean with respect to
/// xf: the head's and the loss's backward pass, done while each chunk's
/// logits are at hand.
pub fn forward(x: HeadInput, out: &mut Logits, losses: &mut [f32], mut dxf: Option<&mut [f32]>) -> f32 {
    let (inv, c, v) = (inv_count(x.targets), x.c, x.v);
    if out.keep {
        for (r0, m) in chunks(x.targets.len(), out.rows) {
            let lg = &mut out.buf[r0 * v..(r0 + m) * v];
            logits_of(lg, &x.xf[r0 * c..(r0 + m) * c], x.w, m, c, v);
            let tg = &x.targets[r0..r0 + m];
            cpu::crossentropy_losses(&mut losses[r0..r0 + m], lg, tg, v);
            if let Some(dxf) = dxf.as_deref_mut() {
                cpu::crossentropy_backward_rows(lg, tg, v, inv);
                dx_of(&mut dxf[r0 * c..(r0 + m) * c], lg, x.w, m, c, v);
            }
        }
        return cpu::crossentropy_mean(losses, x.targets);
    }
    losses.fill(0.0);
    if let Some(dxf) = dxf.as_deref_mut() {
        dxf.fill(0.0);
    }
    let g = &mut *out.gathered;
    for (r0, r1) in target_chunks(x.targets, out.rows) {
        let m = g.logits(&x, out.buf, r0, r1);
        let lg = &mut out.buf[..m * v];
        cpu::crossentropy_losses(&mut g.losses[..m], lg, &g.targets[..m], v);
        g.scatter_losses(&x, r0, r1, losses);
        if let Some(dxf) = dxf.as_deref_mut() {
            cpu::crossentropy_backward_rows(lg, &g.targets[..m], v, inv);
            dx_of(&mut g.dx[..m * c], lg, x.w, m, c, v);
            g.scatter_dx(&x, r0, r1, dxf);
        }
    }
    cpu::crossentropy_mean(losses, x.targets)
}

/// The backward pass of the head and the loss after `forward`: each chunk's
/// dlogits (R, V) (kept logits turn into them in place, others are computed
/// again) go with their rows of xf (R, C) to `dw`, which adds the head's
/// weight gradient dlogits^T @ xf; with dxf (N, C), its rows are written too.
pub fn backward(x: HeadInput, out: &mut Logits, mut dxf: Option<&mut [f32]>, mut dw: Option<WeightGrad>) {
    let (inv, c, v) = (inv_count(x.targets), x.c, x.v);
    if out.keep {
        for (r0, m) in chunks(x.targets.len(), out.rows) {
            let lg = &mut out.buf[r0 * v..(r0 + m) * v];
            cpu::crossentropy_backward_rows(lg, &x.targets[r0..r0 + m], v, inv);
            if let Some(dw) = dw.as_deref_mut() {
                dw(lg, &x.xf[r0 * c..(r0 + m) * c], m);
            }
            if let Some(dxf) = dxf.as_deref_mut() {
                dx_of(&mut dxf[r0 * c..(r0 + m) * c], lg, x.w, m, c, v);
            }
        }
        return;
    }
    if let Some(dxf) = dxf.as_deref_mut() {
        dxf.fill(0.0);
    }
    let g = &mut *out.gathered;
    for (r0, r1) in target_chunks(x.targets, out.rows) {
        let m = g.logits(&x, out.buf, r0, r1);
        let lg = &mut out.buf[..m * v];
        cpu::crossentropy_backward_rows(lg, &g.targets[..m], v, inv);
        if let Some(dw) = dw.as_deref_mut() {
            dw(lg, &g.x[..m * c], m);
        }
        if let Some(dxf) = dxf.as_deref_mut() {
            dx_of(&mut g.dx[..m * c], lg, x.w, m, c, v);
            g.scatter_dx(&x, r0, r1, dxf);
        }
    }
}
