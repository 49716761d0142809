//! The algorithm of kernels/decode_attention.cu, written out here in Rust as
//! the kernel computes it (f32, q, k and v as bf16 values, the cache length
//! split into ranges, each range walked in tiles of 32 with an online
//! softmax, the partials merged by their log-sum-exp, the output rounded to
//! bf16), against the plain attention of `cpu::decode_attention` on the same
//! cache. tests/gpu/emu/test_decode.cpp runs the kernel's own text on the
//! CPU; `lift gpu-check` runs it on a GPU.

use half::bf16;
use lift::cpu;
use lift::rng::Rng;

const TILE: usize = 32;

fn bf(x: f32) -> f32 {
    bf16::from_f32(x).to_f32()
}

/// One (row, head)'s partial over slots[lo..hi]: (softmax-weighted mean of v, lse),
/// or (zeros, -inf) for an empty range. q is the head's query (HS).
fn partial(q: &[f32], k: &[f32], v: &[f32], slots: &[u32], kv_off: usize, kvd: usize) -> (Vec<f32>, f32) {
    let hs = q.len();
    let scale = 1.0 / (hs as f32).sqrt();
    let (mut m, mut l, mut o) = (f32::NEG_INFINITY, 0.0f32, vec![0.0f32; hs]);
    for tile in slots.chunks(TILE) {
        let at = |s: u32| s as usize * kvd + kv_off;
        let sc: Vec<f32> = tile.iter().map(|&s| cpu::dot(q, &k[at(s)..at(s) + hs]) * scale).collect();
        let m_new = sc.iter().fold(m, |a, &b| a.max(b));
        let p: Vec<f32> = sc.iter().map(|&x| (x - m_new).exp()).collect();
        let corr = (m - m_new).exp();
        l = l * corr + p.iter().sum::<f32>();
        o.iter_mut().for_each(|x| *x *= corr);
        for (&pj, &s) in p.iter().zip(tile) {
            cpu::axpy(&mut o, pj, &v[at(s)..at(s) + hs]);
        }
        m = m_new;
    }
    if slots.is_empty() {
        return (o, f32::NEG_INFINITY);
    }
    (o.iter().map(|x| x / l).collect(), m + l.ln())
}

/// decode_attention_partial over n_splits ranges of `chunk`, then decode_attention_merge.
#[allow(clippy::too_many_arguments)]
fn split_attention(
    q: &[f32],
    k: &[f32],
    v: &[f32],
    rows: &[Vec<u32>],
    nh: usize,
    kvh: usize,
    hs: usize,
    chunk: usize,
) -> Vec<f32> {
    let (kvd, group) = (kvh * hs, nh / kvh);
    let mut out = vec![0.0f32; rows.len() * nh * hs];
    for (r, slots) in rows.iter().enumerate() {
        let n_splits = slots.len().div_ceil(chunk);
        for h in 0..nh {
            let qh = &q[(r * nh + h) * hs..][..hs];
            let parts: Vec<(Vec<f32>, f32)> = (0..n_splits + 1) // one more: an empty split
                .map(|s| {
                    let (lo, hi) = ((s * chunk).min(slots.len()), ((s + 1) * chunk).min(slots.len()));
                    partial(qh, k, v, &slots[lo..hi], (h / group) * hs, kvd)
                })
                .collect();
            let mx = parts.iter().fold(f32::NEG_INFINITY, |a, p| a.max(p.1));
            let (mut acc, mut wsum) = (vec![0.0f32; hs], 0.0f32);
            for (o, lse) in parts.iter().filter(|p| p.1 != f32::NEG_INFINITY) {
                let w = (lse - mx).exp();
                wsum += w;
                cpu::axpy(&mut acc, w, o);
            }
            for (dst, a) in out[(r * nh + h) * hs..][..hs].iter_mut().zip(&acc) {
                *dst = bf(a / wsum);
            }
        }
    }
    out
}

fn rel_err(a: &[f32], b: &[f32]) -> f64 {
    let num: f64 = a.iter().zip(b).map(|(x, y)| (*x as f64 - *y as f64).powi(2)).sum();
    let den: f64 = b.iter().map(|y| (*y as f64).powi(2)).sum();
    (num / den).sqrt()
}

/// Split softmax + merge equals the plain attention: cache lengths 1, around
/// the tile, and above 4096; rows sharing a shuffled pool of slots; GQA; one
/// split, splits of one tile, and splits of several tiles. The only
/// difference left is the bf16 rounding of the output (relative 2^-9).
#[test]
fn split_decode_attention_equals_the_plain_attention() {
    let mut rng = Rng::new(5);
    let (nh, kvh, hs) = (6, 2, 64);
    let lens = [1usize, 31, 32, 33, 100, 4100];
    let slots = 4100 + 200;
    let randv = |rng: &mut Rng, n: usize| -> Vec<f32> {
        let mut x = vec![0.0f32; n];
        rng.fill_normal(&mut x);
        x.iter().map(|&v| bf(v)).collect()
    };
    let q = randv(&mut rng, lens.len() * nh * hs);
    let (k, v) = (randv(&mut rng, slots * kvh * hs), randv(&mut rng, slots * kvh * hs));
    let rows: Vec<Vec<u32>> = lens
        .iter()
        .map(|&len| {
            let mut all: Vec<u32> = (0..slots as u32).collect();
            rng.shuffle(&mut all);
            all.truncate(len);
            all
        })
        .collect();
    let mut want = vec![0.0f32; lens.len() * nh * hs];
    cpu::decode_attention(&mut want, &q, &k, &v, &rows, nh, kvh, hs);
    for chunk in [4128, TILE, 5 * TILE] {
        let got = split_attention(&q, &k, &v, &rows, nh, kvh, hs, chunk);
        let e = rel_err(&got, &want);
        println!("chunk {chunk}: relative error {e:.2e}");
        assert!(e < 4e-3, "split decode attention (chunk {chunk}) differs from the plain one by {e:.2e}");
    }
}
