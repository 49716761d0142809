//! The paper's baselines against their references: DoRA and PiSSA against
//! PEFT (tests/reference/make_peft_reference.py dumped PEFT's loss and
//! gradients, and its PiSSA init plus one torch.optim.AdamW step, on the
//! tiny_gqa model), S2FT against the dense gradient and the ratio's counts,
//! and whole runs for what they may and may not change.

mod common;

use lift::cpu_trainer::CpuTrainer;
use lift::data::Batch;
use lift::formats::checkpoint::Checkpoint;
use lift::formats::safetensors::SafeTensors;
use lift::formats::state::StateSource;
use lift::lora::Adapter;
use lift::method::{self, Magnitude, MaskRule, Trainable};
use lift::model::{Activations, Config, FullGrads, Linear, Model, Param, matrices};
use lift::optim::{DenseState, EpsForm};
use lift::options::{Method, MethodOptions, TrainOptions};
use serde_json::Value;

const KINDS: [(&str, Linear); 7] = [
    ("q", Linear::Q),
    ("k", Linear::K),
    ("v", Linear::V),
    ("o", Linear::O),
    ("gate", Linear::Gate),
    ("up", Linear::Up),
    ("down", Linear::Down),
];

fn kind_name(w: Linear) -> &'static str {
    KINDS.iter().find(|(_, k)| *k == w).unwrap().0
}

/// The tiny_gqa model (through `lift convert`) and its fixed batch.
fn tiny_gqa() -> (Model, Batch) {
    let dir = common::root().join("tests/reference/tiny_gqa");
    let bin = common::scratch("methods-tiny-gqa").join("model.bin");
    common::convert(&dir, &bin);
    let ck = Checkpoint::open(&bin).unwrap();
    let model = Model::new(ck.config.clone(), ck.load_weights().unwrap());
    let j: Value = serde_json::from_str(&std::fs::read_to_string(dir.join("reference.json")).unwrap()).unwrap();
    let rows = |k: &str| -> Vec<i64> {
        j[k].as_array()
            .unwrap()
            .iter()
            .flat_map(|r| r.as_array().unwrap().iter().map(|v| v.as_i64().unwrap()))
            .collect()
    };
    let (ids, tg) = (rows("input_ids"), rows("targets"));
    let b = j["input_ids"].as_array().unwrap().len();
    let t = ids.len() / b;
    let targets: Vec<i32> = tg.iter().map(|&v| if v < 0 { -1 } else { v as i32 }).collect();
    let n_loss = targets.iter().filter(|&&v| v >= 0).count();
    (model, Batch { b, t, tokens: ids.iter().map(|&v| v as u32).collect(), targets, n_loss, segments: Vec::new() })
}

fn options(kind: Method, rank: usize, alpha: f32) -> TrainOptions {
    let method = MethodOptions { kind, lora_rank: rank, lora_alpha: alpha, ..MethodOptions::default() };
    TrainOptions { method, ..TrainOptions::default() }
}

fn peft(name: &str) -> (SafeTensors, Value) {
    let dir = common::root().join("tests/reference/peft");
    let st = SafeTensors::open(&dir.join(format!("{name}.safetensors"))).unwrap();
    let meta = serde_json::from_str(&std::fs::read_to_string(dir.join(format!("{name}.json"))).unwrap()).unwrap();
    (st, meta)
}

fn tensor(st: &SafeTensors, name: &str) -> Vec<f32> {
    st.tensor_f32(name).unwrap_or_else(|e| panic!("{name}: {e}"))
}

