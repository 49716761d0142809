//! Principal-weight selection (src/lift.rs) on the GPU: the rank-r
//! approximation W_r by randomized subspace iteration on cuBLAS GEMMs with
//! Cholesky-QR orthonormalization (f64 Gram by DGEMM, the factor and its
//! inverse by one kernel), the small eigenproblem on the host (the same
//! `lift::sym_eigen_top` the CPU uses, q x q, run for the seven matrices of a
//! layer in parallel), then the exact top-k of |W_r| by radix select.
//!
//! The steps and their order are lift.rs's, so on the same weights and seed
//! the masks agree with the CPU's up to f32 rounding (gpu-check measures it).
//! W_r is formed densely in one f32 scratch buffer the size of the largest
//! matrix, reused matrix after matrix; a second one holds W in f32 for the
//! power iterations.

use anyhow::Result;
use rayon::prelude::*;

use super::gpu::{Bf16, Buf, Dt, Gpu};
use super::launch as k;
use crate::lift::{self, Approx};

/// Device scratch of the selection, grown on demand and reused.
#[derive(Default)]
pub struct SelectScratch {
    wf: Option<Buf<f32>>,   // W in f32 (out*in)
    wr: Option<Buf<f32>>,   // W_r, the scores (out*in)
    y: Option<Buf<f32>>,    // (out, q)
    z: Option<Buf<f32>>,    // (in, q); first Omega
    tmp: Option<Buf<f32>>,  // (max(out, in), q)
    y64: Option<Buf<f64>>,  // f64 copy of a sketch or of B
    gram: Option<Buf<f64>>, // (q, q) or (m, m)
    x: Option<Buf<f32>>,    // (q, q) = L^{-T}
    lt: Option<Buf<f64>>,
    mt: Option<Buf<f64>>,
    hist: Option<Buf<u32>>,
    above: Option<Buf<u32>>,
    ties: Option<Buf<u32>>,
}

fn grow<'a, T: cudarc::driver::DeviceRepr + cudarc::driver::ValidAsZeroBits>(g: &Gpu, slot: &'a mut Option<Buf<T>>, n: usize) -> Result<&'a mut Buf<T>> {
    if slot.as_ref().is_none_or(|b| b.len() < n) {
        *slot = None; // free first: the old one may be large
        *slot = Some(g.zeros::<T>(n)?);
    }
    Ok(slot.as_mut().expect("just made"))
}

/// One matrix to select from.
pub struct Job<'a> {
    pub w: &'a Buf<Bf16>,
    pub out: usize,
    pub inp: usize,
    pub k: usize,
    /// The filter rank (validated, capped at min(out, in)); 0 = magnitude
    /// (top-k of |W| itself, the ablation).
    pub r: usize,
    pub how: Approx,
}

/// What phase A leaves for the host eigenproblem and phase B.
enum Pending {
    /// W_r = W (r >= min side, or the magnitude ablation).
    Whole,
    /// Randomized: Q (out, q) and B = Q^T W (q, in); gram = B B^T (q, q).
    Randomized { qm: Buf<f32>, bm: Buf<f32>, q: usize, gram: Vec<f64> },
    /// Exact: W in f64 (out, in), gram of the small side (m, m).
    Exact { w64: Buf<f64>, m: usize, gram: Vec<f64> },
}

impl SelectScratch {
    /// Y (rows, q) <- Y R^{-1} with Y^T Y = R^T R: one Cholesky-QR pass
    /// (lift.rs cholesky_qr). `which` picks y or z.
    fn cholesky_qr(&mut self, g: &Gpu, use_z: bool, rows: usize, q: usize) -> Result<()> {
        let n = rows * q;
        grow(g, &mut self.y64, n)?;
        grow(g, &mut self.tmp, n)?;
        for slot in [&mut self.gram] {
            grow(g, slot, q * q)?;
        }
        for slot in [&mut self.lt, &mut self.mt] {
            grow(g, slot, q * q)?;
        }
        grow(g, &mut self.x, q * q)?;
        // Disjoint fields, borrowed together.
        let SelectScratch { y, z, y64, gram, x, lt, mt, tmp, .. } = self;
        let (y64, gram, x, lt, mt, tmp) = (
            y64.as_mut().unwrap(),
            gram.as_mut().unwrap(),
            x.as_mut().unwrap(),
            lt.as_mut().unwrap(),
            mt.as_mut().unwrap(),
            tmp.as_mut().unwrap(),
        );
        let y = if use_z { z } else { y }.as_mut().expect("sketch allocated");
        k::convert(g, "f32_to_f64", y64, y, n)?;
        g.dgemm(true, false, q, q, rows, y64.ptr(), y64.ptr(), gram.ptr())?; // G = Y^T Y (f64)
        k::cholesky_inverse_transpose(g, x, lt, mt, gram, q)?; // X = L^{-T}
        g.gemm(false, false, rows, q, q, 1.0, y.ptr(), x.ptr(), 0.0, tmp.ptr(), Dt::F32, Dt::F32)?; // Y X
        g.copy(y, 0, tmp, 0, n)
    }

