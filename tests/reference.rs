//! The CPU model against PyTorch, in the manner of llm.c's test_gpt2.c.
//!
//! `tests/reference/make_reference.py` (run by hand, with torch and
//! transformers) built two tiny random Llamas as Hugging Face directories and
//! dumped, for a fixed batch with ignored positions, the logits, the loss and
//! the gradient of every parameter. Here each directory goes through
//! `lift convert`, and lift's forward and backward passes must reproduce the
//! dump, in every layout of its activations (all logits kept; the LM head a
//! few rows at a time with its input's gradient made in the forward pass, as
//! training runs it; that with --recompute). A finite-difference check then
//! tests the backward pass against the forward pass alone, independently of
//! PyTorch.

mod common;

use lift::formats::checkpoint::Checkpoint;
use lift::formats::safetensors::SafeTensors;
use lift::model::{Activations, FullGrads, Head, Model, Param};
use serde_json::Value;

/// Errors are relative to the largest magnitude of each reference tensor.
/// f32 sums taken in another order differ by ~1e-6; a wrong sign or a missing
/// term in any op changes some entry by a sizeable fraction of the scale.
const TOL: f64 = 1e-4;

struct Case {
    model: Model,
    tokens: Vec<u32>,
    targets: Vec<i32>,
    b: usize,
    t: usize,
    loss: f32,
    refs: SafeTensors,
}

fn load_case(name: &str) -> Case {
    let dir = common::root().join("tests/reference").join(name);
    // One directory per test: two tests load the same case at once.
    let test = std::thread::current().name().unwrap_or("main").replace("::", "-");
    let bin = common::scratch(&format!("reference-{name}-{test}")).join("model.bin");
    common::convert(&dir, &bin);
    let ck = Checkpoint::open(&bin).unwrap();
    let model = Model::new(ck.config.clone(), ck.load_weights().unwrap());
    let j: Value = serde_json::from_str(&std::fs::read_to_string(dir.join("reference.json")).unwrap()).unwrap();
    let rows = |k: &str| -> Vec<Vec<i64>> {
        j[k].as_array()
            .unwrap()
            .iter()
            .map(|r| r.as_array().unwrap().iter().map(|v| v.as_i64().unwrap()).collect())
            .collect()
    };
    let ids = rows("input_ids");
    let tg = rows("targets");
    let (b, t) = (ids.len(), ids[0].len());
    Case {
        model,
        tokens: ids.concat().iter().map(|&v| v as u32).collect(),
        targets: tg.concat().iter().map(|&v| if v < 0 { -1 } else { v as i32 }).collect(),
        b,
        t,
        loss: j["loss"].as_f64().unwrap() as f32,
        refs: SafeTensors::open(&dir.join("reference.safetensors")).unwrap(),
    }
}

/// The activation layouts of a batch of (B, T): every logit kept (what
/// generation reads); the LM head 3 rows at a time, its input's gradient
/// made in the forward pass (as training runs it, in chunks that do not
/// divide N); and that keeping only each block's input (--recompute).
fn layouts(case: &Case) -> Vec<(&'static str, Activations)> {
    let c = &case.model.config;
    let chunked = |recompute| {
        let mut a = Activations::with(c, case.b, case.t, Head::Gradient, recompute);
        a.head_rows = 3;
        a.set_shape(c, case.b, case.t);
        a
    };
    vec![
        ("logits kept", Activations::new(c, case.b, case.t)),
        ("chunked", chunked(false)),
        ("recompute", chunked(true)),
    ]
}

/// Loss and every parameter gradient of one forward and backward pass.
fn loss_and_grads(case: &Case, acts: &mut Activations) -> (f32, FullGrads) {
    let loss = case.model.forward(acts, &case.tokens, Some(&case.targets)).unwrap();
    let mut grads = FullGrads::new(&case.model.config);
    case.model.backward(acts, &mut grads);
    (loss, grads)
}

