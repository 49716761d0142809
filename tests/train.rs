//! `lift train` end to end on a tiny real Llama (tests/reference/tiny_gqa:
//! vocab 384, dim 64, 2 layers, GQA), through the binary, as a user runs it.
//! Each test compares what the run wrote with a reference of its own:
//!
//! - which entries a sparse method trains (the mask it saved in state.bin,
//!   and the entries that changed in model.bin), against masks computed here
//!   from the base weights: an SVD written in this file (one-sided Jacobi,
//!   f64) for LIFT, on the tiny model and on SmolLM2-135M, and a full sort
//!   of |W| for `magnitude`;
//! - the rank of LoRA's merged update, from the same SVD;
//! - the validation loss of a short LIFT run, against its step-0 value;
//! - a run interrupted with Ctrl-C and resumed, against the same run
//!   uninterrupted (bit for bit);
//! - `lift eval`'s loss, against a cross-entropy computed here from the
//!   model's logits one example at a time;
//! - a diverging run, against the promise of a stop with the last finite state;
//! - bad input, against the promise of one error line and no files left.

mod common;

use std::io::{BufRead, BufReader};
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::sync::OnceLock;

use lift::formats::checkpoint::Checkpoint;
use lift::model::{Config, Linear, Param, Weights};

// ----------------------------------------------------------------------------
// The fixture: the tiny model as model.bin and a small arithmetic data set

struct Fixture {
    bin: PathBuf,
    data: PathBuf,
}

/// 48 short arithmetic examples (a few with an `input`), each with an `answer`.
fn arithmetic_examples() -> String {
    let examples: Vec<serde_json::Value> = (0..48)
        .map(|i| {
            let (a, b) = (2 + (i * 7) % 23, 1 + (i * 5) % 17);
            let (op, c) = if i % 2 == 0 { ("+", a + b) } else { ("-", a - b) };
            let mut e = serde_json::json!({
                "instruction": format!("What is {a} {op} {b}?"),
                "output": format!("{a} {op} {b} = {c}. The answer is {c}."),
                "answer": c.to_string(),
            });
            if i % 8 == 3 {
                e["input"] = "Show the sum.".into();
            }
            e
        })
        .collect();
    serde_json::to_string_pretty(&examples).unwrap()
}

fn fixture() -> &'static Fixture {
    static F: OnceLock<Fixture> = OnceLock::new();
    F.get_or_init(|| {
        let dir = common::scratch("train-fixture");
        let bin = dir.join("tiny.bin");
        common::convert(&common::root().join("tests/reference/tiny_gqa"), &bin);
        let data = dir.join("arith.json");
        std::fs::write(&data, arithmetic_examples()).unwrap();
        Fixture { bin, data }
    })
}

fn s(p: &Path) -> &str {
    p.to_str().unwrap()
}

/// The flags every run here shares: 40 training and 8 validation examples in
/// batches of 4, no warmup (so step 1 already moves the weights), lr 1e-2.
fn base_args(out: Option<&Path>) -> Vec<String> {
    let f = fixture();
    let mut a: Vec<String> = ["train", "--checkpoint", s(&f.bin), "--data", s(&f.data)].map(String::from).to_vec();
    let shared = "--batch-size 4 --val-size 8 --max-seq-len 128 --warmup 0 --lr 1e-2 --eval-every 0 --save-every 0";
    a.extend(shared.split_whitespace().map(String::from));
    if let Some(o) = out {
        a.extend(["--out".to_string(), s(o).to_string()]);
    }
    a
}

/// The base flags with `extra` added; a flag given in `extra` replaces the
/// base one of the same name (every base flag takes a value).
fn with_flags(mut args: Vec<String>, extra: &[&str]) -> Vec<String> {
    for flag in extra.iter().filter(|x| x.starts_with("--")) {
        if let Some(at) = args.iter().position(|a| a == flag) {
            args.drain(at..at + 2);
        }
    }
    args.extend(extra.iter().map(|x| x.to_string()));
    args
}

/// Trains into `out` with the base flags and `extra`; returns stderr.
fn train(out: &Path, extra: &[&str]) -> String {
    let args = with_flags(base_args(Some(out)), extra);
    let refs: Vec<&str> = args.iter().map(String::as_str).collect();
    let (code, _, err) = common::lift(&refs);
    assert_eq!(code, 0, "lift {}: {err}", refs.join(" "));
    err
}

fn load(path: &Path) -> (Config, Weights) {
    let ck = Checkpoint::open(path).unwrap_or_else(|e| panic!("{}: {e}", path.display()));
    let w = ck.load_weights().unwrap();
    (ck.config.clone(), w)
}

/// Flat indices at which two tensors differ (bit patterns, so -0.0 != 0.0).
fn changed(a: &[f32], b: &[f32]) -> Vec<u32> {
    assert_eq!(a.len(), b.len());
    (0..a.len()).filter(|&i| a[i].to_bits() != b[i].to_bits()).map(|i| i as u32).collect()
}

fn linear_params(c: &Config) -> Vec<(Param, usize, usize)> {
    (0..c.n_layers).flat_map(|l| Linear::ALL.map(|w| (Param::Linear(l, w), w.shape(c).0, w.shape(c).1))).collect()
}

/// The tensors no method trains by default: embedding, norms, untied head.
fn assert_frozen_untouched(c: &Config, base: &Weights, trained: &Weights, except: &[Param]) {
    for p in Param::all(c) {
        if matches!(p, Param::Linear(..)) || except.contains(&p) {
            continue;
        }
        let n = changed(base.get(p), trained.get(p)).len();
        assert_eq!(n, 0, "{}: {n} entries of a frozen tensor changed", p.name());
    }
}

/// k of a weight under --density d: round(d * out * in).
fn density_k(out: usize, inp: usize, d: f64) -> usize {
    (d * (out * inp) as f64).round() as usize
}

