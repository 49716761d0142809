//! The CPU backend: every numeric op of the Llama forward and backward pass,
//! in f32, as plain functions. This is the reference that the CUDA kernels in
//! `kernels/` are checked against, so each op is written to be read first.
//!
//! Shapes: B batch, T time, C model dim, NH query heads, KVH key/value heads,
//! HS head size, F FFN dim, V vocab, N = B*T rows. All buffers are row-major.
//! Backward functions *accumulate* (+=) into their gradient outputs, like
//! llm.c, so a tensor used twice (the tied embedding) just receives two calls.

use rayon::prelude::*;

// ----------------------------------------------------------------------------
// GEMM

/// C (m, n) = A (m, k) @ B (k, n), or C += A @ B when `accumulate`.
/// Each matrix is given with its row stride and column stride, so transposes
/// are free: A^T of a row-major (k, m) matrix is `(a, 1, m)`.
///
/// This is the one place where the CPU path calls unsafe code: the `gemm`
/// crate takes raw pointers. The asserts below prove that every element the
/// product touches lies inside the slices, which makes the call sound.
#[allow(clippy::too_many_arguments)]
pub fn sgemm(
    m: usize,
    n: usize,
    k: usize,
    a: &[f32],
    a_rs: usize,
    a_cs: usize,
    b: &[f32],
    b_rs: usize,
    b_cs: usize,
    c: &mut [f32],
    c_rs: usize,
    accumulate: bool,
) {
    if m == 0 || n == 0 {
        return;
    }
    let last = |rows: usize, cols: usize, rs: usize, cs: usize| (rows - 1) * rs + (cols - 1) * cs;
    assert!(c.len() > last(m, n, c_rs, 1), "sgemm: C too small");
    if k == 0 {
        if !accumulate {
            for i in 0..m {
                c[i * c_rs..i * c_rs + n].fill(0.0);
            }
        }
        return;
    }
    assert!(a.len() > last(m, k, a_rs, a_cs), "sgemm: A too small");
    assert!(b.len() > last(k, n, b_rs, b_cs), "sgemm: B too small");
    // From the main thread a large product is split by C's columns, one
    // serial product per worker: each packs only its own columns' part of
    // B (a linear layer's weight), where the gemm crate's own threads
    // would each pack all of it (a LIFT step on SmolLM2 10% faster). Too
    // few columns: the gemm crate's threads. Inside a parallel task
    // (attention's heads) the product stays serial.
    let threads = rayon::current_num_threads();
    let top = threads > 1 && m * n * k >= 64 * 64 * 64 && rayon::current_thread_index().is_none();
    let parts = if top { threads.min(n / 32).max(1) } else { 1 };
    let parallelism = if top && parts == 1 { gemm::Parallelism::Rayon(threads) } else { gemm::Parallelism::None };
    let (cp, ap, bp) = (Ptr(c.as_mut_ptr()), Ptr(a.as_ptr() as *mut f32), Ptr(b.as_ptr() as *mut f32));
    let columns = |p: usize| {
        let (j0, j1) = (p * n / parts / 16 * 16, if p + 1 == parts { n } else { (p + 1) * n / parts / 16 * 16 });
        // SAFETY: the asserts above bound every index the product of
        // columns j0..j1 reads or writes; `c` is a unique borrow, so it
        // cannot alias `a` or `b`, and the parts write disjoint columns.
        unsafe {
            gemm::gemm(
                m,
                j1 - j0,
                k,
                cp.at(j0),
                1,
                c_rs as isize,
                accumulate,
                ap.at(0),
                a_cs as isize,
                a_rs as isize,
                bp.at(j0 * b_cs),
                b_cs as isize,
                b_rs as isize,
                1.0,
                1.0,
                false,
                false,
                false,
                parallelism,
            );
        }
    };
    if parts == 1 {
        columns(0);
    } else {
        (0..parts).into_par_iter().for_each(columns);
    }
}

/// A raw pointer the parts of a split `sgemm` share (each touches its own
/// columns of C).
#[derive(Clone, Copy)]
struct Ptr(*mut f32);
// SAFETY: only `sgemm` makes these, for parts that write disjoint columns.
unsafe impl Send for Ptr {}
unsafe impl Sync for Ptr {}

impl Ptr {
    fn at(self, offset: usize) -> *mut f32 {
        self.0.wrapping_add(offset)
    }
}

/// A linear layer without bias, the way PyTorch stores it.
/// inp is (N, IC), weight is (OC, IC); out will be (N, OC) = inp @ weight^T.
pub fn matmul_forward(out: &mut [f32], inp: &[f32], weight: &[f32], n: usize, ic: usize, oc: usize) {
    sgemm(n, oc, ic, inp, ic, 1, weight, 1, ic, out, oc, false);
}

/// Gradient of a linear layer with respect to its input.
/// dout is (N, OC), weight is (OC, IC); dinp (N, IC) += dout @ weight.
pub fn matmul_backward_input(dinp: &mut [f32], dout: &[f32], weight: &[f32], n: usize, ic: usize, oc: usize) {
    sgemm(n, ic, oc, dout, oc, 1, weight, ic, 1, dinp, ic, true);
}

/// Gradient of a linear layer with respect to its weight.
/// dout is (N, OC), inp is (N, IC); dweight (OC, IC) += dout^T @ inp.
pub fn matmul_backward_weight(dweight: &mut [f32], dout: &[f32], inp: &[f32], n: usize, ic: usize, oc: usize) {
    sgemm(oc, ic, n, dout, 1, oc, inp, ic, 1, dweight, ic, true);
}

/// One weight's part of a sampled product (below): the flat indices
/// i*IC + j of its selected entries (k, ascending), their gradient
/// accumulators (k), and the gradient of its output, dout (N, OC).
pub struct Sampled<'a> {
    pub dsel: &'a mut [f32],
    pub indices: &'a [u32],
    pub dout: &'a [f32],
    pub oc: usize,
}

/// Only the selected entries of the weight gradients of linear layers that
/// read one input inp (N, IC): for each weight and each flat index i*IC + j
/// in its `indices`, dsel += (dout^T @ inp)[i, j], the dot product of column
/// i of dout with column j of inp. This is LIFT's sampled dense-dense
/// product: at 5% density it does 5% of the dense dW GEMM's arithmetic, and
/// no (OC, IC) buffer is ever formed.
///
/// The dots read rows of the two factors transposed, dout^T and inp^T, a
/// block of SAMPLED_COLS positions at a time, so that what a block's dots
/// read stays in the cache: inp^T's block is transposed once into `scratch`
/// (IC x SAMPLED_COLS floats at least, the weights share it), and each task
/// transposes the rows of dout^T its own entries read, then reads them back
/// from its core's cache.
pub fn matmul_backward_weight_sampled(outs: &mut [Sampled], inp: &[f32], n: usize, ic: usize, scratch: &mut [f32]) {
    let widest = outs.iter().map(|o| o.oc).max().unwrap_or(0);
    assert!(scratch.len() >= sampled_scratch(n, ic, widest), "sampled product: scratch too small");
    let (inp_t, dout_t) = scratch.split_at_mut(SAMPLED_COLS.min(n) * ic);
    for n0 in (0..n).step_by(SAMPLED_COLS) {
        let len = SAMPLED_COLS.min(n - n0);
        let inp_t = &mut inp_t[..ic * len];
        transpose(inp_t, &inp[n0 * ic..(n0 + len) * ic], len, ic);
        for o in outs.iter_mut() {
            let block = &o.dout[n0 * o.oc..(n0 + len) * o.oc];
            let dout_t = &mut dout_t[..o.oc * len];
            sampled_block(o, block, inp_t, ic, len, dout_t);
        }
    }
}

/// Floats of scratch `matmul_backward_weight_sampled` needs for N positions,
/// an input of IC and outputs of at most OC.
pub fn sampled_scratch(n: usize, ic: usize, oc: usize) -> usize {
    SAMPLED_COLS.min(n) * (ic + oc)
}

/// Positions per block of the sampled product: within a block the part of
/// inp^T that every entry reads (IC x 512 floats, 1.2 MB for IC = 576)
/// stays in the L2 cache. Each entry's sum runs block after block.
const SAMPLED_COLS: usize = 512;

/// One block of `matmul_backward_weight_sampled` for one weight: block is
/// dout's rows of the block (LEN, OC), inp_t the block of inp^T (IC, LEN),
/// dout_t room for dout^T (OC, LEN). The entries are split at bands of 16
/// rows of dW; a task transposes its bands' rows of dout^T, then does its
/// entries' dots.
fn sampled_block(o: &mut Sampled, block: &[f32], inp_t: &[f32], ic: usize, len: usize, dout_t: &mut [f32]) {
    let oc = o.oc;
    debug_assert!(o.indices.windows(2).all(|p| p[0] < p[1]), "indices ascending");
    let bands = oc.div_ceil(16);
    let tasks = bands.min(4 * rayon::current_num_threads()).max(1);
    // task t: rows r[t]..r[t + 1] of dW (multiples of 16), entries e[t]..e[t + 1]
    let r: Vec<usize> = (0..=tasks).map(|t| (t * bands / tasks * 16).min(oc)).collect();
    let e: Vec<usize> = r.iter().map(|&row| o.indices.partition_point(|&f| (f as usize) < row * ic)).collect();
    let mut work = Vec::with_capacity(tasks);
    let (mut g, mut rows) = (&mut o.dsel[..], &mut dout_t[..]);
    for t in 0..tasks {
        let (gt, g_rest) = std::mem::take(&mut g).split_at_mut(e[t + 1] - e[t]);
        let (rt, r_rest) = std::mem::take(&mut rows).split_at_mut((r[t + 1] - r[t]) * len);
        work.push((gt, &o.indices[e[t]..e[t + 1]], rt, r[t]));
        (g, rows) = (g_rest, r_rest);
    }
    work.into_par_iter().for_each(|(g, idx, rows, row0)| {
        if idx.is_empty() {
            return;
        }
        for c0 in (row0..row0 + rows.len() / len).step_by(16) {
            transpose_tile_rows(&mut rows[(c0 - row0) * len..], block, len, oc, c0);
        }
        sampled_dots(g, idx, Transposed { dout_t: rows, row0, inp_t, len, ic });
    });
}

