//! The CPU model as a `decode::LogitSource`: a KV cache that rows share,
//! a packed prefill, and one-token steps.
//!
//! The cache is a pool of positions ("slots") per layer, and each row is the
//! list of slots it attends to, in order. That makes the two things a search
//! asks for cheap:
//! - prompts run once, packed end to end with no padding; a beam that starts
//!   from a prompt just copies the prompt's slot list, not its keys and values;
//! - reordering rows (beams that change parents, rows that finish) copies slot
//!   lists, never a cache.
//!
//! A row's positions count from its own first token, which is what Hugging
//! Face's left padding with an attention mask gives (position ids from the
//! mask's cumulative sum): a batch decodes exactly as its prompts would alone.

use crate::cpu::{self, AttnDims, RopeTable};
use crate::decode::{self, DecodeOptions, Decoded, LogitSource, Scores, Want};
use crate::matvec;
use crate::model::{Config, Model};
use anyhow::{Result, bail};

pub use crate::decode::argmax;

/// Keys and values of every position any row has seen.
struct SlotCache {
    kvd: usize,
    /// Slots filled.
    len: usize,
    k: Vec<Vec<f32>>, // L x (slots, KVH*HS), after RoPE
    v: Vec<Vec<f32>>, // L x (slots, KVH*HS)
}

impl SlotCache {
    fn new(c: &Config) -> SlotCache {
        SlotCache { kvd: c.kv_dim(), len: 0, k: vec![Vec::new(); c.n_layers], v: vec![Vec::new(); c.n_layers] }
    }

    /// Writes layer l's keys and values (n, KVD) into slots len..len+n
    /// (committed for all layers by `commit`).
    fn put(&mut self, l: usize, k: &[f32], v: &[f32]) {
        let at = self.len * self.kvd;
        for (dst, src) in [(&mut self.k[l], k), (&mut self.v[l], v)] {
            dst.truncate(at);
            dst.extend_from_slice(src);
        }
    }

    fn commit(&mut self, n: usize) {
        self.len += n;
    }

    /// Drops every slot that no row refers to, renumbering the rest, when
    /// they are more than half the pool, so long beam searches keep about
    /// what their live beams can see.
    fn collect_garbage(&mut self, rows: &mut [Vec<u32>]) {
        let mut map = vec![u32::MAX; self.len];
        let mut kept = 0u32;
        for s in rows.iter().flatten() {
            if map[*s as usize] == u32::MAX {
                map[*s as usize] = kept;
                kept += 1;
            }
        }
        if 2 * kept as usize > self.len {
            return;
        }
        let mut order: Vec<(u32, u32)> =
            map.iter().enumerate().filter(|m| *m.1 != u32::MAX).map(|(old, &new)| (old as u32, new)).collect();
        order.sort_unstable_by_key(|o| o.1);
        let kvd = self.kvd;
        for buf in self.k.iter_mut().chain(self.v.iter_mut()) {
            let mut packed = Vec::with_capacity(order.len() * kvd);
            for &(old, _) in &order {
                packed.extend_from_slice(&buf[old as usize * kvd..(old as usize + 1) * kvd]);
            }
            *buf = packed;
        }
        rows.iter_mut().flatten().for_each(|s| *s = map[*s as usize]);
        self.len = kept as usize;
    }
}

/// `attend(cache, layer, q, att)` fills att (N, NH*HS) from q (N, NH*HS)
/// and the layer's cache, where this call's keys and values already sit in
/// slots cache.len..cache.len+N.
type Attend<'f> = dyn Fn(&SlotCache, usize, &[f32], &mut [f32]) + 'f;

/// `model` behind the `LogitSource` calls, with its own cache and RoPE table.
pub struct CpuSource<'a> {
    model: &'a Model,
    rope: RopeTable,
    cache: SlotCache,
    /// The slots of each row, in position order.
    rows: Vec<Vec<u32>>,
    /// The pool size at which garbage is next looked for.
    gc_at: usize,
}

/// The smallest pool worth collecting garbage from.
const GC_MIN: usize = 4096;