// ----------------------------------------------------------------------------
// The reference SVD: one-sided Jacobi (Hestenes), f64

/// W (out x in, row-major) = sum_t sigma_t left_t right_t^T, sigma descending.
struct Svd {
    sigma: Vec<f64>,
    left: Vec<Vec<f64>>,  // (out) each
    right: Vec<Vec<f64>>, // (in) each
}

/// Rotates pairs of columns of the tall side of W until all are orthogonal:
/// then A V = U S column by column, with V the product of the rotations.
/// Slow (O(m^2 n) per sweep) and simple; fine for 176 x 64.
fn jacobi_svd(w: &[f32], out: usize, inp: usize) -> Svd {
    // A (rows x cols, rows >= cols) as columns: W if tall, else W^T.
    let transposed = out < inp;
    let (rows, cols) = if transposed { (inp, out) } else { (out, inp) };
    let at = |i: usize, j: usize| if transposed { w[j * inp + i] } else { w[i * inp + j] } as f64;
    let mut a: Vec<Vec<f64>> = (0..cols).map(|j| (0..rows).map(|i| at(i, j)).collect()).collect();
    let mut v: Vec<Vec<f64>> = (0..cols).map(|j| (0..cols).map(|i| (i == j) as u8 as f64).collect()).collect();
    let dot = |x: &[f64], y: &[f64]| x.iter().zip(y).map(|(p, q)| p * q).sum::<f64>();
    let rotate = |x: &mut Vec<Vec<f64>>, p: usize, q: usize, c: f64, s: f64| {
        for i in 0..x[p].len() {
            let (xp, xq) = (x[p][i], x[q][i]);
            x[p][i] = c * xp - s * xq;
            x[q][i] = s * xp + c * xq;
        }
    };
    for _sweep in 0..60 {
        let mut rotated = false;
        for p in 0..cols {
            for q in p + 1..cols {
                let (alpha, beta, gamma) = (dot(&a[p], &a[p]), dot(&a[q], &a[q]), dot(&a[p], &a[q]));
                if gamma.abs() <= 1e-15 * (alpha * beta).sqrt() {
                    continue;
                }
                rotated = true;
                let zeta = (beta - alpha) / (2.0 * gamma);
                let t = zeta.signum() / (zeta.abs() + (1.0 + zeta * zeta).sqrt());
                let c = 1.0 / (1.0 + t * t).sqrt();
                rotate(&mut a, p, q, c, c * t);
                rotate(&mut v, p, q, c, c * t);
            }
        }
        if !rotated {
            break;
        }
    }
    let mut order: Vec<usize> = (0..cols).collect();
    let norms: Vec<f64> = a.iter().map(|col| dot(col, col).sqrt()).collect();
    order.sort_by(|&i, &j| norms[j].total_cmp(&norms[i]));
    let sigma: Vec<f64> = order.iter().map(|&j| norms[j]).collect();
    let u: Vec<Vec<f64>> = order.iter().map(|&j| a[j].iter().map(|x| x / norms[j].max(1e-300)).collect()).collect();
    let vs: Vec<Vec<f64>> = order.iter().map(|&j| v[j].clone()).collect();
    // A = U S V^T; W = A, or W = A^T = V S U^T.
    let (left, right) = if transposed { (vs, u) } else { (u, vs) };
    let svd = Svd { sigma, left, right };
    // The reference checks itself: it must reproduce W.
    let back = svd.truncated(cols, out, inp);
    let err = w.iter().zip(&back).map(|(&x, y)| (x as f64 - y).abs()).fold(0.0, f64::max);
    assert!(err < 1e-6 * svd.sigma[0], "Jacobi SVD does not reproduce W: error {err:e}");
    svd
}

impl Svd {
    /// W_r = sum_{t < r} sigma_t left_t right_t^T, (out x in) row-major.
    fn truncated(&self, r: usize, out: usize, inp: usize) -> Vec<f64> {
        let mut w = vec![0.0f64; out * inp];
        for t in 0..r {
            for i in 0..out {
                let c = self.sigma[t] * self.left[t][i];
                for j in 0..inp {
                    w[i * inp + j] += c * self.right[t][j];
                }
            }
        }
        w
    }
}

/// The k largest |scores| by a full sort, ties to the smaller index; ascending.
fn top_k(scores: &[f64], k: usize) -> Vec<u32> {
    let mut idx: Vec<u32> = (0..scores.len() as u32).collect();
    idx.sort_by(|&a, &b| scores[b as usize].abs().total_cmp(&scores[a as usize].abs()).then(a.cmp(&b)));
    let mut top = idx[..k].to_vec();
    top.sort_unstable();
    top
}

/// Entries of `a` not in `b`, both ascending.
fn minus(a: &[u32], b: &[u32]) -> Vec<u32> {
    a.iter().copied().filter(|x| b.binary_search(x).is_err()).collect()
}

// ----------------------------------------------------------------------------
// What a run saved in DIR/state.bin

/// One linear weight's sparse optimizer state: the selected flat indices
/// (ascending) and the Adam moments of each.
struct SavedMask {
    indices: Vec<u32>,
    m: Vec<f32>,
    v: Vec<f32>,
}

struct SavedState {
    step: u64,
    /// Whether every saved weight value is finite.
    finite: bool,
    /// Per linear weight, in (layer, q k v o gate up down) order; empty for
    /// the dense methods.
    masks: Vec<SavedMask>,
}

