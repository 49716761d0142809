//! Principal weights: which entries of each linear weight LIFT trains.
//!
//! For a weight W (out x in, row-major f32) LIFT keeps the k entries with the
//! largest magnitude in W_r, the best rank-r approximation of W (r = filter
//! rank, paper: 32-128). This file is that one idea, in the order it happens:
//!
//!   budget_k            how many entries: k from --density or --rank
//!   filter_rank         --filter-rank, validated and capped at min(out, in)
//!   low_rank_approx     W_r, exactly (f64 eigen-decomposition, the reference)
//!                       or by randomized subspace iteration (production)
//!   top_k_abs           the k largest |W_r[i,j]|, by radix select, no sort
//!   principal_mask      the two together
//!   magnitude_mask,     the ablations the paper argues against: top-k of |W|
//!   random_mask         and k uniformly random entries
//!
//! A mask is a `Vec<u32>` of flat indices i * in + j, sorted ascending.
//! Letters: out, in (the weight's shape), m = min(out, in) (the smaller side),
//! n = max(out, in), r (filter rank), q = r + oversampling (sketch width),
//! k (selected entries).
//!
//! Why W_r needs only U_r: W_r = U_r S_r V_r^T = U_r U_r^T W, the projection of
//! W onto its top-r left singular vectors (or W V_r V_r^T on the right side).
//! Both routes below compute an orthonormal basis of that subspace and project.

use crate::rng::Rng;
use anyhow::{Result, bail};
use rayon::prelude::*;

use crate::cpu::sgemm;

/// Which end of the scores a mask takes (`--select`).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, serde::Serialize, serde::Deserialize, clap::ValueEnum)]
#[serde(rename_all = "lowercase")]
pub enum Select {
    /// The k largest scores (the paper's LIFT and magnitude masks).
    #[default]
    Largest,
    /// The k smallest: what the authors' released `lift_sparse` mask type
    /// selects at their HEAD (an ablation).
    Smallest,
}

// ----------------------------------------------------------------------------
// Budgets: how many entries each weight trains

/// The size of the trainable set of one weight.
#[derive(Clone, Copy, Debug, PartialEq)]
pub enum Budget {
    /// `--density d`: k = round(d * out * in), 0 < d <= 1 (paper: 0.05).
    Density(f64),
    /// `--rank R`: as many entries as a rank-R LoRA adapter has parameters,
    /// k = min((out + in) * R, out * in) (the paper's "LoRA-equivalent" budget).
    Rank(usize),
}

/// k, the number of entries to select in an out x in weight under a budget.
/// Note how the rank budget scales: R = 128 is 6.25% of a 4096 x 4096 weight
/// but 44% of a 576 x 576 one.
pub fn budget_k(out: usize, inp: usize, b: Budget) -> Result<usize> {
    let n = out * inp;
    match b {
        Budget::Density(d) => {
            // written so that NaN fails too
            if !(d > 0.0 && d <= 1.0) {
                bail!("--density {d} is out of range (0, 1]");
            }
            // (a density small enough to round to k = 0 selects nothing)
            Ok(((d * n as f64).round() as usize).min(n))
        }
        Budget::Rank(r) => {
            if r == 0 {
                bail!("--rank 0 is out of range (must be at least 1)");
            }
            Ok((out + inp).saturating_mul(r).min(n))
        }
    }
}

/// The filter rank to use for an out x in weight: `requested` capped at
/// min(out, in), where W_r = W. Returns (rank, whether it was capped) so that
/// the caller can say so; a filter rank of 0 is an error.
pub fn filter_rank(out: usize, inp: usize, requested: usize) -> Result<(usize, bool)> {
    if requested == 0 {
        bail!("--filter-rank 0 is out of range (must be at least 1)");
    }
    let m = out.min(inp);
    Ok((requested.min(m), requested > m))
}

// ----------------------------------------------------------------------------
// Dense f64 building blocks for the exact path

/// Dot product with eight independent partial sums: floating-point addition
/// is not associative, so the compiler only vectorizes a reduction that we
/// have split into lanes ourselves.
fn dot_f64(a: &[f64], b: &[f64]) -> f64 {
    let mut acc = [0.0f64; 8];
    let (a8, a_rest) = a.split_at(a.len() / 8 * 8);
    let (b8, b_rest) = b.split_at(a8.len());
    for (x, y) in a8.chunks_exact(8).zip(b8.chunks_exact(8)) {
        for l in 0..8 {
            acc[l] += x[l] * y[l];
        }
    }
    let mut sum: f64 = acc.iter().sum();
    for (x, y) in a_rest.iter().zip(b_rest) {
        sum += x * y;
    }
    sum
}

/// n zeros, written now by this thread. `vec![0.0; n]` of a large n maps
/// the kernel's shared zero page, and a sum into it (+=) then faults twice
/// per page, the second time a copy-on-write that interrupts every thread
/// to flush its TLB: a fifth of the mask selection's time on a 2-core Xeon.
fn zeros(n: usize) -> Vec<f64> {
    let mut v = Vec::with_capacity(n);
    v.resize(n, 0.0);
    v
}

