//! Principal-weight selection (`src/select.rs`) checked against independent
//! references: matrices built with a known SVD (so W_r is known without any
//! SVD code), brute-force sorting for top-k, plain arithmetic for budgets, and
//! the exact path as the reference for the randomized one, on synthetic and
//! on SmolLM2's real weights.

mod common;

use lift::select::*;

// ----------------------------------------------------------------------------
// Test data, from a generator of the test's own (xorshift64* + Box-Muller)

struct TestRng(u64);

impl TestRng {
    fn new(seed: u64) -> TestRng {
        TestRng(seed.wrapping_mul(0x2545_F491_4F6C_DD1D) | 1)
    }
    fn next(&mut self) -> u64 {
        self.0 ^= self.0 >> 12;
        self.0 ^= self.0 << 25;
        self.0 ^= self.0 >> 27;
        self.0.wrapping_mul(0x2545_F491_4F6C_DD1D)
    }
    fn uniform(&mut self) -> f64 {
        (self.next() >> 11) as f64 / (1u64 << 53) as f64
    }
    fn normal(&mut self) -> f64 {
        let u1 = 1.0 - self.uniform();
        let u2 = self.uniform();
        (-2.0 * u1.ln()).sqrt() * (2.0 * std::f64::consts::PI * u2).cos()
    }
}

/// `cols` orthonormal vectors of length `rows` (f64): Gaussian vectors through
/// modified Gram-Schmidt, done twice for orthogonality to rounding.
fn orthonormal_columns(rows: usize, cols: usize, rng: &mut TestRng) -> Vec<Vec<f64>> {
    let mut q: Vec<Vec<f64>> = Vec::with_capacity(cols);
    for _ in 0..cols {
        let mut v: Vec<f64> = (0..rows).map(|_| rng.normal()).collect();
        for _ in 0..2 {
            for u in &q {
                let d: f64 = u.iter().zip(&v).map(|(a, b)| a * b).sum();
                v.iter_mut().zip(u).for_each(|(x, y)| *x -= d * y);
            }
        }
        let norm = v.iter().map(|x| x * x).sum::<f64>().sqrt();
        v.iter_mut().for_each(|x| *x /= norm);
        q.push(v);
    }
    q
}

/// W = U diag(s) V^T (out x in) with random orthonormal U (out x m) and
/// V (in x m), m = s.len() = min(out, in).
struct KnownSvd {
    out: usize,
    inp: usize,
    u: Vec<Vec<f64>>,
    s: Vec<f64>,
    v: Vec<Vec<f64>>,
    w: Vec<f32>,
}

impl KnownSvd {
    fn new(out: usize, inp: usize, s: Vec<f64>, seed: u64) -> KnownSvd {
        assert_eq!(s.len(), out.min(inp));
        let mut rng = TestRng::new(seed);
        let u = orthonormal_columns(out, s.len(), &mut rng);
        let v = orthonormal_columns(inp, s.len(), &mut rng);
        let mut k = KnownSvd { out, inp, u, s, v, w: Vec::new() };
        k.w = k.truncated(k.s.len()).iter().map(|&x| x as f32).collect();
        k
    }

    /// U_r S_r V_r^T (out x in), in f64.
    fn truncated(&self, r: usize) -> Vec<f64> {
        let mut a = vec![0.0f64; self.out * self.inp];
        for t in 0..r {
            for i in 0..self.out {
                let c = self.u[t][i] * self.s[t];
                let row = &mut a[i * self.inp..(i + 1) * self.inp];
                row.iter_mut().zip(&self.v[t]).for_each(|(x, y)| *x += c * y);
            }
        }
        a
    }
}

/// r singular values in [4, 6], the rest at most 1: a clear gap after r.
fn gapped_spectrum(m: usize, r: usize) -> Vec<f64> {
    (0..m).map(|i| if i < r { 6.0 - 2.0 * i as f64 / r as f64 } else { 1.0 - (i - r) as f64 / m as f64 }).collect()
}

/// Linear from 2 down to 1: sigma_r / sigma_{r+1} ~ 1 + 1/(2m), flatter than
/// an LLM weight's.
fn flat_spectrum(m: usize) -> Vec<f64> {
    (0..m).map(|i| 2.0 - i as f64 / m as f64).collect()
}

