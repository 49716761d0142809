//! DoRA (weight-decomposed low-rank adaptation), as PEFT computes it. Each
//! linear weight W (OC, IC) gets a LoRA adapter (B A, scale s) and a trained
//! magnitude m (OC), initialized to the row norms of W:
//!
//!   V = W + s B A                      (OC, IC), the direction
//!   y = (m / ||V||_row) * (x V^T)      (N, OC), per output row o
//!
//! The norm ||V||_row is treated as a constant in the backward pass (PEFT
//! detaches it, following the DoRA paper's section on training cost), so
//! with c = m / ||V||_row and Z = x V^T:
//!
//!   dm_o = sum_n dy[n,o] Z[n,o] / ||V_o||
//!   dA, dB = LoRA's gradients for the scaled output gradient dy * c
//!
//! The CPU path runs the model on the merged weight diag(c) V, which gives
//! the DoRA layer's outputs and input gradients exactly; its rows have the
//! norms m, which is what `lift export` writes.

use crate::lora::Adapter;

/// The L2 norm of each row of w (OC, IC), summed in f64.
pub fn row_norms(w: &[f32], oc: usize, ic: usize) -> Vec<f32> {
    (0..oc).map(|o| w[o * ic..(o + 1) * ic].iter().map(|&x| x as f64 * x as f64).sum::<f64>().sqrt() as f32).collect()
}

/// merged (OC, IC) = diag(m / ||V||_row) V with V = base + s B A; returns
/// ||V||_row (OC), which the backward pass needs.
pub fn merge_into(ad: &Adapter, m: &[f32], merged: &mut [f32], base: &[f32]) -> Vec<f32> {
    ad.merge_into(merged, base); // V
    let norm = row_norms(merged, ad.oc, ad.ic);
    for (o, row) in merged.chunks_mut(ad.ic).enumerate() {
        let c = m[o] / norm[o];
        row.iter_mut().for_each(|x| *x *= c);
    }
    norm
}

/// Accumulates dA (r, IC), dB (OC, r) and dm (OC) from dout (N, OC) and
/// inp (N, IC) of one DoRA layer with magnitude m, frozen base and the
/// detached norms `norm` of its forward pass. `scaled` is (N, OC) scratch.
#[allow(clippy::too_many_arguments)]
pub fn backward(
    ad: &Adapter,
    m: &[f32],
    norm: &[f32],
    base: &[f32],
    da: &mut [f32],
    db: &mut [f32],
    dm: &mut [f32],
    dout: &[f32],
    inp: &[f32],
    n: usize,
    scaled: &mut Vec<f32>,
) {
    let oc = ad.oc;
    // Z = x V^T, unscaled; dm_o = sum_n dout[n,o] Z[n,o] / ||V_o||
    scaled.resize(n * oc, 0.0);
    ad.forward_unmerged(scaled, inp, base, n);
    let mut sums = vec![0.0f64; oc];
    for (dz, z) in dout.chunks(oc).zip(scaled.chunks(oc)) {
        for o in 0..oc {
            sums[o] += dz[o] as f64 * z[o] as f64;
        }
    }
    for o in 0..oc {
        dm[o] += (sums[o] / norm[o] as f64) as f32;
    }
    // dout * c, then the adapter's own gradients
    for (s, dz) in scaled.chunks_mut(oc).zip(dout.chunks(oc)) {
        for o in 0..oc {
            s[o] = dz[o] * (m[o] / norm[o]);
        }
    }
    ad.backward(da, db, scaled, inp, n);
}
