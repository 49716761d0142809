//! Decoding (src/decode.rs, src/generate.rs) against independent references:
//! - beam search and batched, left-padded greedy and beam search on the real
//!   SmolLM2-135M against transformers' generate() on the same GGUF
//!   (tests/reference/smollm2_decode.json, made by make_decode_reference.py);
//! - beam search on a toy model against an exhaustive search written here;
//! - sampling: reproducible by seed, top-k 1 and a vanishing temperature are
//!   greedy, and the drawn tokens follow the temperature / top-k / nucleus
//!   distribution computed here from the logits.

mod common;

use lift::decode::{self, DecodeOptions, LogitSource, Sampling, Scores, Strategy, Want};
use lift::formats::checkpoint::Checkpoint;
use lift::model::Model;
use serde_json::Value;

fn ids(v: &Value) -> Vec<u32> {
    v.as_array().unwrap().iter().map(|x| x.as_u64().unwrap() as u32).collect()
}

fn id_lists(v: &Value) -> Vec<Vec<u32>> {
    v.as_array().unwrap().iter().map(ids).collect()
}

/// "equal", or where the two token lists first differ.
fn first_difference(got: &[u32], want: &[u32]) -> Option<String> {
    if got == want {
        return None;
    }
    let at = got.iter().zip(want).position(|(a, b)| a != b).unwrap_or(got.len().min(want.len()));
    Some(format!(
        "first difference at new token {at}: lift {:?} vs transformers {:?} (lengths {} and {})",
        got.get(at),
        want.get(at),
        got.len(),
        want.len()
    ))
}

fn reference() -> Value {
    let path = common::root().join("tests/reference/smollm2_decode.json");
    serde_json::from_str(&std::fs::read_to_string(path).unwrap()).unwrap()
}

fn strategy(case: &Value) -> Strategy {
    match case["num_beams"].as_u64().unwrap() as usize {
        1 => Strategy::Greedy,
        n => Strategy::Beam { num_beams: n, length_penalty: case["length_penalty"].as_f64().unwrap() as f32 },
    }
}

/// The single-prompt cases, run by the library with the prompts of equal
/// settings batched together (each prompt's result must not depend on its
/// batch-mates, in transformers' semantics or ours).
#[test]
fn beam_search_matches_transformers() {
    let Some(bin) = common::smollm2_bin() else { return };
    let ck = Checkpoint::open(&bin).unwrap();
    let model = Model::new(ck.config.clone(), ck.load_weights().unwrap());
    let r = reference();
    let eos = Some(r["eos_token_id"].as_u64().unwrap() as u32);
    let singles: Vec<&Value> =
        r["cases"].as_array().unwrap().iter().filter(|c| c["input_ids"].as_array().unwrap().len() == 1).collect();
    let mut groups: Vec<(DecodeOptions, Vec<&Value>)> = Vec::new();
    for c in singles {
        let o = DecodeOptions {
            strategy: strategy(c),
            max_new_tokens: c["max_new_tokens"].as_u64().unwrap() as usize,
            eos,
        };
        match groups.iter_mut().find(|g| g.0 == o) {
            Some(g) => g.1.push(c),
            None => groups.push((o, vec![c])),
        }
    }
    let mut failures = Vec::new();
    for (o, cases) in &groups {
        let prompts: Vec<Vec<u32>> = cases.iter().map(|c| ids(&c["input_ids"][0])).collect();
        let got = lift::generate::generate(&model, &prompts, o).unwrap().ids;
        for (c, g) in cases.iter().zip(&got) {
            let want = ids(&c["new_ids"][0]);
            let label = format!("{} ({:?})", c["name"].as_str().unwrap(), c["prompts"][0].as_str().unwrap());
            match first_difference(g, &want) {
                None => println!("{label}: {} tokens equal", want.len()),
                Some(d) => failures.push(format!("{label}: {d}")),
            }
        }
    }
    assert!(failures.is_empty(), "beam search differs from transformers:\n{}", failures.join("\n"));
}