fn max_abs_diff(a: &[f32], b: &[f64]) -> f64 {
    a.iter().zip(b).map(|(&x, &y)| (x as f64 - y).abs()).fold(0.0, f64::max)
}

fn max_abs(b: &[f64]) -> f64 {
    b.iter().fold(0.0f64, |m, x| m.max(x.abs()))
}

// ----------------------------------------------------------------------------
// The exact low-rank approximation

#[test]
fn exact_low_rank_equals_known_truncated_svd() {
    // Both orientations: out < in works on W W^T, out > in on W^T W.
    for (out, inp) in [(96, 160), (160, 96)] {
        let m = out.min(inp);
        for r in [1, 8, 40] {
            for (kind, s) in [("gapped", gapped_spectrum(m, r)), ("flat", flat_spectrum(m))] {
                let k = KnownSvd::new(out, inp, s, 7 + r as u64);
                let w_r = low_rank_approx(&k.w, out, inp, r, Approx::Exact);
                let reference = k.truncated(r);
                let err = max_abs_diff(&w_r, &reference) / max_abs(&reference);
                println!("{out}x{inp} r={r} {kind}: max |W_r - U_r S_r V_r^T| / max = {err:.2e}");
                assert!(err < 1e-5, "{out}x{inp} r={r} {kind}: relative error {err:e}");

                // the singular values themselves
                let sigma = singular_values(&k.w, out, inp, r);
                for (t, (got, want)) in sigma.iter().zip(&k.s).enumerate() {
                    assert!((got - want).abs() < 1e-6 * want, "sigma_{t}: {got} vs {want}");
                }

                // Eckart-Young: ||W - W_r||_F = sqrt(sum of the dropped sigma^2)
                let resid: f64 = k.w.iter().zip(&w_r).map(|(&a, &b)| (a as f64 - b as f64).powi(2)).sum::<f64>().sqrt();
                let want = k.s[r..].iter().map(|x| x * x).sum::<f64>().sqrt();
                assert!((resid - want).abs() < 1e-5 * want, "Eckart-Young: {resid} vs {want}");
            }
        }
    }
}

#[test]
fn exact_low_rank_handles_full_and_deficient_rank() {
    let (out, inp) = (80, 120);
    // r >= min(out, in): W_r is W itself, bit for bit
    let k = KnownSvd::new(out, inp, flat_spectrum(80), 1);
    assert_eq!(low_rank_approx(&k.w, out, inp, 80, Approx::Exact), k.w);
    assert_eq!(low_rank_approx(&k.w, out, inp, 1000, Approx::Exact), k.w);

    // rank 10: sigma_10.. = 0, so W_r = W for any r >= 10, and the top-4
    // approximation is still the known one (the zero eigenvalues of the Gram
    // matrix must not disturb the others)
    let s: Vec<f64> = (0..80).map(|i| if i < 10 { 5.0 - 0.3 * i as f64 } else { 0.0 }).collect();
    for (out, inp) in [(80, 120), (120, 80)] {
        let k = KnownSvd::new(out, inp, s.clone(), 2);
        let full: Vec<f64> = k.w.iter().map(|&x| x as f64).collect();
        for r in [10, 30] {
            let err = max_abs_diff(&low_rank_approx(&k.w, out, inp, r, Approx::Exact), &full) / max_abs(&full);
            assert!(err < 1e-5, "{out}x{inp} rank 10, r = {r}: W_r should be W, error {err:e}");
        }
        let reference = k.truncated(4);
        let err = max_abs_diff(&low_rank_approx(&k.w, out, inp, 4, Approx::Exact), &reference) / max_abs(&reference);
        assert!(err < 1e-5, "{out}x{inp} rank 10, r = 4: error {err:e}");
        let sigma = singular_values(&k.w, out, inp, 12);
        assert!(sigma[10].abs() < 1e-5 && sigma[11].abs() < 1e-5, "zero singular values: {sigma:?}");
    }
    // and the zero matrix
    assert!(low_rank_approx(&vec![0.0; 40 * 30], 40, 30, 5, Approx::Exact).iter().all(|&x| x == 0.0));
}