/// y is (rows, q) row-major (f32 or f64); returns G = Y^T Y, (q, q), in f64.
/// Products of f32 values are exact in f64, so G is as accurate as f64 sums
/// allow. Y^T Y is a sum of outer products of rows; four rows are added in one
/// sweep over G (upper triangle) so that each G entry is loaded once per four
/// multiply-adds. Fixed-size row ranges are summed separately in parallel and
/// their partial G added in order: the result does not depend on the number
/// of threads. The partials are one buffer made by the calling thread: made
/// inside the tasks (q*q f64 each, 2.6 MB at q = 576, six of them for a
/// 576 x 1536 weight), they were freed into the worker threads' allocator
/// arenas, which kept them resident as slack through the training peak.
fn gram_of_columns<T: Copy + Into<f64> + Sync>(y: &[T], rows: usize, q: usize) -> Vec<f64> {
    const BLOCK: usize = 4;
    const ROWS_PER_TASK: usize = 256;
    let mut partials = zeros(rows.div_ceil(ROWS_PER_TASK) * q * q);
    partials.par_chunks_mut((q * q).max(1)).zip(y[..rows * q].par_chunks(ROWS_PER_TASK * q)).for_each(|(g, part)| {
        let mut blk = vec![0.0f64; BLOCK * q]; // four rows, zero-padded
        for rows4 in part.chunks(BLOCK * q) {
            blk.fill(0.0);
            for (d, &s) in blk.iter_mut().zip(rows4) {
                *d = s.into();
            }
            let (y0, rest) = blk.split_at(q);
            let (y1, rest) = rest.split_at(q);
            let (y2, y3) = rest.split_at(q);
            for a in 0..q {
                let (c0, c1, c2, c3) = (y0[a], y1[a], y2[a], y3[a]);
                let ga = &mut g[a * q + a..(a + 1) * q];
                for (t, gab) in ga.iter_mut().enumerate() {
                    let b = a + t;
                    *gab += c0 * y0[b] + c1 * y1[b] + c2 * y2[b] + c3 * y3[b];
                }
            }
        }
    });
    let mut g = zeros(q * q);
    for part in partials.chunks((q * q).max(1)) {
        g.iter_mut().zip(part).for_each(|(x, y)| *x += y);
    }
    for a in 0..q {
        for b in 0..a {
            g[a * q + b] = g[b * q + a];
        }
    }
    g
}

/// a is (m, k), b is (k, n), both row-major f64; returns C = A B, (m, n).
/// Row i of C is a sum of rows of B scaled by a[i, :] (axpy form: the inner
/// loop runs along contiguous rows and vectorizes). Four rows of C are built
/// together so that each row of B, once loaded, is used four times.
fn matmul_f64(a: &[f64], b: &[f64], m: usize, k: usize, n: usize) -> Vec<f64> {
    const ROWS: usize = 4;
    let mut c = zeros(m * n);
    c.par_chunks_mut(ROWS * n).enumerate().for_each(|(blk, cb)| {
        let i0 = blk * ROWS;
        let rows = cb.len() / n;
        for p in 0..k {
            let bp = &b[p * n..(p + 1) * n];
            for t in 0..rows {
                let aip = a[(i0 + t) * k + p];
                if aip != 0.0 {
                    for (cij, bpj) in cb[t * n..(t + 1) * n].iter_mut().zip(bp) {
                        *cij += aip * bpj;
                    }
                }
            }
        }
    });
    c
}

/// a is (m, n); returns A^T, (n, m).
fn transpose<T: Copy + Default + Send + Sync>(a: &[T], m: usize, n: usize) -> Vec<T> {
    let mut t = vec![T::default(); m * n];
    t.par_chunks_mut(m).enumerate().for_each(|(j, tj)| {
        for (i, tji) in tj.iter_mut().enumerate() {
            *tji = a[i * n + j];
        }
    });
    t
}

// ----------------------------------------------------------------------------
// Symmetric eigen-decomposition: Householder tridiagonalization, then the
// implicit QL algorithm on the tridiagonal matrix. Written from the math
// (Golub & Van Loan, Matrix Computations, 8.3; Wilkinson's shift).
//
// We want only the top r eigenvectors of an m x m matrix, r often much less
// than m. The textbook algorithm accumulates every QL rotation into a full
// m x m matrix (about 6 m^3 flops) and the reflectors into another. Instead,
// we run QL once without vectors, recording its rotations (about m^2 of them),
// see where the r largest eigenvalues ended up, and replay the rotations
// backwards on just those r unit vectors, then apply the Householder
// reflectors to them: O(m^2 r) instead of O(m^3).

/// One Givens rotation of the QL sweep, acting on coordinates (i, i+1).
struct Rotation {
    i: u32,
    c: f64,
    s: f64,
}

