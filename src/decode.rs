//! Decoding: how the next tokens are chosen from a model's next-token logits.
//!
//! Three strategies share one loop (`decode`):
//! - greedy: the most likely token, ties to the lower id (torch.argmax);
//! - beam search with Hugging Face `generate(num_beams=N, do_sample=False)`
//!   semantics (see `BeamSearch`);
//! - sampling: temperature, then top-k, then top-p (Hugging Face's order),
//!   drawn from a seeded generator, so a seed gives the same text every time.
//!
//! The loop never sees a model. It talks to a `LogitSource`, which holds one
//! KV cache per row and can run every row one token further or rearrange the
//! rows. The CPU model is one (`generate::CpuSource`); the GPU model
//! (`cuda::infer::GpuSource`) implements the same three calls over its own
//! cache and reuses all of this file. Each call says how much of the
//! distribution the search reads (`Want`): the GPU then sends back only the
//! argmax, or the top k with the log-sum-exp, not a (rows, vocabulary) array.

use std::time::Instant;

use anyhow::{Result, bail};

use crate::rng::Rng;

/// What a search needs from a model.
pub trait LogitSource {
    fn vocab_size(&self) -> usize;
    /// Forgets every row and starts one row per prompt; returns the scores
    /// (P rows) of the token after each prompt, at least what `want` asks.
    fn prefill(&mut self, prompts: &[Vec<u32>], want: Want) -> Result<Scores>;
    /// Appends tokens[r] to row r; returns the scores (R rows) of the token after.
    fn step(&mut self, tokens: &[u32], want: Want) -> Result<Scores>;
    /// Rearranges the rows: new row i continues old row src[i]. A row may be
    /// repeated (beams that share a parent) or left out (finished).
    fn select(&mut self, src: &[usize]) -> Result<()>;
}

/// How much of each row's next-token distribution a search reads. A source
/// may always give the full logits (the CPU does); one on another device
/// reduces them there, so that only these few numbers cross per step.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Want {
    /// The most likely token (greedy).
    Argmax,
    /// The k most likely tokens and their log-probabilities (beam search, k = 2N).
    Top(usize),
    /// Every logit (sampling).
    Full,
}

/// The scores of R rows over the vocabulary (V).
#[derive(Debug, Clone, PartialEq)]
pub enum Scores {
    /// The logits (R, V).
    Full(Vec<f32>),
    /// Per row the k best logits and their ids (R, k), best first with ties
    /// to the lower id, and each row's log-sum-exp (R).
    Top { k: usize, logits: Vec<f32>, ids: Vec<u32>, lse: Vec<f32> },
}

impl Scores {
    /// Row r's logits (V); only full scores have them.
    pub fn row(&self, r: usize, v: usize) -> &[f32] {
        match self {
            Scores::Full(l) => &l[r * v..(r + 1) * v],
            Scores::Top { .. } => panic!("Scores::row: the source gave only the top tokens"),
        }
    }

    /// Row r's most likely token, ties to the lower id (torch.argmax).
    pub fn argmax(&self, r: usize, v: usize) -> u32 {
        match self {
            Scores::Full(_) => argmax(self.row(r, v)),
            Scores::Top { k, ids, .. } => ids[r * k],
        }
    }

    /// Row r's k most likely tokens, best first (ties to the lower id), as
    /// (log-probability, id): logit - logsumexp(row), the same f32 operation
    /// from full logits and from a device's top k.
    pub fn top_logp(&self, r: usize, k: usize, v: usize) -> Vec<(f32, u32)> {
        match self {
            Scores::Full(_) => {
                let row = self.row(r, v);
                let lse = crate::cpu::logsumexp(row);
                top_k_ids(row, k).into_iter().map(|t| (row[t as usize] - lse, t)).collect()
            }
            Scores::Top { k: kk, logits, ids, lse } => {
                assert!(k <= *kk, "top_logp: {k} tokens asked of a top {kk}");
                (r * kk..r * kk + k).map(|i| (logits[i] - lse[r], ids[i])).collect()
            }
        }
    }
}

/// How the next token is chosen.
#[derive(Debug, Clone, PartialEq)]
pub enum Strategy {
    Greedy,
    /// `num_beams` hypotheses per prompt, finished ones scored by
    /// sum(log p) / length^length_penalty.
    Beam {
        num_beams: usize,
        length_penalty: f32,
    },
    Sample(Sampling),
}