#[test]
fn exact_principal_mask_is_top_k_of_the_known_w_r() {
    let (out, inp, r) = (120, 200, 16);
    let k = KnownSvd::new(out, inp, flat_spectrum(120), 3);
    let reference = k.truncated(r);
    let reference_f32: Vec<f32> = reference.iter().map(|&x| x as f32).collect();
    let n_sel = budget_k(out, inp, Budget::Density(0.05)).unwrap();
    let mask = principal_mask(&k.w, out, inp, n_sel, r, Approx::Exact);
    let want = brute_top_k(&reference_f32, n_sel);
    let overlap = mask_overlap(&want, &mask);
    assert_eq!(mask.len(), n_sel);
    // only entries within rounding of the threshold may differ
    assert!(overlap >= 0.999, "overlap with the known W_r's mask: {overlap}");
}

// ----------------------------------------------------------------------------
// The randomized approximation against the exact one

#[test]
fn randomized_matches_exact_with_a_spectral_gap() {
    let (out, inp, r) = (300, 500, 20);
    let k = KnownSvd::new(out, inp, gapped_spectrum(300, r), 4);
    let exact = low_rank_approx(&k.w, out, inp, r, Approx::Exact);
    let exact64: Vec<f64> = exact.iter().map(|&x| x as f64).collect();
    // With a 4x gap even a thin sketch converges fast: the error fades like
    // (sigma_{q+1} / sigma_r)^(2 iters + 1) = 4^-9 ~ 4e-6 after 4 iterations.
    for how in [Approx::DEFAULT, Approx::Randomized { oversample: 10, power_iters: 4, seed: 9 }] {
        let approx = low_rank_approx(&k.w, out, inp, r, how);
        let err = max_abs_diff(&approx, &exact64) / max_abs(&exact64);
        println!("{how:?}: max |randomized - exact| / max = {err:.2e}");
        assert!(err < 1e-4, "{how:?}: relative error {err:e}");
    }
    // the same for W^T (out > in)
    let wt: Vec<f32> = (0..inp * out).map(|t| k.w[(t % out) * inp + t / out]).collect();
    let exact_t = low_rank_approx(&wt, inp, out, r, Approx::Exact);
    let approx_t = low_rank_approx(&wt, inp, out, r, Approx::DEFAULT);
    let exact_t64: Vec<f64> = exact_t.iter().map(|&x| x as f64).collect();
    assert!(max_abs_diff(&approx_t, &exact_t64) / max_abs(&exact_t64) < 1e-4);
}

#[test]
fn randomized_handles_rank_below_the_sketch_width() {
    // rank 12 < q = 8 + 16: the sketch has dependent columns, which the
    // orthonormalization must drop rather than amplify
    let (out, inp) = (200, 300);
    let s: Vec<f64> = (0..200).map(|i| if i < 12 { 6.0 - 0.4 * i as f64 } else { 0.0 }).collect();
    let k = KnownSvd::new(out, inp, s, 5);
    let how = Approx::Randomized { oversample: 16, power_iters: 3, seed: 1 };
    for r in [4, 12] {
        let reference = k.truncated(r);
        let err = max_abs_diff(&low_rank_approx(&k.w, out, inp, r, how), &reference) / max_abs(&reference);
        assert!(err < 1e-4, "rank 12, r = {r}: relative error {err:e}");
    }
}

#[test]
fn randomized_falls_back_to_exact_when_the_sketch_covers_the_matrix() {
    let (out, inp) = (64, 100);
    let k = KnownSvd::new(out, inp, flat_spectrum(64), 6);
    let how = Approx::Randomized { oversample: 60, power_iters: 1, seed: 0 }; // q = 70 >= 64
    assert_eq!(low_rank_approx(&k.w, out, inp, 10, how), low_rank_approx(&k.w, out, inp, 10, Approx::Exact));
}