/// a is a symmetric (m, m) matrix, overwritten. Reduces it to tridiagonal form
/// T = Q^T A Q with Q = H_0 H_1 ... H_{m-3}, H_k = I - beta_k v_k v_k^T acting
/// on coordinates k+1..m. Returns (diagonal d (m), off-diagonal e (m), e[i]
/// couples i and i+1, e[m-1] = 0, betas (m)); v_k is left in row k of `a`,
/// columns k+1..m, which no later step touches.
fn tridiagonalize(a: &mut [f64], m: usize) -> (Vec<f64>, Vec<f64>, Vec<f64>) {
    let mut d = vec![0.0f64; m];
    let mut e = vec![0.0f64; m];
    let mut betas = vec![0.0f64; m];
    let mut p = vec![0.0f64; m];
    for k in 0..m {
        d[k] = a[k * m + k];
        if k + 2 >= m {
            // the last 2x2 block is already tridiagonal
            if k + 1 < m {
                e[k] = a[k * m + k + 1];
            }
            continue;
        }
        // The column below the diagonal, x = A[k+1.., k], is row k to the
        // right of it by symmetry, and contiguous there.
        let (top, rest) = a.split_at_mut((k + 1) * m);
        let x = &mut top[k * m + k + 1..(k + 1) * m];
        let len = x.len();
        let tail: f64 = x[1..].iter().map(|v| v * v).sum();
        if tail == 0.0 {
            e[k] = x[0]; // nothing to annihilate: H_k = I, beta_k = 0
            continue;
        }
        // Householder vector v = x - alpha e_1 with alpha = -sign(x0) |x|, so
        // that no cancellation happens in v0; beta = 2 / v^T v.
        let sigma = (x[0] * x[0] + tail).sqrt();
        let alpha = if x[0] >= 0.0 { -sigma } else { sigma };
        let beta = 1.0 / (sigma * (sigma + x[0].abs()));
        x[0] -= alpha;
        e[k] = alpha;
        betas[k] = beta;
        let v: &[f64] = x;

        // A22 <- H A22 H = A22 - v w^T - w v^T, with p = beta A22 v and
        // w = p - (beta/2)(p^T v) v. A22 is rows k+1.., columns k+1.. .
        let p = &mut p[..len];
        p.par_iter_mut().zip(rest.par_chunks(m)).with_min_len(64).for_each(|(pi, row)| {
            *pi = beta * dot_f64(&row[k + 1..], v);
        });
        let half_beta_pv = 0.5 * beta * dot_f64(p, v);
        for (pi, vi) in p.iter_mut().zip(v) {
            *pi -= half_beta_pv * vi; // p is now w
        }
        let w: &[f64] = p;
        rest.par_chunks_mut(m).enumerate().with_min_len(64).for_each(|(i, row)| {
            let (vi, wi) = (v[i], w[i]);
            for ((aij, vj), wj) in row[k + 1..].iter_mut().zip(v).zip(w) {
                *aij -= vi * wj + wi * vj;
            }
        });
    }
    (d, e, betas)
}

/// Implicit QL with Wilkinson shifts on the symmetric tridiagonal matrix
/// (d, e), in place: on return d holds the eigenvalues, in no particular
/// order. Every rotation applied is appended to `rotations`: the eigenvector
/// matrix of T is Z = R_1 R_2 ... R_N (Z <- Z R_t for each rotation in turn).
/// Gives up on a block after 60 sweeps, which only non-finite input needs.
fn tridiagonal_ql(d: &mut [f64], e: &mut [f64], rotations: &mut Vec<Rotation>) {
    let m = d.len();
    for l in 0..m {
        let mut sweeps = 0;
        loop {
            // Find the first negligible off-diagonal at or after l: the block
            // l..=end is unreduced and d[l] converges at its top.
            let mut end = l;
            while end + 1 < m && e[end].abs() > f64::EPSILON * (d[end].abs() + d[end + 1].abs()) {
                end += 1;
            }
            if end == l || sweeps == 60 {
                break;
            }
            sweeps += 1;
            // Wilkinson shift from the top 2x2 block, folded into the first
            // rotation: g = d[end] - shift (implicitly).
            // sqrt(a^2 + b^2) rather than hypot: hypot guards against
            // overflow that eigenvalues of a Gram matrix of weights never
            // reach (|x| < 1e150), and costs several times more.
            let mut g = (d[l + 1] - d[l]) / (2.0 * e[l]);
            let mut r = (g * g + 1.0).sqrt();
            g = d[end] - d[l] + e[l] / (g + r.copysign(g));
            let (mut s, mut c, mut p) = (1.0f64, 1.0f64, 0.0f64);
            let mut deflated = false;
            // Chase the bulge from the bottom of the block to its top.
            for i in (l..end).rev() {
                let f = s * e[i];
                let b = c * e[i];
                r = (f * f + g * g).sqrt();
                e[i + 1] = r;
                if r == 0.0 {
                    // underflow: the block splits here, start over on it
                    d[i + 1] -= p;
                    e[end] = 0.0;
                    deflated = true;
                    break;
                }
                s = f / r;
                c = g / r;
                g = d[i + 1] - p;
                r = (d[i] - g) * s + 2.0 * c * b;
                p = s * r;
                d[i + 1] = g + p;
                g = c * r - b;
                rotations.push(Rotation { i: i as u32, c, s });
            }
            if deflated {
                continue;
            }
            d[l] -= p;
            e[l] = g;
            e[end] = 0.0;
        }
    }
}