/// Reads DIR/state.bin as train.rs writes it: "LIFTSTAT", a u64 length and a
/// JSON header, the f32 values of the tensors the header names, then the
/// optimizer state; for a sparse method: a 0 byte, a u64 count, and per
/// weight a u64 k, k u32 indices, k f32 m and k f32 v.
fn read_state(dir: &Path, c: &Config) -> SavedState {
    let bytes = std::fs::read(dir.join("state.bin")).unwrap();
    assert_eq!(&bytes[..8], b"LIFTSTAT");
    let u64_at = |at: usize| u64::from_le_bytes(bytes[at..at + 8].try_into().unwrap()) as usize;
    let words = |at: usize, n: usize| -> Vec<[u8; 4]> {
        bytes[at..at + 4 * n].chunks_exact(4).map(|b| b.try_into().unwrap()).collect()
    };
    let hlen = u64_at(8);
    let header: serde_json::Value = serde_json::from_slice(&bytes[16..16 + hlen]).unwrap();
    let mut pos = 16 + hlen;
    let mut finite = true;
    for name in header["tensors"].as_array().unwrap() {
        let p = Param::all(c).into_iter().find(|p| p.name() == name.as_str().unwrap()).unwrap();
        let n: usize = p.shape(c).iter().product();
        finite &= words(pos, n).into_iter().all(|b| f32::from_le_bytes(b).is_finite());
        pos += 4 * n;
    }
    let mut masks = Vec::new();
    if bytes[pos] == 0 {
        let count = u64_at(pos + 1);
        pos += 9;
        for _ in 0..count {
            let k = u64_at(pos);
            pos += 8;
            let indices = words(pos, k).into_iter().map(u32::from_le_bytes).collect();
            let m = words(pos + 4 * k, k).into_iter().map(f32::from_le_bytes).collect();
            let v = words(pos + 8 * k, k).into_iter().map(f32::from_le_bytes).collect();
            masks.push(SavedMask { indices, m, v });
            pos += 12 * k;
        }
    }
    SavedState { step: header["step"].as_u64().unwrap(), finite, masks }
}

/// Checks what one optimizer step (no warmup, learning rate `lr`) did to a
/// weight with a saved mask: every changed entry is selected, and every
/// selected entry that did not change had an update smaller than its f32
/// spacing. That update is the first bias-corrected Adam step,
/// lr sqrt(1 - b2) / (1 - b1) * m / (sqrt(v) + eps), from the saved m and v;
/// it rounds away only for gradients around 1e-10 and below, which eps
/// damps (SmolLM2 has a few hundred such among 5.3M selected entries).
/// Returns how many selected entries stayed bit-identical.
fn check_one_step(name: &str, base: &[f32], trained: &[f32], mask: &SavedMask, lr: f64) -> usize {
    let got = changed(base, trained);
    let outside = minus(&got, &mask.indices);
    assert!(outside.is_empty(), "{name}: {} changed entries are not in the mask", outside.len());
    let step_size = lr * (1.0f64 - 0.95).sqrt() / (1.0 - 0.9);
    let mut unchanged = 0;
    for (j, &i) in mask.indices.iter().enumerate() {
        let w = base[i as usize];
        if w.to_bits() == trained[i as usize].to_bits() {
            let update = step_size * (mask.m[j] as f64).abs() / ((mask.v[j] as f64).sqrt() + 1e-6);
            let spacing = (f32::from_bits(w.abs().to_bits() + 1) - w.abs()) as f64;
            assert!(
                update < spacing,
                "{name}: entry {i} is selected, its update {update:e} is not below rounding, yet it did not change"
            );
            unchanged += 1;
        }
    }
    unchanged
}

/// Asserts that `mask` holds the k largest |scores|, allowing entries whose
/// score ties the k-th one to a relative `tol` to fall either way; returns
/// how many did.
fn assert_top_k(name: &str, mask: &[u32], scores: &[f64], k: usize, tol: f64) -> usize {
    assert_eq!(mask.len(), k, "{name}: mask of {} entries, k = {k}", mask.len());
    let reference = top_k(scores, k);
    let threshold = reference.iter().map(|&j| scores[j as usize].abs()).fold(f64::INFINITY, f64::min);
    let off: Vec<u32> = minus(mask, &reference).into_iter().chain(minus(&reference, mask)).collect();
    for &j in &off {
        let gap = (scores[j as usize].abs() - threshold).abs() / threshold;
        assert!(
            gap <= tol,
            "{name}: entry {j} (score {:e}, threshold {threshold:e}) is on the wrong side",
            scores[j as usize]
        );
    }
    off.len()
}

// ----------------------------------------------------------------------------
// Sparse methods: the right k entries are trained, nothing else changes

#[test]
fn lift_trains_exactly_the_exact_svd_principal_weights() {
    // --filter-rank 8 (below the tiny model's sides of 32-176, so W_r is not
    // W and the mask is not the magnitude mask); one step at lr 1e-2.
    let out = common::scratch("train-lift-mask");
    train(&out, &["--method", "lift", "--filter-rank", "8", "--max-steps", "1"]);
    let (c, base) = load(&fixture().bin);
    let (_, trained) = load(&out.join("model.bin"));
    let state = read_state(&out, &c);
    for ((p, o, i), mask) in linear_params(&c).into_iter().zip(&state.masks) {
        let k = density_k(o, i, 0.05);
        let scores = jacobi_svd(base.get(p), o, i).truncated(8, o, i);
        let ties = assert_top_k(&p.name(), &mask.indices, &scores, k, 1e-6);
        let unchanged = check_one_step(&p.name(), base.get(p), trained.get(p), mask, 1e-2);
        let magnitude = top_k(&base.get(p).iter().map(|&x| x as f64).collect::<Vec<_>>(), k);
        println!(
            "{:40} k = {k:4}: mask = exact-SVD top-k ({ties} boundary ties), {} changed, overlap with top-k |W| {:.2}",
            p.name(),
            k - unchanged,
            lift::select::mask_overlap(&mask.indices, &magnitude)
        );
        assert_eq!(unchanged, 0, "{}: every principal weight of the tiny model moves in one step", p.name());
    }
    assert_frozen_untouched(&c, &base, &trained, &[]);
}