    /// Phase A of one matrix: everything up to the small eigenproblem.
    fn phase_a(&mut self, g: &Gpu, job: &Job) -> Result<Pending> {
        let (out, inp, r) = (job.out, job.inp, job.r);
        let m = out.min(inp);
        let n = out * inp;
        if r == 0 || r >= m {
            return Ok(Pending::Whole);
        }
        match job.how {
            Approx::Randomized { oversample, power_iters, seed } if r + oversample < m => {
                let q = r + oversample;
                let wf = grow(g, &mut self.wf, n)?;
                k::convert(g, "bf16_to_f32", wf, job.w, n)?;
                grow(g, &mut self.y, out * q)?;
                let z = grow(g, &mut self.z, inp * q)?;
                k::randn(g, z, inp * q, seed)?; // Omega (in, q)
                let (wp, yp, zp) = (self.wf.as_ref().unwrap().ptr(), self.y.as_ref().unwrap().ptr(), self.z.as_ref().unwrap().ptr());
                g.gemm(false, false, out, q, inp, 1.0, wp, zp, 0.0, yp, Dt::F32, Dt::F32)?; // Y = W Omega
                self.cholesky_qr(g, false, out, q)?;
                for _ in 0..power_iters {
                    g.gemm(true, false, inp, q, out, 1.0, wp, yp, 0.0, zp, Dt::F32, Dt::F32)?; // Z = W^T Y
                    self.cholesky_qr(g, true, inp, q)?;
                    g.gemm(false, false, out, q, inp, 1.0, wp, zp, 0.0, yp, Dt::F32, Dt::F32)?; // Y = W Z
                    self.cholesky_qr(g, false, out, q)?;
                }
                self.cholesky_qr(g, false, out, q)?; // CholQR2
                let mut qm = g.zeros::<f32>(out * q)?;
                g.copy(&mut qm, 0, self.y.as_ref().unwrap(), 0, out * q)?;
                let bm = g.zeros::<f32>(q * inp)?;
                g.gemm(true, false, q, inp, out, 1.0, qm.ptr(), wp, 0.0, bm.ptr(), Dt::F32, Dt::F32)?; // B = Q^T W
                let b64 = grow(g, &mut self.y64, q * inp)?;
                k::convert(g, "f32_to_f64", b64, &bm, q * inp)?;
                let b64p = self.y64.as_ref().unwrap().ptr();
                let gram = grow(g, &mut self.gram, q * q)?;
                g.dgemm(false, true, q, q, inp, b64p, b64p, gram.ptr())?; // B B^T
                let gram = g.download(self.gram.as_ref().unwrap(), q * q)?;
                Ok(Pending::Randomized { qm, bm, q, gram })
            }
            _ => {
                let mut w64 = g.zeros::<f64>(n)?;
                k::convert(g, "bf16_to_f64", &mut w64, job.w, n)?;
                let gram = grow(g, &mut self.gram, m * m)?;
                if out <= inp {
                    g.dgemm(false, true, out, out, inp, w64.ptr(), w64.ptr(), gram.ptr())?; // W W^T
                } else {
                    g.dgemm(true, false, inp, inp, out, w64.ptr(), w64.ptr(), gram.ptr())?; // W^T W
                }
                let gram = g.download(self.gram.as_ref().unwrap(), m * m)?;
                Ok(Pending::Exact { w64, m, gram })
            }
        }
    }