/// The r largest eigenvalues of a symmetric (m, m) matrix `a` (consumed) and
/// their eigenvectors. Returns (values (r), descending; vectors (r, m), row t
/// the unit eigenvector of values[t]).
pub fn sym_eigen_top(mut a: Vec<f64>, m: usize, r: usize) -> (Vec<f64>, Vec<f64>) {
    let r = r.min(m);
    let (mut d, mut e, betas) = tridiagonalize(&mut a, m);
    let mut rotations = Vec::with_capacity(2 * m * m);
    tridiagonal_ql(&mut d, &mut e, &mut rotations);

    // Which diagonal positions hold the r largest eigenvalues (ties to the
    // lower position, so the choice is deterministic).
    let mut order: Vec<usize> = (0..m).collect();
    order.sort_by(|&x, &y| d[y].total_cmp(&d[x]).then(x.cmp(&y)));
    order.truncate(r);
    let values: Vec<f64> = order.iter().map(|&j| d[j]).collect();

    // Eigenvector t of A is Q z with z = Z e_j = R_1 (R_2 (... (R_N e_j))).
    // LANES vectors travel together, interleaved (z[coordinate][lane]), so
    // each rotation and each reflector is one short vectorizable loop over
    // lanes; blocks of LANES vectors are independent rayon tasks.
    const LANES: usize = 8;
    let mut vectors = vec![0.0f64; r * m];
    vectors.par_chunks_mut(LANES * m).enumerate().for_each(|(blk, out)| {
        let lanes = out.len() / m;
        let mut z = vec![[0.0f64; LANES]; m];
        for lane in 0..lanes {
            z[order[blk * LANES + lane]][lane] = 1.0;
        }
        // R_t v, coordinates (i, i+1): (c v_i + s v_{i+1}, c v_{i+1} - s v_i)
        for rot in rotations.iter().rev() {
            let i = rot.i as usize;
            let (zi, zi1) = (z[i], z[i + 1]);
            for lane in 0..LANES {
                z[i][lane] = rot.c * zi[lane] + rot.s * zi1[lane];
                z[i + 1][lane] = rot.c * zi1[lane] - rot.s * zi[lane];
            }
        }
        // Q z = H_0 (H_1 (... (H_{m-3} z))): H_k z = z - beta v (v^T z)
        for k in (0..m.saturating_sub(2)).rev() {
            let beta = betas[k];
            if beta == 0.0 {
                continue;
            }
            let v = &a[k * m + k + 1..(k + 1) * m];
            let zk = &mut z[k + 1..];
            let mut dots = [0.0f64; LANES];
            for (vi, zi) in v.iter().zip(zk.iter()) {
                for lane in 0..LANES {
                    dots[lane] += vi * zi[lane];
                }
            }
            for (vi, zi) in v.iter().zip(zk.iter_mut()) {
                for lane in 0..LANES {
                    zi[lane] -= beta * dots[lane] * vi;
                }
            }
        }
        for lane in 0..lanes {
            for (i, zi) in z.iter().enumerate() {
                out[lane * m + i] = zi[lane];
            }
        }
    });
    (values, vectors)
}

// ----------------------------------------------------------------------------
// The exact rank-r approximation

/// The smaller side of W as f64 rows: A = W (out x in) when out <= in,
/// otherwise A = W^T (in x out). A is (m, n), m = min(out, in), so that its
/// Gram matrix A A^T is the small one, (m, m).
struct SmallSide {
    a: Vec<f64>,
    m: usize,
    n: usize,
    transposed: bool,
}

impl SmallSide {
    fn of(w: &[f32], out: usize, inp: usize) -> SmallSide {
        let w64: Vec<f64> = w.par_iter().map(|&x| x as f64).collect();
        if out <= inp {
            SmallSide { a: w64, m: out, n: inp, transposed: false }
        } else {
            SmallSide { a: transpose(&w64, out, inp), m: inp, n: out, transposed: true }
        }
    }
}

/// The top-r singular values of A (m, n) and an orthonormal basis P (r, m) of
/// its top-r left singular subspace, from the eigen-decomposition of
/// G = A A^T = U S^2 U^T.
///
/// Why the Gram matrix and not one-sided Jacobi on A: the Gram route costs
/// m^2 n / 2 multiply-adds for G, 2/3 m^3 for the tridiagonalization and
/// O(m^2 r) for the vectors (about 0.1 s on a 576 x 1536 weight, 2 cores,
/// where LAPACK's full SVD through numpy takes 0.3 s), while one-sided Jacobi
/// needs about 3 m^2 n flops per sweep and 6-10 sweeps, an order of magnitude
/// more, with all of it in rotations of long rows. The price is
/// accuracy for *small* singular values (the squaring doubles their relative
/// error, sigma_min loses precision below about 1e-8 sigma_1 in f64), which
/// the top-r subspace of a weight matrix never needs. The products of f32
/// inputs are exact in f64, so G itself is accurate to f64 rounding.
fn top_left_singular(side: &SmallSide, r: usize) -> (Vec<f64>, Vec<f64>) {
    let at = transpose(&side.a, side.m, side.n); // (n, m)
    let g = gram_of_columns(&at, side.n, side.m); // A A^T = (A^T)^T A^T
    let (values, p) = sym_eigen_top(g, side.m, r);
    let sigma = values.iter().map(|&l| l.max(0.0).sqrt()).collect();
    (sigma, p)
}

