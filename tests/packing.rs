//! Packed batches (src/pack.rs) against the examples one at a time: the
//! loss of a packed batch is the token-weighted mean of the examples'
//! losses and every parameter's gradient the token-weighted mean of theirs,
//! each example computed alone, unpadded, as a batch of one (attention that
//! leaked across examples, or positions that did not restart, would break
//! both). Plus the packing itself: first fit, the budget, the row length.

mod common;

use lift::data::{self, TokenizedExample};
use lift::formats::checkpoint::Checkpoint;
use lift::model::{Activations, FullGrads, Model, Param};
use lift::pack::{self, PackedBatch};

/// Examples of the given (length, prompt length), ids from a fixed stream.
fn examples(shape: &[(usize, usize)], vocab: usize) -> Vec<TokenizedExample> {
    let mut x = 0x9E37_79B9_7F4A_7C15u64;
    shape
        .iter()
        .map(|&(len, n_prompt)| {
            let ids = (0..len)
                .map(|_| {
                    x ^= x << 13;
                    x ^= x >> 7;
                    x ^= x << 17;
                    (x % vocab as u64) as u32
                })
                .collect();
            TokenizedExample { ids, n_prompt, truncated: false, full_len: len }
        })
        .collect()
}

/// The tiny GQA reference model (tests/reference/tiny_gqa), converted into
/// its own scratch folder, with RoPE for `rope` positions.
fn tiny_gqa(scratch: &str, rope: usize) -> Model {
    let bin = common::scratch(scratch).join("model.bin");
    common::convert(&common::root().join("tests/reference/tiny_gqa"), &bin);
    let ck = Checkpoint::open(&bin).unwrap();
    let mut model = Model::new(ck.config.clone(), ck.load_weights().unwrap());
    model.ensure_rope(rope);
    model
}

/// The loss and every parameter's gradient of one batch.
fn loss_and_grads(model: &Model, batch: &data::Batch) -> (f32, FullGrads) {
    let c = &model.config;
    let mut acts = Activations::new(c, batch.b, batch.t);
    acts.segments.clone_from(&batch.segments);
    let loss = model.forward(&mut acts, &batch.tokens, Some(&batch.targets)).unwrap();
    let mut grads = FullGrads::new(c);
    model.backward(&mut acts, &mut grads);
    (loss, grads)
}

#[test]
fn a_packed_batch_equals_its_examples_one_at_a_time() {
    let model = tiny_gqa("packing-tiny-gqa", 64);
    let c = model.config.clone();
    // lengths past the rope scaling's low-frequency band edge (64 / 4 = 16)
    let exs = examples(&[(23, 5), (9, 2), (31, 12), (14, 0), (7, 3), (19, 8)], c.vocab_size);
    let lens: Vec<usize> = exs.iter().map(|e| e.ids.len()).collect();
    let order: Vec<usize> = (0..exs.len()).collect();
    let batches = pack::pack_epoch(&lens, &order, 48, 1000);
    assert_eq!(batches.len(), 1);
    let packed = pack::make_packed_batch(&exs, &batches[0]);
    assert!(batches[0].rows.len() >= 2, "the packing fills {} rows", batches[0].rows.len());
    // the rows end to end, no padding: every position is an example's token
    let total: usize = lens.iter().sum();
    assert_eq!((packed.b, packed.t, packed.segments.len()), (1, total, exs.len()));
    let (loss, grads) = loss_and_grads(&model, &packed);

    let (mut sum_loss, mut n) = (0.0f64, 0usize);
    let mut want: Vec<(Param, Vec<f64>)> =
        Param::all(&c).into_iter().map(|p| (p, vec![0.0; p.shape(&c).iter().product()])).collect();
    for e in &exs {
        let one = data::make_batch(&[e], 0);
        if one.n_loss == 0 {
            continue;
        }
        let (l, g) = loss_and_grads(&model, &one);
        sum_loss += l as f64 * one.n_loss as f64;
        n += one.n_loss;
        for (p, acc) in want.iter_mut() {
            acc.iter_mut().zip(g.grads.get(*p)).for_each(|(a, &x)| *a += x as f64 * one.n_loss as f64);
        }
    }
    assert_eq!(n, packed.n_loss, "the packed batch has the examples' target tokens");
    let want_loss = (sum_loss / n as f64) as f32;
    let loss_err = ((loss - want_loss) / want_loss).abs();
    let mut worst = (0.0f64, String::new());
    for (p, acc) in &want {
        let w: Vec<f32> = acc.iter().map(|&x| (x / n as f64) as f32).collect();
        let e = common::rel_err(grads.grads.get(*p), &w);
        if e > worst.0 {
            worst = (e, p.name());
        }
    }
    eprintln!(
        "packed vs one at a time: loss {loss} vs {want_loss} (rel {loss_err:.1e}); gradients max rel {:.2e} ({})",
        worst.0, worst.1
    );
    assert!(loss_err < 1e-6, "loss {loss} vs {want_loss}");
    assert!(worst.0 < 1e-5, "gradient of {} off by {:.2e}", worst.1, worst.0);
}

