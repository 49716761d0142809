//! The LoRA baseline (`src/lora.rs`): a linear layer y = x W^T + s (x A^T) B^T
//! with s = alpha / r. Its forward is checked against the same sum written
//! out in f64 loops, its merge against its unmerged forward, and its
//! backward (dA, dB) against central finite differences of a scalar loss
//! computed in f64 from the formula, not from the code.

use lift::lora::Adapter;

/// xorshift64*, uniform in [-1, 1).
struct TestRng(u64);

impl TestRng {
    fn signed(&mut self) -> f32 {
        self.0 ^= self.0 >> 12;
        self.0 ^= self.0 << 25;
        self.0 ^= self.0 >> 27;
        let x = self.0.wrapping_mul(0x2545_F491_4F6C_DD1D);
        ((x >> 40) as f32 / (1u32 << 24) as f32) * 2.0 - 1.0
    }
    fn vec(&mut self, n: usize, scale: f32) -> Vec<f32> {
        (0..n).map(|_| self.signed() * scale).collect()
    }
}

/// N rows, IC inputs, OC outputs, rank r: small, odd sizes.
const N: usize = 5;
const IC: usize = 12;
const OC: usize = 9;
const R: usize = 3;

/// An adapter with both factors non-zero (B starts at zero in training,
/// which would hide every term that goes through it).
fn adapter(rng: &mut TestRng) -> Adapter {
    let mut uniform = || (rng.signed() + 1.0) / 2.0;
    let mut ad = Adapter::new(OC, IC, R, 6.0, &mut uniform);
    ad.b = rng.vec(OC * R, 0.5);
    ad
}

/// y (N, OC) = x W^T + s (x A^T) B^T, in f64 from the definition.
fn reference_forward(x: &[f64], w: &[f64], a: &[f64], b: &[f64], s: f64) -> Vec<f64> {
    let mut y = vec![0.0; N * OC];
    for n in 0..N {
        let xa: Vec<f64> = (0..R).map(|k| (0..IC).map(|i| x[n * IC + i] * a[k * IC + i]).sum()).collect();
        for o in 0..OC {
            let base: f64 = (0..IC).map(|i| x[n * IC + i] * w[o * IC + i]).sum();
            let low: f64 = (0..R).map(|k| xa[k] * b[o * R + k]).sum();
            y[n * OC + o] = base + s * low;
        }
    }
    y
}

fn to64(v: &[f32]) -> Vec<f64> {
    v.iter().map(|&x| x as f64).collect()
}

fn max_abs_diff(a: &[f32], b: &[f64]) -> f64 {
    a.iter().zip(b).map(|(&x, &y)| (x as f64 - y).abs()).fold(0.0, f64::max)
}

#[test]
fn a_new_adapter_starts_at_the_base_model() {
    // PEFT's init: B = 0, A ~ U(-1/sqrt(IC), 1/sqrt(IC)); so W + s B A = W exactly.
    let mut rng = TestRng(11);
    let mut uniform = || (rng.signed() + 1.0) / 2.0;
    let ad = Adapter::new(OC, IC, R, 16.0, &mut uniform);
    assert_eq!(ad.scale, 16.0 / R as f32);
    assert!(ad.b.iter().all(|&x| x == 0.0));
    let bound = 1.0 / (IC as f32).sqrt();
    assert!(ad.a.iter().all(|&x| x.abs() <= bound) && ad.a.iter().any(|&x| x != 0.0));
    let w = TestRng(12).vec(OC * IC, 1.0);
    let mut merged = vec![0.0; OC * IC];
    ad.merge_into(&mut merged, &w);
    assert_eq!(merged, w, "an untrained adapter leaves the weight bit-identical");
}

#[test]
fn forward_and_merge_equal_the_definition() {
    let mut rng = TestRng(21);
    let ad = adapter(&mut rng);
    let w = rng.vec(OC * IC, 0.3);
    let x = rng.vec(N * IC, 1.0);
    let want = reference_forward(&to64(&x), &to64(&w), &to64(&ad.a), &to64(&ad.b), ad.scale as f64);

    let mut unmerged = vec![0.0f32; N * OC];
    ad.forward_unmerged(&mut unmerged, &x, &w, N);
    // The merged weight run through the plain linear layer.
    let mut merged_w = vec![0.0f32; OC * IC];
    ad.merge_into(&mut merged_w, &w);
    let mut merged = vec![0.0f32; N * OC];
    lift::cpu::matmul_forward(&mut merged, &x, &merged_w, N, IC, OC);

    let scale = want.iter().fold(0.0f64, |m, v| m.max(v.abs()));
    let (e_unmerged, e_merged) = (max_abs_diff(&unmerged, &want) / scale, max_abs_diff(&merged, &want) / scale);
    println!("relative error: unmerged {e_unmerged:.1e}, merged {e_merged:.1e}");
    assert!(e_unmerged < 1e-6, "forward_unmerged is off the definition by {e_unmerged:e}");
    assert!(e_merged < 1e-6, "the merged weight's forward is off the definition by {e_merged:e}");
}

#[test]
fn backward_equals_finite_differences() {
    // Loss L = sum(y * G) for a fixed random G, so dL/dy = G, which is the
    // dout that Adapter::backward takes.
    let mut rng = TestRng(31);
    let ad = adapter(&mut rng);
    let w = rng.vec(OC * IC, 0.3);
    let x = rng.vec(N * IC, 1.0);
    let g = rng.vec(N * OC, 1.0);
    let (x64, w64, g64, s) = (to64(&x), to64(&w), to64(&g), ad.scale as f64);
    let loss = |a: &[f64], b: &[f64]| -> f64 {
        reference_forward(&x64, &w64, a, b, s).iter().zip(&g64).map(|(y, g)| y * g).sum()
    };

    // backward accumulates: start from a non-zero buffer to check that too.
    let (mut da, mut db) = (vec![1.0f32; R * IC], vec![-1.0f32; OC * R]);
    ad.backward(&mut da, &mut db, &g, &x, N);
    da.iter_mut().for_each(|v| *v -= 1.0);
    db.iter_mut().for_each(|v| *v += 1.0);

    let h = 1e-5;
    let (a0, b0) = (to64(&ad.a), to64(&ad.b));
    let mut worst = 0.0f64;
    for (name, grad, is_a) in [("dA", &da, true), ("dB", &db, false)] {
        let base = if is_a { &a0 } else { &b0 };
        let mut fd = vec![0.0f64; base.len()];
        for (i, fdi) in fd.iter_mut().enumerate() {
            let (mut plus, mut minus) = (base.clone(), base.clone());
            plus[i] += h;
            minus[i] -= h;
            let (lp, lm) =
                if is_a { (loss(&plus, &b0), loss(&minus, &b0)) } else { (loss(&a0, &plus), loss(&a0, &minus)) };
            *fdi = (lp - lm) / (2.0 * h);
        }
        let scale = fd.iter().fold(0.0f64, |m, v| m.max(v.abs()));
        let err = max_abs_diff(grad, &fd) / scale;
        println!("{name}: relative error against finite differences {err:.1e}");
        worst = worst.max(err);
    }
    assert!(worst < 1e-5, "LoRA backward is off the finite differences by {worst:e}");
}