/// A block of the sampled product's two factors, transposed: rows
/// row0.. of dout^T (each LEN floats) and inp^T (IC, LEN).
#[derive(Clone, Copy)]
pub struct Transposed<'a> {
    pub dout_t: &'a [f32],
    pub row0: usize,
    pub inp_t: &'a [f32],
    pub len: usize,
    pub ic: usize,
}

/// g[e] += dout^T[i] . inp^T[j] for each flat index i*IC + j in idx: one
/// block of the sampled product. With AVX-512 by
/// `x86::sampled_dots_avx512` (entries of one row share its loads),
/// elsewhere by `dot`; the two sum in different orders.
fn sampled_dots(g: &mut [f32], idx: &[u32], t: Transposed) {
    #[cfg(target_arch = "x86_64")]
    {
        if std::is_x86_feature_detected!("avx512f") {
            // SAFETY: the CPU has AVX-512F.
            return unsafe { x86::sampled_dots_avx512(g, idx, t) };
        }
    }
    sampled_dots_portable(g, idx, t)
}

fn sampled_dots_portable(g: &mut [f32], idx: &[u32], t: Transposed) {
    for (g, &flat) in g.iter_mut().zip(idx) {
        let (i, j) = (flat as usize / t.ic - t.row0, flat as usize % t.ic);
        *g += dot(&t.dout_t[i * t.len..][..t.len], &t.inp_t[j * t.len..][..t.len]);
    }
}

/// out (C, R) = inp (R, C) transposed, 16 columns of inp (rows of out) per
/// task.
pub fn transpose(out: &mut [f32], inp: &[f32], r: usize, c: usize) {
    const TILE: usize = 16;
    if r == 0 || c == 0 {
        return;
    }
    out[..c * r]
        .par_chunks_mut(TILE * r)
        .enumerate()
        .for_each(|(cb, rows)| transpose_tile_rows(rows, inp, r, c, cb * TILE));
}

/// Columns c0..c0+16 of inp (R, C) (fewer at C's end) transposed into
/// the first rows of `rows`, R floats each; on AVX-512 in 16 x 16 register tiles
/// (`x86::transpose_tile`).
fn transpose_tile_rows(rows: &mut [f32], inp: &[f32], r: usize, c: usize, c0: usize) {
    const TILE: usize = 16;
    let w = (c - c0).min(TILE);
    let mut done = 0; // rows of inp already transposed by the vector kernel
    #[cfg(target_arch = "x86_64")]
    {
        if w == TILE && std::is_x86_feature_detected!("avx512f") {
            done = r / TILE * TILE;
            // SAFETY: the CPU has AVX-512F.
            unsafe { x86::transpose_tiles_avx512(rows, inp, r, c, c0) };
        }
    }
    for row in done..r {
        for col in 0..w {
            rows[col * r + row] = inp[row * c + c0 + col];
        }
    }
}

// ----------------------------------------------------------------------------
// Embedding

/// tokens is (N), wte is (V, C); out will be (N, C), row n = wte[tokens[n]].
/// The caller has checked every token id against V.
pub fn embedding_forward(out: &mut [f32], tokens: &[u32], wte: &[f32], c: usize) {
    out.par_chunks_mut(c).zip(tokens.par_iter()).for_each(|(row, &tok)| {
        let t = tok as usize;
        row.copy_from_slice(&wte[t * c..(t + 1) * c]);
    });
}

/// dwte (V, C) += scatter of dout (N, C) into the rows named by tokens (N).
/// Serial: two positions with the same token write the same row.
pub fn embedding_backward(dwte: &mut [f32], dout: &[f32], tokens: &[u32], c: usize) {
    for (row, &tok) in dout.chunks(c).zip(tokens) {
        let t = tok as usize;
        for (d, g) in dwte[t * c..(t + 1) * c].iter_mut().zip(row) {
            *d += g;
        }
    }
}

// ----------------------------------------------------------------------------
// RMSNorm

/// inp is (N, C), weight is (C); out will be (N, C) and rstd (N).
/// out = inp * rstd * weight with rstd = 1 / sqrt(mean(inp^2) + eps),
/// computed in f32 as Hugging Face's LlamaRMSNorm does.
pub fn rmsnorm_forward(out: &mut [f32], rstd: &mut [f32], inp: &[f32], weight: &[f32], c: usize, eps: f32) {
    out.par_chunks_mut(c).zip(rstd.par_iter_mut()).zip(inp.par_chunks(c)).for_each(|((o, r), x)| {
        let ms = x.iter().map(|v| v * v).sum::<f32>() / c as f32;
        let s = 1.0 / (ms + eps).sqrt();
        *r = s;
        for ((o, x), w) in o.iter_mut().zip(x).zip(weight) {
            *o = x * s * w;
        }
    });
}

/// Backward of rmsnorm_forward. With xhat = inp * rstd and g = dout * weight:
///   dinp += rstd * (g - xhat * mean(g * xhat)),   dweight += sum_n dout * xhat.
/// dinp is (N, C), dweight (C), or None when the weight is frozen.
#[allow(clippy::too_many_arguments)]
pub fn rmsnorm_backward(
    dinp: &mut [f32],
    dweight: Option<&mut [f32]>,
    dout: &[f32],
    inp: &[f32],
    weight: &[f32],
    rstd: &[f32],
    c: usize,
) {
    dinp.par_chunks_mut(c).zip(dout.par_chunks(c)).zip(inp.par_chunks(c)).zip(rstd.par_iter()).for_each(
        |(((dx, dy), x), &s)| {
            let mut dot = 0.0f32;
            for i in 0..c {
                dot += dy[i] * weight[i] * x[i] * s;
            }
            let mean = dot / c as f32;
            for i in 0..c {
                let xhat = x[i] * s;
                dx[i] += s * (dy[i] * weight[i] - xhat * mean);
            }
        },
    );
    if let Some(dw) = dweight {
        // Rows are summed serially per column block so the result does not
        // depend on the thread count.
        dw.par_chunks_mut(64).enumerate().for_each(|(blk, dw)| {
            let c0 = blk * 64;
            for ((dy, x), &s) in dout.chunks(c).zip(inp.chunks(c)).zip(rstd) {
                for (j, d) in dw.iter_mut().enumerate() {
                    *d += dy[c0 + j] * x[c0 + j] * s;
                }
            }
        });
    }
}

// ----------------------------------------------------------------------------
// RoPE

/// The rotation angles of rotary position embeddings: for each position p and
/// each pair i < HS/2, cos(p * inv_freq[i]) and sin(p * inv_freq[i]).
/// Both tables are (T, HS/2).
pub struct RopeTable {
    pub half: usize,
    pub cos: Vec<f32>,
    pub sin: Vec<f32>,
}

impl RopeTable {
    pub fn new(inv_freq: &[f64], max_pos: usize) -> RopeTable {
        let half = inv_freq.len();
        let mut cos = vec![0.0; max_pos * half];
        let mut sin = vec![0.0; max_pos * half];
        for p in 0..max_pos {
            for (i, f) in inv_freq.iter().enumerate() {
                let a = p as f64 * f;
                cos[p * half + i] = a.cos() as f32;
                sin[p * half + i] = a.sin() as f32;
            }
        }
        RopeTable { half, cos, sin }
    }

    pub fn max_pos(&self) -> usize {
        self.cos.len() / self.half
    }
}

/// Rotates every head of x in place. x is (B, T, H, HS); the row of time t
/// sits at position pos0 + t. Hugging Face's layout ("rotate_half"): element i
/// pairs with element i + HS/2, not with its neighbour.
///   x[i]      <- x[i] cos - x[i+HS/2] sin
///   x[i+HS/2] <- x[i+HS/2] cos + x[i] sin
pub fn rope_forward(x: &mut [f32], rope: &RopeTable, t: usize, h: usize, hs: usize, pos0: usize) {
    rope_rotate(x, rope, t, h, hs, pos0, 1.0);
}

/// Backward of rope_forward: the rotation's transpose, i.e. the rotation by
/// the opposite angle, applied in place to the gradient dx (B, T, H, HS).
pub fn rope_backward(dx: &mut [f32], rope: &RopeTable, t: usize, h: usize, hs: usize) {
    rope_rotate(dx, rope, t, h, hs, 0, -1.0);
}

fn rope_rotate(x: &mut [f32], rope: &RopeTable, t: usize, h: usize, hs: usize, pos0: usize, sign: f32) {
    x.par_chunks_mut(h * hs).enumerate().for_each(|(row, xt)| rotate_row(xt, rope, pos0 + row % t, hs, sign));
}

/// rope_forward with each row's own position: x (N, H, HS), pos (N) (the
/// decoding path, where the rows of a batch stand at different positions).
pub fn rope_forward_at(x: &mut [f32], rope: &RopeTable, pos: &[usize], h: usize, hs: usize) {
    x.par_chunks_mut(h * hs).zip(pos.par_iter()).for_each(|(xt, &p)| rotate_row(xt, rope, p, hs, 1.0));
}

/// One row's heads (H, HS) rotated by position p's angles (times `sign`).
fn rotate_row(xt: &mut [f32], rope: &RopeTable, p: usize, hs: usize, sign: f32) {
    let half = hs / 2;
    let cos = &rope.cos[p * half..(p + 1) * half];
    let sin = &rope.sin[p * half..(p + 1) * half];
    for head in xt.chunks_mut(hs) {
        let (a, b) = head.split_at_mut(half);
        for i in 0..half {
            let (x0, x1) = (a[i], b[i]);
            let s = sign * sin[i];
            a[i] = x0 * cos[i] - x1 * s;
            b[i] = x1 * cos[i] + x0 * s;
        }
    }
}

// ----------------------------------------------------------------------------
// Causal grouped-query attention