#[test]
fn randomized_is_deterministic_by_seed() {
    let (out, inp) = (150, 250);
    let k = KnownSvd::new(out, inp, flat_spectrum(150), 8);
    let how = |seed| Approx::Randomized { oversample: 20, power_iters: 2, seed };
    let a = low_rank_approx(&k.w, out, inp, 10, how(1));
    assert_eq!(a, low_rank_approx(&k.w, out, inp, 10, how(1)));
    assert_ne!(a, low_rank_approx(&k.w, out, inp, 10, how(2)));
}

/// A spectrum shaped like an LLM weight's: sigma_i = (1 + i)^-1/4, so
/// sigma_32 / sigma_33 = 1.008 and sigma_128 / sigma_129 = 1.002.
#[test]
fn randomized_mask_agrees_with_exact_on_a_flat_spectrum() {
    let (out, inp) = (384, 1024);
    let s: Vec<f64> = (0..384).map(|i| (1.0 + i as f64).powf(-0.25)).collect();
    let k = KnownSvd::new(out, inp, s, 10);
    let n_sel = budget_k(out, inp, Budget::Density(DEFAULT_DENSITY)).unwrap();
    for r in [DEFAULT_FILTER_RANK, 32] {
        let exact = principal_mask(&k.w, out, inp, n_sel, r, Approx::Exact);
        let fast = principal_mask(&k.w, out, inp, n_sel, r, Approx::DEFAULT);
        let overlap = mask_overlap(&exact, &fast);
        println!("flat spectrum {out}x{inp}, r = {r}: mask agreement {overlap:.5}");
        assert!(overlap >= 0.99, "r = {r}: randomized mask agrees on only {overlap}");
    }
}

// ----------------------------------------------------------------------------
// Selection

/// The reference: every index sorted by (|x| descending, index ascending),
/// the first k, sorted back by index.
fn brute_top_k(x: &[f32], k: usize) -> Vec<u32> {
    let mut idx: Vec<u32> = (0..x.len() as u32).collect();
    idx.sort_by(|&a, &b| x[b as usize].abs().total_cmp(&x[a as usize].abs()).then(a.cmp(&b)));
    idx.truncate(k);
    idx.sort_unstable();
    idx
}

/// The k smallest |x|, ties to the smaller index, by a full sort.
fn brute_bottom_k(x: &[f32], k: usize) -> Vec<u32> {
    let mut idx: Vec<u32> = (0..x.len() as u32).collect();
    idx.sort_by(|&a, &b| x[a as usize].abs().total_cmp(&x[b as usize].abs()).then(a.cmp(&b)));
    idx.truncate(k);
    idx.sort_unstable();
    idx
}

fn assert_mask_shape(mask: &[u32], k: usize, n: usize) {
    assert_eq!(mask.len(), k);
    assert!(mask.windows(2).all(|p| p[0] < p[1]), "mask not strictly ascending");
    assert!(mask.iter().all(|&i| (i as usize) < n));
}

#[test]
fn top_k_abs_equals_a_full_sort_with_ties_to_the_smaller_index() {
    let mut rng = TestRng::new(11);
    // n = 200_003 spans several of top_k_abs's 65536-entry chunks, so the
    // quota of tied entries is split across chunks
    for n in [1usize, 7, 1000, 200_003] {
        // a few levels, both signs and -0.0: ties everywhere
        let levels = [0.0f32, -0.0, 0.25, -0.25, 1.0, -1.0, 3.0, -3.0];
        let tied: Vec<f32> = (0..n).map(|_| levels[(rng.next() % 8) as usize]).collect();
        let distinct: Vec<f32> = (0..n).map(|_| rng.normal() as f32).collect();
        for x in [&tied, &distinct] {
            let mut ks = vec![0, 1, n / 3, n / 2, n - 1, n];
            // thresholds just inside each tie group
            for level in [3.0f32, 1.0, 0.25] {
                ks.push(x.iter().filter(|v| v.abs() >= level).count().saturating_sub(1).min(n));
            }
            for k in ks {
                let got = top_k_abs(x, k);
                assert_mask_shape(&got, k, n);
                assert_eq!(got, brute_top_k(x, k), "n = {n}, k = {k}");
            }
        }
    }
    assert!(top_k_abs(&[], 0).is_empty());
}