/// Sampling settings; top_k 0 and top_p 1 switch those filters off.
#[derive(Debug, Clone, PartialEq)]
pub struct Sampling {
    pub temperature: f32,
    pub top_k: usize,
    pub top_p: f32,
    pub seed: u64,
}

#[derive(Debug, Clone, PartialEq)]
pub struct DecodeOptions {
    pub strategy: Strategy,
    pub max_new_tokens: usize,
    /// Ends a row (or a hypothesis) and is kept as its last token.
    pub eos: Option<u32>,
}

impl DecodeOptions {
    pub fn greedy(max_new_tokens: usize, eos: Option<u32>) -> DecodeOptions {
        DecodeOptions { strategy: Strategy::Greedy, max_new_tokens, eos }
    }

    /// Refuses settings that have no meaning, in the words of the flags.
    pub fn validate(&self) -> Result<()> {
        match &self.strategy {
            Strategy::Greedy => {}
            Strategy::Beam { num_beams, length_penalty } => {
                if *num_beams == 0 {
                    bail!("--num-beams must be at least 1");
                }
                if !length_penalty.is_finite() {
                    bail!("--length-penalty must be a finite number");
                }
            }
            Strategy::Sample(s) => {
                if !(s.temperature.is_finite() && s.temperature > 0.0) {
                    bail!("--temperature must be a positive number (0 means greedy)");
                }
                if !(s.top_p > 0.0 && s.top_p <= 1.0) {
                    bail!("--top-p must be in (0, 1], not {}", s.top_p);
                }
            }
        }
        Ok(())
    }
}

/// What a decode did, for tokens/s figures.
#[derive(Debug, Clone, Copy, Default, PartialEq)]
pub struct DecodeStats {
    /// Prompt tokens run through the model once, and the time it took.
    pub prefill_tokens: usize,
    pub prefill_s: f64,
    /// One-token steps, the rows they ran (every beam counts), and their time.
    pub steps: usize,
    pub step_rows: usize,
    pub step_s: f64,
}

impl DecodeStats {
    pub fn add(&mut self, o: &DecodeStats) {
        self.prefill_tokens += o.prefill_tokens;
        self.prefill_s += o.prefill_s;
        self.steps += o.steps;
        self.step_rows += o.step_rows;
        self.step_s += o.step_s;
    }
}

pub struct Decoded {
    /// The new tokens of each prompt, ending with EOS when one was produced.
    pub ids: Vec<Vec<u32>>,
    pub stats: DecodeStats,
}

/// Continues every prompt by the strategy of `o`; all prompts run as one batch.
pub fn decode(m: &mut dyn LogitSource, prompts: &[Vec<u32>], o: &DecodeOptions) -> Result<Decoded> {
    o.validate()?;
    let mut stats = DecodeStats::default();
    if prompts.is_empty() || o.max_new_tokens == 0 {
        return Ok(Decoded { ids: vec![Vec::new(); prompts.len()], stats });
    }
    if let Some(i) = prompts.iter().position(Vec::is_empty) {
        bail!("prompt {i} is empty: decoding needs at least one prompt token");
    }
    let v = m.vocab_size();
    let mut search: Box<dyn Search> = match &o.strategy {
        Strategy::Greedy => Box::new(PerRow::new(prompts.len(), Pick::Greedy, o, v)),
        Strategy::Sample(s) => {
            let rngs = (0..prompts.len()).map(|i| Rng::stream(s.seed, i as u64)).collect();
            Box::new(PerRow::new(prompts.len(), Pick::Sample(s.clone(), rngs), o, v))
        }
        Strategy::Beam { num_beams, length_penalty } => {
            Box::new(BeamSearch::new(prompts.len(), *num_beams, *length_penalty, o, v))
        }
    };
    let want = search.want();
    let t0 = Instant::now();
    let mut scores = m.prefill(prompts, want)?;
    stats.prefill_tokens = prompts.iter().map(Vec::len).sum();
    stats.prefill_s = t0.elapsed().as_secs_f64();
    let t0 = Instant::now();
    while let Some(next) = search.advance(&scores) {
        m.select(&next.src)?;
        scores = m.step(&next.tokens, want)?;
        stats.steps += 1;
        stats.step_rows += next.tokens.len();
    }
    stats.step_s = t0.elapsed().as_secs_f64();
    Ok(Decoded { ids: search.finish(), stats })
}

