//! LoRA, the baseline LIFT is compared with: every linear weight W (OC, IC)
//! gets a trainable low-rank update, W + s B A, with A (r, IC), B (OC, r),
//! s = alpha / r. W itself is frozen.
//!
//! The CPU path runs the model on the merged weight W + s B A (rebuilt after
//! each optimizer step), which gives exactly the adapter model's outputs and
//! input gradients without touching the model code. The adapter gradients
//! come from the two factors of dW that the backward pass hands over, never
//! forming dW itself:
//!   dB = s dout^T (inp A^T)        (OC, r) from (N, OC) and (N, r)
//!   dA = s (dout B)^T inp          (r, IC) from (N, r) and (N, IC)

use serde::{Deserialize, Serialize};

use crate::cpu::sgemm;
use crate::select;

/// One linear layer's adapter.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Adapter {
    pub r: usize,
    pub oc: usize,
    pub ic: usize,
    pub scale: f32,
    pub a: Vec<f32>, // (r, IC)
    pub b: Vec<f32>, // (OC, r)
}

impl Adapter {
    /// A ~ U(-1/sqrt(IC), 1/sqrt(IC)) (PEFT's Kaiming-uniform default), B = 0,
    /// so training starts from the base model exactly.
    pub fn new(oc: usize, ic: usize, r: usize, alpha: f32, uniform: &mut impl FnMut() -> f32) -> Adapter {
        let bound = 1.0 / (ic as f32).sqrt();
        Adapter {
            r,
            oc,
            ic,
            scale: alpha / r as f32,
            a: (0..r * ic).map(|_| (2.0 * uniform() - 1.0) * bound).collect(),
            b: vec![0.0; oc * r],
        }
    }

    /// merged (OC, IC) = base + s B A.
    pub fn merge_into(&self, merged: &mut [f32], base: &[f32]) {
        merged.copy_from_slice(base);
        let mut ba = vec![0.0f32; self.oc * self.ic];
        sgemm(self.oc, self.ic, self.r, &self.b, self.r, 1, &self.a, self.ic, 1, &mut ba, self.ic, false);
        for (m, d) in merged.iter_mut().zip(&ba) {
            *m += self.scale * d;
        }
    }

    /// PiSSA's adapter for a weight W (OC, IC), as PEFT builds it: from the
    /// top-r singular triplets (U_r, S_r, V_r), B = U_r diag(sqrt(S_r / s)),
    /// A = diag(sqrt(S_r / s)) V_r^T, and the frozen residual W - s B A that
    /// replaces W, so base + s B A is W again (to rounding) at step 0.
    /// `niter` = Some((iterations, seed)) takes the randomized SVD (PEFT's
    /// `pissa_niter_N`), None the exact one. Returns (adapter, residual).
    pub fn pissa(
        w: &[f32],
        oc: usize,
        ic: usize,
        r: usize,
        alpha: f32,
        niter: Option<(usize, u64)>,
    ) -> (Adapter, Vec<f32>) {
        let (u, sigma, v) = match niter {
            None => select::svd_top(w, oc, ic, r),
            Some((iters, seed)) => select::svd_top_randomized(w, oc, ic, r, iters, seed),
        };
        let r = sigma.len();
        let scale = alpha / r as f32;
        let root: Vec<f64> = sigma.iter().map(|&x| (x / scale as f64).sqrt()).collect();
        let mut b = vec![0.0f32; oc * r]; // (OC, r): column i is u_i sqrt(S_i / s)
        for i in 0..r {
            for o in 0..oc {
                b[o * r + i] = (u[i * oc + o] * root[i]) as f32;
            }
        }
        let a: Vec<f32> = (0..r * ic).map(|j| (v[j] * root[j / ic]) as f32).collect(); // (r, IC)
        let ad = Adapter { r, oc, ic, scale, a, b };
        let mut ba = vec![0.0f32; oc * ic];
        sgemm(oc, ic, r, &ad.b, r, 1, &ad.a, ic, 1, &mut ba, ic, false);
        let residual = w.iter().zip(&ba).map(|(&x, &d)| x - scale * d).collect();
        (ad, residual)
    }

    /// out (N, OC) = inp @ base^T + s (inp @ A^T) @ B^T, the adapter model's
    /// layer computed without merging (what the merge must agree with).
    pub fn forward_unmerged(&self, out: &mut [f32], inp: &[f32], base: &[f32], n: usize) {
        let (r, ic, oc) = (self.r, self.ic, self.oc);
        crate::cpu::matmul_forward(out, inp, base, n, ic, oc);
        let mut xa = vec![0.0f32; n * r];
        crate::cpu::matmul_forward(&mut xa, inp, &self.a, n, ic, r);
        let mut low = vec![0.0f32; n * oc];
        crate::cpu::matmul_forward(&mut low, &xa, &self.b, n, r, oc);
        for (o, l) in out.iter_mut().zip(&low) {
            *o += self.scale * l;
        }
    }

    /// Accumulates dA (r, IC) and dB (OC, r) from dout (N, OC) and inp (N, IC).
    pub fn backward(&self, da: &mut [f32], db: &mut [f32], dout: &[f32], inp: &[f32], n: usize) {
        let (r, ic, oc) = (self.r, self.ic, self.oc);
        let mut xa = vec![0.0f32; n * r]; // inp @ A^T, (N, r)
        crate::cpu::matmul_forward(&mut xa, inp, &self.a, n, ic, r);
        let mut dyb = vec![0.0f32; n * r]; // dout @ B, (N, r)
        sgemm(n, r, oc, dout, oc, 1, &self.b, r, 1, &mut dyb, r, false);
        for v in xa.iter_mut().chain(dyb.iter_mut()) {
            *v *= self.scale;
        }
        crate::cpu::matmul_backward_weight(db, dout, &xa, n, r, oc);
        crate::cpu::matmul_backward_weight(da, &dyb, inp, n, ic, r);
    }
}