/// The dimensions of one attention call. Queries are (B, Tq, NH, HS); keys and
/// values are (B, Tcap, KVH, HS) of which the first Tk rows are filled (Tcap > Tk
/// for a KV cache). Query t sits at position Tk - Tq + t and sees keys 0..=that.
#[derive(Clone, Copy, Debug)]
pub struct AttnDims {
    pub b: usize,
    pub tq: usize,
    pub tk: usize,
    pub tcap: usize,
    pub nh: usize,
    pub kvh: usize,
    pub hs: usize,
}

/// The naive twin of `attention_forward`, one query row at a time with dot
/// products: the clearest statement of what attention computes, and the
/// reference the GEMM version is tested against. Same arguments and results.
#[allow(clippy::too_many_arguments)]
pub fn attention_forward_naive(
    out: &mut [f32],
    lse: &mut [f32],
    q: &[f32],
    k: &[f32],
    v: &[f32],
    d: AttnDims,
    starts: Option<&[usize]>,
) {
    let AttnDims { tq, tk, tcap, nh, kvh, hs, .. } = d;
    let scale = 1.0 / (hs as f32).sqrt();
    let group = nh / kvh;
    // One task per query row (b, t), all heads; `scores` is the task's scratch.
    out.par_chunks_mut(nh * hs).zip(lse.par_chunks_mut(nh)).enumerate().for_each_init(
        || vec![0.0f32; tk],
        |scores, (row, (out_t, lse_t))| {
            let (b, t) = (row / tq, row % tq);
            let pos = tk - tq + t; // causal: keys lo..=pos
            let lo = starts.map_or(0, |s| s[b].min(pos));
            let n_keys = pos + 1 - lo;
            let q_t = &q[row * nh * hs..(row + 1) * nh * hs];
            for h in 0..nh {
                let kv = h / group;
                let qh = &q_t[h * hs..(h + 1) * hs];
                let key = |j: usize| &k[((b * tcap + lo + j) * kvh + kv) * hs..][..hs];
                let val = |j: usize| &v[((b * tcap + lo + j) * kvh + kv) * hs..][..hs];
                let mut max = f32::NEG_INFINITY;
                for (j, s) in scores[..n_keys].iter_mut().enumerate() {
                    *s = dot(qh, key(j)) * scale;
                    max = max.max(*s);
                }
                let mut sum = 0.0f32;
                for s in scores[..n_keys].iter_mut() {
                    *s = (*s - max).exp();
                    sum += *s;
                }
                let o = &mut out_t[h * hs..(h + 1) * hs];
                o.fill(0.0);
                for (j, &p) in scores[..n_keys].iter().enumerate() {
                    axpy(o, p / sum, val(j));
                }
                lse_t[h] = max + sum.ln();
            }
        },
    );
}

/// The naive twin of `attention_backward`: two passes of dot products, each
/// parallel over rows with no shared writes: pass 1 walks the keys of each
/// query (dq), pass 2 walks the queries of each key (dk, dv). Scores are
/// recomputed in each pass instead of stored. Same arguments and results.
#[allow(clippy::too_many_arguments)]
pub fn attention_backward_naive(
    dq: &mut [f32],
    dk: &mut [f32],
    dv: &mut [f32],
    delta: &mut [f32],
    dout: &[f32],
    out: &[f32],
    lse: &[f32],
    q: &[f32],
    k: &[f32],
    v: &[f32],
    d: AttnDims,
) {
    let AttnDims { b: _, tq: t_len, nh, kvh, hs, .. } = d;
    assert!(d.tq == d.tk && d.tk == d.tcap, "attention_backward: training shapes only");
    let scale = 1.0 / (hs as f32).sqrt();
    let group = nh / kvh;
    let qrow = |b: usize, t: usize, h: usize| ((b * t_len + t) * nh + h) * hs;
    let kvrow = |b: usize, t: usize, h: usize| ((b * t_len + t) * kvh + h) * hs;

    // D_t for every (b, t, h).
    delta.par_iter_mut().enumerate().for_each(|(i, dl)| {
        *dl = dot(&dout[i * hs..(i + 1) * hs], &out[i * hs..(i + 1) * hs]);
    });

    // Pass 1: dq, one task per query row (b, t).
    dq.par_chunks_mut(nh * hs).enumerate().for_each(|(row, dq_t)| {
        let (b, t) = (row / t_len, row % t_len);
        for h in 0..nh {
            let kv = h / group;
            let i = (row * nh + h) * hs;
            let (qh, doh) = (&q[i..i + hs], &dout[i..i + hs]);
            let (l, dl) = (lse[row * nh + h], delta[row * nh + h]);
            let dqh = &mut dq_t[h * hs..(h + 1) * hs];
            for j in 0..=t {
                let kj = &k[kvrow(b, j, kv)..][..hs];
                let p = (dot(qh, kj) * scale - l).exp();
                let ds = p * (dot(doh, &v[kvrow(b, j, kv)..][..hs]) - dl);
                axpy(dqh, ds * scale, kj);
            }
        }
    });

    // Pass 2: dk and dv, one task per key row (b, j); each key/value head
    // gathers from every query head of its group and every later time.
    dk.par_chunks_mut(kvh * hs).zip(dv.par_chunks_mut(kvh * hs)).enumerate().for_each(|(row, (dk_j, dv_j))| {
        let (b, j) = (row / t_len, row % t_len);
        for kv in 0..kvh {
            let kj = &k[kvrow(b, j, kv)..][..hs];
            let vj = &v[kvrow(b, j, kv)..][..hs];
            let dkh = &mut dk_j[kv * hs..(kv + 1) * hs];
            let dvh = &mut dv_j[kv * hs..(kv + 1) * hs];
            for h in kv * group..(kv + 1) * group {
                for t in j..t_len {
                    let i = qrow(b, t, h);
                    let (qt, dot_t) = (&q[i..i + hs], &dout[i..i + hs]);
                    let m = (b * t_len + t) * nh + h;
                    let p = (dot(qt, kj) * scale - lse[m]).exp();
                    let ds = p * (dot(dot_t, vj) - delta[m]);
                    axpy(dkh, ds * scale, qt);
                    axpy(dvh, p, dot_t);
                }
            }
        }
    });
}

/// out (B, Tq, NH, HS) = softmax(q k^T / sqrt(HS) + causal mask) v, per head;
/// query head h reads key/value head h / (NH / KVH). Also writes lse
/// (B, Tq, NH), the log-sum-exp of each row of scores: with it the backward
/// pass rebuilds the probabilities, so no (T, T) matrix outlives the call.
///
/// One task per (batch row, head), each three steps on a (Tq, Tk) scratch:
///   S = q_h k_h^T * scale      a GEMM (the full square; the causal half is masked)
///   P = softmax over each row's visible keys, lse saved
///   out_h = P v_h              a GEMM
/// GEMMs, not dot products, because they keep the vector units busy: the
/// naive twin above does the same arithmetic at a tenth of the speed.
///
/// `starts` (B), for left-padded batches in generation: row b's keys before
/// starts[b] are padding and are masked out. (A padding query itself attends
/// only to its own key, which keeps it finite; nothing reads its output.)
#[allow(clippy::too_many_arguments)]
pub fn attention_forward(
    out: &mut [f32],
    lse: &mut [f32],
    q: &[f32],
    k: &[f32],
    v: &[f32],
    d: AttnDims,
    starts: Option<&[usize]>,
) {
    let AttnDims { b, tq, tk, tcap, nh, kvh, hs } = d;
    let scale = 1.0 / (hs as f32).sqrt();
    let group = nh / kvh;
    let (q_rs, kv_rs) = (nh * hs, kvh * hs);
    // Each task returns its head's output (Tq, HS) and lse (Tq); they are
    // scattered into the interleaved (B, Tq, NH, ...) layouts afterwards.
    let heads: Vec<(Vec<f32>, Vec<f32>)> = (0..b * nh)
        .into_par_iter()
        .map_init(
            || vec![0.0f32; tq * tk],
            |s, bh| {
                let (bi, h) = (bh / nh, bh % nh);
                let qh = &q[(bi * tq * nh + h) * hs..];
                let kh = &k[(bi * tcap * kvh + h / group) * hs..];
                let vh = &v[(bi * tcap * kvh + h / group) * hs..];
                let s = &mut s[..tq * tk];
                sgemm(tq, tk, hs, qh, q_rs, 1, kh, 1, kv_rs, s, tk, false);
                let mut lse_h = vec![0.0f32; tq];
                for (t, (row, l)) in s.chunks_mut(tk).zip(lse_h.iter_mut()).enumerate() {
                    let pos = tk - tq + t;
                    let lo = starts.map_or(0, |st| st[bi].min(pos));
                    *l = softmax_visible(row, lo, pos + 1, scale);
                }
                let mut out_h = vec![0.0f32; tq * hs];
                sgemm(tq, hs, tk, s, tk, 1, vh, kv_rs, 1, &mut out_h, hs, false);
                (out_h, lse_h)
            },
        )
        .collect();
    scatter_heads(out, lse, &heads, b, tq, nh, hs);
}

/// The attention of a decoding step: one new query per row over the keys
/// and values that row has seen. q is (R, NH, HS); k and v are a cache of
/// slots (S, KVH, HS), after RoPE; slots[r] lists the slots row r sees, in
/// position order, its own new key last (rows may share slots: beams of one
/// prompt). out (R, NH, HS) = softmax(q_h k^T / sqrt(HS)) v over those slots,
/// per head h, which reads kv head h / (NH / KVH).
///
/// The GPU twin, kernels/decode_attention.cu, computes the same softmax in
/// pieces: it splits each row's slots into ranges, takes the softmax of each
/// range with its log-sum-exp, and merges the pieces by their lse.
#[allow(clippy::too_many_arguments)]
pub fn decode_attention(
    out: &mut [f32],
    q: &[f32],
    k: &[f32],
    v: &[f32],
    slots: &[Vec<u32>],
    nh: usize,
    kvh: usize,
    hs: usize,
) {
    out.par_chunks_mut(nh * hs)
        .zip(q.par_chunks(nh * hs))
        .zip(slots.par_iter())
        .for_each(|((out, qr), slots)| decode_attention_row(out, qr, k, v, slots, nh, kvh, hs));
}

