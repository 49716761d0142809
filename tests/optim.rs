//! LIFT's sparse AdamW (`src/optim.rs`) against an AdamW written out here
//! from the formulas alone, in f64, one entry at a time:
//!
//!   m <- b1 m + (1 - b1) g
//!   v <- b2 v + (1 - b2) g^2
//!   w <- w - lr sqrt(1 - b2^t) / (1 - b1^t) * m / (sqrt(v) + eps)
//!   w <- w - lr wd w
//!
//! The sparse optimizer on a mask must be this update on the masked entries
//! and nothing at all on the others; a mask refresh must carry m and v over
//! for the entries that stay selected and start the new ones from zero, with
//! the step counter running on.

use std::collections::BTreeMap;

use lift::optim::{AdamW, DenseState, SparseState, clip_scale};

/// xorshift64*: the test's own generator, independent of `lift::rng`.
struct TestRng(u64);

impl TestRng {
    fn new(seed: u64) -> TestRng {
        TestRng(seed.wrapping_mul(0x9E37_79B9_7F4A_7C15) | 1)
    }
    fn next(&mut self) -> u64 {
        self.0 ^= self.0 >> 12;
        self.0 ^= self.0 << 25;
        self.0 ^= self.0 >> 27;
        self.0.wrapping_mul(0x2545_F491_4F6C_DD1D)
    }
    /// Uniform in [-1, 1).
    fn signed(&mut self) -> f32 {
        ((self.next() >> 40) as f32 / (1u32 << 24) as f32) * 2.0 - 1.0
    }
    /// k distinct indices below n, ascending (a partial Fisher-Yates).
    fn subset(&mut self, n: usize, k: usize) -> Vec<u32> {
        let mut all: Vec<u32> = (0..n as u32).collect();
        for i in 0..k {
            let j = i + (self.next() % (n - i) as u64) as usize;
            all.swap(i, j);
        }
        let mut s = all[..k].to_vec();
        s.sort_unstable();
        s
    }
}

/// The reference: one entry's AdamW state and update, in f64.
#[derive(Clone, Copy, Default, Debug)]
struct RefEntry {
    m: f64,
    v: f64,
}

impl RefEntry {
    fn step(&mut self, w: &mut f64, g: f64, t: u64, o: &AdamW) {
        let (b1, b2, eps, lr, wd) = (o.beta1 as f64, o.beta2 as f64, o.eps as f64, o.lr as f64, o.weight_decay as f64);
        self.m = b1 * self.m + (1.0 - b1) * g;
        self.v = b2 * self.v + (1.0 - b2) * g * g;
        let step_size = lr * (1.0 - b2.powi(t as i32)).sqrt() / (1.0 - b1.powi(t as i32));
        *w -= step_size * self.m / (self.v.sqrt() + eps);
        *w -= lr * wd * *w;
    }
}

/// AdamW with a learning rate that changes from step to step, as a schedule
/// gives it, and some weight decay so that the decoupled decay is exercised.
fn opt_at(t: u64) -> AdamW {
    AdamW { lr: 1e-2 * (1.0 - 0.05 * t as f32), weight_decay: 0.1, ..AdamW::default() }
}

fn max_abs_diff(a: &[f32], b: &[f64]) -> f64 {
    a.iter().zip(b).map(|(&x, &y)| (x as f64 - y).abs()).fold(0.0, f64::max)
}

#[test]
fn paper_hyperparameters_and_bias_corrected_step_size() {
    let o = AdamW::default();
    assert_eq!((o.beta1, o.beta2, o.eps, o.weight_decay), (0.9, 0.95, 1e-6, 0.0));
    for t in 1..=20u64 {
        let (b1, b2) = (o.beta1 as f64, o.beta2 as f64);
        let want = o.lr as f64 * (1.0 - b2.powi(t as i32)).sqrt() / (1.0 - b1.powi(t as i32));
        let got = o.step_size(t) as f64;
        assert!((got - want).abs() <= 1e-7 * want, "step {t}: step size {got}, formula {want}");
    }
}