#[test]
fn smollm2_lift_trains_exactly_the_exact_svd_principal_weights() {
    // The real model with the default selection (--filter-rank 128, 5%,
    // --svd auto = exact on SmolLM2's sizes), one step on the arithmetic set.
    let Some(bin) = common::smollm2_bin() else { return };
    let out = common::scratch("train-smollm2-lift");
    let lr = 2e-4;
    train(
        &out,
        &["--checkpoint", s(&bin), "--batch-size", "2", "--val-size", "2", "--max-steps", "1", "--lr", &lr.to_string()],
    );
    let (c, base) = load(&bin);
    let (_, trained) = load(&out.join("model.bin"));
    let state = read_state(&out, &c);
    assert_eq!(state.masks.len(), c.n_layers * 7);
    let mut unchanged_all = 0;
    for ((p, o, i), mask) in linear_params(&c).into_iter().zip(&state.masks) {
        let k = density_k(o, i, 0.05);
        unchanged_all += check_one_step(&p.name(), base.get(p), trained.get(p), mask, lr);
        let Param::Linear(l, _) = p else { unreachable!() };
        if ![0, 15, 29].contains(&l) {
            assert_eq!(mask.indices.len(), k, "{}", p.name());
            continue;
        }
        // Layers 0, 15, 29 against the library's exact path (tested against
        // known SVDs in tests/lift_select.rs), and where it is quick (the
        // 192 x 576 k and v weights) against this file's Jacobi SVD too.
        let exact = lift::select::principal_mask(base.get(p), o, i, k, 128, lift::select::Approx::Exact);
        assert_eq!(mask.indices, exact, "{}: the trained mask is not the exact principal weights", p.name());
        let mut line = format!("{:40} {o:4}x{i:<4} k = {k:6}: mask = exact principal weights", p.name());
        if o.min(i) <= 192 {
            let scores = jacobi_svd(base.get(p), o, i).truncated(128, o, i);
            let ties = assert_top_k(&p.name(), &mask.indices, &scores, k, 1e-5);
            line += &format!(" = Jacobi-SVD top-k ({ties} boundary ties)");
        }
        println!("{line}");
    }
    let total: usize = state.masks.iter().map(|m| m.indices.len()).sum();
    println!("{unchanged_all} of {total} selected entries kept their value (update below f32 rounding)");
    assert!(unchanged_all * 1000 < total, "too many selected entries did not move: {unchanged_all}");
    assert_frozen_untouched(&c, &base, &trained, &[]);
}

#[test]
fn randomized_lift_masks_agree_with_the_exact_svd() {
    // The production path: q = r + 16 columns (below every side, so the
    // sketch is really used), the default power iterations.
    let out = common::scratch("train-lift-randomized");
    train(
        &out,
        &["--method", "lift", "--svd", "randomized", "--filter-rank", "8", "--oversample", "16", "--max-steps", "1"],
    );
    let (c, base) = load(&fixture().bin);
    let (_, trained) = load(&out.join("model.bin"));
    let state = read_state(&out, &c);
    let mut worst = 1.0f64;
    for ((p, o, i), mask) in linear_params(&c).into_iter().zip(&state.masks) {
        let k = density_k(o, i, 0.05);
        assert_eq!(mask.indices.len(), k, "{}", p.name());
        check_one_step(&p.name(), base.get(p), trained.get(p), mask, 1e-2);
        let reference = top_k(&jacobi_svd(base.get(p), o, i).truncated(8, o, i), k);
        let overlap = lift::select::mask_overlap(&reference, &mask.indices);
        println!("{:40} randomized vs exact-SVD mask: {overlap:.4}", p.name());
        worst = worst.min(overlap);
    }
    println!("minimum agreement {worst:.4}");
    assert!(worst >= 0.99, "the randomized masks agree with the exact SVD's on only {worst:.4}");
    assert_frozen_untouched(&c, &base, &trained, &[]);
}

#[test]
fn magnitude_trains_the_largest_weights_under_a_rank_budget() {
    // --rank 2: k = min((out + in) * 2, out * in), the LoRA-equivalent budget.
    let out = common::scratch("train-magnitude");
    train(&out, &["--method", "magnitude", "--rank", "2", "--max-steps", "1"]);
    let (c, base) = load(&fixture().bin);
    let (_, trained) = load(&out.join("model.bin"));
    let state = read_state(&out, &c);
    for ((p, o, i), mask) in linear_params(&c).into_iter().zip(&state.masks) {
        let k = ((o + i) * 2).min(o * i);
        let reference = top_k(&base.get(p).iter().map(|&x| x as f64).collect::<Vec<_>>(), k);
        assert_eq!(mask.indices, reference, "{}: the mask is not the top-{k} |W|", p.name());
        assert_eq!(check_one_step(&p.name(), base.get(p), trained.get(p), mask, 1e-2), 0, "{}", p.name());
    }
    assert_frozen_untouched(&c, &base, &trained, &[]);
}

