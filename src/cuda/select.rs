//! Principal-weight selection (src/select.rs) on the GPU: the rank-r
//! approximation W_r by randomized subspace iteration on cuBLAS GEMMs with
//! Cholesky-QR orthonormalization (f64 Gram by DGEMM, the factor and its
//! inverse by one kernel), the small eigenproblem on the host (the same
//! `select::sym_eigen_top` the CPU uses, q x q), then the exact top-k of |W_r|
//! by radix select.
//!
//! The steps and their order are select.rs's, so on the same weights and seed
//! the masks agree with the CPU's up to f32 rounding (gpu-check measures it).
//!
//! How the work is arranged, for speed (the arithmetic is unchanged):
//! - Matrices come in batches (a layer's seven). The randomized ones iterate
//!   in lockstep, so each orthonormalization step runs the Cholesky kernel
//!   once for the batch (one block per matrix) instead of once per matrix:
//!   that kernel is a serial algorithm whose latency, not its arithmetic, is
//!   its cost. Each matrix keeps W in f32 and its two sketches for the
//!   duration of the batch.
//! - The host's eigenproblems of batch i run on a CPU thread while the GPU
//!   does batch i + 1; batch i's W_r and top-k follow (`select_batches`).
//! - With `tf32`, the sketch products of the power iteration run on the
//!   tensor cores in TF32; B = Q^T W and W_r stay f32.
//!
//! W_r is formed densely in one f32 scratch buffer the size of the largest
//! matrix, reused matrix after matrix.

use std::time::Instant;

use anyhow::{Result, anyhow};
use rayon::prelude::*;

use super::gpu::{Bf16, Buf, Dt, Gpu};
use super::launch;
use crate::select::{self, Approx};

/// Device scratch of the selection, grown on demand and reused.
#[derive(Default)]
pub struct SelectScratch {
    wr: Option<Buf<f32>>,   // W_r, the scores (out*in)
    tmp: Option<Buf<f32>>,  // (rows, q): Y X, before it replaces Y
    y64: Option<Buf<f64>>,  // f64 copy of a sketch or of B
    gram: Option<Buf<f64>>, // (nb, q, q) Gram matrices, or (m, m)
    x: Option<Buf<f32>>,    // (nb, q, q) = L^{-T}
    lt: Option<Buf<f64>>,   // (nb, q, q) Cholesky scratch
    mt: Option<Buf<f64>>,
    hist: Option<Buf<u32>>,
    above: Option<Buf<u32>>,
    ties: Option<Buf<u32>>,
    /// Sketch products in TF32 (see the module comment).
    pub tf32: bool,
}

fn grow<'a, T: cudarc::driver::DeviceRepr + cudarc::driver::ValidAsZeroBits>(
    g: &Gpu,
    slot: &'a mut Option<Buf<T>>,
    n: usize,
) -> Result<&'a mut Buf<T>> {
    if slot.as_ref().is_none_or(|b| b.len() < n) {
        *slot = None; // free first: the old one may be large
        *slot = Some(g.zeros::<T>(n)?);
    }
    Ok(slot.as_mut().expect("just made"))
}

/// One matrix to select from.
#[derive(Clone, Copy)]
pub struct Job<'a> {
    pub w: &'a Buf<Bf16>,
    pub out: usize,
    pub inp: usize,
    pub k: usize,
    /// The filter rank (validated, capped at min(out, in)); 0 = magnitude
    /// (top-k of |W| itself, the ablation).
    pub r: usize,
    pub how: Approx,
    /// The k smallest scores instead of the largest (`--select smallest`).
    pub smallest: bool,
}

/// A randomized sketch in progress: W (out, in) in f32, Y (out, q) and
/// Z (in, q), the two sides of the subspace iteration.
struct Sketch {
    wf: Buf<f32>,
    y: Buf<f32>,
    z: Buf<f32>,
    out: usize,
    inp: usize,
}