/// One row of `decode_attention`, compiled for the widest vectors this CPU
/// has; with AVX-512 and HS a multiple of 16 the scores come from
/// `x86::scores_avx512`, elsewhere from `scores`.
#[allow(clippy::too_many_arguments)]
fn decode_attention_row(
    out: &mut [f32],
    q: &[f32],
    k: &[f32],
    v: &[f32],
    slots: &[u32],
    nh: usize,
    kvh: usize,
    hs: usize,
) {
    #[cfg(target_arch = "x86_64")]
    {
        if hs.is_multiple_of(16) && hs <= 256 && std::is_x86_feature_detected!("avx512f") {
            // SAFETY: the CPU has AVX-512F.
            return unsafe { decode_attention_row_avx512(out, q, k, v, slots, nh, kvh, hs) };
        }
    }
    decode_attention_heads(out, q, k, v, slots, nh, kvh, hs, scores)
}

#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx512f")]
#[allow(clippy::too_many_arguments)]
fn decode_attention_row_avx512(
    out: &mut [f32],
    q: &[f32],
    k: &[f32],
    v: &[f32],
    s: &[u32],
    nh: usize,
    kvh: usize,
    hs: usize,
) {
    let kernel = |p: &mut [f32], q: &[f32], k: &[f32], s: &[u32], d: ScoreDims| {
        // SAFETY: AVX-512F is enabled here, HS % 16 == 0 was checked.
        unsafe { x86::scores_avx512(p, q, k, s, d) }
    };
    decode_attention_heads(out, q, k, v, s, nh, kvh, hs, kernel)
}

/// The layout `scores` reads: kv head `off / hs` of rows of KVD floats,
/// GROUP query heads of HS, one score per (head, slot) times `scale`.
#[derive(Clone, Copy)]
struct ScoreDims {
    group: usize,
    hs: usize,
    kvd: usize,
    off: usize,
    scale: f32,
}

/// p (GROUP, N) = scale * q_h . key(slots[j]) for the GROUP query heads q
/// (GROUP, HS) that share one kv head.
fn scores(p: &mut [f32], q: &[f32], k: &[f32], slots: &[u32], d: ScoreDims) {
    let n = slots.len();
    for (j, &s) in slots.iter().enumerate() {
        let key = &k[s as usize * d.kvd + d.off..][..d.hs];
        for h in 0..d.group {
            p[h * n + j] = dot(&q[h * d.hs..(h + 1) * d.hs], key) * d.scale;
        }
    }
}

/// out (NH, HS) for one query q (NH, HS) over `slots`. The heads that share a
/// kv head go together, so each cached key and value is read from memory
/// once per kv head rather than once per query head.
#[inline(always)]
#[allow(clippy::too_many_arguments)]
fn decode_attention_heads(
    out: &mut [f32],
    q: &[f32],
    k: &[f32],
    v: &[f32],
    slots: &[u32],
    nh: usize,
    kvh: usize,
    hs: usize,
    scores: impl Fn(&mut [f32], &[f32], &[f32], &[u32], ScoreDims),
) {
    let (group, kvd, n) = (nh / kvh, kvh * hs, slots.len());
    let scale = 1.0 / (hs as f32).sqrt();
    let mut p = vec![0.0f32; group * n]; // (GROUP, N) scores, then probabilities
    let mut sum = vec![0.0f32; group];
    for g in 0..kvh {
        let qg = &q[g * group * hs..(g + 1) * group * hs];
        scores(&mut p, qg, k, slots, ScoreDims { group, hs, kvd, off: g * hs, scale });
        for (ph, sum) in p.chunks_exact_mut(n).zip(sum.iter_mut()) {
            let max = ph.iter().fold(f32::NEG_INFINITY, |m, &x| m.max(x));
            *sum = 0.0;
            ph.iter_mut().for_each(|x| {
                *x = (*x - max).exp();
                *sum += *x;
            });
        }
        let og = &mut out[g * group * hs..(g + 1) * group * hs];
        og.fill(0.0);
        for (j, &s) in slots.iter().enumerate() {
            let val = &v[s as usize * kvd + g * hs..][..hs];
            for (h, oh) in og.chunks_exact_mut(hs).enumerate() {
                axpy(oh, p[h * n + j] / sum[h], val);
            }
        }
    }
}

/// Row of raw scores -> probabilities: entries lo..hi are scaled, shifted by
/// their maximum and exponentiated, the rest zeroed; returns the row's
/// log-sum-exp of the scaled scores.
fn softmax_visible(row: &mut [f32], lo: usize, hi: usize, scale: f32) -> f32 {
    let max = row[lo..hi].iter().fold(f32::NEG_INFINITY, |m, &x| m.max(x * scale));
    let sum = exp_scaled(&mut row[lo..hi], scale, max);
    let inv = 1.0 / sum;
    row[lo..hi].iter_mut().for_each(|x| *x *= inv);
    row[..lo].fill(0.0);
    row[hi..].fill(0.0);
    max + sum.ln()
}

/// x = e^(x * scale - shift) over a row; returns the sum (16 lanes of
/// partial sums). The attention's softmax: by exp_poly, compiled for the
/// widest vectors this CPU has (with libm's expf, a call per score, it was
/// 5% of a LIFT step on SmolLM2).
fn exp_scaled(row: &mut [f32], scale: f32, shift: f32) -> f32 {
    #[cfg(target_arch = "x86_64")]
    {
        if std::is_x86_feature_detected!("avx512f") {
            // SAFETY: the CPU has AVX-512F.
            return unsafe { exp_scaled_avx512(row, scale, shift) };
        }
    }
    exp_scaled_lanes(row, scale, shift)
}

#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx512f")]
fn exp_scaled_avx512(row: &mut [f32], scale: f32, shift: f32) -> f32 {
    exp_scaled_lanes(row, scale, shift)
}

#[inline(always)]
fn exp_scaled_lanes(row: &mut [f32], scale: f32, shift: f32) -> f32 {
    let mut lanes = [0.0f32; 16];
    let mut chunks = row.chunks_exact_mut(16);
    for c in &mut chunks {
        for l in 0..16 {
            c[l] = exp_poly(c[l] * scale - shift);
            lanes[l] += c[l];
        }
    }
    let mut rest = 0.0f32;
    for x in chunks.into_remainder() {
        *x = exp_poly(*x * scale - shift);
        rest += *x;
    }
    lanes.iter().sum::<f32>() + rest
}

/// Per-(batch row, head) results (Tq, HS) and (Tq) into out (B, Tq, NH, HS)
/// and lse (B, Tq, NH).
fn scatter_heads(
    out: &mut [f32],
    lse: &mut [f32],
    heads: &[(Vec<f32>, Vec<f32>)],
    b: usize,
    tq: usize,
    nh: usize,
    hs: usize,
) {
    out.par_chunks_mut(nh * hs).zip(lse.par_chunks_mut(nh)).enumerate().for_each(|(row, (o, l))| {
        let (bi, t) = (row / tq, row % tq);
        for h in 0..nh {
            let (oh, lh) = &heads[bi * nh + h];
            o[h * hs..(h + 1) * hs].copy_from_slice(&oh[t * hs..(t + 1) * hs]);
            l[h] = lh[t];
        }
    });
    debug_assert_eq!(heads.len(), b * nh);
}

/// Backward of attention_forward for training (Tq = Tk = Tcap = T).
/// dout and out are (B, T, NH, HS); dq (B, T, NH, HS), dk and dv
/// (B, T, KVH, HS) are accumulated. `delta` (B, T, NH) receives D below.
///
/// With P rebuilt from lse and D_t = dout_t . out_t, per (batch row, head):
///   dP = dout_h v_h^T             a GEMM (T, T)
///   dS = P * (dP - D_t)           elementwise (zero above the diagonal, as P)
///   dq_h = scale dS k_h           a GEMM
///   dk_h = scale dS^T q_h         a GEMM, summed over the heads of the group
///   dv_h = P^T dout_h             a GEMM, likewise
#[allow(clippy::too_many_arguments)]
pub fn attention_backward(
    dq: &mut [f32],
    dk: &mut [f32],
    dv: &mut [f32],
    delta: &mut [f32],
    dout: &[f32],
    out: &[f32],
    lse: &[f32],
    q: &[f32],
    k: &[f32],
    v: &[f32],
    d: AttnDims,
) {
    let AttnDims { b, tq: t_len, nh, kvh, hs, .. } = d;
    assert!(d.tq == d.tk && d.tk == d.tcap, "attention_backward: training shapes only");
    let scale = 1.0 / (hs as f32).sqrt();
    let group = nh / kvh;
    let (q_rs, kv_rs) = (nh * hs, kvh * hs);
    delta.par_iter_mut().enumerate().for_each(|(i, dl)| {
        *dl = dot(&dout[i * hs..(i + 1) * hs], &out[i * hs..(i + 1) * hs]);
    });
    // Per task: dq_h, dk_h, dv_h, each (T, HS).
    let grads: Vec<[Vec<f32>; 3]> = (0..b * nh)
        .into_par_iter()
        .map_init(
            || (vec![0.0f32; t_len * t_len], vec![0.0f32; t_len * t_len]),
            |(p, ds), bh| {
                let (bi, h) = (bh / nh, bh % nh);
                let qh = &q[(bi * t_len * nh + h) * hs..];
                let doh = &dout[(bi * t_len * nh + h) * hs..];
                let kh = &k[(bi * t_len * kvh + h / group) * hs..];
                let vh = &v[(bi * t_len * kvh + h / group) * hs..];
                let (p, ds) = (&mut p[..t_len * t_len], &mut ds[..t_len * t_len]);
                // P from the saved lse: exp(S * scale - lse) on the causal part.
                sgemm(t_len, t_len, hs, qh, q_rs, 1, kh, 1, kv_rs, p, t_len, false);
                for (t, row) in p.chunks_mut(t_len).enumerate() {
                    exp_scaled(&mut row[..=t], scale, lse[(bi * t_len + t) * nh + h]);
                    row[t + 1..].fill(0.0);
                }
                sgemm(t_len, t_len, hs, doh, q_rs, 1, vh, 1, kv_rs, ds, t_len, false);
                for (t, (drow, prow)) in ds.chunks_mut(t_len).zip(p.chunks(t_len)).enumerate() {
                    let dl = delta[(bi * t_len + t) * nh + h];
                    for (x, &pv) in drow.iter_mut().zip(prow) {
                        *x = pv * (*x - dl) * scale;
                    }
                }
                let mut dqh = vec![0.0f32; t_len * hs];
                let mut dkh = vec![0.0f32; t_len * hs];
                let mut dvh = vec![0.0f32; t_len * hs];
                sgemm(t_len, hs, t_len, ds, t_len, 1, kh, kv_rs, 1, &mut dqh, hs, false);
                sgemm(t_len, hs, t_len, ds, 1, t_len, qh, q_rs, 1, &mut dkh, hs, false);
                sgemm(t_len, hs, t_len, p, 1, t_len, doh, q_rs, 1, &mut dvh, hs, false);
                [dqh, dkh, dvh]
            },
        )
        .collect();
    // Scatter: dq row by row; dk and dv summed over the heads of each group.
    dq.par_chunks_mut(nh * hs).enumerate().for_each(|(row, dqr)| {
        let (bi, t) = (row / t_len, row % t_len);
        for h in 0..nh {
            axpy(&mut dqr[h * hs..(h + 1) * hs], 1.0, &grads[bi * nh + h][0][t * hs..(t + 1) * hs]);
        }
    });
    dk.par_chunks_mut(kvh * hs).zip(dv.par_chunks_mut(kvh * hs)).enumerate().for_each(|(row, (dkr, dvr))| {
        let (bi, t) = (row / t_len, row % t_len);
        for h in 0..nh {
            let kv = h / group;
            let g = &grads[bi * nh + h];
            axpy(&mut dkr[kv * hs..(kv + 1) * hs], 1.0, &g[1][t * hs..(t + 1) * hs]);
            axpy(&mut dvr[kv * hs..(kv + 1) * hs], 1.0, &g[2][t * hs..(t + 1) * hs]);
        }
    });
}