#[test]
fn random_trains_k_entries_per_matrix_and_norms_on_request() {
    let out = common::scratch("train-random");
    train(&out, &["--method", "random", "--max-steps", "1", "--train-norms"]);
    let (c, base) = load(&fixture().bin);
    let (_, trained) = load(&out.join("model.bin"));
    let state = read_state(&out, &c);
    for ((p, o, i), mask) in linear_params(&c).into_iter().zip(&state.masks) {
        let k = density_k(o, i, 0.05);
        assert_eq!(mask.indices.len(), k, "{}", p.name());
        assert!(mask.indices.windows(2).all(|w| w[0] < w[1]), "{}: indices ascending and distinct", p.name());
        assert_eq!(check_one_step(&p.name(), base.get(p), trained.get(p), mask, 1e-2), 0, "{}", p.name());
        let magnitude = top_k(&base.get(p).iter().map(|&x| x as f64).collect::<Vec<_>>(), k);
        let overlap = lift::select::mask_overlap(&mask.indices, &magnitude);
        assert!(overlap < 0.3, "{}: a random mask overlaps the magnitude mask by {overlap:.2}", p.name());
    }
    // Each matrix draws its own mask: same-shaped weights of layers 0 and 1 differ.
    for j in 0..7 {
        assert_ne!(state.masks[j].indices, state.masks[7 + j].indices, "layers 0 and 1 share a random mask");
    }
    // --train-norms trains every norm densely; embedding and head stay.
    let norms: Vec<Param> =
        (0..c.n_layers).flat_map(|l| [Param::AttnNorm(l), Param::MlpNorm(l)]).chain([Param::Norm]).collect();
    for &p in &norms {
        let n = changed(base.get(p), trained.get(p)).len();
        assert!(n * 10 >= base.get(p).len() * 9, "{}: only {n} entries trained", p.name());
    }
    assert_frozen_untouched(&c, &base, &trained, &norms);
}

#[test]
fn a_tied_embedding_is_trained_with_the_lm_heads_gradient_too() {
    // tiny_tied: the LM head is the embedding. The head's gradient reaches
    // every row (every token has some probability at every position), the
    // lookup's only the rows of tokens in the batch; so after one step at
    // lr 1e-2 (Adam's first step moves each entry by about lr) every row has
    // moved. With the lookup's gradient alone, 58 of the 384 rows did.
    let dir = common::scratch("train-tied-embed");
    let bin = dir.join("tied.bin");
    common::convert(&common::root().join("tests/reference/tiny_tied"), &bin);
    let out = dir.join("out");
    train(&out, &["--checkpoint", s(&bin), "--method", "random", "--max-steps", "1", "--train-embeddings"]);
    let (c, base) = load(&bin);
    let (_, trained) = load(&out.join("model.bin"));
    assert!(c.tied_embeddings);
    let (e0, e1) = (base.get(Param::Embed), trained.get(Param::Embed));
    let row = |e: &[f32], r: usize| e[r * c.dim..(r + 1) * c.dim].to_vec();
    let moved = (0..c.vocab_size).filter(|&r| !changed(&row(e0, r), &row(e1, r)).is_empty()).count();
    println!("{moved} of {} embedding rows moved after one step", c.vocab_size);
    assert_eq!(moved, c.vocab_size, "rows of tokens outside the batch did not get the LM head's gradient");
}

// ----------------------------------------------------------------------------
// Dense baselines

#[test]
fn full_changes_the_linear_weights_and_nothing_else() {
    let out = common::scratch("train-full");
    train(&out, &["--method", "full", "--max-steps", "2"]);
    let (c, base) = load(&fixture().bin);
    let (_, trained) = load(&out.join("model.bin"));
    for (p, o, i) in linear_params(&c) {
        let n = changed(base.get(p), trained.get(p)).len();
        assert!(n as f64 >= 0.99 * (o * i) as f64, "{}: only {n} of {} entries changed", p.name(), o * i);
    }
    assert_frozen_untouched(&c, &base, &trained, &[]);
}

/// --recompute keeps only each block's input and computes the rest again in
/// the backward pass: the same ops on the same values, so the same model,
/// bit for bit (norms trained too, so that their gradients count).
#[test]
fn recompute_trains_the_same_model_bit_for_bit() {
    let (kept, again) = (common::scratch("train-kept"), common::scratch("train-recompute"));
    train(&kept, &["--max-steps", "3", "--train-norms"]);
    train(&again, &["--max-steps", "3", "--train-norms", "--recompute"]);
    let bytes = |d: &Path| std::fs::read(d.join("model.bin")).unwrap();
    assert!(bytes(&kept) == bytes(&again), "model.bin differs with --recompute");
}

#[test]
fn lora_merged_update_has_rank_at_most_the_adapter_rank() {
    let out = common::scratch("train-lora");
    train(&out, &["--method", "lora", "--lora-rank", "4", "--lora-alpha", "8", "--max-steps", "3"]);
    let (c, base) = load(&fixture().bin);
    let (_, trained) = load(&out.join("model.bin"));
    for (p, o, i) in linear_params(&c) {
        let delta: Vec<f32> = trained.get(p).iter().zip(base.get(p)).map(|(a, b)| a - b).collect();
        let sigma = jacobi_svd(&delta, o, i).sigma;
        // sigma_5 is the f32 rounding of W + s B A, about 1e-7 |W| ~ 1e-9.
        let ratio = sigma[4] / sigma[0];
        println!("{:40} sigma_1 {:.2e}, sigma_4 {:.2e}, sigma_5 / sigma_1 {ratio:.1e}", p.name(), sigma[0], sigma[3]);
        assert!(sigma[0] > 1e-4, "{}: the adapter did not train", p.name());
        assert!(ratio < 1e-3, "{}: W' - W has rank above 4 (sigma_5 / sigma_1 = {ratio:e})", p.name());
    }
    assert_frozen_untouched(&c, &base, &trained, &[]);
}

// ----------------------------------------------------------------------------
// The loop: validation loss, metrics, interruption, resume, divergence

fn metrics(dir: &Path) -> Vec<serde_json::Value> {
    let text = std::fs::read_to_string(dir.join("metrics.jsonl")).unwrap();
    text.lines().map(|l| serde_json::from_str(l).unwrap()).collect()
}