impl<'a> CpuSource<'a> {
    pub fn new(model: &'a Model) -> CpuSource<'a> {
        let c = &model.config;
        let rope = RopeTable::new(&c.rope_inv_freq(), 1);
        CpuSource { model, rope, cache: SlotCache::new(c), rows: Vec::new(), gc_at: GC_MIN }
    }

    /// Positions held in the cache (live rows' and garbage not yet collected).
    pub fn cached_positions(&self) -> usize {
        self.cache.len
    }

    /// Makes the RoPE table cover positions 0..len.
    fn ensure_rope(&mut self, len: usize) {
        if self.rope.max_pos() < len {
            let n = len.next_power_of_two().max(256);
            self.rope = RopeTable::new(&self.model.config.rope_inv_freq(), n);
        }
    }

    /// Runs `tokens` (N) through every layer; token i sits at position pos[i].
    /// Returns the residual stream (N, C) after the last layer.
    fn layers(&mut self, tokens: &[u32], pos: &[usize], attend: &Attend) -> Vec<f32> {
        let model = self.model;
        let (c, w) = (&model.config, &model.weights);
        let n = tokens.len();
        let (d, qd, kvd, f) = (c.dim, c.q_dim(), c.kv_dim(), c.ffn_dim);
        let z = |len: usize| vec![0.0f32; len];
        let (mut x, mut xn, mut rstd, mut tmp) = (z(n * d), z(n * d), z(n), z(n * d));
        let (mut q, mut k, mut v, mut att) = (z(n * qd), z(n * kvd), z(n * kvd), z(n * qd));
        let (mut gate, mut up, mut h) = (z(n * f), z(n * f), z(n * f));
        cpu::embedding_forward(&mut x, tokens, &w.embed, d);
        for (l, lw) in w.layers.iter().enumerate() {
            cpu::rmsnorm_forward(&mut xn, &mut rstd, &x, &lw.attn_norm, d, c.norm_eps);
            matvec::forward(&mut q, &xn, &lw.wq, n, d, qd);
            matvec::forward(&mut k, &xn, &lw.wk, n, d, kvd);
            matvec::forward(&mut v, &xn, &lw.wv, n, d, kvd);
            cpu::rope_forward_at(&mut q, &self.rope, pos, c.n_heads, c.head_dim);
            cpu::rope_forward_at(&mut k, &self.rope, pos, c.n_kv_heads, c.head_dim);
            self.cache.put(l, &k, &v);
            attend(&self.cache, l, &q, &mut att);
            matvec::forward(&mut tmp, &att, &lw.wo, n, qd, d);
            cpu::residual_forward(&mut x, &tmp);
            cpu::rmsnorm_forward(&mut xn, &mut rstd, &x, &lw.mlp_norm, d, c.norm_eps);
            matvec::forward(&mut gate, &xn, &lw.w_gate, n, d, f);
            matvec::forward(&mut up, &xn, &lw.w_up, n, d, f);
            cpu::swiglu_forward(&mut h, &gate, &up);
            matvec::forward(&mut tmp, &h, &lw.w_down, n, f, d);
            cpu::residual_forward(&mut x, &tmp);
        }
        self.cache.commit(n);
        x
    }

    /// The final norm and the head on the chosen rows of x (N, C): (R, V).
    fn head(&self, x: &[f32], rows: impl Iterator<Item = usize>) -> Vec<f32> {
        let c = &self.model.config;
        let d = c.dim;
        let last: Vec<f32> = rows.flat_map(|r| x[r * d..(r + 1) * d].iter().copied()).collect();
        let b = last.len() / d;
        let (mut xn, mut rstd) = (vec![0.0; b * d], vec![0.0; b]);
        cpu::rmsnorm_forward(&mut xn, &mut rstd, &last, &self.model.weights.norm, d, c.norm_eps);
        let mut logits = vec![0.0; b * c.vocab_size];
        matvec::forward(&mut logits, &xn, self.model.weights.head(), b, d, c.vocab_size);
        logits
    }

    fn check_ids(&self, ids: &[u32]) -> Result<()> {
        let v = self.model.config.vocab_size;
        if let Some(&bad) = ids.iter().find(|&&id| id as usize >= v) {
            bail!("token id {bad} is out of range (vocab {v})");
        }
        Ok(())
    }
}

impl LogitSource for CpuSource<'_> {
    fn vocab_size(&self) -> usize {
        self.model.config.vocab_size
    }