/// `--select smallest` (the released code's lift_sparse at HEAD): the k
/// smallest |x| with ties to the smaller index, against a full sort, and
/// on a matrix of known SVD the k smallest |W_r|.
#[test]
fn select_smallest_equals_a_full_sort_and_the_known_w_r() {
    let mut rng = TestRng::new(12);
    for n in [1usize, 9, 1000, 200_003] {
        let levels = [0.0f32, -0.0, 0.25, -0.25, 1.0, -1.0, 3.0, -3.0];
        let tied: Vec<f32> = (0..n).map(|_| levels[(rng.next() % 8) as usize]).collect();
        let distinct: Vec<f32> = (0..n).map(|_| rng.normal() as f32).collect();
        for x in [&tied, &distinct] {
            for k in [0, 1, n / 3, n / 2, n - 1, n] {
                let got = select_k_abs(x, k, Select::Smallest);
                assert_mask_shape(&got, k, n);
                assert_eq!(got, brute_bottom_k(x, k), "n = {n}, k = {k}");
            }
        }
    }
    let (out, inp, r) = (120, 200, 16);
    let known = KnownSvd::new(out, inp, flat_spectrum(120), 4);
    let reference: Vec<f32> = known.truncated(r).iter().map(|&x| x as f32).collect();
    let k = budget_k(out, inp, Budget::Density(0.05)).unwrap();
    let mask = principal_mask_of(&known.w, out, inp, k, r, Approx::Exact, Select::Smallest);
    let overlap = mask_overlap(&brute_bottom_k(&reference, k), &mask);
    assert!(overlap >= 0.999, "overlap with the known W_r's smallest entries: {overlap}");
    // and it is not the largest-entry mask
    assert!(mask_overlap(&brute_top_k(&reference, k), &mask) < 0.01);
}

// ----------------------------------------------------------------------------
// PiSSA's adapters from the top-r singular triplets

/// On a matrix of known SVD, PiSSA's s B A is the known U_r S_r V_r^T, each
/// component s b_i a_i^T is sigma_i u_i v_i^T (whatever sign the solver gave
/// the pair), and residual + s B A is W to rounding; the randomized path
/// (PEFT's pissa_niter) agrees on a gapped spectrum.
#[test]
fn pissa_adapters_are_the_known_top_r_svd() {
    for (out, inp) in [(60, 90), (90, 60)] {
        let r = 5;
        let m = out.min(inp);
        let known = KnownSvd::new(out, inp, gapped_spectrum(m, r), 21);
        let alpha = 10.0f32;
        for niter in [None, Some((6, 3u64))] {
            let (ad, residual) = lift::lora::Adapter::pissa(&known.w, out, inp, r, alpha, niter);
            assert_eq!((ad.r, ad.oc, ad.ic), (r, out, inp));
            let s = ad.scale as f64;
            assert!((s - alpha as f64 / r as f64).abs() < 1e-12);
            let mut worst = 0.0f64;
            for i in 0..r {
                for o in 0..out {
                    for j in 0..inp {
                        let got = s * ad.b[o * r + i] as f64 * ad.a[i * inp + j] as f64;
                        let want = known.s[i] * known.u[i][o] * known.v[i][j];
                        worst = worst.max((got - want).abs());
                    }
                }
            }
            let tol = if niter.is_none() { 1e-5 } else { 1e-3 };
            assert!(worst / known.s[0] < tol, "{out}x{inp} {niter:?}: component error {worst}");
            let mut merged = vec![0.0f32; out * inp];
            ad.merge_into(&mut merged, &residual);
            let err = max_abs_diff(&merged, &known.w.iter().map(|&x| x as f64).collect::<Vec<_>>());
            assert!(err < 1e-5, "residual + s B A differs from W by {err}");
        }
    }
}

#[test]
fn magnitude_mask_is_top_k_of_abs_w() {
    let mut rng = TestRng::new(12);
    let w: Vec<f32> = (0..50_000).map(|_| (rng.normal() * 0.02) as f32).collect();
    for k in [0, 1, 2500, 50_000] {
        let mask = magnitude_mask(&w, k);
        assert_mask_shape(&mask, k, w.len());
        assert_eq!(mask, brute_top_k(&w, k));
    }
}