/// DoRA's loss and the gradients of every A, B and magnitude equal PEFT's
/// for the same adapter and magnitude values. A norm that is not detached,
/// a missing alpha / r or a magnitude gradient without the 1 / ||V|| would
/// each change them far beyond the tolerance.
#[test]
fn dora_loss_and_gradients_equal_peft() {
    let (model, batch) = tiny_gqa();
    let (st, meta) = peft("dora");
    let c = model.config.clone();
    let (r, alpha) = (meta["r"].as_u64().unwrap() as usize, meta["alpha"].as_f64().unwrap() as f32);
    let (mut adapters, mut states, mut magnitudes) = (Vec::new(), Vec::new(), Vec::new());
    for (_, l, w) in matrices(&c) {
        let (oc, ic) = w.shape(&c);
        let key = |p: &str| format!("{p}.{l}.{}", kind_name(w));
        let ad = Adapter { r, oc, ic, scale: alpha / r as f32, a: tensor(&st, &key("A")), b: tensor(&st, &key("B")) };
        states.push((DenseState::new(ad.a.len()), DenseState::new(ad.b.len())));
        adapters.push(ad);
        magnitudes.push(Magnitude { m: tensor(&st, &key("m")), state: DenseState::new(oc) });
    }
    let o = options(Method::Dora, r, alpha);
    let saved = (Trainable::Dora { adapters, states, magnitudes }, Vec::new());
    let mut tr = CpuTrainer::start(model, &o, batch.t, batch.b * batch.t, Some(saved)).unwrap();
    let loss = tr.gradients(&batch).unwrap();
    let want = meta["loss"].as_f64().unwrap() as f32;
    eprintln!("DoRA loss {loss} vs PEFT {want}");
    assert!(((loss - want) / want).abs() < 1e-5, "loss {loss} vs PEFT {want}");
    let mut worst = (0.0f64, String::new());
    for (id, l, w) in matrices(&c) {
        let g = &tr.linear_grads()[id];
        let (oc, ic) = w.shape(&c);
        let (da, rest) = g.split_at(r * ic);
        let (db, dm) = rest.split_at(oc * r);
        for (name, got) in [("A", da), ("B", db), ("m", dm)] {
            let key = format!("grad.{name}.{l}.{}", kind_name(w));
            let e = common::rel_err(got, &tensor(&st, &key));
            if e > worst.0 {
                worst = (e, key);
            }
        }
    }
    eprintln!("DoRA gradients: max relative error {:.2e} ({})", worst.0, worst.1);
    assert!(worst.0 < 1e-4, "DoRA gradient {} off by {:.2e}", worst.1, worst.0);
}

/// PiSSA's residuals equal PEFT's (exact SVD; the signs of the singular
/// vectors do not enter them), the model is unchanged at step 0, and one
/// `--adamw torch` step leaves the merged weights PEFT + torch.optim.AdamW
/// leaves, to float rounding.
#[test]
fn pissa_init_and_first_step_equal_peft() {
    let (model, batch) = tiny_gqa();
    let (st, meta) = peft("pissa");
    let c = model.config.clone();
    let base = model.weights.clone();
    let (r, alpha) = (meta["r"].as_u64().unwrap() as usize, meta["alpha"].as_f64().unwrap() as f32);
    let mut o = options(Method::Pissa, r, alpha);
    (o.adamw, o.adam_eps, o.grad_clip) = (EpsForm::Torch, 1e-6, 0.0);

    let mut residuals = base.clone();
    method::pissa_start(&c, &o.method, o.seed, &mut residuals);
    let mut worst = 0.0f64;
    for (_, l, w) in matrices(&c) {
        let want = tensor(&st, &format!("residual.{l}.{}", kind_name(w)));
        worst = worst.max(common::rel_err(residuals.layers[l].linear(w), &want));
    }
    eprintln!("PiSSA residuals vs PEFT: max relative error {worst:.2e}");
    // PEFT runs its SVD in f32; lift in f64
    assert!(worst < 1e-4, "PiSSA residuals off by {worst:.2e}");

    let mut tr = CpuTrainer::start(model, &o, batch.t, batch.b * batch.t, None).unwrap();
    for (_, l, w) in matrices(&c) {
        let e = common::rel_err(&tr.tensor(Param::Linear(l, w)).unwrap(), base.layers[l].linear(w));
        assert!(e < 1e-6, "layer {l} {w:?}: residual + s B A differs from W by {e:.2e}");
    }
    let loss = tr.gradients(&batch).unwrap();
    let want = meta["loss_before"].as_f64().unwrap() as f32;
    assert!(((loss - want) / want).abs() < 1e-5, "loss at step 0 {loss} vs PEFT {want}");
    lift::trainer::Trainer::step(&mut tr, std::slice::from_ref(&batch), meta["lr"].as_f64().unwrap() as f32, 1)
        .unwrap();
    // Adam's first step is about lr * sign(g) per adapter entry, so an entry
    // whose gradient is within rounding of zero (f32 SVD in PEFT, f64 here)
    // may step the other way: a few merged entries may differ by a part of
    // the step, every other one only by rounding.
    let (mut worst, mut moved, mut off, mut total) = (0.0f64, 0.0f64, 0usize, 0usize);
    for (_, l, w) in matrices(&c) {
        let got = tr.tensor(Param::Linear(l, w)).unwrap();
        let want = tensor(&st, &format!("merged.{l}.{}", kind_name(w)));
        worst = worst.max(common::rel_err(&got, &want));
        moved = moved.max(common::rel_err(&want, base.layers[l].linear(w)));
        let scale = want.iter().fold(0.0f32, |m, x| m.max(x.abs()));
        off += got.iter().zip(&want).filter(|(a, b)| (*a - *b).abs() > 1e-5 * scale).count();
        total += got.len();
    }
    eprintln!(
        "PiSSA after one AdamW step vs PEFT: {off} of {total} merged entries beyond 1e-5 relative, worst {worst:.2e} \
         (the step moved W by {moved:.2e})"
    );
    assert!(moved > 1e-3, "the reference step should move the weights");
    assert!(off * 200 < total, "{off} of {total} merged entries differ from PEFT's");
    assert!(worst < 0.1 * moved, "merged weights after one step off by {worst:.2e}");
}