/// What phase A leaves for the host eigenproblem and phase B.
enum Pending {
    /// W_r = W (r >= min side, or the magnitude ablation).
    Whole,
    /// Randomized: Q (out, q) and B = Q^T W (q, in); the host gets B B^T.
    Randomized { qm: Buf<f32>, bm: Buf<f32>, q: usize },
    /// Exact: W in f64 (out, in); the host gets the Gram matrix of the small side.
    Exact { w64: Buf<f64> },
}

/// A randomized sketch's result: Q (out, q), B = Q^T W (q, in), and B B^T
/// (q, q) on the host.
type Sketched = (Buf<f32>, Buf<f32>, Vec<f64>);

/// The host's part of one matrix: the top r eigenvectors of a symmetric
/// (m, m) matrix.
struct Eigen {
    gram: Vec<f64>,
    m: usize,
    r: usize,
}

impl SelectScratch {
    /// Sketches (rows, q) <- sketch R^{-1} with sketch^T sketch = R^T R, for
    /// every sketch of the batch: one Cholesky-QR pass each (select.rs
    /// cholesky_qr), the factorizations in one kernel launch. `use_z` picks
    /// Z, else Y.
    fn cholesky_qr(&mut self, g: &Gpu, sk: &mut [Sketch], use_z: bool, q: usize) -> Result<()> {
        let nb = sk.len();
        let rows_of = |s: &Sketch| if use_z { s.inp } else { s.out };
        let max_rows = sk.iter().map(rows_of).max().unwrap_or(0);
        grow(g, &mut self.y64, max_rows * q)?;
        grow(g, &mut self.tmp, max_rows * q)?;
        grow(g, &mut self.gram, nb * q * q)?;
        grow(g, &mut self.lt, nb * q * q)?;
        grow(g, &mut self.mt, nb * q * q)?;
        grow(g, &mut self.x, nb * q * q)?;
        let SelectScratch { y64, gram, x, lt, mt, tmp, .. } = self;
        let (y64, gram, x, lt, mt, tmp) = (
            y64.as_mut().unwrap(),
            gram.as_mut().unwrap(),
            x.as_mut().unwrap(),
            lt.as_mut().unwrap(),
            mt.as_mut().unwrap(),
            tmp.as_mut().unwrap(),
        );
        g.timed("cholqr gram (f64)", || {
            for (b, s) in sk.iter().enumerate() {
                let (rows, y) = (rows_of(s), if use_z { &s.z } else { &s.y });
                launch::convert(g, "f32_to_f64", y64, y, rows * q)?;
                g.dgemm(true, false, q, q, rows, y64.ptr(), y64.ptr(), gram.at(b * q * q))?; // G = Y^T Y (f64)
            }
            Ok(())
        })?;
        g.timed("cholqr cholesky", || launch::cholesky_inverse_transpose(g, x, lt, mt, gram, q, nb))?; // X = L^{-T}
        g.timed("cholqr apply", || {
            for (b, s) in sk.iter_mut().enumerate() {
                let rows = rows_of(s);
                let y = if use_z { &mut s.z } else { &mut s.y };
                g.gemm(false, false, rows, q, q, 1.0, y.ptr(), x.at(b * q * q), 0.0, tmp.ptr(), Dt::F32, Dt::F32)?; // Y X
                g.copy(y, 0, tmp, 0, rows * q)?;
            }
            Ok(())
        })
    }