/// The top r singular triplets of W (out x in) by the exact path, in f64:
/// (U (r, out), sigma (r), V (r, in)), row i of U and of V the i-th left and
/// right singular vectors, sigma descending (r capped at min(out, in)). The
/// sign of each pair (u_i, v_i) is the eigensolver's; u_i sigma_i v_i^T is
/// not affected by it. A zero singular value gets zero vectors on the
/// side derived from the other.
pub fn svd_top(w: &[f32], out: usize, inp: usize, r: usize) -> (Vec<f64>, Vec<f64>, Vec<f64>) {
    check_shape(w, out, inp);
    let side = SmallSide::of(w, out, inp);
    let (m, n) = (side.m, side.n);
    let (sigma, p) = top_left_singular(&side, r.min(m)); // p (r, m): the small side's vectors
    let r = sigma.len();
    let mut pa = matmul_f64(&p, &side.a, r, m, n); // (r, n) = diag(sigma) times the other side's vectors
    for (row, &s) in pa.chunks_mut(n).zip(&sigma) {
        let inv = if s > 0.0 { 1.0 / s } else { 0.0 };
        row.iter_mut().for_each(|x| *x *= inv);
    }
    if side.transposed { (pa, sigma, p) } else { (p, sigma, pa) }
}

/// The same triplets from the randomized range of `randomized_range` (q = r
/// columns, `iters` power iterations, the seed's sketch): W ~ Q Q^T W, whose
/// SVD is Q times the exact SVD of the small Q^T W (r, in).
pub fn svd_top_randomized(
    w: &[f32],
    out: usize,
    inp: usize,
    r: usize,
    iters: usize,
    seed: u64,
) -> (Vec<f64>, Vec<f64>, Vec<f64>) {
    check_shape(w, out, inp);
    let r = r.min(out).min(inp);
    let q = randomized_range(w, out, inp, r, iters, seed); // (out, r), orthonormal columns
    let mut b = vec![0.0f32; r * inp];
    sgemm(r, inp, out, &q, 1, r, w, inp, 1, &mut b, inp, false); // B = Q^T W (r, in)
    let (ub, sigma, v) = svd_top(&b, r, inp, r); // ub (r, r): rows = left vectors of B
    let q64: Vec<f64> = q.iter().map(|&x| x as f64).collect();
    // u_i = Q ub_i: U (r, out) = ub (r, r) @ Q^T
    let qt = transpose(&q64, out, r); // (r, out)
    let u = matmul_f64(&ub, &qt, sigma.len(), r, out);
    (u, sigma, v)
}

/// The r largest singular values of W (out x in), descending, by the exact
/// path (r is capped at min(out, in)).
pub fn singular_values(w: &[f32], out: usize, inp: usize, r: usize) -> Vec<f64> {
    check_shape(w, out, inp);
    if r.min(out).min(inp) == 0 {
        return Vec::new();
    }
    let side = SmallSide::of(w, out, inp);
    top_left_singular(&side, r.min(side.m)).0
}

/// W_r exactly: W (out x in), rank r < min(out, in); returns W_r (out x in).
/// With P (r, m) the top-r basis of the small side A (m, n):
/// A_r = P^T (P A), then W_r = A_r or A_r^T.
fn low_rank_exact(w: &[f32], out: usize, inp: usize, r: usize) -> Vec<f32> {
    let side = SmallSide::of(w, out, inp);
    let (m, n) = (side.m, side.n);
    let (_, p) = top_left_singular(&side, r);
    let pa = matmul_f64(&p, &side.a, r, m, n); // (r, n)
    let pt = transpose(&p, r, m); // (m, r)
    let a_r = matmul_f64(&pt, &pa, m, r, n); // (m, n)
    if side.transposed {
        transpose(&a_r, m, n).into_iter().map(|x| x as f32).collect()
    } else {
        a_r.into_iter().map(|x| x as f32).collect()
    }
}

// ----------------------------------------------------------------------------
// The randomized rank-r approximation (Halko, Martinsson, Tropp 2011,
// algorithms 4.4 and 5.1), all products through `cpu::sgemm`.

/// One pass of Cholesky-QR: Y (rows, q) row-major f32 is overwritten with
/// Y R^{-1}, where G = Y^T Y = R^T R. The result spans the same space and is
/// orthonormal up to an error of about eps32 * cond(Y) (from rounding R^{-1}
/// and the product to f32): the Gram matrix and the factor are f64, where
/// products of f32 are exact, so even cond(Y) ~ 1e5 is safe. (Forming G in
/// f32 would square cond(Y) into an f32 error and break down near 1e3; power
/// iterates of LLM weights reach a few hundred.) A second pass (CholQR2)
/// starts from cond ~ 1 and leaves Y orthonormal to f32 precision.
/// A column that depends on the earlier ones (relative residual below 1e-5,
/// e.g. when W has rank < q) becomes zero instead of amplified noise, so
/// Y Y^T stays the projector onto the span.
fn cholesky_qr(y: &mut [f32], rows: usize, q: usize) {
    let g = gram_of_columns(y, rows, q); // (q, q)
    let x = cholesky_inverse_transpose(&g, q); // (q, q), R^{-1}, upper triangular
    let y0 = y.to_vec();
    sgemm(rows, q, q, &y0, q, 1, &x, q, 1, y, q, false);
}