/// A random `tiny` model (`lift init`) and a short CPU run on data/math.json
/// with `extra` flags: (the base model.bin, the run's --out directory).
fn tiny_run(name: &str, extra: &[&str]) -> (std::path::PathBuf, std::path::PathBuf) {
    let dir = common::scratch(name);
    let base = dir.join("tiny.bin");
    let (code, _, err) = common::lift(&["init", "--config", "tiny", "-o", base.to_str().unwrap()]);
    assert_eq!(code, 0, "{err}");
    let out = dir.join("run");
    let data = common::root().join("data/math.json");
    let mut args = vec!["train", "--device", "cpu", "--checkpoint", base.to_str().unwrap(), "--data"];
    args.extend([data.to_str().unwrap(), "--out", out.to_str().unwrap(), "--batch-size", "4", "--val-size", "4"]);
    args.extend(["--lr", "5e-3", "--max-seq-len", "512"]);
    args.extend_from_slice(extra);
    let (code, _, err) = common::lift(&args);
    assert_eq!(code, 0, "{err}");
    (base, out)
}

/// DoRA's merged weights have row norms equal to the trained magnitudes
/// (read back from state.bin) after a run; the norms and the embedding stay
/// the checkpoint's.
#[test]
fn dora_run_merges_into_rows_of_the_trained_magnitudes() {
    let (base, out) = tiny_run("methods-dora-run", &["--method", "dora", "--max-steps", "4", "--lora-rank", "4"]);
    let ck = Checkpoint::open(&out.join("model.bin")).unwrap();
    let (c, trained) = (ck.config.clone(), ck.load_weights().unwrap());
    let mut scratch = trained.clone();
    let saved = lift::formats::state::load(&out, &c, &mut scratch).unwrap();
    let Trainable::Dora { magnitudes, .. } = &saved.trainable else { panic!("not a DoRA state") };
    let (mut worst, mut moved) = (0.0f64, 0.0f64);
    let original = Checkpoint::open(&base).unwrap().load_weights().unwrap();
    for (id, l, w) in matrices(&c) {
        let (oc, ic) = w.shape(&c);
        let rows = trained.layers[l].linear(w);
        for o in 0..oc {
            let norm = rows[o * ic..(o + 1) * ic].iter().map(|&x| x as f64 * x as f64).sum::<f64>().sqrt();
            let m = magnitudes[id].m[o] as f64;
            worst = worst.max((norm - m).abs() / m);
        }
        moved = moved.max(common::rel_err(rows, original.layers[l].linear(w)));
    }
    eprintln!("DoRA run: row norms vs magnitudes, max relative difference {worst:.2e}; weights moved {moved:.2e}");
    assert!(moved > 1e-4, "the run should change the linear weights");
    assert!(worst < 1e-5, "merged rows do not have the trained magnitudes ({worst:.2e})");
    for p in [Param::Embed, Param::Norm, Param::AttnNorm(0)] {
        assert_eq!(trained.get(p), original.get(p), "{p:?} changed");
    }
}

// ----------------------------------------------------------------------------
// S2FT

fn s2ft_options(heads: bool) -> MethodOptions {
    MethodOptions { kind: Method::S2ft, s2ft_ratio: 0.3, s2ft_heads: heads, ..MethodOptions::default() }
}

/// For each linear kind, the rows and the columns that hold a masked entry,
/// and whether the mask is exactly those whole rows or whole columns.
fn whole_rows_or_cols(mask: &[u32], out: usize, inp: usize) -> (Vec<usize>, Vec<usize>) {
    let rows: std::collections::BTreeSet<usize> = mask.iter().map(|&i| i as usize / inp).collect();
    let cols: std::collections::BTreeSet<usize> = mask.iter().map(|&i| i as usize % inp).collect();
    let (rows, cols): (Vec<usize>, Vec<usize>) = (rows.into_iter().collect(), cols.into_iter().collect());
    if mask.len() == rows.len() * inp {
        (rows, Vec::new())
    } else {
        assert_eq!(mask.len(), cols.len() * out, "a mask of neither whole rows nor whole columns");
        (Vec::new(), cols)
    }
}

