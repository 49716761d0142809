//! A linear layer for a few rows at a time: the decode steps of generation.
//!
//! out (N, OC) = inp (N, IC) @ weight^T, weight (OC, IC) as PyTorch stores it,
//! for N up to a few dozen (one row per sequence or beam). A general GEMM
//! copies ("packs") the weight into panels on every call; with few rows that
//! copy costs more than the arithmetic, and a decode step is then bound by
//! moving each weight three times (read, write the panel, read the panel).
//! Here every output is the dot product of an input row with a weight row,
//! both already contiguous, so each weight row is read once from memory per
//! call and used against every input row while it sits in L1.
//!
//! Two vector kernels, chosen at run time: with AVX-512 a tile of 4 weight
//! rows x 4 input rows (16 accumulators of 16 lanes), with AVX2 and FMA one
//! of 4 x 2 (8 accumulators of 8 lanes). Elsewhere `forward` falls back to
//! the GEMM.

use rayon::prelude::*;

/// Above this many rows the GEMM's packing pays for itself.
pub const MAX_ROWS: usize = 64;

/// Weight rows per parallel task at most: 64 rows of SmolLM2's widest input
/// (1536) are 384 KiB. Smaller layers are cut into 4 equal tasks per thread
/// instead, so that no thread waits on the last one (576 outputs in tasks of
/// 64 would give two threads 5 and 4).
const ROWS_PER_TASK: usize = 64;

/// Weight rows per task for OC outputs: at most ROWS_PER_TASK, a multiple of
/// the 4-row tile, and an equal share for each of 4 tasks per thread.
fn rows_per_task(oc: usize) -> usize {
    let tasks = 4 * rayon::current_num_threads();
    oc.div_ceil(tasks).next_multiple_of(4).clamp(4, ROWS_PER_TASK)
}

/// out (N, OC) = inp (N, IC) @ weight^T; any N, fastest for N <= MAX_ROWS.
pub fn forward(out: &mut [f32], inp: &[f32], weight: &[f32], n: usize, ic: usize, oc: usize) {
    assert!(out.len() >= n * oc && inp.len() >= n * ic && weight.len() >= oc * ic, "matvec: buffers too small");
    let Some(kernel) = kernel(ic) else {
        return crate::cpu::matmul_forward(out, inp, weight, n, ic, oc);
    };
    if n > MAX_ROWS {
        return crate::cpu::matmul_forward(out, inp, weight, n, ic, oc);
    }
    // Tasks own disjoint column ranges of every output row; each writes its
    // results into a (N, cols) block of its own, copied out afterwards.
    let step = rows_per_task(oc);
    let blocks: Vec<(usize, Vec<f32>)> = (0..oc)
        .step_by(step)
        .collect::<Vec<_>>()
        .into_par_iter()
        .map(|j0| {
            let cols = step.min(oc - j0);
            let mut part = vec![0.0f32; n * cols];
            let w = &weight[j0 * ic..(j0 + cols) * ic];
            // SAFETY: kernel() checked the CPU features the kernel needs.
            unsafe { kernel(&mut part, &inp[..n * ic], w, n, ic, cols) };
            (j0, part)
        })
        .collect();
    for (j0, part) in blocks {
        let cols = part.len() / n;
        for r in 0..n {
            out[r * oc + j0..r * oc + j0 + cols].copy_from_slice(&part[r * cols..(r + 1) * cols]);
        }
    }
}

/// Out (N, OC) by plain f64 dot products: the test reference.
pub fn forward_naive(inp: &[f32], weight: &[f32], n: usize, ic: usize, oc: usize) -> Vec<f32> {
    let mut out = vec![0.0; n * oc];
    for r in 0..n {
        for j in 0..oc {
            let s: f64 = (0..ic).map(|i| inp[r * ic + i] as f64 * weight[j * ic + i] as f64).sum();
            out[r * oc + j] = s as f32;
        }
    }
    out
}