/// g is a symmetric positive semi-definite (q, q) matrix. Computes its
/// Cholesky factor G = L L^T, skipping (zeroing) the pivots that are
/// negligible, and returns X = L^{-T} (q, q) as f32, with zero rows and
/// columns for the skipped pivots.
fn cholesky_inverse_transpose(g: &[f64], q: usize) -> Vec<f32> {
    const DROP: f64 = 1e-10; // squared relative residual: 1e-5 in norm
    let mut l = vec![0.0f64; q * q];
    let mut kept = vec![false; q];
    for j in 0..q {
        let lj = &l[j * q..j * q + j];
        let dj = g[j * q + j] - dot_f64(lj, lj);
        // false for NaN too (non-finite weights): such a column is dropped
        let independent = dj > 0.0 && dj > DROP * g[j * q + j];
        if !independent {
            continue;
        }
        kept[j] = true;
        let ljj = dj.sqrt();
        l[j * q + j] = ljj;
        for i in j + 1..q {
            let s = g[i * q + j] - dot_f64(&l[i * q..i * q + j], &l[j * q..j * q + j]);
            l[i * q + j] = s / ljj;
        }
    }
    // M = L^{-1} by forward substitution, column by column; X = M^T.
    let mut x = vec![0.0f32; q * q];
    let mut col = vec![0.0f64; q];
    for c in 0..q {
        if !kept[c] {
            continue;
        }
        col.fill(0.0);
        col[c] = 1.0 / l[c * q + c];
        for i in c + 1..q {
            if kept[i] {
                let s = dot_f64(&l[i * q + c..i * q + i], &col[c..i]);
                col[i] = -s / l[i * q + i];
            }
        }
        // column c of M is row c of X
        for i in c..q {
            x[c * q + i] = col[i] as f32;
        }
    }
    x
}

/// An orthonormal basis Q (out, q) of the dominant q-dimensional column space
/// of W (out x in): Q = orth((W W^T)^iters W Omega), Omega (in, q) Gaussian.
/// Each power iteration multiplies the weight of singular direction j by
/// sigma_j^2, so directions beyond q fade like (sigma_{q+1} / sigma_r)^(2 iters + 1).
/// Multiplying raw iterates would let sigma_1 swamp the small directions in
/// f32, so every half-step is orthonormalized. There one Cholesky-QR pass is
/// enough, since only the span must survive, not exact orthonormality; the
/// final Q gets a second pass, because B = Q^T W assumes Q^T Q = I.
fn randomized_range(w: &[f32], out: usize, inp: usize, q: usize, iters: usize, seed: u64) -> Vec<f32> {
    let mut omega = vec![0.0f32; inp * q]; // (in, q)
    Rng::new(seed).fill_normal(&mut omega);
    let mut y = vec![0.0f32; out * q]; // (out, q)
    sgemm(out, q, inp, w, inp, 1, &omega, q, 1, &mut y, q, false); // Y = W Omega
    cholesky_qr(&mut y, out, q);
    let z = &mut omega; // (in, q), reused
    for _ in 0..iters {
        sgemm(inp, q, out, w, 1, inp, &y, q, 1, z, q, false); // Z = W^T Y
        cholesky_qr(z, inp, q);
        sgemm(out, q, inp, w, inp, 1, z, q, 1, &mut y, q, false); // Y = W Z
        cholesky_qr(&mut y, out, q);
    }
    cholesky_qr(&mut y, out, q); // CholQR2: orthonormal to f32 precision
    y
}

/// W_r by randomized subspace iteration; rank r, sketch width q = r + oversample
/// < min(out, in). With Q (out, q) from `randomized_range`:
///   B = Q^T W            (q, in)
///   B B^T = U_B S^2 U_B^T, keep the top r: U_B^T is (r, q)
///   W_r = (Q U_B) (U_B^T B)     (out, r) x (r, in)
fn low_rank_randomized(w: &[f32], out: usize, inp: usize, r: usize, q: usize, iters: usize, seed: u64) -> Vec<f32> {
    let qm = randomized_range(w, out, inp, q, iters, seed);
    let mut b = vec![0.0f32; q * inp];
    sgemm(q, inp, out, &qm, 1, q, w, inp, 1, &mut b, inp, false); // B = Q^T W
    let bt = transpose(&b, q, inp); // (in, q)
    let (_, ub_t) = sym_eigen_top(gram_of_columns(&bt, inp, q), q, r); // (r, q), from B B^T
    let ub_t: Vec<f32> = ub_t.into_iter().map(|x| x as f32).collect();
    let mut coef = vec![0.0f32; r * inp];
    sgemm(r, inp, q, &ub_t, q, 1, &b, inp, 1, &mut coef, inp, false); // U_B^T B (r, in)
    let mut basis = vec![0.0f32; out * r];
    sgemm(out, r, q, &qm, q, 1, &ub_t, 1, q, &mut basis, r, false); // Q U_B (out, r)
    let mut w_r = vec![0.0f32; out * inp];
    sgemm(out, inp, r, &basis, r, 1, &coef, inp, 1, &mut w_r, inp, false);
    w_r
}

// ----------------------------------------------------------------------------
// The public face of the low-rank step