/// S2FT's masks are whole rows of up_proj, whole columns of down_proj and,
/// with heads, whole head blocks of v_proj rows and o_proj columns; each
/// kind holds floor(units * L * ratio) units over all layers; nothing else
/// is trained.
#[test]
fn s2ft_masks_are_whole_channels_and_heads_of_the_ratio() {
    let c: Config = lift::init::named_config("small").unwrap();
    let (l_count, f, hs) = (c.n_layers, c.ffn_dim, c.head_dim);
    for heads in [false, true] {
        let plans = method::mask_plans(&c, &s2ft_options(heads), 42, 0, 0).unwrap();
        let mut units = std::collections::BTreeMap::new();
        for p in &plans {
            let MaskRule::Fixed(mask) = &p.rule else { panic!("S2FT plans a fixed mask") };
            assert!(mask.windows(2).all(|w| w[0] < w[1]), "mask not ascending");
            let (rows, cols) = whole_rows_or_cols(mask, p.out, p.inp);
            let n = match p.linear {
                Linear::Up => rows.len(),
                Linear::Down => cols.len(),
                Linear::V => {
                    assert!(rows.chunks(hs).all(|h| h[0] % hs == 0 && h.len() == hs), "v rows not whole heads");
                    rows.len() / hs
                }
                Linear::O => {
                    assert!(cols.chunks(hs).all(|h| h[0] % hs == 0 && h.len() == hs), "o columns not whole heads");
                    cols.len() / hs
                }
                _ => {
                    assert!(mask.is_empty(), "{:?} should not be trained", p.linear);
                    0
                }
            };
            if !mask.is_empty() {
                assert!(heads || !matches!(p.linear, Linear::V | Linear::O), "heads trained without --s2ft-heads");
            }
            *units.entry(format!("{:?}", p.linear)).or_insert(0usize) += n;
        }
        let ratio = 0.3f64;
        assert_eq!(units["Up"], ((f * l_count) as f64 * ratio) as usize);
        assert_eq!(units["Down"], ((f * l_count) as f64 * ratio) as usize);
        if heads {
            assert_eq!(units["V"], ((c.n_kv_heads * l_count) as f64 * ratio) as usize);
            assert_eq!(units["O"], ((c.n_heads * l_count) as f64 * ratio) as usize);
        }
        eprintln!("S2FT (heads {heads}): {units:?} units over {l_count} layers");
    }
}

/// S2FT's gradients are the dense gradient (FullGrads, the model's plain
/// backward pass) at the selected rows and columns.
#[test]
fn s2ft_gradients_are_the_dense_gradient_restricted() {
    let (mut model, batch) = tiny_gqa();
    let c = model.config.clone();
    model.ensure_rope(batch.t);
    let mut acts = Activations::new(&c, batch.b, batch.t);
    model.forward(&mut acts, &batch.tokens, Some(&batch.targets)).unwrap();
    let mut dense = FullGrads::new(&c);
    model.backward(&mut acts, &mut dense);
    let o = TrainOptions { method: s2ft_options(true), ..TrainOptions::default() };
    let mut tr = CpuTrainer::start(model, &o, batch.t, batch.b * batch.t, None).unwrap();
    tr.gradients(&batch).unwrap();
    let Trainable::Sparse { states } = tr.trainable() else { panic!("S2FT is a sparse state") };
    let mut worst = 0.0f64;
    let mut trained = 0;
    for (id, l, w) in matrices(&c) {
        let d = dense.grads.get(Param::Linear(l, w));
        let want: Vec<f32> = states[id].indices.iter().map(|&i| d[i as usize]).collect();
        trained += want.len();
        if !want.is_empty() {
            worst = worst.max(common::rel_err(&tr.linear_grads()[id], &want));
        }
    }
    eprintln!("S2FT gradients vs the dense ones: max relative error {worst:.2e} over {trained} entries");
    assert!(trained > 0);
    assert!(worst < 1e-5, "S2FT gradients off by {worst:.2e}");
}