// ----------------------------------------------------------------------------
// SwiGLU

/// gate and up are (N, F); out will be (N, F) = silu(gate) * up,
/// silu(x) = x * sigmoid(x).
pub fn swiglu_forward(out: &mut [f32], gate: &[f32], up: &[f32]) {
    out.par_chunks_mut(4096).zip(gate.par_chunks(4096)).zip(up.par_chunks(4096)).for_each(|((o, g), u)| {
        #[cfg(target_arch = "x86_64")]
        {
            if std::is_x86_feature_detected!("avx512f") {
                // SAFETY: the CPU has AVX-512F.
                return unsafe { swiglu_forward_avx512(o, g, u) };
            }
        }
        swiglu_forward_lanes(o, g, u)
    });
}

#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx512f")]
fn swiglu_forward_avx512(out: &mut [f32], gate: &[f32], up: &[f32]) {
    swiglu_forward_lanes(out, gate, up)
}

#[inline(always)]
fn swiglu_forward_lanes(out: &mut [f32], gate: &[f32], up: &[f32]) {
    for ((o, &g), &u) in out.iter_mut().zip(gate).zip(up) {
        *o = g / (1.0 + exp_poly(-g)) * u;
    }
}

/// 1 / (1 + e^-x), by exp_poly so that loops over it vectorize.
#[inline(always)]
fn sigmoid(x: f32) -> f32 {
    1.0 / (1.0 + exp_poly(-x))
}

/// Backward of swiglu_forward: with s = sigmoid(gate),
///   dup += dout * gate * s,   dgate += dout * up * s * (1 + gate * (1 - s)).
pub fn swiglu_backward(dgate: &mut [f32], dup: &mut [f32], dout: &[f32], gate: &[f32], up: &[f32]) {
    dgate
        .par_chunks_mut(4096)
        .zip(dup.par_chunks_mut(4096))
        .zip(dout.par_chunks(4096))
        .zip(gate.par_chunks(4096).zip(up.par_chunks(4096)))
        .for_each(|(((dg, du), dy), (g, u))| {
            for i in 0..dy.len() {
                let s = sigmoid(g[i]);
                du[i] += dy[i] * g[i] * s;
                dg[i] += dy[i] * u[i] * s * (1.0 + g[i] * (1.0 - s));
            }
        });
}

/// swiglu_backward into fresh gradients, in place: dh (N, F) holds dout and
/// becomes dgate, up (N, F) becomes dup. The backward pass needs no three
/// more (N, F) buffers this way (elementwise, so in place is safe; the
/// values are those of swiglu_backward into zeros).
pub fn swiglu_backward_inplace(dh: &mut [f32], up: &mut [f32], gate: &[f32]) {
    dh.par_chunks_mut(4096).zip(up.par_chunks_mut(4096)).zip(gate.par_chunks(4096)).for_each(|((dy, u), g)| {
        #[cfg(target_arch = "x86_64")]
        {
            if std::is_x86_feature_detected!("avx512f") {
                // SAFETY: the CPU has AVX-512F.
                return unsafe { swiglu_backward_inplace_avx512(dy, u, g) };
            }
        }
        swiglu_backward_inplace_lanes(dy, u, g)
    });
}

#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx512f")]
fn swiglu_backward_inplace_avx512(dh: &mut [f32], up: &mut [f32], gate: &[f32]) {
    swiglu_backward_inplace_lanes(dh, up, gate)
}

#[inline(always)]
fn swiglu_backward_inplace_lanes(dh: &mut [f32], up: &mut [f32], gate: &[f32]) {
    for ((dy, u), &g) in dh.iter_mut().zip(up.iter_mut()).zip(gate) {
        let s = sigmoid(g);
        let du = *dy * g * s;
        *dy = *dy * *u * s * (1.0 + g * (1.0 - s));
        *u = du;
    }
}

// ----------------------------------------------------------------------------
// Residual

/// x (N, C) += y (N, C): the residual stream adds each block's output.
pub fn residual_forward(x: &mut [f32], y: &[f32]) {
    x.par_chunks_mut(4096).zip(y.par_chunks(4096)).for_each(|(x, y)| {
        for (x, y) in x.iter_mut().zip(y) {
            *x += y;
        }
    });
}

// ----------------------------------------------------------------------------
// Cross-entropy

/// logits is (N, V), targets (N) with a negative id for positions that take
/// no part in the loss. Writes losses (N): lse(logits_n) - logits_n[target]
/// or 0 where ignored, and returns their mean over the counted positions
/// (0 when none counts), which is PyTorch's `cross_entropy(ignore_index=-100)`.
pub fn crossentropy_forward(losses: &mut [f32], logits: &[f32], targets: &[i32], v: usize) -> f32 {
    crossentropy_losses(losses, logits, targets, v);
    crossentropy_mean(losses, targets)
}

/// The per-row part of crossentropy_forward, for any R rows: losses (R)
/// from logits (R, V) and targets (R). lm_head.rs calls it chunk by chunk.
pub fn crossentropy_losses(losses: &mut [f32], logits: &[f32], targets: &[i32], v: usize) {
    losses.par_iter_mut().zip(logits.par_chunks(v)).zip(targets.par_iter()).for_each(|((loss, row), &tgt)| {
        *loss = if tgt < 0 { 0.0 } else { logsumexp(row) - row[tgt as usize] };
    });
}

/// Mean of losses (N) over the positions with a target (0 when none has one).
pub fn crossentropy_mean(losses: &[f32], targets: &[i32]) -> f32 {
    let n = targets.iter().filter(|&&t| t >= 0).count();
    if n == 0 {
        return 0.0;
    }
    // Summed in f64 so the mean does not depend on the thread count.
    (losses.iter().map(|&l| l as f64).sum::<f64>() / n as f64) as f32
}

/// Backward of the mean cross-entropy, written over the logits in place:
/// row n becomes (softmax(logits_n) - onehot(target_n)) / count, or zeros for
/// an ignored position. logits is (N, V); it holds dlogits afterwards.
pub fn crossentropy_backward_inplace(logits: &mut [f32], targets: &[i32], v: usize) {
    let n = targets.iter().filter(|&&t| t >= 0).count().max(1);
    crossentropy_backward_rows(logits, targets, v, 1.0 / n as f32);
}

/// The per-row part of crossentropy_backward_inplace, for any R rows of a
/// batch whose counted positions number 1 / inv: logits (R, V) become dlogits.
pub fn crossentropy_backward_rows(logits: &mut [f32], targets: &[i32], v: usize, inv: f32) {
    logits.par_chunks_mut(v).zip(targets.par_iter()).for_each(|(row, &tgt)| {
        if tgt < 0 {
            row.fill(0.0);
            return;
        }
        let l = logsumexp(row);
        softmax_scaled(row, l, inv);
        row[tgt as usize] -= inv;
    });
}

// ----------------------------------------------------------------------------
// Small helpers

/// row = e^(row - lse) * scale: softmax probabilities given the row's
/// log-sum-exp, scaled; vectorized like `logsumexp`.
fn softmax_scaled(row: &mut [f32], lse: f32, scale: f32) {
    #[cfg(target_arch = "x86_64")]
    {
        if std::is_x86_feature_detected!("avx512f") {
            // SAFETY: the CPU has AVX-512F.
            return unsafe { softmax_scaled_avx512(row, lse, scale) };
        }
    }
    softmax_scaled_lanes(row, lse, scale)
}

#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx512f")]
fn softmax_scaled_avx512(row: &mut [f32], lse: f32, scale: f32) {
    softmax_scaled_lanes(row, lse, scale)
}

#[inline(always)]
fn softmax_scaled_lanes(row: &mut [f32], lse: f32, scale: f32) {
    for x in row.iter_mut() {
        *x = exp_poly(*x - lse) * scale;
    }
}