    /// select.rs randomized_range and the first half of low_rank_randomized
    /// for a batch of matrices with the same q and iteration count: returns,
    /// per matrix, Q (out, q), B = Q^T W (q, in) and B B^T (q, q) on the host.
    fn randomized_batch(&mut self, g: &Gpu, jobs: &[&Job], q: usize, iters: usize) -> Result<Vec<Sketched>> {
        let nb = jobs.len();
        let ab = if self.tf32 { Dt::Tf32 } else { Dt::F32 };
        let mut sk = Vec::with_capacity(nb);
        g.timed("sketch setup", || {
            for job in jobs {
                let Approx::Randomized { seed, .. } = job.how else { unreachable!("a randomized job") };
                let (out, inp) = (job.out, job.inp);
                let mut wf = g.zeros::<f32>(out * inp)?;
                launch::convert(g, "bf16_to_f32", &mut wf, job.w, out * inp)?;
                let mut z = g.zeros::<f32>(inp * q)?;
                launch::randn(g, &mut z, inp * q, seed)?; // Omega (in, q)
                sk.push(Sketch { wf, y: g.zeros::<f32>(out * q)?, z, out, inp });
            }
            Ok(())
        })?;
        let products = |sk: &[Sketch], w_t: bool| {
            g.timed("sketch gemm", || {
                for s in sk {
                    if w_t {
                        g.gemm(true, false, s.inp, q, s.out, 1.0, s.wf.ptr(), s.y.ptr(), 0.0, s.z.ptr(), ab, Dt::F32)?; // Z = W^T Y
                    } else {
                        g.gemm(false, false, s.out, q, s.inp, 1.0, s.wf.ptr(), s.z.ptr(), 0.0, s.y.ptr(), ab, Dt::F32)?; // Y = W Z
                    }
                }
                Ok(())
            })
        };
        products(&sk, false)?; // Y = W Omega
        self.cholesky_qr(g, &mut sk, false, q)?;
        for _ in 0..iters {
            products(&sk, true)?;
            self.cholesky_qr(g, &mut sk, true, q)?;
            products(&sk, false)?;
            self.cholesky_qr(g, &mut sk, false, q)?;
        }
        self.cholesky_qr(g, &mut sk, false, q)?; // CholQR2: orthonormal to f32 precision
        // B = Q^T W (f32) and B B^T (f64), for every matrix; one download.
        let gram_all = grow(g, &mut self.gram, nb * q * q)?.ptr();
        let mut bms = Vec::with_capacity(nb);
        for (b, s) in sk.iter().enumerate() {
            let bm = g.zeros::<f32>(q * s.inp)?;
            g.timed("sketch gemm", || {
                g.gemm(true, false, q, s.inp, s.out, 1.0, s.y.ptr(), s.wf.ptr(), 0.0, bm.ptr(), Dt::F32, Dt::F32)
            })?;
            let b64 = grow(g, &mut self.y64, q * s.inp)?;
            g.timed("B gram (f64)", || {
                launch::convert(g, "f32_to_f64", b64, &bm, q * s.inp)?;
                g.dgemm(false, true, q, q, s.inp, b64.ptr(), b64.ptr(), gram_all + (b * q * q * 8) as u64) // B B^T
            })?;
            bms.push(bm);
        }
        let grams = g.download(self.gram.as_ref().unwrap(), nb * q * q)?;
        Ok(sk
            .into_iter()
            .zip(bms)
            .enumerate()
            .map(|(b, (s, bm))| (s.y, bm, grams[b * q * q..(b + 1) * q * q].to_vec()))
            .collect())
    }