/// The rows of the next step: row i continues old row src[i] with tokens[i].
struct Next {
    src: Vec<usize>,
    tokens: Vec<u32>,
}

/// One strategy's state between steps.
trait Search {
    /// What the search reads of each row's scores.
    fn want(&self) -> Want;
    /// Given the scores of the live rows (R), chooses the next rows, or
    /// None when the search is over.
    fn advance(&mut self, scores: &Scores) -> Option<Next>;
    /// The new tokens of each prompt.
    fn finish(self: Box<Self>) -> Vec<Vec<u32>>;
}

// ----------------------------------------------------------------------------
// Greedy and sampling: one row per prompt

enum Pick {
    Greedy,
    /// One generator per prompt, so a row's draws do not depend on the others.
    Sample(Sampling, Vec<Rng>),
}

struct PerRow {
    out: Vec<Vec<u32>>,
    /// The prompt each live row belongs to.
    live: Vec<usize>,
    pick: Pick,
    max_new: usize,
    eos: Option<u32>,
    v: usize,
    scratch: Vec<(f32, u32)>,
}

impl PerRow {
    fn new(n: usize, pick: Pick, o: &DecodeOptions, v: usize) -> PerRow {
        let live = (0..n).collect();
        PerRow { out: vec![Vec::new(); n], live, pick, max_new: o.max_new_tokens, eos: o.eos, v, scratch: Vec::new() }
    }
}

impl Search for PerRow {
    fn want(&self) -> Want {
        match self.pick {
            Pick::Greedy => Want::Argmax,
            Pick::Sample(..) => Want::Full,
        }
    }

    fn advance(&mut self, scores: &Scores) -> Option<Next> {
        let mut next = Next { src: Vec::new(), tokens: Vec::new() };
        let mut live = Vec::new();
        for (r, &p) in self.live.iter().enumerate() {
            let id = match &mut self.pick {
                Pick::Greedy => scores.argmax(r, self.v),
                Pick::Sample(s, rngs) => sample(scores.row(r, self.v), s, &mut rngs[p], &mut self.scratch),
            };
            self.out[p].push(id);
            if Some(id) != self.eos && self.out[p].len() < self.max_new {
                next.src.push(r);
                next.tokens.push(id);
                live.push(p);
            }
        }
        self.live = live;
        (!next.src.is_empty()).then_some(next)
    }

    fn finish(self: Box<Self>) -> Vec<Vec<u32>> {
        self.out
    }
}

/// The index of the largest logit; the first one wins a tie, as torch.argmax.
pub fn argmax(logits: &[f32]) -> u32 {
    let mut best = 0;
    for (i, &v) in logits.iter().enumerate() {
        if v > logits[best] {
            best = i;
        }
    }
    best as u32
}

// ----------------------------------------------------------------------------
// Sampling

/// The tokens sampling may draw and their unnormalized probabilities, as
/// Hugging Face's warpers leave them: logits / temperature; then only the
/// tokens at least as likely as the k-th (ties kept); then the nucleus: in
/// order of falling probability, each token whose more likely tokens sum to
/// less than top_p (so the most likely one always stays). Returned as
/// (weight, id) with weights exp(x - max), in id order.
pub fn sampling_weights(logits: &[f32], s: &Sampling, scratch: &mut Vec<(f32, u32)>) -> Vec<(f64, u32)> {
    // (V) -> candidates (x / T, id)
    scratch.clear();
    scratch.extend(logits.iter().enumerate().map(|(i, &x)| (x / s.temperature, i as u32)));
    if s.top_k > 0 && s.top_k < scratch.len() {
        let k = s.top_k;
        let kth = scratch.select_nth_unstable_by(k - 1, |a, b| b.0.total_cmp(&a.0)).1.0;
        scratch.retain(|c| c.0 >= kth);
    }
    let max = scratch.iter().fold(f32::NEG_INFINITY, |m, c| m.max(c.0));
    let mut w: Vec<(f64, u32)> = scratch.iter().map(|&(x, i)| (((x - max) as f64).exp(), i)).collect();
    if s.top_p < 1.0 {
        w = nucleus(w, s.top_p as f64);
    }
    w.sort_unstable_by_key(|c| c.1);
    w
}