/// log(sum(exp(x))), shifted by the maximum so it cannot overflow. Over a
/// 128K vocabulary one running f32 sum would lose ~1e-5 (and, as a single
/// dependency chain, run at a fraction of the speed), so blocks of 256 are
/// summed in sixteen f32 lanes and the block sums added in f64; compiled for
/// the widest vectors this CPU has.
pub fn logsumexp(x: &[f32]) -> f32 {
    #[cfg(target_arch = "x86_64")]
    {
        if std::is_x86_feature_detected!("avx512f") {
            // SAFETY: the CPU has AVX-512F.
            return unsafe { logsumexp_avx512(x) };
        }
        if std::is_x86_feature_detected!("avx2") {
            // SAFETY: the CPU has AVX2.
            return unsafe { logsumexp_avx2(x) };
        }
    }
    logsumexp_lanes(x)
}

#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx512f")]
fn logsumexp_avx512(x: &[f32]) -> f32 {
    logsumexp_lanes(x)
}

#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx2")]
fn logsumexp_avx2(x: &[f32]) -> f32 {
    logsumexp_lanes(x)
}

/// logsumexp over 16 lanes of f32 partial sums per block of 256, the blocks
/// summed in f64; the exponentials by `exp_poly`, so the loop vectorizes.
#[inline(always)]
fn logsumexp_lanes(x: &[f32]) -> f32 {
    let max = x.iter().fold(f32::NEG_INFINITY, |m, &v| m.max(v));
    if max == f32::NEG_INFINITY {
        return max;
    }
    let mut total = 0.0f64;
    for block in x.chunks(256) {
        let mut lanes = [0.0f32; 16];
        let chunks = block.chunks_exact(16);
        let rest: f32 = chunks.remainder().iter().map(|&v| exp_poly(v - max)).sum();
        for c in chunks {
            for l in 0..16 {
                lanes[l] += exp_poly(c[l] - max);
            }
        }
        total += lanes.iter().map(|&v| v as f64).sum::<f64>() + rest as f64;
    }
    (max as f64 + total.ln()) as f32
}

/// e^x in f32 by arithmetic alone, so that a loop over it vectorizes (libm's
/// expf is a call per element): x = n ln 2 + r with |r| <= ln 2 / 2, e^r by
/// Cephes' degree-7 polynomial, 2^n put into the exponent bits. Within 2e-7
/// relative of the exact value for x in [-87.3, 88]; 0 below (e^-inf = 0),
/// e^88 above; NaN stays NaN.
///
/// No float-to-int conversion: Rust's `as i32` saturates (NaN to 0), which
/// LLVM compiled to scalar code with a NaN test per element, so the "vector"
/// loops over this ran at 3.6 ns per element (libm's speed). Rounding by
/// adding 1.5 * 2^23 and building 2^n from the low mantissa bits of
/// 2^23 + n + 127 are plain float and bit operations (and give the bits the
/// `as i32` version gave, for every one of 44 million sampled inputs).
#[inline(always)]
pub fn exp_poly(x: f32) -> f32 {
    const LO: f32 = -87.33654;
    const ROUND: f32 = 12_582_912.0; // 1.5 * 2^23: x + ROUND - ROUND is x rounded to an integer
    const BIAS: f32 = 8_388_735.0; // 2^23 + 127: its low mantissa bits hold n + 127
    let xc = x.clamp(LO, 88.0);
    let t = xc * std::f32::consts::LOG2_E + 0.5;
    let rounded = (t + ROUND) - ROUND;
    let n = if rounded > t { rounded - 1.0 } else { rounded }; // floor(t), in [-126, 127]
    let r = xc - n * 0.693_359_4 - n * -2.121_944_4e-4;
    let p = ((((1.987_569_1e-4 * r + 1.398_199_9e-3) * r + 8.333_452e-3) * r + 4.166_579_6e-2) * r + 1.666_666_5e-1)
        * r
        + 0.5;
    let y = p * r * r + r + 1.0;
    let scale = f32::from_bits((n + BIAS).to_bits() << 23); // 2^n
    if x < LO {
        0.0
    } else if x.is_nan() {
        x
    } else {
        y * scale
    }
}

#[inline]
pub fn dot(a: &[f32], b: &[f32]) -> f32 {
    // The same loop compiled for the widest vectors this CPU has (checked
    // once, cached by std). The 32 partial sums are independent lanes, so the
    // width changes the speed, not one bit of the result.
    #[cfg(target_arch = "x86_64")]
    {
        if std::is_x86_feature_detected!("avx512f") {
            // SAFETY: the CPU has AVX-512F.
            return unsafe { dot_avx512(a, b) };
        }
        if std::is_x86_feature_detected!("avx2") {
            // SAFETY: the CPU has AVX2.
            return unsafe { dot_avx2(a, b) };
        }
    }
    dot_lanes(a, b)
}

#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx512f")]
fn dot_avx512(a: &[f32], b: &[f32]) -> f32 {
    dot_lanes(a, b)
}

#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx2")]
fn dot_avx2(a: &[f32], b: &[f32]) -> f32 {
    dot_lanes(a, b)
}

#[inline(always)]
fn dot_lanes(a: &[f32], b: &[f32]) -> f32 {
    // Four independent vectors of eight partial sums: a single accumulator
    // would make every multiply-add wait for the previous one (4 cycles);
    // four keep both FMA units busy.
    let n = a.len().min(b.len());
    let (a, b) = (&a[..n], &b[..n]);
    let mut acc = [0.0f32; 32];
    let (ca, cb) = (a.chunks_exact(32), b.chunks_exact(32));
    let (ra, rb) = (ca.remainder(), cb.remainder());
    for (x, y) in ca.zip(cb) {
        for l in 0..32 {
            acc[l] += x[l] * y[l];
        }
    }
    let mut s8 = [0.0f32; 8];
    for l in 0..8 {
        s8[l] = (acc[l] + acc[l + 8]) + (acc[l + 16] + acc[l + 24]);
    }
    let mut s = ((s8[0] + s8[4]) + (s8[1] + s8[5])) + ((s8[2] + s8[6]) + (s8[3] + s8[7]));
    for (x, y) in ra.iter().zip(rb) {
        s += x * y;
    }
    s
}

/// y += alpha * x
#[inline]
pub fn axpy(y: &mut [f32], alpha: f32, x: &[f32]) {
    for (y, x) in y.iter_mut().zip(x) {
        *y += alpha * x;
    }
}

/// Vector kernels: the decode steps' attention scores, the sampled dW's dot
/// products and its transposes.
#[cfg(target_arch = "x86_64")]
mod x86 {
    use super::{ScoreDims, Transposed};
    use std::arch::x86_64::*;

    /// Slots ahead whose keys are fetched while this one is scored.
    const PREFETCH: usize = 8;

    /// `super::scores` with 16-lane vectors: each key (HS / 16 vectors,
    /// HS <= 256) is loaded once and scored against every head of the group
    /// by fused multiply-adds, then summed across its lanes.
    ///
    /// # Safety
    /// The CPU must have AVX-512F; d.hs % 16 == 0 and d.hs <= 256.
    #[target_feature(enable = "avx512f")]
    pub unsafe fn scores_avx512(p: &mut [f32], q: &[f32], k: &[f32], slots: &[u32], d: ScoreDims) {
        let (n, nv) = (slots.len(), d.hs / 16);
        assert!(d.hs.is_multiple_of(16) && nv <= 16 && q.len() >= d.group * d.hs && p.len() >= d.group * n);
        let mut key = [_mm512_setzero_ps(); 16];
        for (j, &s) in slots.iter().enumerate() {
            let row = &k[s as usize * d.kvd + d.off..][..d.hs];
            if let Some(&ahead) = slots.get(j + PREFETCH) {
                let at = k.as_ptr().wrapping_add(ahead as usize * d.kvd + d.off);
                for c in (0..d.hs).step_by(16) {
                    _mm_prefetch::<_MM_HINT_T0>(at.wrapping_add(c) as *const i8);
                }
            }
            for (c, kv) in key[..nv].iter_mut().enumerate() {
                // SAFETY: row holds HS = 16 * nv floats.
                *kv = unsafe { _mm512_loadu_ps(row.as_ptr().add(16 * c)) };
            }
            for h in 0..d.group {
                let qh = &q[h * d.hs..(h + 1) * d.hs];
                let mut acc = _mm512_setzero_ps();
                for (c, kv) in key[..nv].iter().enumerate() {
                    // SAFETY: qh holds HS floats.
                    acc = _mm512_fmadd_ps(unsafe { _mm512_loadu_ps(qh.as_ptr().add(16 * c)) }, *kv, acc);
                }
                p[h * n + j] = _mm512_reduce_add_ps(acc) * d.scale;
            }
        }
    }

    /// `super::sampled_dots` with 16-lane fused multiply-adds. Runs of up
    /// to four entries in the same row i of dW share every load of
    /// dout^T's row (dot4); the rest go one at a time (dot1).
    ///
    /// # Safety
    /// The CPU must have AVX-512F.
    #[target_feature(enable = "avx512f")]
    pub unsafe fn sampled_dots_avx512(g: &mut [f32], idx: &[u32], t: Transposed) {
        let (len, ic) = (t.len, t.ic);
        assert!(g.len() >= idx.len());
        let mut e = 0;
        while e < idx.len() {
            let i = idx[e] as usize / ic;
            let row = i * ic..(i + 1) * ic;
            let run = 1 + (1..4).take_while(|&m| idx.get(e + m).is_some_and(|&f| row.contains(&(f as usize)))).count();
            let a = &t.dout_t[(i - t.row0) * len..][..len];
            let b = |m: usize| &t.inp_t[(idx[e + m] as usize - row.start) * len..][..len];
            if run == 4 {
                // SAFETY: the CPU has AVX-512F; all five rows hold len floats.
                let s = unsafe { dot4(a, [b(0), b(1), b(2), b(3)]) };
                for (m, s) in s.into_iter().enumerate() {
                    g[e + m] += s;
                }
            } else {
                for m in 0..run {
                    // SAFETY: as above.
                    g[e + m] += unsafe { dot1(a, b(m)) };
                }
            }
            e += run;
        }
    }