#[test]
fn a_short_lift_run_lowers_the_validation_loss() {
    let out = common::scratch("train-lowers");
    let steps = 20;
    train(&out, &["--method", "lift", "--filter-rank", "8", "--max-steps", &steps.to_string(), "--eval-every", "10"]);
    let m = metrics(&out);
    // One record per optimizer step, after the step-0 validation record.
    let recorded: Vec<u64> = m.iter().map(|r| r["step"].as_u64().unwrap()).collect();
    assert_eq!(recorded, (0..=steps).collect::<Vec<u64>>(), "metrics.jsonl: one record per step");
    assert!(m[1..].iter().all(|r| r["loss"].as_f64().is_some_and(f64::is_finite) && r["lr"].is_number()));
    let v0 = m[0]["val_loss"].as_f64().unwrap();
    let v_end = m[steps as usize]["val_loss"].as_f64().unwrap();
    assert!(m[10]["val_loss"].is_number(), "--eval-every 10 evaluates at step 10");
    println!(
        "validation loss {v0:.4} -> {v_end:.4} after {steps} LIFT steps ({:.1}% lower)",
        100.0 * (1.0 - v_end / v0)
    );
    assert!(v_end < 0.9 * v0, "validation loss {v0} -> {v_end}: not lowered by 10%");
    let svg = std::fs::read_to_string(out.join("loss.svg")).unwrap();
    assert!(svg.contains("<svg") && svg.contains("</svg>"), "loss.svg is an SVG image");

    // 20 steps, no mask refresh (the default interval is 400): the mask held
    // still, so every changed entry is a principal weight of the base model.
    let (c, base) = load(&fixture().bin);
    let (_, trained) = load(&out.join("model.bin"));
    let state = read_state(&out, &c);
    let mut unchanged = 0;
    for ((p, o, i), mask) in linear_params(&c).into_iter().zip(&state.masks) {
        let k = density_k(o, i, 0.05);
        let scores = jacobi_svd(base.get(p), o, i).truncated(8, o, i);
        assert_top_k(&p.name(), &mask.indices, &scores, k, 1e-6);
        let got = changed(base.get(p), trained.get(p));
        assert!(minus(&got, &mask.indices).is_empty(), "{}: changed entries outside the mask", p.name());
        unchanged += k - got.len();
    }
    println!("{unchanged} selected entries ended bit-identical after {steps} steps (updates cancelling in f32)");
    assert_frozen_untouched(&c, &base, &trained, &[]);
}

#[test]
fn a_validation_example_longer_than_every_training_one_is_evaluated() {
    // Two examples, one held out: for most seeds the long one is the
    // validation example. (The RoPE table once covered only the training
    // examples, and the validation pass panicked.)
    let dir = common::scratch("train-long-val");
    let data = dir.join("data.json");
    let long = "Count every number from one to twenty, slowly. ".repeat(8);
    std::fs::write(
        &data,
        serde_json::json!([{"instruction": "What is 2 + 2?", "output": "4"}, {"instruction": long, "output": "ok"}])
            .to_string(),
    )
    .unwrap();
    for seed in ["0", "1", "2", "3"] {
        let out = dir.join(format!("out-{seed}"));
        train(
            &out,
            &[
                "--data",
                s(&data),
                "--val-size",
                "1",
                "--batch-size",
                "1",
                "--max-steps",
                "1",
                "--max-seq-len",
                "1024",
                "--seed",
                seed,
            ],
        );
        let m = metrics(&out);
        assert!(m[0]["val_loss"].as_f64().is_some_and(f64::is_finite), "seed {seed}: {:?}", m[0]);
    }
}

/// The fields of a metrics record that a resumed run must reproduce exactly.
fn curve(m: &[serde_json::Value]) -> Vec<(u64, String)> {
    m.iter()
        .map(|r| {
            let keep = ["loss", "val_loss", "lr", "grad_norm", "tokens"];
            let vals: Vec<String> = keep.iter().map(|k| format!("{k}={}", r[*k])).collect();
            (r["step"].as_u64().unwrap(), vals.join(" "))
        })
        .collect()
}

#[test]
fn ctrl_c_saves_the_state_and_resume_reproduces_the_uninterrupted_run() {
    // 16 steps over 3.2 epochs (40 examples, batches of 4, 2 micro-batches a
    // step), masks refreshed every 3 steps, validation every 4, a periodic
    // save every 5: an interruption lands mid-epoch and between refreshes.
    // SIGINT goes out when step 2 is reported; the steps after it leave the
    // signal time to arrive even on a loaded machine.
    let flags: Vec<&str> = "--method lift --filter-rank 8 --epochs 4 --max-steps 16 --grad-accum 2 \
        --update-interval 3 --eval-every 4 --save-every 5 --warmup 0.1"
        .split_whitespace()
        .collect();
    let whole = common::scratch("train-uninterrupted");
    train(&whole, &flags);

    // The same run, interrupted: SIGINT once step 2 is reported.
    let cut = common::scratch("train-interrupted");
    let args = with_flags(base_args(Some(&cut)), &flags);
    let mut child = Command::new(env!("CARGO_BIN_EXE_lift"))
        .args(&args)
        .stdout(Stdio::null())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    let mut stderr = String::new();
    let mut sent = false;
    for line in BufReader::new(child.stderr.take().unwrap()).lines() {
        let line = line.unwrap();
        if !sent && line.starts_with("step 2/") {
            let ok = Command::new("kill").args(["-INT", &child.id().to_string()]).status().unwrap().success();
            assert!(ok, "kill -INT");
            sent = true;
        }
        stderr.push_str(&line);
        stderr.push('\n');
    }
    let status = child.wait().unwrap();
    assert!(sent, "the run never reported step 2: {stderr}");
    assert_eq!(status.code(), Some(0), "an interrupted run exits cleanly: {stderr}");
    let at: u64 = stderr
        .lines()
        .find_map(|l| l.strip_prefix("interrupted at step "))
        .and_then(|l| l.split(':').next()?.parse().ok())
        .unwrap_or_else(|| panic!("no 'interrupted at step N' message: {stderr}"));
    assert!((2..16).contains(&at), "stopped at step {at}");
    assert!(!stderr.contains("done:"), "an interrupted run does not claim to be done: {stderr}");
    assert!(cut.join("state.bin").exists(), "Ctrl-C saves the state");
    assert!(!cut.join("model.bin").exists(), "an interrupted run writes no model.bin");
    assert_eq!(metrics(&cut).last().unwrap()["step"].as_u64(), Some(at), "metrics.jsonl is saved up to step {at}");

    // Resume with the same flags and no --out: the run continues in its own directory.
    let mut args = with_flags(base_args(None), &flags);
    args.extend(["--resume".to_string(), s(&cut).to_string()]);
    let refs: Vec<&str> = args.iter().map(String::as_str).collect();
    let (code, _, err) = common::lift(&refs);
    assert_eq!(code, 0, "resume: {err}");
    assert!(err.contains(&format!("resuming from {} at step {at}", cut.display())), "{err}");

    let (a, b) = (curve(&metrics(&whole)), curve(&metrics(&cut)));
    println!("interrupted at step {at} of 16; resumed curve:");
    for (step, vals) in &b {
        println!("  step {step:2}: {vals}");
    }
    assert_eq!(a, b, "the resumed run's loss curve differs from the uninterrupted one");
    let (c, w_whole) = load(&whole.join("model.bin"));
    let (_, w_cut) = load(&cut.join("model.bin"));
    for p in Param::all(&c) {
        assert!(changed(w_whole.get(p), w_cut.get(p)).is_empty(), "{}: resumed weights differ", p.name());
    }
}