/// How W_r is computed.
#[derive(Clone, Copy, Debug, PartialEq)]
pub enum Approx {
    /// The true SVD, in f64: the reference.
    Exact,
    /// Randomized subspace iteration with q = r + oversample columns and
    /// `power_iters` rounds of W W^T; falls back to `Exact` when q >= min(out, in).
    Randomized { oversample: usize, power_iters: usize, seed: u64 },
}

impl Approx {
    /// The production setting: `DEFAULT_OVERSAMPLE`, `DEFAULT_POWER_ITERS`, seed 0.
    pub const DEFAULT: Approx =
        Approx::Randomized { oversample: DEFAULT_OVERSAMPLE, power_iters: DEFAULT_POWER_ITERS, seed: 0 };
}

/// The default `--filter-rank` (the paper uses 32-128).
pub const DEFAULT_FILTER_RANK: usize = 128;
/// The default `--density` (the paper's "top 5%").
pub const DEFAULT_DENSITY: f64 = 0.05;

/// Default sketch columns beyond r, and power iterations: q = r + 128 with
/// 12 iterations. LLM weight spectra are flat (sigma_r / sigma_{r+1} is
/// 1.001-1.03 on SmolLM2), so the sketch converges to the top-q subspace
/// slowly and r must sit well inside it; with these settings the masks of
/// all 210 SmolLM2-135M weights agree with the exact-SVD masks on at least
/// 99.85% of entries at r = 32 and r = 128 (tests/lift_select.rs checks
/// layers 0, 15 and 29). The randomized path costs O(out in q iters) in f32
/// GEMMs, the exact one O(m^2 n + m^3) in f64: exact is cheaper on the CPU
/// up to about 1024 on the smaller side (method::CPU_EXACT_UP_TO).
pub const DEFAULT_OVERSAMPLE: usize = 128;
/// See `DEFAULT_OVERSAMPLE`.
pub const DEFAULT_POWER_ITERS: usize = 12;

fn check_shape(w: &[f32], out: usize, inp: usize) {
    assert_eq!(w.len(), out * inp, "weight has {} values, expected {out} x {inp}", w.len());
    assert!(out * inp <= 1 << 32, "a {out} x {inp} weight is too large for u32 mask indices");
}

/// W_r, the rank-r approximation of W (out x in); returns (out x in).
/// r >= min(out, in) gives W itself; r = 0 gives zeros.
pub fn low_rank_approx(w: &[f32], out: usize, inp: usize, r: usize, how: Approx) -> Vec<f32> {
    check_shape(w, out, inp);
    let m = out.min(inp);
    if r >= m {
        return w.to_vec();
    }
    if r == 0 {
        return vec![0.0; out * inp];
    }
    match how {
        Approx::Randomized { oversample, power_iters, seed } if r + oversample < m => {
            low_rank_randomized(w, out, inp, r, r + oversample, power_iters, seed)
        }
        _ => low_rank_exact(w, out, inp, r),
    }
}

// ----------------------------------------------------------------------------
// Selection

/// The flat indices (sorted ascending) of the k entries with the largest
/// |scores|, ties broken toward the smaller index; k <= scores.len().
///
/// Radix select instead of a sort: |x| of an f32 is ordered like its bit
/// pattern read as an integer (sign bit cleared), so the k-th largest score
/// is found from two histograms, of the high 16 bits and then of the low 16
/// bits within the one high bucket that holds it. That gives the exact
/// threshold value T and how many scores lie above it; a last pass keeps
/// every score above T and, of those equal to T, the first ones in index
/// order. Every pass is O(n) and parallel; nothing of size n is allocated
/// but the answer. (NaN, whose bits lie above +inf, counts as largest.)
pub fn top_k_abs(scores: &[f32], k: usize) -> Vec<u32> {
    select_k_abs(scores, k, Select::Largest)
}