    /// Phase A of a batch: everything up to the small eigenproblems.
    fn phase_a(&mut self, g: &Gpu, jobs: &[Job]) -> Result<(Vec<Pending>, Vec<Option<Eigen>>)> {
        let mut pending: Vec<Option<Pending>> = jobs.iter().map(|_| None).collect();
        let mut eigen: Vec<Option<Eigen>> = jobs.iter().map(|_| None).collect();
        // The randomized ones, grouped by (q, iterations): each group in lockstep.
        let mut groups: Vec<((usize, usize), Vec<usize>)> = Vec::new();
        for (i, job) in jobs.iter().enumerate() {
            let m = job.out.min(job.inp);
            if job.r == 0 || job.r >= m {
                pending[i] = Some(Pending::Whole);
                continue;
            }
            match job.how {
                Approx::Randomized { oversample, power_iters, .. } if job.r + oversample < m => {
                    let key = (job.r + oversample, power_iters);
                    match groups.iter_mut().find(|(k, _)| *k == key) {
                        Some((_, v)) => v.push(i),
                        None => groups.push((key, vec![i])),
                    }
                }
                _ => {
                    let (p, gram) = self.exact_a(g, job)?;
                    eigen[i] = Some(Eigen { gram, m, r: job.r });
                    pending[i] = Some(p);
                }
            }
        }
        for ((q, iters), idx) in groups {
            let batch: Vec<&Job> = idx.iter().map(|&i| &jobs[i]).collect();
            let done = self.randomized_batch(g, &batch, q, iters)?;
            for (i, (qm, bm, gram)) in idx.into_iter().zip(done) {
                eigen[i] = Some(Eigen { gram, m: q, r: jobs[i].r });
                pending[i] = Some(Pending::Randomized { qm, bm, q });
            }
        }
        Ok((pending.into_iter().map(|p| p.expect("every job has a path")).collect(), eigen))
    }

    /// The exact path's phase A: W in f64 and the Gram matrix of its small side.
    fn exact_a(&mut self, g: &Gpu, job: &Job) -> Result<(Pending, Vec<f64>)> {
        let (out, inp) = (job.out, job.inp);
        let (m, n) = (out.min(inp), out * inp);
        let mut w64 = g.zeros::<f64>(n)?;
        launch::convert(g, "bf16_to_f64", &mut w64, job.w, n)?;
        let gram = grow(g, &mut self.gram, m * m)?;
        g.timed("exact gram (f64)", || {
            if out <= inp {
                g.dgemm(false, true, out, out, inp, w64.ptr(), w64.ptr(), gram.ptr()) // W W^T
            } else {
                g.dgemm(true, false, inp, inp, out, w64.ptr(), w64.ptr(), gram.ptr()) // W^T W
            }
        })?;
        let gram = g.download(self.gram.as_ref().unwrap(), m * m)?;
        Ok((Pending::Exact { w64 }, gram))
    }

    /// Phase B: W_r into the scores buffer from the eigenvectors `vecs`
    /// (r rows), then the top k.
    fn phase_b(&mut self, g: &Gpu, job: &Job, pending: Pending, vecs: &[f64]) -> Result<Buf<u32>> {
        let (out, inp, r) = (job.out, job.inp, job.r);
        let n = out * inp;
        grow(g, &mut self.wr, n)?;
        let wr = self.wr.as_mut().unwrap();
        g.timed("W_r formation", || {
            match pending {
                Pending::Whole => launch::convert(g, "bf16_to_f32", wr, job.w, n)?,
                Pending::Randomized { qm, bm, q } => {
                    let u: Vec<f32> = vecs.iter().map(|&x| x as f32).collect();
                    let u = g.upload(&u)?; // U_B^T (r, q)
                    let coef = g.zeros::<f32>(r * inp)?;
                    g.gemm(false, false, r, inp, q, 1.0, u.ptr(), bm.ptr(), 0.0, coef.ptr(), Dt::F32, Dt::F32)?;
                    let basis = g.zeros::<f32>(out * r)?;
                    g.gemm(false, true, out, r, q, 1.0, qm.ptr(), u.ptr(), 0.0, basis.ptr(), Dt::F32, Dt::F32)?;
                    g.gemm(false, false, out, inp, r, 1.0, basis.ptr(), coef.ptr(), 0.0, wr.ptr(), Dt::F32, Dt::F32)?;
                }
                Pending::Exact { w64, .. } => {
                    let p = g.upload(vecs)?; // P (r, m)
                    let wr64 = g.zeros::<f64>(n)?;
                    if out <= inp {
                        let pa = g.zeros::<f64>(r * inp)?;
                        g.dgemm(false, false, r, inp, out, p.ptr(), w64.ptr(), pa.ptr())?; // P A
                        g.dgemm(true, false, out, inp, r, p.ptr(), pa.ptr(), wr64.ptr())?; // P^T (P A)
                    } else {
                        let wp = g.zeros::<f64>(out * r)?;
                        g.dgemm(false, true, out, r, inp, w64.ptr(), p.ptr(), wp.ptr())?; // W P^T
                        g.dgemm(false, false, out, inp, r, wp.ptr(), p.ptr(), wr64.ptr())?; // (W P^T) P
                    }
                    launch::convert(g, "f64_to_f32", wr, &wr64, n)?;
                    g.sync()?; // wr64, pa, wp are freed on return
                }
            }
            if job.smallest {
                launch::reverse_abs_order(g, wr, n)?;
            }
            Ok(())
        })?;
        self.top_k_abs(g, n, job.k)
    }