    /// The lanes of x below len - at (all 16 when len - at >= 16).
    #[inline(always)]
    fn tail_mask(len: usize, at: usize) -> __mmask16 {
        if len - at >= 16 { 0xffff } else { ((1u32 << (len - at)) - 1) as __mmask16 }
    }

    /// Four dot products of a with b[0..4] (all of a's length): a's vectors
    /// loaded once, two accumulators per product (8 FMA chains in flight).
    #[target_feature(enable = "avx512f")]
    unsafe fn dot4(a: &[f32], b: [&[f32]; 4]) -> [f32; 4] {
        let len = a.len();
        assert!(b.iter().all(|r| r.len() == len));
        let (pa, pb) = (a.as_ptr(), b.map(<[f32]>::as_ptr));
        let mut s = [_mm512_setzero_ps(); 8];
        let mut x = 0;
        // SAFETY (every load): x + 32 <= len, or a mask below len - x.
        while x + 32 <= len {
            let (a0, a1) = unsafe { (_mm512_loadu_ps(pa.add(x)), _mm512_loadu_ps(pa.add(x + 16))) };
            for k in 0..4 {
                s[k] = _mm512_fmadd_ps(a0, unsafe { _mm512_loadu_ps(pb[k].add(x)) }, s[k]);
                s[k + 4] = _mm512_fmadd_ps(a1, unsafe { _mm512_loadu_ps(pb[k].add(x + 16)) }, s[k + 4]);
            }
            x += 32;
        }
        while x < len {
            let m = tail_mask(len, x);
            let a0 = unsafe { _mm512_maskz_loadu_ps(m, pa.add(x)) };
            for k in 0..4 {
                s[k] = _mm512_fmadd_ps(a0, unsafe { _mm512_maskz_loadu_ps(m, pb[k].add(x)) }, s[k]);
            }
            x += 16;
        }
        [0, 1, 2, 3].map(|k| _mm512_reduce_add_ps(_mm512_add_ps(s[k], s[k + 4])))
    }

    /// One dot product of two rows of equal length, four accumulators.
    #[target_feature(enable = "avx512f")]
    unsafe fn dot1(a: &[f32], b: &[f32]) -> f32 {
        let len = a.len();
        assert_eq!(b.len(), len);
        let (pa, pb) = (a.as_ptr(), b.as_ptr());
        let mut s = [_mm512_setzero_ps(); 4];
        let mut x = 0;
        // SAFETY (every load): x + 64 <= len, or a mask below len - x.
        while x + 64 <= len {
            for (k, acc) in s.iter_mut().enumerate() {
                let (u, v) = unsafe { (_mm512_loadu_ps(pa.add(x + 16 * k)), _mm512_loadu_ps(pb.add(x + 16 * k))) };
                *acc = _mm512_fmadd_ps(u, v, *acc);
            }
            x += 64;
        }
        while x < len {
            let m = tail_mask(len, x);
            let (u, v) = unsafe { (_mm512_maskz_loadu_ps(m, pa.add(x)), _mm512_maskz_loadu_ps(m, pb.add(x))) };
            s[0] = _mm512_fmadd_ps(u, v, s[0]);
            x += 16;
        }
        _mm512_reduce_add_ps(_mm512_add_ps(_mm512_add_ps(s[0], s[1]), _mm512_add_ps(s[2], s[3])))
    }

    /// Rows 0..R/16*16 of out's 16 rows `rows` (16, R): columns c0..c0+16
    /// of inp (R, C), transposed 16 x 16 at a time in registers.
    ///
    /// # Safety
    /// The CPU must have AVX-512F.
    #[target_feature(enable = "avx512f")]
    pub unsafe fn transpose_tiles_avx512(rows: &mut [f32], inp: &[f32], r: usize, c: usize, c0: usize) {
        assert!(c0 + 16 <= c && inp.len() >= r * c && rows.len() >= 16 * r);
        for r0 in (0..r / 16 * 16).step_by(16) {
            // SAFETY: rows r0..r0+16 of inp hold columns c0..c0+16, and
            // rows 0..16 of out columns r0..r0+16 (the asserts).
            unsafe { transpose_tile(inp.as_ptr().add(r0 * c + c0), c, rows.as_mut_ptr().add(r0), r) };
        }
    }