/// The k largest |scores| (`Largest`) or the k smallest (`Smallest`), as
/// ascending flat indices, ties to the smaller index either way. Smallest
/// is largest on the key 0x7FFFFFFF - key: the order of |x| reversed, its
/// ties kept.
pub fn select_k_abs(scores: &[f32], k: usize, which: Select) -> Vec<u32> {
    let n = scores.len();
    assert!(k <= n, "top_k_abs: k = {k} exceeds the {n} scores");
    assert!(n <= 1 << 32, "top_k_abs: {n} scores do not fit u32 indices");
    if k == 0 {
        return Vec::new();
    }
    if k == n {
        return (0..n as u32).collect();
    }
    let flip = if which == Select::Smallest { 0x7FFF_FFFF } else { 0 };
    let key = |x: f32| (x.to_bits() & 0x7FFF_FFFF) ^ flip;
    const CHUNK: usize = 1 << 16;

    // Histogram of key >> 16 over all scores (per-task histograms, summed).
    let hist = |select: &(dyn Fn(u32) -> Option<usize> + Sync)| -> Vec<u64> {
        scores
            .par_chunks(CHUNK)
            .fold(
                || vec![0u64; 1 << 16],
                |mut h, chunk| {
                    for &x in chunk {
                        if let Some(b) = select(key(x)) {
                            h[b] += 1;
                        }
                    }
                    h
                },
            )
            .reduce(
                || vec![0u64; 1 << 16],
                |mut a, b| {
                    a.iter_mut().zip(&b).for_each(|(x, y)| *x += y);
                    a
                },
            )
    };
    // The bucket that holds the k-th largest, counting down from the top;
    // returns (bucket, how many lie in higher buckets).
    let find = |h: &[u64], need: u64| -> (usize, u64) {
        let mut above = 0u64;
        for b in (0..h.len()).rev() {
            if above + h[b] >= need {
                return (b, above);
            }
            above += h[b];
        }
        unreachable!("the histogram holds at least `need` entries")
    };
    let h_hi = hist(&|kx| Some((kx >> 16) as usize));
    let (hi, above_hi) = find(&h_hi, k as u64);
    let h_lo = hist(&|kx| ((kx >> 16) as usize == hi).then_some((kx & 0xFFFF) as usize));
    let (lo, above_lo) = find(&h_lo, k as u64 - above_hi);
    let threshold = ((hi as u32) << 16) | lo as u32;
    let ties_needed = k as u64 - above_hi - above_lo; // >= 1

    // Split the equal-to-threshold quota over chunks in index order, then
    // collect each chunk's selection in parallel.
    let ties_per_chunk: Vec<u64> =
        scores.par_chunks(CHUNK).map(|c| c.iter().filter(|&&x| key(x) == threshold).count() as u64).collect();
    let mut quota = Vec::with_capacity(ties_per_chunk.len());
    let mut left = ties_needed;
    for t in ties_per_chunk {
        quota.push(t.min(left));
        left -= t.min(left);
    }
    let parts: Vec<Vec<u32>> = scores
        .par_chunks(CHUNK)
        .zip(quota)
        .enumerate()
        .map(|(c, (chunk, mut ties))| {
            let base = (c * CHUNK) as u32;
            let mut sel = Vec::new();
            for (i, &x) in chunk.iter().enumerate() {
                let kx = key(x);
                if kx > threshold || (kx == threshold && ties > 0) {
                    if kx == threshold {
                        ties -= 1;
                    }
                    sel.push(base + i as u32);
                }
            }
            sel
        })
        .collect();
    let mut out = Vec::with_capacity(k);
    for p in parts {
        out.extend_from_slice(&p);
    }
    debug_assert_eq!(out.len(), k);
    out
}

/// LIFT's principal weights of W (out x in): the k largest entries of |W_r|,
/// r = filter_rank (validate it with `filter_rank` first; r >= min(out, in)
/// means W itself). Sorted ascending flat indices.
pub fn principal_mask(w: &[f32], out: usize, inp: usize, k: usize, filter_rank: usize, how: Approx) -> Vec<u32> {
    principal_mask_of(w, out, inp, k, filter_rank, how, Select::Largest)
}

/// principal_mask taking the k largest or the k smallest |W_r|.
pub fn principal_mask_of(
    w: &[f32],
    out: usize,
    inp: usize,
    k: usize,
    filter_rank: usize,
    how: Approx,
    which: Select,
) -> Vec<u32> {
    assert!(filter_rank > 0, "principal_mask: filter rank 0 (validate with select::filter_rank)");
    select_k_abs(&low_rank_approx(w, out, inp, filter_rank, how), k, which)
}

/// The `magnitude` ablation: the k largest |W| entries, no rank reduction.
pub fn magnitude_mask(w: &[f32], k: usize) -> Vec<u32> {
    top_k_abs(w, k)
}

/// The `random` ablation: k distinct flat indices out of n, uniformly at
/// random, sorted ascending. Floyd's algorithm: for j = n-k .. n-1 draw t in
/// [0, j]; take t, or j if t is already taken. Every k-subset is equally
/// likely, and it needs k draws and a bitmap of n bits, which then yields
/// the indices in ascending order for free.
pub fn random_mask(n: usize, k: usize, seed: u64) -> Vec<u32> {
    assert!(k <= n, "random_mask: k = {k} exceeds n = {n}");
    assert!(n <= 1 << 32, "random_mask: n = {n} does not fit u32 indices");
    let mut rng = Rng::new(seed);
    let mut taken = vec![0u64; n.div_ceil(64)];
    for j in n - k..n {
        let t = rng.below(j + 1);
        let pick = if taken[t / 64] >> (t % 64) & 1 == 1 { j } else { t };
        taken[pick / 64] |= 1 << (pick % 64);
    }
    let mut out = Vec::with_capacity(k);
    for (wi, &word) in taken.iter().enumerate() {
        let mut bits = word;
        while bits != 0 {
            out.push((wi * 64) as u32 + bits.trailing_zeros());
            bits &= bits - 1;
        }
    }
    out
}

/// |a ∩ b| / |a| for two masks sorted ascending (1 when a is empty): the
/// fraction of a's entries that b also selects. For two masks of the same k,
/// the share of entries they agree on.
pub fn mask_overlap(a: &[u32], b: &[u32]) -> f64 {
    if a.is_empty() {
        return 1.0;
    }
    let (mut i, mut j, mut common) = (0, 0, 0usize);
    while i < a.len() && j < b.len() {
        match a[i].cmp(&b[j]) {
            std::cmp::Ordering::Less => i += 1,
            std::cmp::Ordering::Greater => j += 1,
            std::cmp::Ordering::Equal => {
                common += 1;
                i += 1;
                j += 1;
            }
        }
    }
    common as f64 / a.len() as f64
}