    /// select::top_k_abs on the scores buffer `wr` (n values): the k largest
    /// |scores|, ties toward the smaller index, ascending.
    fn top_k_abs(&mut self, g: &Gpu, n: usize, k: usize) -> Result<Buf<u32>> {
        g.timed("top-k", || self.top_k_abs_inner(g, n, k))
    }

    fn top_k_abs_inner(&mut self, g: &Gpu, n: usize, k: usize) -> Result<Buf<u32>> {
        assert!(k <= n && n <= 1 << 32, "top_k_abs: k = {k}, n = {n}");
        if k == 0 {
            return g.zeros::<u32>(0);
        }
        if k == n {
            return g.upload(&(0..n as u32).collect::<Vec<u32>>());
        }
        // The bucket that holds the k-th largest, counting down from the top;
        // returns (bucket, how many lie in higher buckets). As in select.rs.
        let find = |h: &[u32], need: u64| -> (u32, u64) {
            let mut above = 0u64;
            for b in (0..h.len()).rev() {
                if above + h[b] as u64 >= need {
                    return (b as u32, above);
                }
                above += h[b] as u64;
            }
            unreachable!("the histogram holds at least `need` entries")
        };
        let mut need = k as u64;
        let mut prefix = 0u32;
        // digits of the 31-bit key: bits 30..20, 19..10, 9..0
        for (shift, bits) in [(20u32, 11u32), (10, 10), (0, 10)] {
            let hist = grow(g, &mut self.hist, launch::HIST_BINS)?;
            g.zero(hist)?;
            let prefix_shift = shift + bits;
            let scores = self.wr.as_ref().unwrap();
            let hist = self.hist.as_mut().unwrap();
            launch::radix_histogram(
                g,
                hist,
                scores,
                n,
                shift,
                (1 << bits) - 1,
                if shift == 20 { 31 } else { prefix_shift },
                prefix,
            )?;
            let h = g.download(hist, 1 << bits)?;
            let (digit, above) = find(&h, need);
            need -= above;
            prefix = (prefix << bits) | digit;
        }
        let threshold = prefix;
        let ties_needed = need as u32; // >= 1
        let nb = n.div_ceil(launch::SEL_CHUNK);
        grow(g, &mut self.above, nb)?;
        grow(g, &mut self.ties, nb)?;
        let scores = self.wr.as_ref().unwrap();
        launch::select_count(g, self.above.as_mut().unwrap(), self.ties.as_mut().unwrap(), scores, n, threshold)?;
        let above = g.download(self.above.as_ref().unwrap(), nb)?;
        let ties = g.download(self.ties.as_ref().unwrap(), nb)?;
        let (mut out_start, mut tie_start) = (Vec::with_capacity(nb), Vec::with_capacity(nb));
        let (mut pos, mut tie_pos) = (0u64, 0u64);
        for b in 0..nb {
            out_start.push(pos as u32);
            tie_start.push(tie_pos as u32);
            let taken = (ties_needed as u64).saturating_sub(tie_pos).min(ties[b] as u64);
            pos += above[b] as u64 + taken;
            tie_pos += ties[b] as u64;
        }
        assert_eq!(pos, k as u64, "top_k_abs: the counts do not add up to k");
        let out_start = g.upload(&out_start)?;
        let tie_start = g.upload(&tie_start)?;
        let mut sel = g.zeros::<u32>(k)?;
        launch::select_write(g, &mut sel, k, &out_start, &tie_start, scores, n, threshold, ties_needed)?;
        g.sync()?; // out_start and tie_start are freed on return
        Ok(sel)
    }