    /// Phase B: W_r into the scores buffer from the eigenvectors `vecs`
    /// (r rows), then the top k.
    fn phase_b(&mut self, g: &Gpu, job: &Job, pending: Pending, vecs: &[f64]) -> Result<Buf<u32>> {
        let (out, inp, r) = (job.out, job.inp, job.r);
        let n = out * inp;
        grow(g, &mut self.wr, n)?;
        let wr = self.wr.as_mut().unwrap();
        match pending {
            Pending::Whole => k::convert(g, "bf16_to_f32", wr, job.w, n)?,
            Pending::Randomized { qm, bm, q, .. } => {
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
                k::convert(g, "f64_to_f32", wr, &wr64, n)?;
                g.sync()?; // wr64, pa, wp are freed on return
            }
        }
        self.top_k_abs(g, n, job.k)
    }

    /// lift::top_k_abs on the scores buffer `wr` (n values): the k largest
    /// |scores|, ties toward the smaller index, ascending.
    fn top_k_abs(&mut self, g: &Gpu, n: usize, kk: usize) -> Result<Buf<u32>> {
        assert!(kk <= n && n <= 1 << 32, "top_k_abs: k = {kk}, n = {n}");
        if kk == 0 {
            return g.zeros::<u32>(0);
        }
        if kk == n {
            return g.upload(&(0..n as u32).collect::<Vec<u32>>());
        }
        // The bucket that holds the k-th largest, counting down from the top;
        // returns (bucket, how many lie in higher buckets). As in lift.rs.
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
        let mut need = kk as u64;
        let mut prefix = 0u32;
        // digits of the 31-bit key: bits 30..20, 19..10, 9..0
        for (shift, bits) in [(20u32, 11u32), (10, 10), (0, 10)] {
            let hist = grow(g, &mut self.hist, k::HIST_BINS)?;
            g.zero(hist)?;
            let prefix_shift = shift + bits;
            let scores = self.wr.as_ref().unwrap();
            let hist = self.hist.as_mut().unwrap();
            k::radix_histogram(g, hist, scores, n, shift, (1 << bits) - 1, if shift == 20 { 31 } else { prefix_shift }, prefix)?;
            let h = g.download(hist, 1 << bits)?;
            let (digit, above) = find(&h, need);
            need -= above;
            prefix = (prefix << bits) | digit;
        }
        let threshold = prefix;
        let ties_needed = need as u32; // >= 1
        let nb = n.div_ceil(k::SEL_CHUNK);
        grow(g, &mut self.above, nb)?;
        grow(g, &mut self.ties, nb)?;
        let scores = self.wr.as_ref().unwrap();
        k::select_count(g, self.above.as_mut().unwrap(), self.ties.as_mut().unwrap(), scores, n, threshold)?;
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
        assert_eq!(pos, kk as u64, "top_k_abs: the counts do not add up to k");
        let out_start = g.upload(&out_start)?;
        let tie_start = g.upload(&tie_start)?;
        let mut sel = g.zeros::<u32>(kk)?;
        k::select_write(g, &mut sel, kk, &out_start, &tie_start, scores, n, threshold, ties_needed)?;
        g.sync()?; // out_start and tie_start are freed on return
        Ok(sel)
    }

    /// Selects the masks of a batch of matrices (a layer's seven): phase A
    /// for each on the GPU, the eigenproblems on the host in parallel, then
    /// phase B and the top-k for each.
    pub fn select(&mut self, g: &Gpu, jobs: &[Job]) -> Result<Vec<Buf<u32>>> {
        let mut pending = Vec::with_capacity(jobs.len());
        for job in jobs {
            pending.push(self.phase_a(g, job)?);
        }
        let vecs: Vec<Vec<f64>> = pending
            .par_iter()
            .zip(jobs)
            .map(|(p, job)| match p {
                Pending::Whole => Vec::new(),
                Pending::Randomized { q, gram, .. } => lift::sym_eigen_top(gram.clone(), *q, job.r).1,
                Pending::Exact { m, gram, .. } => lift::sym_eigen_top(gram.clone(), *m, job.r).1,
            })
            .collect();
        let mut masks = Vec::with_capacity(jobs.len());
        for ((job, p), v) in jobs.iter().zip(pending).zip(&vecs) {
            masks.push(self.phase_b(g, job, p, v)?);
        }
        Ok(masks)
    }

    /// top_k_abs of an f32 score array given on the host (for gpu-check).
    pub fn top_k_of(&mut self, g: &Gpu, scores: &[f32], kk: usize) -> Result<Vec<u32>> {
        let n = scores.len();
        grow(g, &mut self.wr, n)?;
        g.write(self.wr.as_mut().unwrap(), 0, scores)?;
        let sel = self.top_k_abs(g, n, kk)?;
        g.download(&sel, kk)
    }
}