/// The batch cases, left-padded in transformers, through `lift generate`
/// with one --prompt-ids per prompt.
#[test]
fn batched_generation_matches_transformers() {
    let Some(bin) = common::smollm2_bin() else { return };
    let r = reference();
    let mut failures = Vec::new();
    for c in r["cases"].as_array().unwrap().iter().filter(|c| c["input_ids"].as_array().unwrap().len() > 1) {
        let mut args =
            vec!["generate".to_string(), "--checkpoint".into(), bin.to_str().unwrap().into(), "--json".into()];
        for p in id_lists(&c["input_ids"]) {
            args.push("--prompt-ids".into());
            args.push(p.iter().map(u32::to_string).collect::<Vec<_>>().join(","));
        }
        args.extend(["--max-new-tokens".into(), c["max_new_tokens"].to_string()]);
        args.extend(["--num-beams".into(), c["num_beams"].to_string()]);
        args.extend(["--length-penalty".into(), c["length_penalty"].to_string()]);
        let refs: Vec<&str> = args.iter().map(String::as_str).collect();
        let (code, out, err) = common::lift(&refs);
        assert_eq!(code, 0, "lift generate failed: {err}");
        let lines: Vec<Value> = out.lines().map(|l| serde_json::from_str(l).unwrap()).collect();
        let want = id_lists(&c["new_ids"]);
        assert_eq!(lines.len(), want.len(), "one JSON line per prompt");
        for (i, (line, w)) in lines.iter().zip(&want).enumerate() {
            let label = format!("{} prompt {i}", c["name"].as_str().unwrap());
            match first_difference(&ids(&line["ids"]), w) {
                None => println!("{label}: {} tokens equal", w.len()),
                Some(d) => failures.push(format!("{label}: {d}")),
            }
        }
    }
    assert!(failures.is_empty(), "batched generation differs from transformers:\n{}", failures.join("\n"));
}

// ----------------------------------------------------------------------------
// The CPU source against the training forward pass

/// `CpuSource` with every answer checked against `Model::forward` run from
/// scratch on each row's whole sequence (no cache, no packing, no slots).
struct Checked<'a> {
    inner: lift::generate::CpuSource<'a>,
    model: &'a Model,
    seqs: Vec<Vec<u32>>,
    worst: f64,
    shrank: bool,
}

impl Checked<'_> {
    fn check(&mut self, scores: &Scores) {
        let Scores::Full(logits) = scores else { panic!("the CPU source gives full logits") };
        let v = self.model.config.vocab_size;
        for (r, seq) in self.seqs.iter().enumerate() {
            let mut acts = lift::model::Activations::new(&self.model.config, 1, seq.len());
            self.model.forward(&mut acts, seq, None).unwrap();
            let want = &acts.logits[(seq.len() - 1) * v..seq.len() * v];
            self.worst = self.worst.max(common::rel_err(&logits[r * v..(r + 1) * v], want));
        }
    }
}

impl LogitSource for Checked<'_> {
    fn vocab_size(&self) -> usize {
        self.inner.vocab_size()
    }
    fn prefill(&mut self, prompts: &[Vec<u32>], want: Want) -> anyhow::Result<Scores> {
        self.seqs = prompts.to_vec();
        let scores = self.inner.prefill(prompts, want)?;
        self.check(&scores);
        Ok(scores)
    }
    fn step(&mut self, tokens: &[u32], want: Want) -> anyhow::Result<Scores> {
        self.seqs.iter_mut().zip(tokens).for_each(|(s, &t)| s.push(t));
        let before = self.inner.cached_positions();
        let scores = self.inner.step(tokens, want)?;
        self.shrank |= self.inner.cached_positions() < before;
        self.check(&scores);
        Ok(scores)
    }
    fn select(&mut self, src: &[usize]) -> anyhow::Result<()> {
        self.seqs = src.iter().map(|&s| self.seqs[s].clone()).collect();
        let before = self.inner.cached_positions();
        self.inner.select(src)?;
        self.shrank |= self.inner.cached_positions() < before;
        Ok(())
    }
}

/// Packed prefill, per-row positions, slot attention, beam reordering and
/// garbage collection of the cache give the logits of the plain forward
/// pass, on the tiny GQA model (llama3 RoPE scaling) with 8 prompts of
/// different lengths and 8 beams each, long enough for the pool to be
/// collected.
#[test]
fn the_cpu_source_gives_the_logits_of_the_forward_pass() {
    let dir = common::scratch("decode-tiny");
    let bin = dir.join("tiny.bin");
    common::convert(&common::root().join("tests/reference/tiny_gqa"), &bin);
    let ck = Checkpoint::open(&bin).unwrap();
    let mut model = Model::new(ck.config.clone(), ck.load_weights().unwrap());
    model.ensure_rope(256);
    let prompts: Vec<Vec<u32>> =
        (0..8).map(|i| (0..5 + 3 * i).map(|t| ((t * 37 + i * 11) % 380) as u32).collect()).collect();
    let mut src = Checked {
        inner: lift::generate::CpuSource::new(&model),
        model: &model,
        seqs: vec![],
        worst: 0.0,
        shrank: false,
    };
    let o =
        DecodeOptions { strategy: Strategy::Beam { num_beams: 8, length_penalty: 1.0 }, max_new_tokens: 90, eos: None };
    let out = decode::decode(&mut src, &prompts, &o).unwrap();
    println!("max rel err of the logits {:.2e}; pool collected: {}", src.worst, src.shrank);
    assert!(out.ids.iter().all(|ids| ids.len() == 90));
    assert!(src.worst < 1e-4, "cached logits differ from the forward pass by {:.2e}", src.worst);
    assert!(src.shrank, "the cache was never collected: the test does not reach the garbage collection");
    let o = DecodeOptions::greedy(40, None);
    decode::decode(&mut src, &prompts, &o).unwrap();
    assert!(src.worst < 1e-4, "greedy: {:.2e}", src.worst);
}