#[test]
fn random_mask_is_distinct_sorted_seeded_and_uniform() {
    for (n, k) in [(0, 0), (10, 0), (10, 10), (1000, 1), (331_776, 16_589), (100_000, 99_999)] {
        let mask = random_mask(n, k, 42);
        assert_mask_shape(&mask, k, n);
        assert_eq!(mask, random_mask(n, k, 42), "same seed, same mask");
    }
    assert_ne!(random_mask(100_000, 5000, 1), random_mask(100_000, 5000, 2));
    // every index equally likely: n = 20, k = 5 over 20000 seeds, each index
    // is picked with probability 1/4 (standard error 0.003)
    let mut counts = [0usize; 20];
    for seed in 0..20_000 {
        for i in random_mask(20, 5, seed) {
            counts[i as usize] += 1;
        }
    }
    for (i, &c) in counts.iter().enumerate() {
        let p = c as f64 / 20_000.0;
        assert!((p - 0.25).abs() < 0.015, "index {i} picked with frequency {p}");
    }
}

#[test]
fn mask_overlap_counts_shared_entries() {
    assert_eq!(mask_overlap(&[1, 2, 3, 4], &[1, 2, 3, 4]), 1.0);
    assert_eq!(mask_overlap(&[1, 2, 3, 4], &[5, 6, 7, 8]), 0.0);
    assert_eq!(mask_overlap(&[1, 2, 3, 4], &[0, 2, 4, 6]), 0.5);
    assert_eq!(mask_overlap(&[], &[]), 1.0);
}

// ----------------------------------------------------------------------------
// Budgets

#[test]
fn budgets_follow_density_and_lora_equivalent_rank() {
    let k = |o, i, b| budget_k(o, i, b).unwrap();
    // density: round(d * out * in)
    assert_eq!(k(576, 576, Budget::Density(0.05)), 16_589); // 16588.8
    assert_eq!(k(576, 1536, Budget::Density(0.05)), 44_237); // 44236.8
    assert_eq!(k(576, 576, Budget::Density(1.0)), 331_776);
    // rank: (out + in) * R, what a rank-R LoRA trains, capped at out * in
    assert_eq!(k(576, 576, Budget::Rank(128)), 147_456); // 44.4% of 331776
    assert!((147_456.0f64 / 331_776.0 - 0.4444).abs() < 1e-4);
    assert_eq!(k(4096, 4096, Budget::Rank(128)), 1_048_576); // 6.25%
    assert_eq!(k(192, 576, Budget::Rank(128)), 98_304);
    assert_eq!(k(576, 576, Budget::Rank(1000)), 331_776);

    let err = |b| budget_k(576, 576, b).unwrap_err().to_string();
    assert_eq!(err(Budget::Density(1.5)), "--density 1.5 is out of range (0, 1]");
    assert_eq!(err(Budget::Density(0.0)), "--density 0 is out of range (0, 1]");
    assert_eq!(err(Budget::Density(-0.1)), "--density -0.1 is out of range (0, 1]");
    assert_eq!(err(Budget::Density(f64::NAN)), "--density NaN is out of range (0, 1]");
    assert_eq!(err(Budget::Rank(0)), "--rank 0 is out of range (must be at least 1)");
}

#[test]
fn filter_rank_is_capped_at_the_smaller_side() {
    assert_eq!(filter_rank(576, 1536, 128).unwrap(), (128, false));
    assert_eq!(filter_rank(192, 576, 192).unwrap(), (192, false));
    assert_eq!(filter_rank(192, 576, 256).unwrap(), (192, true));
    assert_eq!(filter_rank(1536, 576, 1000).unwrap(), (576, true));
    assert_eq!(
        filter_rank(576, 576, 0).unwrap_err().to_string(),
        "--filter-rank 0 is out of range (must be at least 1)"
    );
}

// ----------------------------------------------------------------------------
// Real weights: SmolLM2-135M-Instruct

/// (name, out, in, values (out x in, row-major)).
type NamedWeight = (String, usize, usize, Vec<f32>);

/// The layers whose seven linear weights are checked: first, middle, last.
/// (All 30 layers take about 70 s in release on 2 cores; these three, 9 s.)
const SMOLLM2_LAYERS: [usize; 3] = [0, 15, 29];