    /// Selects the masks of batches of matrices (one batch per layer), in
    /// order: phase A of batch i on the GPU; its eigenproblems on a CPU
    /// thread (each matrix's in parallel) while phase B of batch i - 1 and
    /// phase A of batch i + 1 run; then phase B of batch i.
    pub fn select_batches(&mut self, g: &Gpu, batches: &[&[Job]]) -> Result<Vec<Buf<u32>>> {
        let mut masks = Vec::new();
        let (mut host_s, mut wait_s) = (0.0f64, 0.0f64);
        std::thread::scope(|scope| -> Result<()> {
            let mut prev = None;
            for (bi, jobs) in batches.iter().enumerate() {
                let (pending, problems) = self.phase_a(g, jobs)?;
                let handle = scope.spawn(move || {
                    let t0 = Instant::now();
                    let vecs: Vec<Vec<f64>> = problems
                        .into_par_iter()
                        .map(|p| match p {
                            Some(e) => select::sym_eigen_top(e.gram, e.m, e.r).1,
                            None => Vec::new(),
                        })
                        .collect();
                    (vecs, t0.elapsed().as_secs_f64())
                });
                if let Some((pb, pp, ph)) = prev.replace((bi, pending, handle)) {
                    masks.extend(self.finish(g, batches[pb], pp, ph, &mut host_s, &mut wait_s)?);
                }
            }
            if let Some((pb, pp, ph)) = prev.take() {
                masks.extend(self.finish(g, batches[pb], pp, ph, &mut host_s, &mut wait_s)?);
            }
            Ok(())
        })?;
        g.add_host_time("host eigen (overlapped)", host_s);
        g.add_host_time("host eigen (waited for)", wait_s);
        Ok(masks)
    }

    /// Phase B of a batch, once its eigenvectors are in.
    fn finish(
        &mut self,
        g: &Gpu,
        jobs: &[Job],
        pending: Vec<Pending>,
        eig: std::thread::ScopedJoinHandle<'_, (Vec<Vec<f64>>, f64)>,
        host_s: &mut f64,
        wait_s: &mut f64,
    ) -> Result<Vec<Buf<u32>>> {
        let t0 = Instant::now();
        let (vecs, secs) =
            eig.join().map_err(|_| anyhow!("mask selection: the eigen-decomposition thread panicked"))?;
        *wait_s += t0.elapsed().as_secs_f64();
        *host_s += secs;
        let mut masks = Vec::with_capacity(jobs.len());
        for ((job, p), v) in jobs.iter().zip(pending).zip(&vecs) {
            masks.push(self.phase_b(g, job, p, v)?);
        }
        Ok(masks)
    }

    /// Selects the masks of one batch of matrices (see select_batches).
    pub fn select(&mut self, g: &Gpu, jobs: &[Job]) -> Result<Vec<Buf<u32>>> {
        self.select_batches(g, &[jobs])
    }

    /// top_k_abs of an f32 score array given on the host (for gpu-check).
    pub fn top_k_of(&mut self, g: &Gpu, scores: &[f32], k: usize) -> Result<Vec<u32>> {
        let n = scores.len();
        grow(g, &mut self.wr, n)?;
        g.write(self.wr.as_mut().unwrap(), 0, scores)?;
        let sel = self.top_k_abs(g, n, k)?;
        g.download(&sel, k)
    }
}