// ----------------------------------------------------------------------------
// A toy model: the next-token logits depend only on the last token.

/// Logits table[last token] (V each); the prompt's last token starts.
/// With `reduce`, the source answers as a GPU does: only the top k of each
/// row (by a sort, not by the search's own code) and its log-sum-exp.
struct Markov {
    table: Vec<Vec<f32>>,
    rows: Vec<u32>,
    reduce: bool,
}

impl LogitSource for Markov {
    fn vocab_size(&self) -> usize {
        self.table.len()
    }
    fn prefill(&mut self, prompts: &[Vec<u32>], want: Want) -> anyhow::Result<Scores> {
        self.rows = prompts.iter().map(|p| *p.last().unwrap()).collect();
        Ok(self.scores(want))
    }
    fn step(&mut self, tokens: &[u32], want: Want) -> anyhow::Result<Scores> {
        assert_eq!(tokens.len(), self.rows.len());
        self.rows = tokens.to_vec();
        Ok(self.scores(want))
    }
    fn select(&mut self, src: &[usize]) -> anyhow::Result<()> {
        self.rows = src.iter().map(|&s| self.rows[s]).collect();
        Ok(())
    }
}

impl Markov {
    fn new(v: usize, seed: u64) -> Markov {
        let mut rng = lift::rng::Rng::new(seed);
        let table = (0..v).map(|_| (0..v).map(|_| 3.0 * rng.normal()).collect()).collect();
        Markov { table, rows: Vec::new(), reduce: false }
    }
    fn logits(&self) -> Vec<f32> {
        self.rows.iter().flat_map(|&t| self.table[t as usize].clone()).collect()
    }
    fn scores(&self, want: Want) -> Scores {
        let k = match want {
            Want::Full => return Scores::Full(self.logits()),
            _ if !self.reduce => return Scores::Full(self.logits()),
            Want::Argmax => 1,
            Want::Top(k) => k.min(self.table.len()),
        };
        let (mut logits, mut ids, mut lse) = (Vec::new(), Vec::new(), Vec::new());
        for &t in &self.rows {
            let row = &self.table[t as usize];
            let mut order: Vec<u32> = (0..row.len() as u32).collect();
            order.sort_by(|&a, &b| row[b as usize].total_cmp(&row[a as usize]).then(a.cmp(&b)));
            ids.extend_from_slice(&order[..k]);
            logits.extend(order[..k].iter().map(|&i| row[i as usize]));
            lse.push(lift::cpu::logsumexp(row));
        }
        Scores::Top { k, logits, ids, lse }
    }
    /// log-softmax of row t, in f64.
    fn logp(&self, t: u32) -> Vec<f64> {
        let row = &self.table[t as usize];
        let max = row.iter().fold(f64::NEG_INFINITY, |m, &x| m.max(x as f64));
        let lse = max + row.iter().map(|&x| (x as f64 - max).exp()).sum::<f64>().ln();
        row.iter().map(|&x| x as f64 - lse).collect()
    }
}

/// A source that sends only each row's top k and log-sum-exp (as the GPU's
/// does) gives the search exactly what full logits give: the same tokens
/// for greedy and for beam search (penalties 1, 2, -1; a few prompts; ties
/// in the logits, which decide by the lower id).
#[test]
fn top_k_scores_decode_as_full_logits_do() {
    let mut m = Markov::new(40, 9);
    for row in m.table.iter_mut() {
        row.iter_mut().for_each(|x| *x = (*x * 2.0).round() / 2.0); // ties
    }
    let prompts: Vec<Vec<u32>> = (0..5).map(|i| vec![1, 3 * i + 2]).collect();
    let strategies = [
        Strategy::Greedy,
        Strategy::Beam { num_beams: 3, length_penalty: 1.0 },
        Strategy::Beam { num_beams: 4, length_penalty: 2.0 },
        Strategy::Beam { num_beams: 2, length_penalty: -1.0 },
    ];
    for strategy in strategies {
        let o = DecodeOptions { strategy: strategy.clone(), max_new_tokens: 12, eos: Some(7) };
        m.reduce = false;
        let full = decode::decode(&mut m, &prompts, &o).unwrap().ids;
        m.reduce = true;
        let top = decode::decode(&mut m, &prompts, &o).unwrap().ids;
        assert_eq!(full, top, "{strategy:?}: top-k scores decode differently from full logits");
    }
}