#[test]
fn sparse_adamw_is_dense_adamw_restricted_to_the_mask() {
    // A 24 x 40 weight, 5% of it selected, 12 steps of random gradients.
    let (out, inp) = (24, 40);
    let n = out * inp;
    let mut rng = TestRng::new(1);
    let w0: Vec<f32> = (0..n).map(|_| rng.signed()).collect();
    let mask = rng.subset(n, 48);
    let mut state = SparseState::new(mask.clone());
    let mut w = w0.clone();
    let mut w_ref: Vec<f64> = w0.iter().map(|&x| x as f64).collect();
    let mut ref_state = vec![RefEntry::default(); mask.len()];
    for t in 1..=12u64 {
        // Gradients of very different sizes, as real ones are.
        let g: Vec<f32> = (0..mask.len()).map(|j| rng.signed() * 10f32.powi(j as i32 % 5 - 3)).collect();
        let o = opt_at(t);
        state.step(&o, t, &mut w, &g);
        for (j, &i) in mask.iter().enumerate() {
            ref_state[j].step(&mut w_ref[i as usize], g[j] as f64, t, &o);
        }
        let err = max_abs_diff(&w, &w_ref);
        assert!(err < 1e-6, "step {t}: weights differ from the reference by {err:e}");
        if t == 12 {
            println!("after {t} steps: max |w - w_ref| = {err:.1e} (|w| < 1)");
        }
    }
    let m_ref: Vec<f64> = ref_state.iter().map(|e| e.m).collect();
    let v_ref: Vec<f64> = ref_state.iter().map(|e| e.v).collect();
    assert!(max_abs_diff(&state.m, &m_ref) < 1e-6 * m_ref.iter().fold(0.0f64, |a, b| a.max(b.abs())));
    assert!(max_abs_diff(&state.v, &v_ref) < 1e-6 * v_ref.iter().fold(0.0f64, |a, b| a.max(b.abs())));
    // Entries outside the mask: bit for bit what they were.
    let mut changed = 0;
    for i in 0..n {
        if mask.binary_search(&(i as u32)).is_ok() {
            changed += (w[i] != w0[i]) as usize;
        } else {
            assert_eq!(w[i].to_bits(), w0[i].to_bits(), "unselected entry {i} changed");
        }
    }
    assert_eq!(changed, mask.len(), "every selected entry moves");
    assert_eq!(state.bytes(), mask.len() * 12, "state is index + m + v per selected entry, nothing else");
}

#[test]
fn dense_adamw_equals_the_reference_on_every_entry() {
    let n = 300;
    let mut rng = TestRng::new(2);
    let w0: Vec<f32> = (0..n).map(|_| rng.signed()).collect();
    let mut w = w0.clone();
    let mut w_ref: Vec<f64> = w0.iter().map(|&x| x as f64).collect();
    let mut state = DenseState::new(n);
    let mut ref_state = vec![RefEntry::default(); n];
    for t in 1..=10u64 {
        let g: Vec<f32> = (0..n).map(|_| rng.signed() * 1e-2).collect();
        let o = opt_at(t);
        state.step(&o, t, &mut w, &g);
        for i in 0..n {
            ref_state[i].step(&mut w_ref[i], g[i] as f64, t, &o);
        }
    }
    let err = max_abs_diff(&w, &w_ref);
    assert!(err < 1e-6, "dense AdamW differs from the reference by {err:e}");
}

#[test]
fn refresh_keeps_the_state_of_surviving_entries_by_hand() {
    // Before: entries 1, 4, 7, 9. After: 0, 4, 8, 9, 12. Survivors: 4 and 9.
    let mut s = SparseState { indices: vec![1, 4, 7, 9], m: vec![0.1, 0.2, 0.3, 0.4], v: vec![1.0, 2.0, 3.0, 4.0] };
    let stats = s.refresh(vec![0, 4, 8, 9, 12]);
    assert_eq!(s.indices, vec![0, 4, 8, 9, 12]);
    assert_eq!(s.m, vec![0.0, 0.2, 0.0, 0.4, 0.0]);
    assert_eq!(s.v, vec![0.0, 2.0, 0.0, 4.0, 0.0]);
    assert_eq!((stats.kept, stats.total), (2, 5));
    // To a disjoint mask: nothing kept; to the same mask: everything.
    let stats = s.refresh(vec![2, 3]);
    assert_eq!((s.m.clone(), s.v.clone(), stats.kept), (vec![0.0; 2], vec![0.0; 2], 0));
    s.m = vec![5.0, 6.0];
    let stats = s.refresh(vec![2, 3]);
    assert_eq!((s.m.clone(), stats.kept, stats.total), (vec![5.0, 6.0], 2, 2));
}