#[test]
fn a_non_finite_loss_stops_the_run_and_keeps_the_last_good_state() {
    // lr 1e30: the first Adam step moves every selected weight by ~1e30, and
    // the next forward pass overflows.
    let out = common::scratch("train-nan");
    let args = with_flags(
        base_args(Some(&out)),
        &["--method", "lift", "--filter-rank", "8", "--lr", "1e30", "--max-steps", "5"],
    );
    let refs: Vec<&str> = args.iter().map(String::as_str).collect();
    let (code, _, err) = common::lift(&refs);
    assert_ne!(code, 0, "a diverged run fails: {err}");
    assert!(!err.contains("panicked"), "{err}");
    let last = err.lines().last().unwrap();
    assert!(last.starts_with("error: ") && last.contains("stopped"), "one error line at the end: {err}");
    assert!(last.contains("loss is") || last.contains("gradient norm is"), "{last}");
    assert_eq!(err.lines().filter(|l| l.starts_with("error")).count(), 1);
    assert!(!out.join("model.bin").exists(), "no model.bin from a diverged run");
    let (c, _) = load(&fixture().bin);
    let SavedState { step, finite, .. } = read_state(&out, &c);
    assert!(last.contains(&format!("The last good state (step {step})")), "{last}");
    assert!((1..5).contains(&step), "state saved at step {step}");
    assert!(finite, "the saved state holds non-finite weights");
    let m = metrics(&out);
    assert_eq!(m.last().unwrap()["step"].as_u64(), Some(step), "metrics.jsonl ends at the saved step");
    assert!(m[1..].iter().all(|r| r["loss"].as_f64().is_some_and(f64::is_finite)), "only finite losses are recorded");
    println!("{last}");
}

// ----------------------------------------------------------------------------
// lift eval

#[test]
fn eval_json_loss_equals_a_per_example_cross_entropy() {
    let f = fixture();
    let mut args = vec!["eval", "--checkpoint", s(&f.bin), "--data", s(&f.data)];
    args.extend("--json --batch-size 5 --max-new-tokens 6 --limit 12".split_whitespace());
    let (code, out, err) = common::lift(&args);
    assert_eq!(code, 0, "{err}");
    let r: serde_json::Value = serde_json::from_str(out.trim()).unwrap_or_else(|e| panic!("{e}: {out:?}"));
    assert_eq!(r["n"].as_u64(), Some(12));
    let accuracy = r["accuracy"].as_f64().expect("accuracy is reported for examples with an answer");
    assert!((0.0..=1.0).contains(&accuracy));
    assert_eq!(r["n_answered"].as_u64(), Some(12));

    // The reference: each example alone (no padding, no batching), the
    // template written out here, log-softmax in f64 over the logits.
    let ck = Checkpoint::open(&f.bin).unwrap();
    let tok = &ck.tokenizer;
    let mut model = lift::model::Model::new(ck.config.clone(), ck.load_weights().unwrap());
    let examples: Vec<serde_json::Value> = serde_json::from_str(&arithmetic_examples()).unwrap();
    let (mut sum, mut count) = (0.0f64, 0usize);
    for e in &examples[..12] {
        let mut prompt = String::from(
            "Below is an instruction that describes a task. Write a response that appropriately completes the request.\n\n",
        );
        prompt += &format!("### Instruction:\n{}\n\n", e["instruction"].as_str().unwrap());
        if let Some(input) = e["input"].as_str() {
            prompt += &format!("### Input:\n{input}\n\n");
        }
        prompt += "### Response:\n";
        let mut ids = vec![tok.bos_id().unwrap()];
        ids.extend(tok.encode(&prompt));
        let n_prompt = ids.len();
        ids.extend(tok.encode(e["output"].as_str().unwrap()));
        ids.push(tok.eos_id().unwrap());
        let t = ids.len();
        model.ensure_rope(t);
        let mut acts = lift::model::Activations::new(&model.config, 1, t);
        model.forward(&mut acts, &ids, None).unwrap();
        let v = model.config.vocab_size;
        for pos in n_prompt - 1..t - 1 {
            let row = &acts.logits[pos * v..(pos + 1) * v];
            let max = row.iter().fold(f64::NEG_INFINITY, |m, &x| m.max(x as f64));
            let lse = max + row.iter().map(|&x| (x as f64 - max).exp()).sum::<f64>().ln();
            sum += lse - row[ids[pos + 1] as usize] as f64;
            count += 1;
        }
    }
    let want = sum / count as f64;
    let got = r["loss"].as_f64().unwrap();
    println!("eval loss {got:.6}, per-example reference {want:.6}, {count} target tokens");
    assert_eq!(r["loss_tokens"].as_u64(), Some(count as u64));
    assert!((got - want).abs() < 1e-5 * want, "eval loss {got} vs reference {want}");
}