/// Every continuation that ends at EOS or at max_new tokens, and its score
/// sum(log p) / length^penalty: the best one is what a beam search wide
/// enough to keep every hypothesis returns.
fn exhaustive_best(m: &Markov, start: u32, eos: u32, max_new: usize, penalty: f64) -> Vec<u32> {
    let mut best = (f64::NEG_INFINITY, Vec::new());
    let mut open = vec![(Vec::<u32>::new(), start, 0.0f64)];
    while let Some((seq, last, logp)) = open.pop() {
        for (t, lp) in m.logp(last).into_iter().enumerate() {
            let mut s = seq.clone();
            s.push(t as u32);
            let total = logp + lp;
            if t as u32 == eos || s.len() == max_new {
                let score = total / (s.len() as f64).powf(penalty);
                if score > best.0 {
                    best = (score, s);
                }
            } else {
                open.push((s, t as u32, total));
            }
        }
    }
    best.1
}

#[test]
fn a_wide_beam_search_finds_the_best_scored_continuation() {
    // V = 4 (EOS = 3), 4 new tokens: 3^3 running hypotheses at most, so 64
    // beams keep all of them, and fewer than 64 finish before the last step,
    // so transformers' early-stopping rule never cuts the search short.
    let (v, eos, max_new) = (4, 3u32, 4);
    for seed in 0..20 {
        let mut m = Markov::new(v, seed);
        for penalty in [1.0, 2.0, 0.0, -1.0] {
            let want = exhaustive_best(&m, 0, eos, max_new, penalty);
            let o = DecodeOptions {
                strategy: Strategy::Beam { num_beams: 64, length_penalty: penalty as f32 },
                max_new_tokens: max_new,
                eos: Some(eos),
            };
            let got = decode::decode(&mut m, &[vec![0]], &o).unwrap().ids.remove(0);
            assert_eq!(got, want, "seed {seed}, length penalty {penalty}");
        }
    }
}

#[test]
fn one_beam_is_greedy() {
    for seed in 0..10 {
        let mut m = Markov::new(7, seed);
        let greedy = DecodeOptions::greedy(12, Some(6));
        let beam = DecodeOptions { strategy: Strategy::Beam { num_beams: 1, length_penalty: 1.0 }, ..greedy.clone() };
        let prompts = vec![vec![0], vec![3], vec![5]];
        let a = decode::decode(&mut m, &prompts, &greedy).unwrap().ids;
        let b = decode::decode(&mut m, &prompts, &beam).unwrap().ids;
        assert_eq!(a, b, "seed {seed}");
        // Independently: greedy follows the argmax of the table.
        for (p, out) in prompts.iter().zip(&a) {
            let mut last = p[0];
            for &t in out {
                let row = &m.table[last as usize];
                let best = (0..row.len()).max_by(|&i, &j| row[i].total_cmp(&row[j]).then(j.cmp(&i))).unwrap();
                assert_eq!(t, best as u32);
                last = t;
            }
            assert!(out.len() == 12 || *out.last().unwrap() == 6);
        }
    }
}

// ----------------------------------------------------------------------------
// Sampling

fn sampling(temperature: f32, top_k: usize, top_p: f32, seed: u64) -> Strategy {
    Strategy::Sample(Sampling { temperature, top_k, top_p, seed })
}

/// Draws `n` tokens from the toy model's row 0 (the prompt [0], one token
/// per decode, a new seed each time) and counts them.
fn counts(m: &mut Markov, strategy: impl Fn(u64) -> Strategy, n: u64) -> Vec<u64> {
    let mut c = vec![0u64; m.vocab_size()];
    for seed in 0..n {
        let o = DecodeOptions { strategy: strategy(seed), max_new_tokens: 1, eos: None };
        c[decode::decode(m, &[vec![0]], &o).unwrap().ids[0][0] as usize] += 1;
    }
    c
}