#[test]
fn training_across_a_refresh_follows_the_reference() {
    // 6 steps on mask A, refresh to mask B (half of A kept, half new), then
    // 6 more steps. The reference keeps a state per entry in a map: entries
    // that leave the mask lose it, entries that join start from zero, and t
    // counts on from 7.
    let n = 500;
    let mut rng = TestRng::new(3);
    let w0: Vec<f32> = (0..n).map(|_| rng.signed()).collect();
    let a = rng.subset(n, 40);
    let kept: Vec<u32> = a.iter().copied().step_by(2).collect();
    let fresh: Vec<u32> = rng.subset(n, 60).into_iter().filter(|i| a.binary_search(i).is_err()).take(20).collect();
    let mut b: Vec<u32> = kept.iter().chain(&fresh).copied().collect();
    b.sort_unstable();

    let mut w = w0.clone();
    let mut w_ref: Vec<f64> = w0.iter().map(|&x| x as f64).collect();
    let mut s = SparseState::new(a.clone());
    let mut reference: BTreeMap<u32, RefEntry> = a.iter().map(|&i| (i, RefEntry::default())).collect();
    let mut run =
        |s: &mut SparseState, reference: &mut BTreeMap<u32, RefEntry>, steps: std::ops::RangeInclusive<u64>| {
            for t in steps {
                let g: Vec<f32> = (0..s.k()).map(|_| rng.signed() * 1e-3).collect();
                let o = opt_at(t);
                s.step(&o, t, &mut w, &g);
                for (j, &i) in s.indices.iter().enumerate() {
                    reference.get_mut(&i).unwrap().step(&mut w_ref[i as usize], g[j] as f64, t, &o);
                }
            }
        };
    run(&mut s, &mut reference, 1..=6);
    let before: BTreeMap<u32, (f32, f32)> =
        s.indices.iter().zip(s.m.iter().zip(&s.v)).map(|(&i, (&m, &v))| (i, (m, v))).collect();
    let stats = s.refresh(b.clone());
    assert_eq!((stats.kept, stats.total), (kept.len(), b.len()));
    for (j, &i) in s.indices.iter().enumerate() {
        let want = before.get(&i).copied().unwrap_or((0.0, 0.0));
        assert_eq!((s.m[j], s.v[j]), want, "entry {i}: state after the refresh");
    }
    reference = b.iter().map(|&i| (i, reference.get(&i).copied().unwrap_or_default())).collect();
    run(&mut s, &mut reference, 7..=12);

    let err = max_abs_diff(&w, &w_ref);
    assert!(err < 1e-6, "weights differ from the reference by {err:e}");
    for i in 0..n as u32 {
        if a.binary_search(&i).is_err() && b.binary_search(&i).is_err() {
            assert_eq!(w[i as usize].to_bits(), w0[i as usize].to_bits(), "entry {i} was never selected but changed");
        }
    }
}

#[test]
fn clipping_scales_the_global_norm_down_to_the_limit() {
    // A gradient of norm 5 (3-4-5) clipped at 1 becomes norm 1; below the limit, or with clipping off, 1.
    let s = clip_scale(25.0, 1.0) as f64;
    assert!((5.0 * s - 1.0).abs() < 1e-6, "clipped norm {}", 5.0 * s);
    assert_eq!(clip_scale(0.25, 1.0), 1.0);
    assert_eq!(clip_scale(25.0, 0.0), 1.0);
}