/// out (N, COLS) = x (N, IC) @ w (COLS, IC)^T for one task's weight rows.
type Kernel = unsafe fn(&mut [f32], &[f32], &[f32], usize, usize, usize);

/// The widest vector kernel this CPU runs (AVX-512, else AVX2 with FMA), or
/// None: then the GEMM does the product.
fn kernel(ic: usize) -> Option<Kernel> {
    #[cfg(target_arch = "x86_64")]
    {
        if ic >= 16 && std::is_x86_feature_detected!("avx512f") {
            return Some(x86::block_avx512);
        }
        if ic >= 8 && std::is_x86_feature_detected!("avx2") && std::is_x86_feature_detected!("fma") {
            return Some(x86::block);
        }
    }
    let _ = ic;
    None
}

#[cfg(not(target_arch = "x86_64"))]
mod x86 {
    pub unsafe fn block(_: &mut [f32], _: &[f32], _: &[f32], _: usize, _: usize, _: usize) {
        unreachable!("matvec: the vector kernel is x86-64 only")
    }
    pub unsafe fn block_avx512(_: &mut [f32], _: &[f32], _: &[f32], _: usize, _: usize, _: usize) {
        unreachable!("matvec: the vector kernel is x86-64 only")
    }
}

#[cfg(target_arch = "x86_64")]
mod x86 {
    use std::arch::x86_64::*;

    /// out (N, COLS) = x (N, IC) @ w (COLS, IC)^T in tiles of 4 weight rows
    /// x 2 input rows; the edges take tiles of 1 weight row and 1 input row.
    ///
    /// # Safety
    /// The CPU must have AVX2 and FMA.
    #[target_feature(enable = "avx2,fma")]
    pub unsafe fn block(out: &mut [f32], x: &[f32], w: &[f32], n: usize, ic: usize, cols: usize) {
        let mut j = 0;
        while j < cols {
            let wj = if cols - j >= 4 { 4 } else { 1 };
            let mut r = 0;
            while r < n {
                let rr = if n - r >= 2 { 2 } else { 1 };
                // SAFETY: r + rr <= n and j + wj <= cols, the rows tile reads.
                unsafe {
                    match (wj, rr) {
                        (4, 2) => tile::<4, 2>(out, x, w, r, j, ic, cols),
                        (4, _) => tile::<4, 1>(out, x, w, r, j, ic, cols),
                        (_, 2) => tile::<1, 2>(out, x, w, r, j, ic, cols),
                        _ => tile::<1, 1>(out, x, w, r, j, ic, cols),
                    }
                }
                r += rr;
            }
            j += wj;
        }
    }

    /// out[r + a, j + b] = dot(x row r + a, w row j + b) for a < R, b < W:
    /// lanes of 8 summed pairwise at the end, then the IC % 8 tail in order.
    ///
    /// # Safety
    /// AVX2 and FMA; x holds rows r..r+R and w rows j..j+W, IC floats each.
    #[target_feature(enable = "avx2,fma")]
    #[allow(clippy::too_many_arguments)]
    unsafe fn tile<const W: usize, const R: usize>(
        out: &mut [f32],
        x: &[f32],
        w: &[f32],
        r: usize,
        j: usize,
        ic: usize,
        cols: usize,
    ) {
        let mut acc = [[_mm256_setzero_ps(); W]; R];
        let main = ic - ic % 8;
        let (xp, wp) = (x.as_ptr(), w.as_ptr());
        let mut k = 0;
        while k < main {
            let mut wv = [_mm256_setzero_ps(); W];
            for (b, v) in wv.iter_mut().enumerate() {
                // SAFETY: (j + b) * ic + k + 8 <= cols * ic = w.len() (block's loop bounds).
                *v = unsafe { _mm256_loadu_ps(wp.add((j + b) * ic + k)) };
                // The next tile's weight rows (see tile16).
                _mm_prefetch::<_MM_HINT_T0>(wp.wrapping_add((j + W + b) * ic + k) as *const i8);
            }
            for (a, acc_a) in acc.iter_mut().enumerate() {
                // SAFETY: (r + a) * ic + k + 8 <= n * ic = x.len().
                let xv = unsafe { _mm256_loadu_ps(xp.add((r + a) * ic + k)) };
                for (s, v) in acc_a.iter_mut().zip(&wv) {
                    *s = _mm256_fmadd_ps(xv, *v, *s);
                }
            }
            k += 8;
        }
        for (a, acc_a) in acc.iter().enumerate() {
            for (b, s) in acc_a.iter().enumerate() {
                let mut sum = hsum(*s);
                for t in main..ic {
                    sum += x[(r + a) * ic + t] * w[(j + b) * ic + t];
                }
                out[(r + a) * cols + j + b] = sum;
            }
        }
    }