fn check_against_pytorch(name: &str) {
    let mut case = load_case(name);
    case.model.ensure_rope(case.t);
    for (layout, mut acts) in layouts(&case) {
        let loss = case.model.forward(&mut acts, &case.tokens, Some(&case.targets)).unwrap();
        let loss_err = ((loss - case.loss) / case.loss).abs() as f64;
        println!("{name}, {layout}: loss {loss:.7} vs PyTorch {:.7}, rel err {loss_err:.2e}", case.loss);
        assert!(loss_err < TOL, "{layout}: loss differs from PyTorch: {loss_err:.2e}");
        if acts.head == Head::Logits {
            let logits_err = common::rel_err(&acts.logits, &case.refs.tensor_f32("logits").unwrap());
            println!("{name}: logits max rel err {logits_err:.2e}");
            assert!(logits_err < TOL, "logits differ from PyTorch: {logits_err:.2e}");
        }

        let mut grads = FullGrads::new(&case.model.config);
        case.model.backward(&mut acts, &mut grads);
        let mut worst = (0.0f64, String::new());
        let mut failures = Vec::new();
        for p in Param::all(&case.model.config) {
            let want = case.refs.tensor_f32(&format!("grad.{}", p.name())).unwrap();
            let err = common::rel_err(grads.grads.get(p), &want);
            if err > worst.0 {
                worst = (err, p.name());
            }
            if err >= TOL {
                failures.push(format!("{} {err:.2e}", p.name()));
            }
        }
        println!("{name}, {layout}: gradients max rel err {:.2e} ({})", worst.0, worst.1);
        assert!(failures.is_empty(), "{layout}: gradients differ from PyTorch: {failures:?}");
    }
}

/// --recompute runs each block's forward ops again on its kept input, so
/// the loss and every gradient are those without it, bit for bit.
#[test]
fn recompute_gives_the_same_bits() {
    for name in ["tiny_gqa", "tiny_tied"] {
        let mut case = load_case(name);
        case.model.ensure_rope(case.t);
        let mut runs = layouts(&case).into_iter().skip(1).map(|(_, mut a)| loss_and_grads(&case, &mut a));
        let ((loss, kept), (loss_r, recomputed)) = (runs.next().unwrap(), runs.next().unwrap());
        assert_eq!(loss.to_bits(), loss_r.to_bits(), "{name}: loss");
        for p in Param::all(&case.model.config) {
            let same = kept.grads.get(p).iter().zip(recomputed.grads.get(p)).all(|(a, b)| a.to_bits() == b.to_bits());
            assert!(same, "{name}: the gradient of {} differs with --recompute", p.name());
        }
    }
}

#[test]
fn tiny_gqa_untied_llama3_rope_matches_pytorch() {
    check_against_pytorch("tiny_gqa");
}

#[test]
fn tiny_tied_mha_matches_pytorch() {
    check_against_pytorch("tiny_tied");
}

/// Central differences of the loss, computed by the forward pass alone, must
/// match the analytic gradient on coordinates of every kind of tensor.
#[test]
fn backward_matches_finite_differences() {
    let mut case = load_case("tiny_gqa");
    case.model.ensure_rope(case.t);
    let mut acts = Activations::new(&case.model.config, case.b, case.t);
    case.model.forward(&mut acts, &case.tokens, Some(&case.targets)).unwrap();
    let mut grads = FullGrads::new(&case.model.config);
    case.model.backward(&mut acts, &mut grads);

    let mut rng = 0x9e3779b97f4a7c15u64;
    let mut checked = 0;
    for p in Param::all(&case.model.config) {
        let g = grads.grads.get(p).to_vec();
        // The coordinate with the largest gradient, and two random ones.
        let top = (0..g.len()).max_by(|&a, &b| g[a].abs().total_cmp(&g[b].abs())).unwrap();
        let mut coords = vec![top];
        for _ in 0..2 {
            rng ^= rng << 13;
            rng ^= rng >> 7;
            rng ^= rng << 17;
            coords.push((rng % g.len() as u64) as usize);
        }
        for i in coords {
            let h = 1e-2f32;
            let w0 = case.model.weights.get(p)[i];
            case.model.weights.get_mut(p)[i] = w0 + h;
            let up = case.model.forward(&mut acts, &case.tokens, Some(&case.targets)).unwrap() as f64;
            case.model.weights.get_mut(p)[i] = w0 - h;
            let down = case.model.forward(&mut acts, &case.tokens, Some(&case.targets)).unwrap() as f64;
            case.model.weights.get_mut(p)[i] = w0;
            let fd = (up - down) / (2.0 * h as f64);
            let an = g[i] as f64;
            // f32 loss rounding (~1e-6) over 2h limits the absolute accuracy to ~1e-4.
            let ok = (fd - an).abs() <= 0.03 * an.abs() + 2e-4;
            assert!(ok, "{} [{i}]: finite difference {fd:.6e} vs backward {an:.6e}", p.name());
            checked += 1;
        }
    }
    println!("finite differences agree on {checked} coordinates");
}