    /// dst[k * ds + i] = src[i * ss + k] for i, k < 16: four rounds of
    /// shuffles (2 rows of 1 float, of 2 floats, of 4 floats, of 8 floats).
    #[target_feature(enable = "avx512f")]
    unsafe fn transpose_tile(src: *const f32, ss: usize, dst: *mut f32, ds: usize) {
        // SAFETY: the caller's; 16 rows of 16 floats at both ends.
        let mut r: [__m512; 16] = std::array::from_fn(|i| unsafe { _mm512_loadu_ps(src.add(i * ss)) });
        let mut t = [_mm512_setzero_ps(); 16];
        for i in 0..8 {
            // lanes (a0 b0 a1 b1) per 128-bit block of rows a, b = 2i, 2i + 1
            t[2 * i] = _mm512_unpacklo_ps(r[2 * i], r[2 * i + 1]);
            t[2 * i + 1] = _mm512_unpackhi_ps(r[2 * i], r[2 * i + 1]);
        }
        for i in 0..4 {
            // r[4i + k]: column k + 4L of rows 4i..4i+4 in block L
            r[4 * i] = _mm512_shuffle_ps::<0x44>(t[4 * i], t[4 * i + 2]);
            r[4 * i + 1] = _mm512_shuffle_ps::<0xEE>(t[4 * i], t[4 * i + 2]);
            r[4 * i + 2] = _mm512_shuffle_ps::<0x44>(t[4 * i + 1], t[4 * i + 3]);
            r[4 * i + 3] = _mm512_shuffle_ps::<0xEE>(t[4 * i + 1], t[4 * i + 3]);
        }
        for i in 0..2 {
            for k in 0..4 {
                t[8 * i + k] = _mm512_shuffle_f32x4::<0x88>(r[8 * i + k], r[8 * i + 4 + k]);
                t[8 * i + 4 + k] = _mm512_shuffle_f32x4::<0xDD>(r[8 * i + k], r[8 * i + 4 + k]);
            }
        }
        for k in 0..8 {
            // r[k]: column k of all 16 rows, in order
            r[k] = _mm512_shuffle_f32x4::<0x88>(t[k], t[k + 8]);
            r[k + 8] = _mm512_shuffle_f32x4::<0xDD>(t[k], t[k + 8]);
        }
        for (k, v) in r.iter().enumerate() {
            // SAFETY: the caller's.
            unsafe { _mm512_storeu_ps(dst.add(k * ds), *v) };
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn pseudo(n: usize, seed: u32) -> Vec<f32> {
        (0..n)
            .map(|i| (((i as u32).wrapping_mul(2654435761).wrapping_add(seed) >> 8) % 1000) as f32 / 500.0 - 1.0)
            .collect()
    }

    /// `dot` agrees with f64 dot products on lengths around the 32-lane
    /// blocks, and whichever vector width it runs at, it returns exactly the
    /// portable loop's bits.
    #[test]
    fn dot_matches_f64_and_the_portable_loop() {
        for n in [0, 1, 31, 32, 33, 64, 100, 1216] {
            let (a, b) = (pseudo(n, 5), pseudo(n, 6));
            let want: f64 = a.iter().zip(&b).map(|(x, y)| *x as f64 * *y as f64).sum();
            let got = dot(&a, &b);
            assert!((got as f64 - want).abs() < 1e-5 * (n as f64).max(1.0), "n {n}: {got} vs {want}");
            assert_eq!(got.to_bits(), dot_lanes(&a, &b).to_bits(), "n {n}");
        }
    }

    /// exp_poly against f64's exp over the whole range a softmax feeds it,
    /// and its edges; logsumexp and the cross-entropy gradient's softmax
    /// against f64 on a vocabulary-sized row.
    #[test]
    fn exp_poly_and_logsumexp_match_f64() {
        let mut worst = 0.0f64;
        for i in 0..=200_000 {
            let x = -87.0 + 175.0 * i as f32 / 200_000.0;
            let (got, want) = (exp_poly(x) as f64, (x as f64).exp());
            worst = worst.max((got - want).abs() / want);
        }
        assert!(worst < 3e-7, "exp_poly: worst relative error {worst:e}");
        assert_eq!(exp_poly(f32::NEG_INFINITY), 0.0);
        assert_eq!(exp_poly(-100.0), 0.0);
        assert_eq!(exp_poly(0.0), 1.0);
        assert!(exp_poly(f32::NAN).is_nan());
        let row: Vec<f32> = pseudo(49_157, 9).iter().map(|v| v * 12.0).collect();
        let max = row.iter().fold(f32::NEG_INFINITY, |m, &v| m.max(v)) as f64;
        let want = max + row.iter().map(|&v| (v as f64 - max).exp()).sum::<f64>().ln();
        let got = logsumexp(&row) as f64;
        assert!((got - want).abs() < 2e-6 * want.abs().max(1.0), "logsumexp {got} vs {want}");
        let mut p = row.clone();
        softmax_scaled(&mut p, got as f32, 0.5);
        for (&q, &v) in p.iter().zip(&row) {
            let w = 0.5 * (v as f64 - want).exp();
            assert!((q as f64 - w).abs() <= 1e-6 * w + 1e-12, "softmax {q} vs {w}");
        }
    }

    /// The sampled dW equals the same entries of dout^T @ inp computed by a
    /// plain triple loop in f64, on shapes that are not multiples of any
    /// block size, by the dispatching op and by the portable loop; with two
    /// weights of different widths reading one input, as the trainer calls it.
    #[test]
    fn sampled_weight_gradient_matches_naive_product() {
        // Shapes on no block size; a mask that leaves rows 40..90 empty and
        // spans several of the parallel tasks; an empty mask; N over two
        // blocks of SAMPLED_COLS with runs of 1 to 4+ entries per row; OC
        // over many bands of 16 rows.
        type Case = (usize, usize, usize, fn(u32) -> bool); // N, IC, OC, which entries
        let masks: [Case; 5] = [
            (37, 29, 41, |i| i % 7 == 3 || i % 11 == 0),
            (19, 150, 100, |i| (i % 13 == 1 || i % 5 == 0) && !(40 * 150..90 * 150).contains(&i)),
            (5, 70, 40, |_| false),
            (1100, 23, 17, |i| i % 23 < (i / 23) % 6),
            (600, 40, 333, |i| i % 9 == 2 || i % 31 == 0),
        ];
        let naive = |dout: &[f32], inp: &[f32], n: usize, ic: usize, oc: usize, flat: u32| {
            let (i, j) = (flat as usize / ic, flat as usize % ic);
            let terms = (0..n).map(|r| dout[r * oc + i] as f64 * inp[r * ic + j] as f64);
            terms.fold((0.5, 0.5), |(s, a), x| (s + x, a + x.abs()))
        };
        for (n, ic, oc, keep) in masks {
            let (dout, inp) = (pseudo(n * oc, 1), pseudo(n * ic, 2));
            let indices: Vec<u32> = (0..(oc * ic) as u32).filter(|&i| keep(i)).collect();
            // a second weight on the same input: 7 rows, every third entry
            let (oc2, dout2) = (7, pseudo(n * 7, 4));
            let indices2: Vec<u32> = (0..(7 * ic) as u32).filter(|i| i % 3 == 0).collect();
            let (mut got, mut got2) = (vec![0.5f32; indices.len()], vec![0.5f32; indices2.len()]);
            let mut scratch = vec![0.0; SAMPLED_COLS.min(n) * (ic + oc.max(oc2))];
            let mut outs = [
                Sampled { dsel: &mut got, indices: &indices, dout: &dout, oc },
                Sampled { dsel: &mut got2, indices: &indices2, dout: &dout2, oc: oc2 },
            ];
            matmul_backward_weight_sampled(&mut outs, &inp, n, ic, &mut scratch);
            let mut portable = vec![0.5f32; indices.len()];
            for n0 in (0..n).step_by(SAMPLED_COLS) {
                let len = SAMPLED_COLS.min(n - n0);
                let (mut s1, mut s2) = (vec![0.0; oc * len], vec![0.0; ic * len]);
                transpose(&mut s1, &dout[n0 * oc..(n0 + len) * oc], len, oc);
                transpose(&mut s2, &inp[n0 * ic..(n0 + len) * ic], len, ic);
                sampled_dots_portable(
                    &mut portable,
                    &indices,
                    Transposed { dout_t: &s1, row0: 0, inp_t: &s2, len, ic },
                );
            }
            for ((g, p), &flat) in got.iter().zip(&portable).zip(&indices) {
                let (want, size) = naive(&dout, &inp, n, ic, oc, flat);
                for (what, v) in [("op", g), ("portable", p)] {
                    let err = (*v as f64 - want).abs();
                    assert!(err < 1e-6 * size, "{what} {n}x{ic}x{oc} entry {flat}: {v} vs {want}");
                }
            }
            for (g, &flat) in got2.iter().zip(&indices2) {
                let (want, size) = naive(&dout2, &inp, n, ic, oc2, flat);
                assert!((*g as f64 - want).abs() < 1e-6 * size, "second weight {n}x{ic}x7 entry {flat}: {g} vs {want}");
            }
        }
    }

    /// Both the register tiles and the scalar edges: shapes below, at and
    /// off multiples of 16.
    #[test]
    fn transpose_matches_definition() {
        for (r, c) in [(45, 70), (16, 16), (33, 48), (7, 5), (100, 17), (0, 20), (20, 0)] {
            let x = pseudo(r * c, 3);
            let mut t = vec![0.0; r * c];
            transpose(&mut t, &x, r, c);
            for i in 0..r {
                for j in 0..c {
                    assert_eq!(t[j * r + i], x[i * c + j], "{r}x{c} at ({i}, {j})");
                }
            }
        }
    }

    fn attn_inputs(d: AttnDims, seed: u32) -> (Vec<f32>, Vec<f32>, Vec<f32>) {
        let q = pseudo(d.b * d.tq * d.nh * d.hs, seed);
        let k = pseudo(d.b * d.tcap * d.kvh * d.hs, seed + 1);
        let v = pseudo(d.b * d.tcap * d.kvh * d.hs, seed + 2);
        (q, k, v)
    }

    /// The GEMM attention equals its naive twin: training shapes (GQA), a KV
    /// cache with fewer queries than keys, and left-padded rows.
    #[test]
    fn attention_forward_matches_naive_twin() {
        let cases = [
            (AttnDims { b: 2, tq: 37, tk: 37, tcap: 37, nh: 6, kvh: 2, hs: 16 }, None),
            (AttnDims { b: 2, tq: 3, tk: 20, tcap: 24, nh: 4, kvh: 4, hs: 8 }, None),
            (AttnDims { b: 2, tq: 9, tk: 9, tcap: 12, nh: 2, kvh: 1, hs: 8 }, Some(vec![0usize, 4])),
        ];
        for (d, starts) in cases {
            let (q, k, v) = attn_inputs(d, 11);
            let n = d.b * d.tq;
            let (mut o1, mut l1) = (vec![0.0; n * d.nh * d.hs], vec![0.0; n * d.nh]);
            let (mut o2, mut l2) = (o1.clone(), l1.clone());
            attention_forward(&mut o1, &mut l1, &q, &k, &v, d, starts.as_deref());
            attention_forward_naive(&mut o2, &mut l2, &q, &k, &v, d, starts.as_deref());
            for (a, b) in o1.iter().zip(&o2).chain(l1.iter().zip(&l2)) {
                assert!((a - b).abs() < 1e-5, "{d:?}: {a} vs {b}");
            }
        }
    }

    #[test]
    fn attention_backward_matches_naive_twin() {
        let d = AttnDims { b: 2, tq: 29, tk: 29, tcap: 29, nh: 6, kvh: 2, hs: 16 };
        let (q, k, v) = attn_inputs(d, 5);
        let n = d.b * d.tq;
        let (mut out, mut lse) = (vec![0.0; n * d.nh * d.hs], vec![0.0; n * d.nh]);
        attention_forward(&mut out, &mut lse, &q, &k, &v, d, None);
        let dout = pseudo(out.len(), 9);
        let grads = |naive: bool| {
            let (mut dq, mut dk, mut dv) = (vec![0.1; q.len()], vec![0.2; k.len()], vec![0.3; v.len()]);
            let mut delta = vec![0.0; n * d.nh];
            let f = if naive { attention_backward_naive } else { attention_backward };
            f(&mut dq, &mut dk, &mut dv, &mut delta, &dout, &out, &lse, &q, &k, &v, d);
            [dq, dk, dv]
        };
        for (a, b) in grads(false).iter().zip(grads(true).iter()) {
            for (x, y) in a.iter().zip(b) {
                assert!((x - y).abs() < 1e-5, "{x} vs {y}");
            }
        }
    }

    /// Softmax attention of one query per row over the row's slots, in f64:
    /// the reference for `decode_attention`. out (R, NH, HS).
    fn decode_attention_f64(
        q: &[f32],
        k: &[f32],
        v: &[f32],
        rows: &[Vec<u32>],
        nh: usize,
        kvh: usize,
        hs: usize,
    ) -> Vec<f64> {
        let (group, kvd) = (nh / kvh, kvh * hs);
        let mut out = vec![0.0f64; rows.len() * nh * hs];
        for (r, slots) in rows.iter().enumerate() {
            for h in 0..nh {
                let (qh, off) = (&q[(r * nh + h) * hs..][..hs], (h / group) * hs);
                let s: Vec<f64> = slots
                    .iter()
                    .map(|&j| (0..hs).map(|i| qh[i] as f64 * k[j as usize * kvd + off + i] as f64).sum::<f64>())
                    .map(|x| x / (hs as f64).sqrt())
                    .collect();
                let max = s.iter().cloned().fold(f64::NEG_INFINITY, f64::max);
                let e: Vec<f64> = s.iter().map(|x| (x - max).exp()).collect();
                let sum: f64 = e.iter().sum();
                for (&j, p) in slots.iter().zip(&e) {
                    for i in 0..hs {
                        out[(r * nh + h) * hs + i] += p / sum * v[j as usize * kvd + off + i] as f64;
                    }
                }
            }
        }
        out
    }

    /// Decode attention, through the vector kernel where this CPU has one and
    /// through the portable scores always, against f64: rows that share
    /// slots (beams), slots out of pool order, HS that the 16-lane kernel
    /// takes (64, 128) and one it leaves to the portable loop (24).
    #[test]
    fn decode_attention_matches_f64() {
        for (nh, kvh, hs) in [(9, 3, 64), (4, 4, 128), (6, 2, 24)] {
            let slots = 40;
            let (q, k, v) = (pseudo(3 * nh * hs, 1), pseudo(slots * kvh * hs, 2), pseudo(slots * kvh * hs, 3));
            let rows: Vec<Vec<u32>> = vec![(0..17).collect(), (0..17).chain([30, 5, 39]).collect(), vec![7]];
            let want = decode_attention_f64(&q, &k, &v, &rows, nh, kvh, hs);
            let mut got = vec![f32::NAN; want.len()];
            decode_attention(&mut got, &q, &k, &v, &rows, nh, kvh, hs);
            let mut portable = vec![f32::NAN; want.len()];
            for (r, slots) in rows.iter().enumerate() {
                let (o, qr) = (&mut portable[r * nh * hs..][..nh * hs], &q[r * nh * hs..][..nh * hs]);
                decode_attention_heads(o, qr, &k, &v, slots, nh, kvh, hs, scores);
            }
            for (i, e) in want.iter().enumerate() {
                for (name, x) in [("decode_attention", got[i]), ("portable scores", portable[i])] {
                    assert!((x as f64 - e).abs() < 1e-5, "{name} NH {nh} KVH {kvh} HS {hs}, entry {i}: {x} vs {e}");
                }
            }
        }
    }
}