// ----------------------------------------------------------------------------
// Bad input: one error line, non-zero exit, nothing left in --out

/// Runs a training that must fail: the error is the last stderr line and the
/// only one starting with "error:", mentions every needle, and `out` is not
/// created.
fn train_fails(name: &str, data: Option<&str>, extra: &[&str], needles: &[&str]) {
    let dir = common::scratch(&format!("train-bad-{name}"));
    let out = dir.join("out");
    let mut args = with_flags(base_args(Some(&out)), &["--max-steps", "1"]);
    if let Some(text) = data {
        let file = dir.join("data.json");
        std::fs::write(&file, text).unwrap();
        args = with_flags(args, &["--data", s(&file)]);
    }
    args = with_flags(args, extra);
    let refs: Vec<&str> = args.iter().map(String::as_str).collect();
    let (code, _, err) = common::lift(&refs);
    assert_ne!(code, 0, "{name}: should fail: {err}");
    assert!(!err.contains("panicked"), "{name}: panicked: {err}");
    let errors: Vec<&str> = err.lines().filter(|l| l.starts_with("error")).collect();
    assert_eq!(errors.len(), 1, "{name}: want one error line: {err}");
    assert_eq!(err.lines().last(), Some(errors[0]), "{name}: the error is the last line: {err}");
    for n in needles {
        assert!(errors[0].contains(n), "{name}: {:?} does not mention {n:?}", errors[0]);
    }
    assert!(!out.exists(), "{name}: {} was created", out.display());
}

#[test]
fn bad_training_input_fails_with_one_line_and_leaves_nothing() {
    let good = arithmetic_examples();
    let mut list: Vec<serde_json::Value> = serde_json::from_str(&good).unwrap();
    train_fails("not-json", Some("instruction,output\n1,2\n"), &[], &["data.json", "not JSON or JSONL"]);
    train_fails("broken-json", Some("[{\"instruction\": \"x\", "), &[], &["data.json", "not valid JSON"]);
    train_fails("empty-list", Some("[]"), &[], &["data.json", "no examples"]);
    train_fails("empty-file", Some("\n"), &[], &["data.json", "empty"]);
    // (`answer` would stand in for a missing `output`, so both go.)
    list[5].as_object_mut().unwrap().remove("output");
    list[5].as_object_mut().unwrap().remove("answer");
    let no_target = serde_json::to_string(&list).unwrap();
    train_fails("no-target", Some(&no_target), &[], &["data.json", "example 5", "no target", "--skip-bad"]);
    list[5]["output"] = "fine".into();
    list[7].as_object_mut().unwrap().remove("instruction");
    train_fails("no-prompt", Some(&serde_json::to_string(&list).unwrap()), &[], &["example 7", "no prompt"]);
    train_fails("all-truncated", None, &["--max-seq-len", "20"], &["max_seq_len 20"]);
    train_fails("val-too-big", None, &["--val-size", "48"], &["--val-size"]);
    train_fails("density-zero", None, &["--density", "0"], &["--density", "out of range"]);
    train_fails("density-above-one", None, &["--density", "1.5"], &["--density", "out of range"]);
    train_fails(
        "density-empty-layer",
        None,
        &["--density", "2e-4"],
        &["--density", "selects no entry", "K weights (32x64"],
    );
    train_fails("rank-zero", None, &["--rank", "0"], &["--rank"]);
    train_fails("filter-rank-zero", None, &["--filter-rank", "0"], &["--filter-rank"]);
    train_fails("lora-rank-zero", None, &["--method", "lora", "--lora-rank", "0"], &["--lora-rank"]);
    train_fails("resume-nothing", None, &["--resume", "/no/such/run"], &["/no/such/run", "state.bin"]);

    // An --out that cannot be a directory (under a regular file).
    let dir = common::scratch("train-bad-out");
    let file = dir.join("file");
    std::fs::write(&file, "x").unwrap();
    let out = file.join("out");
    let args = with_flags(base_args(Some(&out)), &["--max-steps", "1"]);
    let refs: Vec<&str> = args.iter().map(String::as_str).collect();
    let (code, _, err) = common::lift(&refs);
    assert_ne!(code, 0);
    let last = err.lines().last().unwrap();
    assert!(last.starts_with("error:") && last.contains(s(&out)), "{err}");
    assert_eq!(std::fs::read_dir(&dir).unwrap().count(), 1, "nothing but the file is left");

    // --skip-bad trains on the rest and says what it skipped.
    let dir = common::scratch("train-skip-bad");
    let (data, out) = (dir.join("data.json"), dir.join("out"));
    std::fs::write(&data, &no_target).unwrap();
    let args = with_flags(base_args(Some(&out)), &["--data", s(&data), "--max-steps", "1", "--skip-bad"]);
    let refs: Vec<&str> = args.iter().map(String::as_str).collect();
    let (code, _, err) = common::lift(&refs);
    assert_eq!(code, 0, "{err}");
    assert!(err.contains("skipped 1 bad examples") && err.contains("example 5"), "{err}");
    assert!(out.join("model.bin").exists());
}