/// SmolLM2-135M-Instruct's linear weights of `SMOLLM2_LAYERS` as (name, out,
/// in, values), dequantized from the Q4_1 GGUF by `lift::formats::gguf`. llama.cpp
/// stores the q and k rows permuted for its RoPE layout; a row permutation
/// permutes W_r and both masks alike, so the agreement does not see it.
fn smollm2_matrices() -> Option<Vec<NamedWeight>> {
    let path = common::smollm2_gguf()?;
    let gguf = lift::formats::gguf::GgufFile::open(&path).unwrap_or_else(|e| panic!("{e}"));
    let mut mats = Vec::new();
    for l in SMOLLM2_LAYERS {
        for kind in ["attn_q", "attn_k", "attn_v", "attn_output", "ffn_gate", "ffn_up", "ffn_down"] {
            let name = format!("blk.{l}.{kind}.weight");
            let t = gguf.require_tensor(&name).unwrap_or_else(|e| panic!("{e}"));
            // ggml dims are [in, out]: dims[0] varies fastest.
            let (inp, out) = (t.dims[0] as usize, t.dims[1] as usize);
            let w = gguf.tensor_f32(t).unwrap_or_else(|e| panic!("{e}"));
            mats.push((name, out, inp, w));
        }
    }
    Some(mats)
}

#[test]
fn smollm2_randomized_masks_agree_with_exact() {
    let Some(mats) = smollm2_matrices() else { return };
    for r in [32, DEFAULT_FILTER_RANK] {
        let mut worst = (1.0f64, String::new());
        let mut sum = 0.0;
        for (name, out, inp, w) in &mats {
            let k = budget_k(*out, *inp, Budget::Density(DEFAULT_DENSITY)).unwrap();
            let (r_used, _) = filter_rank(*out, *inp, r).unwrap();
            let t = std::time::Instant::now();
            let exact = principal_mask(w, *out, *inp, k, r_used, Approx::Exact);
            let t_exact = t.elapsed().as_secs_f64() * 1e3;
            let t = std::time::Instant::now();
            let fast = principal_mask(w, *out, *inp, k, r_used, Approx::DEFAULT);
            let t_fast = t.elapsed().as_secs_f64() * 1e3;
            let overlap = mask_overlap(&exact, &fast);
            // (q = r + oversample at or above the smaller side falls back to exact.)
            let note = if r_used + DEFAULT_OVERSAMPLE >= (*out).min(*inp) {
                "  (sketch covers the matrix: exact)"
            } else {
                ""
            };
            println!(
                "r = {r:3} {name:24} {out:4}x{inp:<4} agreement {overlap:.5}  exact {t_exact:6.1} ms  randomized {t_fast:6.1} ms{note}"
            );
            sum += overlap;
            if overlap < worst.0 {
                worst = (overlap, name.clone());
            }
        }
        println!("r = {r}: minimum agreement {:.5} ({}), mean {:.5}", worst.0, worst.1, sum / mats.len() as f64);
        assert!(worst.0 >= 0.99, "r = {r}: {} agrees on only {:.5}", worst.1, worst.0);
    }
}

/// On SmolLM2's real weights (layer 0's seven matrices, filter rank 32, 5%),
/// `--select smallest` is exactly the k smallest |W_r| of the exact W_r by a
/// full sort, and shares almost nothing with the largest-entry mask.
#[test]
fn smollm2_select_smallest_is_the_bottom_k_of_w_r() {
    let Some(mats) = smollm2_matrices() else { return };
    for (name, out, inp, w) in mats.iter().take(7) {
        let k = budget_k(*out, *inp, Budget::Density(DEFAULT_DENSITY)).unwrap();
        let w_r = low_rank_approx(w, *out, *inp, 32, Approx::Exact);
        let smallest = principal_mask_of(w, *out, *inp, k, 32, Approx::Exact, Select::Smallest);
        assert_eq!(smallest, brute_bottom_k(&w_r, k), "{name}");
        let largest = principal_mask(w, *out, *inp, k, 32, Approx::Exact);
        assert!(mask_overlap(&largest, &smallest) < 0.01, "{name}");
    }
}