    /// The prompts packed end to end (N = their total length); each one's
    /// attention sees only its own tokens, causally. The CPU gives full
    /// logits whatever the search wants (they are in memory already).
    fn prefill(&mut self, prompts: &[Vec<u32>], _want: Want) -> Result<Scores> {
        let tokens: Vec<u32> = prompts.concat();
        self.check_ids(&tokens)?;
        self.rows.clear();
        self.cache.len = 0;
        self.gc_at = GC_MIN;
        let pos: Vec<usize> = prompts.iter().flat_map(|p| 0..p.len()).collect();
        self.ensure_rope(pos.iter().max().map_or(0, |&p| p + 1));
        let lens: Vec<usize> = prompts.iter().map(Vec::len).collect();
        let c = self.model.config.clone();
        let attend = |cache: &SlotCache, l, q: &[f32], att: &mut [f32]| prompt_attention(&c, cache, l, &lens, q, att);
        let x = self.layers(&tokens, &pos, &attend);
        let mut end = 0;
        for len in &lens {
            self.rows.push((end as u32..(end + len) as u32).collect());
            end += len;
        }
        let lasts: Vec<usize> = lens.iter().scan(0, |e, len| Some(std::mem::replace(e, *e + len) + len - 1)).collect();
        Ok(Scores::Full(self.head(&x, lasts.into_iter())))
    }

    fn step(&mut self, tokens: &[u32], _want: Want) -> Result<Scores> {
        assert_eq!(tokens.len(), self.rows.len(), "step: one token per row");
        self.check_ids(tokens)?;
        let pos: Vec<usize> = self.rows.iter().map(Vec::len).collect();
        self.ensure_rope(pos.iter().max().map_or(0, |&p| p + 1));
        let base = self.cache.len as u32;
        for (r, row) in self.rows.iter_mut().enumerate() {
            row.push(base + r as u32);
        }
        let c = self.model.config.clone();
        let rows = std::mem::take(&mut self.rows);
        let attend = |cache: &SlotCache, l, q: &[f32], att: &mut [f32]| slot_attention(&c, cache, l, &rows, q, att);
        let x = self.layers(tokens, &pos, &attend);
        self.rows = rows;
        Ok(Scores::Full(self.head(&x, 0..tokens.len())))
    }

    fn select(&mut self, src: &[usize]) -> Result<()> {
        if src.len() == self.rows.len() && src.iter().enumerate().all(|(i, &s)| i == s) {
            return Ok(());
        }
        self.rows = src.iter().map(|&s| self.rows[s].clone()).collect();
        // Slots of dropped rows are garbage; a pass over the rows' lists
        // costs far less than a step, so it is looked for at every doubling.
        if self.cache.len >= self.gc_at {
            self.cache.collect_garbage(&mut self.rows);
            self.gc_at = (2 * self.cache.len).max(GC_MIN);
        }
        Ok(())
    }
}

/// Causal attention of packed prompts, each over its own keys, with the
/// GEMM attention of training (`cpu::attention_forward`, one prompt at a time).
fn prompt_attention(c: &Config, cache: &SlotCache, l: usize, lens: &[usize], q: &[f32], att: &mut [f32]) {
    let (qd, kvd) = (c.q_dim(), c.kv_dim());
    let mut lse = Vec::new();
    let mut start = 0;
    for &t in lens {
        let d = AttnDims { b: 1, tq: t, tk: t, tcap: t, nh: c.n_heads, kvh: c.n_kv_heads, hs: c.head_dim };
        let kv = (cache.len + start) * kvd..(cache.len + start + t) * kvd;
        let (k, v) = (&cache.k[l][kv.clone()], &cache.v[l][kv]);
        lse.resize(t * c.n_heads, 0.0);
        let rows = start * qd..(start + t) * qd;
        cpu::attention_forward(&mut att[rows.clone()], &mut lse, &q[rows], k, v, d, None);
        start += t;
    }
}

/// One query per row, over the slots the row lists (the new one last).
fn slot_attention(c: &Config, cache: &SlotCache, l: usize, rows: &[Vec<u32>], q: &[f32], att: &mut [f32]) {
    cpu::decode_attention(att, q, &cache.k[l], &cache.v[l], rows, c.n_heads, c.n_kv_heads, c.head_dim);
}

/// Decodes `prompts` with the CPU model (one batch).
pub fn generate(model: &Model, prompts: &[Vec<u32>], o: &DecodeOptions) -> Result<Decoded> {
    decode::decode(&mut CpuSource::new(model), prompts, o)
}