/// The validation loss as the training loop computes it (cpu_trainer::
/// eval_loss, which must hand each batch's segments to the model) over
/// packed batches equals the one over batches padded to their longest
/// example: the token-weighted mean over the same targets. Run after a
/// padded pass, so that nothing is left over from an earlier batch.
#[test]
fn the_validation_loss_of_packed_batches_is_the_padded_one() {
    let model = tiny_gqa("packing-val-tiny-gqa", 48);
    let c = model.config.clone();
    let exs = examples(&[(23, 5), (9, 2), (31, 12), (14, 0), (7, 3), (19, 8), (40, 10), (12, 4)], c.vocab_size);
    let padded: Vec<data::Batch> =
        exs.chunks(3).map(|ch| data::make_batch(&ch.iter().collect::<Vec<_>>(), 0)).collect();
    let lens: Vec<usize> = exs.iter().map(|e| e.ids.len()).collect();
    let order: Vec<usize> = (0..exs.len()).collect();
    let packed: Vec<data::Batch> =
        pack::pack_epoch(&lens, &order, 48, 70).iter().map(|p| pack::make_packed_batch(&exs, p)).collect();
    // batches of one row, some longer than RoPE's table: positions must follow the examples
    assert!(packed.len() >= 2 && packed.iter().all(|b| b.b == 1) && packed.iter().any(|b| b.t > 48));
    let mut acts = Activations::new(&c, 1, 1);
    let want = lift::cpu_trainer::eval_loss(&model, &mut acts, &padded).unwrap();
    let got = lift::cpu_trainer::eval_loss(&model, &mut acts, &packed).unwrap();
    let err = ((got - want) / want).abs();
    eprintln!("validation loss packed {got} vs padded {want} (rel {err:.1e})");
    assert!(err < 1e-6, "packed {got} vs padded {want}");
}

/// The model runs a packed batch's segments side by side, each on its own
/// piece of the buffers, so segments that overlap or come out of order are
/// an error, not a wrong answer or a panic.
#[test]
fn overlapping_or_unordered_segments_are_an_error() {
    let model = tiny_gqa("packing-bad-segments", 64);
    let c = model.config.clone();
    let exs = examples(&[(23, 5), (9, 2), (31, 12)], c.vocab_size);
    let lens: Vec<usize> = exs.iter().map(|e| e.ids.len()).collect();
    let batch = pack::make_packed_batch(&exs, &pack::pack_epoch(&lens, &[0, 1, 2], 64, 1000)[0]);
    let mut swapped = batch.segments.clone();
    swapped.swap(0, 1);
    let mut overlapping = batch.segments.clone();
    overlapping[1].start -= 1;
    overlapping[1].len += 1;
    for segments in [swapped, overlapping] {
        let mut acts = Activations::new(&c, batch.b, batch.t);
        acts.segments = segments;
        let err = model.forward(&mut acts, &batch.tokens, Some(&batch.targets)).unwrap_err();
        assert!(err.to_string().contains("overlap or are out of order"), "{err}");
    }
}

/// First fit in the epoch's order, no row over the length limit, batches
/// within the token budget, every example exactly once.
#[test]
fn packing_is_first_fit_within_the_limits() {
    let lens = [30, 10, 25, 5, 40, 8, 12, 33, 3];
    let order = [4, 0, 1, 2, 3, 5, 6, 7, 8];
    let batches = pack::pack_epoch(&lens, &order, 48, 100);
    // by hand: 40 opens row 0; 30 does not fit it (70 > 48): row 1; 10 fits
    // row 1 (40); 25 would make 105 > 100 tokens: the next batch, row 0;
    // 5 and 8 join it (38); 12 does not fit (50): row 1; 33 fits row 1
    // (45); 3 fits row 0 (41).
    let want =
        vec![PackedBatch { rows: vec![vec![4], vec![0, 1]] }, PackedBatch { rows: vec![vec![2, 3, 5, 8], vec![6, 7]] }];
    let mut seen: Vec<usize> = batches.iter().flat_map(|b| b.rows.iter().flatten().copied()).collect();
    seen.sort_unstable();
    assert_eq!(seen, (0..lens.len()).collect::<Vec<_>>());
    for b in &batches {
        assert!(b.rows.iter().all(|r| r.iter().map(|&i| lens[i]).sum::<usize>() <= 48));
        assert!(b.rows.iter().flatten().map(|&i| lens[i]).sum::<usize>() <= 100);
    }
    assert_eq!(batches, want);
}

/// What the GPU reads of a packed batch (cuda::model::packing_of): for each
/// position, where its example starts in its row (the attention kernels
/// attend from there to the position itself) and its place in the example
/// (RoPE's). Written out by hand for a (2, 5) batch; a gap or an overlap,
/// which would join two examples in the kernels, is refused.
#[test]
fn the_gpu_reads_each_positions_example_start_and_place() {
    use lift::cuda::model::packing_of;
    use lift::data::Segment;
    let sg = |row, start, len| Segment { row, start, len };
    let (seg0, pos) = packing_of(&[sg(0, 0, 2), sg(0, 2, 3), sg(1, 0, 1), sg(1, 1, 4)], 2, 5).unwrap();
    assert_eq!(seg0, vec![0, 0, 2, 2, 2, 0, 1, 1, 1, 1]);
    assert_eq!(pos, vec![0, 1, 0, 1, 2, 0, 0, 1, 2, 3]);
    // make_packed_batch's (1, N) layout
    let b = pack::make_packed_batch(
        &examples(&[(3, 1), (4, 2), (2, 1)], 50),
        &PackedBatch { rows: vec![vec![0, 1], vec![2]] },
    );
    let (seg0, pos) = packing_of(&b.segments, b.b, b.t).unwrap();
    assert_eq!(seg0, vec![0, 0, 0, 3, 3, 3, 3, 7, 7]);
    assert_eq!(pos, vec![0, 1, 2, 0, 1, 2, 3, 0, 1]);
    for bad in [
        vec![sg(0, 0, 2), sg(0, 3, 2), sg(1, 0, 5)], // a gap at (0, 2)
        vec![sg(0, 0, 3), sg(0, 2, 3), sg(1, 0, 5)], // an overlap
        vec![sg(0, 0, 5)],                           // row 1 left out
        vec![sg(0, 0, 5), sg(1, 0, 6)],              // past the row
    ] {
        assert!(packing_of(&bad, 2, 5).is_err(), "{bad:?}");
    }
}