/// The nucleus of weighted candidates: sorted by falling weight, the ones
/// whose predecessors' share of the total is below p. Only the head of the
/// order is sorted: the top m by select, doubling m until the nucleus ends
/// inside it, so a 128K vocabulary costs a few linear passes, not a sort.
fn nucleus(mut w: Vec<(f64, u32)>, p: f64) -> Vec<(f64, u32)> {
    let total: f64 = w.iter().map(|c| c.0).sum();
    let by_weight = |a: &(f64, u32), b: &(f64, u32)| b.0.total_cmp(&a.0).then(a.1.cmp(&b.1));
    let mut m = 64.min(w.len());
    loop {
        if m < w.len() {
            w.select_nth_unstable_by(m - 1, by_weight);
        }
        w[..m].sort_unstable_by(by_weight);
        let mut before = 0.0;
        for (i, c) in w[..m].iter().enumerate() {
            if before / total >= p {
                w.truncate(i.max(1));
                return w;
            }
            before += c.0;
        }
        if m == w.len() {
            return w;
        }
        m = (2 * m).min(w.len());
    }
}

/// One token drawn from the sampling distribution of `logits`.
fn sample(logits: &[f32], s: &Sampling, rng: &mut Rng, scratch: &mut Vec<(f32, u32)>) -> u32 {
    let w = sampling_weights(logits, s, scratch);
    let total: f64 = w.iter().map(|c| c.0).sum();
    let u = rng.next_f64() * total;
    let mut acc = 0.0;
    for &(wi, id) in &w {
        acc += wi;
        if u < acc {
            return id;
        }
    }
    w.last().map_or(0, |c| c.1) // u rounded up to the total
}

// ----------------------------------------------------------------------------
// Beam search

/// A hypothesis: its new tokens and sum of log-probabilities (f32, as
/// transformers accumulates it).
#[derive(Debug, Clone)]
struct Hyp {
    tokens: Vec<u32>,
    logp: f32,
}

/// The beams of one prompt.
struct Item {
    /// Running hypotheses, best first; their rows are consecutive.
    running: Vec<Hyp>,
    /// Finished hypotheses and their scores, best first, at most num_beams.
    finished: Vec<(f32, Hyp)>,
    /// Whether a running beam can still beat the worst finished one
    /// (transformers' `is_early_stop_heuristic_unsatisfied`).
    open: bool,
}

/// A continuation: beam (row within its item), token, and the beam's log
/// probability with it.
#[derive(Debug, Clone, Copy)]
struct Cand {
    logp: f32,
    beam: usize,
    token: u32,
}

/// Beam search as transformers 5.x `_beam_search` does it with
/// do_sample=False, early_stopping=False (the default). Per prompt and step:
/// 1. every running beam's log-softmax plus its running sum gives the
///    candidates; the best 2·N (N = num_beams) are kept, best first;
/// 2. a candidate that ends (EOS, or the last allowed token) is a finished
///    hypothesis if it ranks among the first N: score = sum / length^penalty,
///    length counting the new tokens with the EOS; only the N best finished
///    are kept;
/// 3. the best N candidates that do not end are the next running beams;
/// 4. the prompt is done once N hypotheses are finished and the best running
///    sum divided by (its length)^penalty cannot beat the worst of them.
///
/// The result is the best finished hypothesis. At the first step all N beams
/// would be copies of the prompt (transformers gives beams 2..N a score of
/// -1e9 so that only the first one counts), so each prompt runs as one row
/// until the first candidates are chosen: the prompt is computed once.
struct BeamSearch {
    items: Vec<Item>,
    /// The items that still have rows, in row order.
    live: Vec<usize>,
    num_beams: usize,
    length_penalty: f32,
    /// New tokens in every running beam so far.
    generated: usize,
    max_new: usize,
    eos: Option<u32>,
    v: usize,
}

impl BeamSearch {
    fn new(n: usize, num_beams: usize, length_penalty: f32, o: &DecodeOptions, v: usize) -> BeamSearch {
        let fresh = || Item { running: vec![Hyp { tokens: Vec::new(), logp: 0.0 }], finished: Vec::new(), open: true };
        BeamSearch {
            items: (0..n).map(|_| fresh()).collect(),
            live: (0..n).collect(),
            num_beams,
            length_penalty,
            generated: 0,
            max_new: o.max_new_tokens,
            eos: o.eos,
            v,
        }
    }

    /// sum / length^penalty, in f32 as transformers computes it.
    fn score(&self, logp: f32, len: usize) -> f32 {
        logp / (len as f64).powf(self.length_penalty as f64) as f32
    }