/// A whole S2FT run changes only the selected rows of up_proj, columns of
/// down_proj and head blocks of v_proj / o_proj, as many as the ratio says;
/// every other entry is bit-identical.
#[test]
fn s2ft_run_changes_only_whole_selected_channels() {
    let extra = ["--method", "s2ft", "--s2ft-ratio", "0.25", "--s2ft-heads", "--max-steps", "3"];
    let (base, out) = tiny_run("methods-s2ft-run", &extra);
    let before = Checkpoint::open(&base).unwrap().load_weights().unwrap();
    let ck = Checkpoint::open(&out.join("model.bin")).unwrap();
    let (c, after) = (ck.config.clone(), ck.load_weights().unwrap());
    let (f, l_count, hs) = (c.ffn_dim, c.n_layers, c.head_dim);
    let mut units = std::collections::BTreeMap::new();
    for (_, l, w) in matrices(&c) {
        let (out_, inp) = w.shape(&c);
        let (x, y) = (before.layers[l].linear(w), after.layers[l].linear(w));
        let changed: Vec<u32> = (0..x.len()).filter(|&i| x[i].to_bits() != y[i].to_bits()).map(|i| i as u32).collect();
        let n = match w {
            Linear::Up => whole_rows_or_cols(&changed, out_, inp).0.len(),
            Linear::Down => whole_rows_or_cols(&changed, out_, inp).1.len(),
            Linear::V => whole_rows_or_cols(&changed, out_, inp).0.len() / hs,
            Linear::O => whole_rows_or_cols(&changed, out_, inp).1.len() / hs,
            _ => {
                assert!(changed.is_empty(), "layer {l} {w:?}: {} entries changed", changed.len());
                0
            }
        };
        *units.entry(format!("{w:?}")).or_insert(0usize) += n;
    }
    eprintln!("S2FT run: changed units {units:?}");
    let ratio = 0.25f64;
    assert_eq!(units["Up"], ((f * l_count) as f64 * ratio) as usize);
    assert_eq!(units["Down"], ((f * l_count) as f64 * ratio) as usize);
    assert_eq!(units["V"], ((c.n_kv_heads * l_count) as f64 * ratio) as usize);
    assert_eq!(units["O"], ((c.n_heads * l_count) as f64 * ratio) as usize);
    for p in [Param::Embed, Param::Norm] {
        assert_eq!(before.get(p), after.get(p));
    }
}

/// A DoRA, PiSSA or S2FT run stopped after 3 steps and resumed from its
/// state.bin ends with the model.bin of an uninterrupted 6-step run, byte
/// for byte (a constant learning rate, so the step count does not change
/// the schedule). PiSSA's residuals are recomputed from the checkpoint.
#[test]
fn dora_pissa_s2ft_resume_exactly() {
    let dir = common::scratch("methods-resume");
    let base = dir.join("tiny.bin");
    let (code, _, err) = common::lift(&["init", "--config", "tiny", "-o", base.to_str().unwrap()]);
    assert_eq!(code, 0, "{err}");
    let data = common::root().join("data/math.json");
    for m in ["dora", "pissa", "s2ft"] {
        let run = |out: &std::path::Path, steps: &str, resume: bool| {
            let mut args: Vec<String> = [
                "train",
                "--device",
                "cpu",
                "--checkpoint",
                base.to_str().unwrap(),
                "--data",
                data.to_str().unwrap(),
                "--out",
                out.to_str().unwrap(),
                "--method",
                m,
                "--max-steps",
                steps,
                "--batch-size",
                "2",
                "--val-size",
                "2",
                "--lr",
                "2e-3",
                "--schedule",
                "constant",
                "--warmup",
                "0",
                "--lora-rank",
                "4",
                "--s2ft-ratio",
                "0.2",
                "--s2ft-heads",
                "--max-seq-len",
                "512",
            ]
            .iter()
            .map(|s| s.to_string())
            .collect();
            if resume {
                args.extend(["--resume".to_string(), out.to_str().unwrap().to_string()]);
            }
            let refs: Vec<&str> = args.iter().map(|s| s.as_str()).collect();
            let (code, _, err) = common::lift(&refs);
            assert_eq!(code, 0, "{m}: {err}");
        };
        let (whole, cut) = (dir.join(format!("{m}-whole")), dir.join(format!("{m}-cut")));
        run(&whole, "6", false);
        run(&cut, "3", false);
        run(&cut, "6", true);
        let (a, b) = (std::fs::read(whole.join("model.bin")).unwrap(), std::fs::read(cut.join("model.bin")).unwrap());
        assert!(a == b, "{m}: the resumed run's model.bin differs from the uninterrupted one's");
    }
}