    /// The same product with 16-lane AVX-512 vectors in tiles of 4 weight
    /// rows x 4 input rows (16 accumulators of the 32 registers): each step
    /// loads 4 weight and 4 input vectors for 16 fused multiply-adds. The
    /// last rows take tiles of 2, then 1.
    ///
    /// # Safety
    /// The CPU must have AVX-512F.
    #[target_feature(enable = "avx512f")]
    pub unsafe fn block_avx512(out: &mut [f32], x: &[f32], w: &[f32], n: usize, ic: usize, cols: usize) {
        let mut j = 0;
        while j < cols {
            let wj = if cols - j >= 4 { 4 } else { 1 };
            let mut r = 0;
            while r < n {
                let rr = [1, 1, 2, 2, 4][(n - r).min(4)];
                // SAFETY: r + rr <= n and j + wj <= cols, the rows tile16 reads.
                unsafe {
                    match (wj, rr) {
                        (4, 4) => tile16::<4, 4>(out, x, w, r, j, ic, cols),
                        (4, 2) => tile16::<4, 2>(out, x, w, r, j, ic, cols),
                        (4, _) => tile16::<4, 1>(out, x, w, r, j, ic, cols),
                        (_, 4) => tile16::<1, 4>(out, x, w, r, j, ic, cols),
                        (_, 2) => tile16::<1, 2>(out, x, w, r, j, ic, cols),
                        _ => tile16::<1, 1>(out, x, w, r, j, ic, cols),
                    }
                }
                r += rr;
            }
            j += wj;
        }
    }

    /// `tile` with 16 lanes: lanes summed by _mm512_reduce_add_ps, then the
    /// IC % 16 tail in order.
    ///
    /// # Safety
    /// AVX-512F; x holds rows r..r+R and w rows j..j+W, IC floats each.
    #[target_feature(enable = "avx512f")]
    #[allow(clippy::too_many_arguments)]
    unsafe fn tile16<const W: usize, const R: usize>(
        out: &mut [f32],
        x: &[f32],
        w: &[f32],
        r: usize,
        j: usize,
        ic: usize,
        cols: usize,
    ) {
        let mut acc = [[_mm512_setzero_ps(); W]; R];
        let main = ic - ic % 16;
        let (xp, wp) = (x.as_ptr(), w.as_ptr());
        let mut k = 0;
        while k < main {
            let mut wv = [_mm512_setzero_ps(); W];
            for (b, v) in wv.iter_mut().enumerate() {
                // SAFETY: (j + b) * ic + k + 16 <= cols * ic = w.len().
                *v = unsafe { _mm512_loadu_ps(wp.add((j + b) * ic + k)) };
                // The next tile's weight rows, on their way from memory while
                // this tile computes (a hint: it never faults). Without it the
                // loads of each tile's first rows stall the arithmetic: 16
                // rows through SmolLM2's layers took 94 ms a step, 61 with it.
                _mm_prefetch::<_MM_HINT_T0>(wp.wrapping_add((j + W + b) * ic + k) as *const i8);
            }
            for (a, acc_a) in acc.iter_mut().enumerate() {
                // SAFETY: (r + a) * ic + k + 16 <= n * ic = x.len().
                let xv = unsafe { _mm512_loadu_ps(xp.add((r + a) * ic + k)) };
                for (s, v) in acc_a.iter_mut().zip(&wv) {
                    *s = _mm512_fmadd_ps(xv, *v, *s);
                }
            }
            k += 16;
        }
        for (a, acc_a) in acc.iter().enumerate() {
            for (b, s) in acc_a.iter().enumerate() {
                let mut sum = _mm512_reduce_add_ps(*s);
                for t in main..ic {
                    sum += x[(r + a) * ic + t] * w[(j + b) * ic + t];
                }
                out[(r + a) * cols + j + b] = sum;
            }
        }
    }