    /// Steps 1-4 for one item whose running beams are rows row0.. of
    /// `scores`; returns the next running beams as candidates.
    fn advance_item(&mut self, it: usize, scores: &Scores, row0: usize) -> Vec<Cand> {
        let n = self.num_beams;
        let cands = top_candidates(scores, row0, &self.items[it].running, 2 * n, self.v);
        let len = self.generated + 1;
        let last = len == self.max_new;
        let mut next = Vec::with_capacity(n);
        for (rank, c) in cands.iter().enumerate() {
            let ends = last || Some(c.token) == self.eos;
            if !ends {
                if next.len() < n {
                    next.push(*c);
                }
            } else if rank < n && self.items[it].open {
                let score = self.score(c.logp, len);
                let item = &mut self.items[it];
                let mut tokens = item.running[c.beam].tokens.clone();
                tokens.push(c.token);
                item.finished.push((score, Hyp { tokens, logp: c.logp }));
                // Stable: an earlier hypothesis stays ahead of an equal newcomer.
                item.finished.sort_by(|a, b| b.0.total_cmp(&a.0));
                item.finished.truncate(n);
            }
        }
        let best_possible = next.first().map(|c| self.score(c.logp, len));
        let item = &mut self.items[it];
        if let (Some(best), true) = (best_possible, item.finished.len() == n) {
            let worst = item.finished.last().map_or(f32::NEG_INFINITY, |f| f.0);
            item.open &= best > worst;
        }
        next
    }
}

impl Search for BeamSearch {
    fn want(&self) -> Want {
        Want::Top(2 * self.num_beams)
    }

    fn advance(&mut self, scores: &Scores) -> Option<Next> {
        let mut next = Next { src: Vec::new(), tokens: Vec::new() };
        let mut live = Vec::new();
        let mut row0 = 0;
        for it in std::mem::take(&mut self.live) {
            let rows = self.items[it].running.len();
            let chosen = self.advance_item(it, scores, row0);
            let item = &mut self.items[it];
            if item.open && !chosen.is_empty() {
                let old = std::mem::take(&mut item.running);
                for c in &chosen {
                    let mut tokens = old[c.beam].tokens.clone();
                    tokens.push(c.token);
                    item.running.push(Hyp { tokens, logp: c.logp });
                    next.src.push(row0 + c.beam);
                    next.tokens.push(c.token);
                }
                live.push(it);
            }
            row0 += rows;
        }
        self.generated += 1;
        self.live = live;
        (!next.src.is_empty()).then_some(next)
    }

    fn finish(self: Box<Self>) -> Vec<Vec<u32>> {
        let pick = |it: Item| match it.finished.into_iter().next() {
            Some((_, h)) => h.tokens,
            None => it.running.into_iter().next().map(|h| h.tokens).unwrap_or_default(),
        };
        self.items.into_iter().map(pick).collect()
    }
}

/// The best k continuations of the beams (rows row0.. of `scores`), best
/// first: log_softmax(row) + the beam's sum, over all beams and tokens; ties
/// go to the lower (beam, token), the order of transformers' flattened top-k.
fn top_candidates(scores: &Scores, row0: usize, beams: &[Hyp], k: usize, v: usize) -> Vec<Cand> {
    let mut all = Vec::with_capacity(beams.len() * k);
    for (b, hyp) in beams.iter().enumerate() {
        // Within a row the order of log-probabilities is the order of logits,
        // so a row's best k hold every candidate the beams can keep.
        for (logp, token) in scores.top_logp(row0 + b, k, v) {
            all.push(Cand { logp: logp + hyp.logp, beam: b, token });
        }
    }
    all.sort_by(|a, b| b.logp.total_cmp(&a.logp).then((a.beam, a.token).cmp(&(b.beam, b.token))));
    all.truncate(k);
    all
}

/// The ids of the k largest values, largest first, ties to the lower id: one
/// pass keeping a sorted list of k.
fn top_k_ids(row: &[f32], k: usize) -> Vec<u32> {
    let mut best: Vec<(f32, u32)> = Vec::with_capacity(k + 1);
    for (i, &x) in row.iter().enumerate() {
        if best.len() == k && x <= best[k - 1].0 {
            continue;
        }
        let at = best.partition_point(|&(y, _)| y >= x);
        best.insert(at, (x, i as u32));
        best.truncate(k);
    }
    best.into_iter().map(|(_, i)| i).collect()
}
