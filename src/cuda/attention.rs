//! Which attention kernels a run uses. The tensor-core kernels
//! (attention_tc.cu, head sizes 64 and 128) are faster than the plain ones
//! (attention.cu, CUDA cores), but they are only trusted after a short run of
//! both on the same random inputs agrees (`self_check`); `choose` applies
//! the `--attention` policy before a benchmark or training starts. gpu-check
//! compares both kinds against the CPU separately.

use anyhow::{Result, bail};

use super::gpu::Attention;
use super::gpu::{Bf16, Buf, Gpu};
use super::launch::{self, Attn};
use crate::rng::Rng;

/// The tensor-core attention kernels against the plain ones, on the GPU,
/// on random inputs of both head sizes (forward and backward, T not a
/// multiple of the tiles, GQA, whole rows and a packed batch). Returns the worst relative difference over
/// every output (NaN if any output is not finite). A few milliseconds: run
/// before the tensor-core kernels are trusted with a benchmark or training.
pub fn self_check(g: &Gpu) -> Result<f64> {
    let before = g.attention();
    let mut rng = Rng::new(0x5e1f);
    let mut worst = 0.0f64;
    // the packed batch: examples of 40, 1, 70 and 39 tokens in one row of 150
    let packed: Vec<i32> = [(0, 40), (40, 1), (41, 70), (111, 39)]
        .iter()
        .flat_map(|&(start, len)| std::iter::repeat_n(start, len as usize))
        .collect();
    let seg0 = g.upload(&packed)?;
    for (d, seg0) in [
        (Attn { b: 2, t: 150, nh: 4, kvh: 2, hs: 64 }, None),
        (Attn { b: 1, t: 77, nh: 4, kvh: 1, hs: 128 }, None),
        (Attn { b: 1, t: 150, nh: 4, kvh: 2, hs: 64 }, Some(&seg0)),
    ] {
        let (nq, nkv, nr) = (d.b * d.t * d.nh * d.hs, d.b * d.t * d.kvh * d.hs, d.b * d.t * d.nh);
        let (q, kk, v, dout) =
            (randv(&mut rng, nq, 1.0), randv(&mut rng, nkv, 1.0), randv(&mut rng, nkv, 1.0), randv(&mut rng, nq, 1.0));
        let (qb, kb, vb, db) = (upb(g, &q)?, upb(g, &kk)?, upb(g, &v)?, upb(g, &dout)?);
        let mut results = Vec::new();
        for a in [Attention::Plain, Attention::Tc] {
            g.set_attention(a);
            let poison = |n: usize| g.upload(&vec![0xffffu16; n]);
            let (mut out, mut lse) = (poison(nq)?, g.upload(&vec![f32::NAN; nr])?);
            launch::attention_forward(g, &mut out, &mut lse, &qb, &kb, &vb, seg0, d)?;
            let (mut dq, mut dk, mut dv, mut delta) =
                (g.zeros::<Bf16>(nq)?, g.zeros::<Bf16>(nkv)?, g.zeros::<Bf16>(nkv)?, g.zeros::<f32>(nr)?);
            if a == Attention::Tc {
                (dq, dk, dv) = (poison(nq)?, poison(nkv)?, poison(nkv)?);
            }
            launch::attention_backward(
                g, &mut dq, &mut dk, &mut dv, &mut delta, &db, &out, &lse, &qb, &kb, &vb, seg0, d,
            )?;
            results.push([
                down(g, &out, nq)?,
                g.download(&lse, nr)?,
                down(g, &dq, nq)?,
                down(g, &dk, nkv)?,
                down(g, &dv, nkv)?,
            ]);
        }
        for (x, y) in results[1].iter().zip(&results[0]) {
            let e = rel_err(x, y);
            worst = if e.is_nan() || worst.is_nan() { f64::NAN } else { worst.max(e) };
        }
    }
    g.set_attention(before);
    Ok(worst)
}

/// Picks the attention kernels for a run: `plain` as asked; `tc` only if
/// self_check passes (else an error); `auto` tries tc and falls back to
/// plain, saying so.
pub fn choose(g: &Gpu, requested: Attention) -> Result<Attention> {
    if requested == Attention::Plain {
        g.set_attention(Attention::Plain);
        return Ok(Attention::Plain);
    }
    let worst = self_check(g)?;
    let ok = worst.is_finite() && worst <= 2e-2;
    eprintln!(
        "attention: tensor-core kernels vs plain, worst relative difference {worst:.2e} ({})",
        if ok { "ok" } else { "FAILED" }
    );
    if ok {
        g.set_attention(Attention::Tc);
        return Ok(Attention::Tc);
    }
    if requested == Attention::Tc {
        bail!(
            "--attention tc: the tensor-core attention kernels disagree with the plain ones ({worst:.2e}); use --attention plain"
        );
    }
    eprintln!("attention: falling back to the plain kernels");
    g.set_attention(Attention::Plain);
    Ok(Attention::Plain)
}

/// ||a - b|| / ||b|| (0 when both are zero); NaN anywhere gives NaN.
/// (These small helpers serve gpu-check too.)
pub(super) fn rel_err(a: &[f32], b: &[f32]) -> f64 {
    assert_eq!(a.len(), b.len());
    let (mut num, mut den) = (0.0f64, 0.0f64);
    for (&x, &y) in a.iter().zip(b) {
        if !x.is_finite() || !y.is_finite() {
            return f64::NAN;
        }
        num += (x as f64 - y as f64).powi(2);
        den += (y as f64).powi(2);
    }
    if den == 0.0 { num.sqrt() } else { (num / den).sqrt() }
}

/// n normal values times `scale`, each rounded to bf16 (kept as f32).
pub(super) fn randv(rng: &mut Rng, n: usize, scale: f32) -> Vec<f32> {
    let mut v = vec![0.0; n];
    rng.fill_normal(&mut v);
    v.iter().map(|x| half::bf16::from_f32(x * scale).to_f32()).collect()
}

/// f32 values to a bf16 buffer on the device.
pub(super) fn upb(g: &Gpu, x: &[f32]) -> Result<Buf<Bf16>> {
    g.upload(&x.iter().map(|&v| half::bf16::from_f32(v).to_bits()).collect::<Vec<Bf16>>())
}

/// The first n values of a bf16 buffer, widened to f32.
pub(super) fn down(g: &Gpu, b: &Buf<Bf16>, n: usize) -> Result<Vec<f32>> {
    Ok(g.download(b, n)?.into_iter().map(|v| half::bf16::from_bits(v).to_f32()).collect())
}