/// The distribution sampling should draw from, computed from the logits in
/// f64: softmax(x / T), restricted to the k most likely and then to the
/// nucleus (the most likely tokens until their probability reaches p),
/// renormalized.
fn expected(logits: &[f32], t: f64, k: usize, p: f64) -> Vec<f64> {
    let x: Vec<f64> = logits.iter().map(|&l| l as f64 / t).collect();
    let mut order: Vec<usize> = (0..x.len()).collect();
    order.sort_by(|&a, &b| x[b].total_cmp(&x[a]));
    let keep_k = if k == 0 { x.len() } else { k };
    let kept: Vec<usize> = order[..keep_k].to_vec();
    let z: f64 = kept.iter().map(|&i| x[i].exp()).sum();
    let mut nucleus = Vec::new();
    let mut mass = 0.0;
    for &i in &kept {
        if mass >= p {
            break;
        }
        nucleus.push(i);
        mass += x[i].exp() / z;
    }
    let zn: f64 = nucleus.iter().map(|&i| x[i].exp()).sum();
    (0..x.len()).map(|i| if nucleus.contains(&i) { x[i].exp() / zn } else { 0.0 }).collect()
}

/// Drawn frequencies against the expected probabilities: never a token
/// outside the support, and each frequency within 5 standard errors.
fn check_frequencies(label: &str, c: &[u64], want: &[f64]) {
    let n: u64 = c.iter().sum();
    for (i, (&ci, &pi)) in c.iter().zip(want).enumerate() {
        if pi == 0.0 {
            assert_eq!(ci, 0, "{label}: token {i} is outside the distribution but was drawn {ci} times");
            continue;
        }
        let f = ci as f64 / n as f64;
        let se = (pi * (1.0 - pi) / n as f64).sqrt();
        assert!((f - pi).abs() <= 5.0 * se + 1e-9, "{label}: token {i} drawn at {f:.4}, expected {pi:.4}");
    }
}

#[test]
fn sampling_follows_temperature_top_k_and_top_p() {
    let mut m = Markov::new(12, 7);
    let row = m.table[0].clone();
    let n = 6000;
    for (t, k, p) in [(1.0, 0, 1.0), (0.7, 0, 1.0), (1.5, 4, 1.0), (1.0, 0, 0.6), (1.3, 6, 0.8), (1.0, 0, 0.05)] {
        let c = counts(&mut m, |seed| sampling(t, k, p, seed), n);
        check_frequencies(&format!("T {t} top-k {k} top-p {p}"), &c, &expected(&row, t as f64, k, p as f64));
    }
}

#[test]
fn sampling_is_reproducible_by_seed() {
    let mut m = Markov::new(30, 3);
    let prompts = vec![vec![0], vec![1], vec![2]];
    let run = |m: &mut Markov, seed| {
        let o = DecodeOptions { strategy: sampling(1.0, 0, 0.9, seed), max_new_tokens: 40, eos: None };
        decode::decode(m, &prompts, &o).unwrap().ids
    };
    let a = run(&mut m, 11);
    assert_eq!(a, run(&mut m, 11), "the same seed gives the same tokens");
    assert_ne!(a, run(&mut m, 12), "another seed gives other tokens");
    assert_ne!(a[0], a[1][..], "rows draw from their own generators");
}

/// On SmolLM2: top-k 1, and a temperature near 0, give transformers' greedy tokens.
#[test]
fn top_k_one_and_a_vanishing_temperature_are_greedy() {
    let Some(bin) = common::smollm2_bin() else { return };
    let ck = Checkpoint::open(&bin).unwrap();
    let model = Model::new(ck.config.clone(), ck.load_weights().unwrap());
    let r = reference();
    let c = r["cases"].as_array().unwrap().iter().find(|c| c["name"] == "greedy batch, left padded").unwrap();
    let prompts = id_lists(&c["input_ids"]);
    let want = id_lists(&c["new_ids"]);
    let eos = Some(r["eos_token_id"].as_u64().unwrap() as u32);
    for (label, s) in [("top-k 1", sampling(1.0, 1, 1.0, 5)), ("temperature 1e-4", sampling(1e-4, 0, 1.0, 5))] {
        let o = DecodeOptions { strategy: s, max_new_tokens: c["max_new_tokens"].as_u64().unwrap() as usize, eos };
        let got = lift::generate::generate(&model, &prompts, &o).unwrap().ids;
        for (i, (g, w)) in got.iter().zip(&want).enumerate() {
            assert!(first_difference(g, w).is_none(), "{label}, prompt {i}: {}", first_difference(g, w).unwrap());
        }
    }
}