    /// The 8 lanes of v summed as ((0+4)+(2+6)) + ((1+5)+(3+7)).
    #[target_feature(enable = "avx2,fma")]
    fn hsum(v: __m256) -> f32 {
        let s4 = _mm_add_ps(_mm256_castps256_ps128(v), _mm256_extractf128_ps(v, 1));
        let s2 = _mm_add_ps(s4, _mm_movehl_ps(s4, s4));
        let s1 = _mm_add_ss(s2, _mm_shuffle_ps(s2, s2, 1));
        _mm_cvtss_f32(s1)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn pseudo(n: usize, seed: u32) -> Vec<f32> {
        let mut s = seed.wrapping_mul(2654435761).wrapping_add(1);
        (0..n)
            .map(|_| {
                s ^= s << 13;
                s ^= s >> 17;
                s ^= s << 5;
                (s as f32 / u32::MAX as f32) * 2.0 - 1.0
            })
            .collect()
    }

    /// Every edge of the tiling (rows and weight rows not multiples of the
    /// tile, IC not a multiple of the lanes, one task and several) against
    /// f64 dots, for each kernel this CPU can run.
    #[test]
    fn matches_f64_dot_products() {
        let mut kernels: Vec<(&str, Kernel)> = Vec::new();
        #[cfg(target_arch = "x86_64")]
        {
            if std::is_x86_feature_detected!("avx512f") {
                kernels.push(("avx512", x86::block_avx512));
            }
            if std::is_x86_feature_detected!("avx2") && std::is_x86_feature_detected!("fma") {
                kernels.push(("avx2", x86::block));
            }
        }
        for (name, kernel) in kernels {
            for (n, ic, oc) in
                [(1, 16, 1), (2, 576, 576), (3, 29, 7), (5, 37, 130), (7, 40, 9), (17, 1536, 67), (64, 64, 200)]
            {
                let (x, w) = (pseudo(n * ic, 1), pseudo(oc * ic, 2));
                let mut got = vec![f32::NAN; n * oc];
                // SAFETY: the kernel's CPU features were detected above.
                unsafe { kernel(&mut got, &x, &w, n, ic, oc) };
                let want = forward_naive(&x, &w, n, ic, oc);
                for (i, (g, e)) in got.iter().zip(&want).enumerate() {
                    let tol = 1e-5 * (ic as f32).sqrt();
                    assert!((g - e).abs() <= tol, "{name}: n {n} ic {ic} oc {oc}, entry {i}: {g} vs {e}");
                }
            }
        }
    }

    /// `forward` through its tasks and copy-out, and its GEMM fallback above
    /// MAX_ROWS, against f64 dots.
    #[test]
    fn forward_matches_f64_dot_products() {
        for (n, ic, oc) in [(3, 576, 200), (MAX_ROWS + 1, 40, 70)] {
            let (x, w) = (pseudo(n * ic, 3), pseudo(oc * ic, 4));
            let mut got = vec![f32::NAN; n * oc];
            forward(&mut got, &x, &w, n, ic, oc);
            let want = forward_naive(&x, &w, n, ic, oc);
            for (g, e) in got.iter().zip(&want) {
                assert!((g - e).abs() <= 1e-5 * (ic as f32).sqrt(), "n {n} ic {ic} oc {oc}: {g} vs {e}");
            }
        }
    }
}
