//! The GPU model as a `decode::LogitSource` (generate.rs is the CPU's): the
//! same search code (decode.rs) decodes on either device; only the scores
//! come from here.
//!
//! The KV cache is generate.rs's design on the device: per layer a pool of
//! slots, k and v (S, KVH, HS) bf16 after RoPE, and a slot table (R, stride)
//! u32 saying which slots each row sees, in position order. So
//! - prefill runs the prompts as one right-padded batch (B, Tmax) through
//!   the training kernels (causal attention, RoPE at t), writing the keys and
//!   values of prompt b, position t straight into slot b*Tmax + t: the cache
//!   is the prefill's own k and v buffer; padding slots are never listed;
//! - a step appends one slot per row (slots base..base+R, the k and v GEMMs
//!   write there), rotates q and k by each row's own position
//!   (rope_rotate_at), and attends with decode_attention.cu;
//! - beams start from their prompt's slots without copying them, and
//!   reordering rows (beam search) copies rows of the table on the device
//!   (kv_table_select), never keys and values.
//!
//! Everything is allocated once, for a `Plan` (the batch, the longest prompt,
//! the new tokens, the beams): the pool holds B*Tmax + max_new * R slots,
//! which is every slot a decode can write, so it never fills and needs no
//! garbage collection. `Plan::bytes` says the size before anything is made.
//! Per step, only the token ids and positions go to the device, and back
//! come what the search wants (decode::Want): the argmax or the top k with
//! the log-sum-exp (logits_topk, one copy), or the full logits for sampling.

use anyhow::{Result, bail};

use super::gpu::{Bf16, Buf, Dt, Gpu};
use super::launch::{self, Attn, DecodeAttn, TOPK_MAX};
use super::model::{GpuActs, GpuModel};
use crate::decode::{self, DecodeOptions, Decoded, LogitSource, Scores, Strategy, Want};
use crate::model::{Config, Model};

/// What one GpuSource is made for: batches of up to `batch` prompts of up to
/// `prompt_len` tokens, `max_new` new tokens, `beams` rows per prompt.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct Plan {
    pub batch: usize,
    pub prompt_len: usize,
    pub max_new: usize,
    pub beams: usize,
}

/// decode_attention's target of blocks per step: a few per multiprocessor
/// of the GPUs lift runs on (132 on an H100/H200).
const TARGET_BLOCKS: usize = 4 * 132;

impl Plan {
    /// Rows of a step at most.
    pub fn rows(&self) -> usize {
        self.batch * self.beams.max(1)
    }
    /// Slots of the pool: every prompt position, and one per row and step.
    pub fn slots(&self) -> usize {
        self.batch * self.prompt_len + self.max_new * self.rows()
    }
    /// Positions a row can reach: the slot table's width and the RoPE table's length.
    pub fn stride(&self) -> usize {
        self.prompt_len + self.max_new
    }
    /// Rows of the activation buffers: the padded prefill or a step.
    fn act_rows(&self) -> usize {
        (self.batch * self.prompt_len).max(self.rows())
    }
    /// Partial results of decode_attention at most (launch::decode_splits
    /// gives at most TARGET_BLOCKS / (R*NH) + 1 splits per (row, head)).
    fn parts(&self, c: &Config) -> usize {
        self.rows() * c.n_heads + TARGET_BLOCKS
    }

    /// Device bytes of the cache and every buffer `GpuSource::new` makes
    /// (the weights not included: GpuModel::weight_bytes).
    pub fn bytes(&self, c: &Config) -> usize {
        let (d, q, kv, f, v) = (c.dim, c.q_dim(), c.kv_dim(), c.ffn_dim, c.vocab_size);
        let (n, r) = (self.act_rows(), self.rows());
        let cache = 2 * 2 * c.n_layers * self.slots() * kv;
        let tables = 4 * (2 * r * self.stride() + 3 * n + r * (2 * TOPK_MAX + 1));
        let acts = 2 * n * (4 * d + 2 * q + 3 * f) + 4 * n * (1 + c.n_heads);
        let head = 2 * 2 * r * d + 4 * r * v;
        let parts = 4 * self.parts(c) * (c.head_dim + 1);
        cache + tables + acts + head + parts
    }
}

/// An evaluation's sizes apart from the batch: the longest target example
/// (the loss pass), the longest prompt, the new tokens and the beams.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct EvalShape {
    pub loss_len: usize,
    pub prompt_len: usize,
    pub max_new: usize,
    pub beams: usize,
}

impl EvalShape {
    pub fn plan(&self, batch: usize) -> Plan {
        Plan { batch, prompt_len: self.prompt_len, max_new: self.max_new, beams: self.beams }
    }

    /// Device bytes at batch b: (weights, loss buffers, decoding buffers).
    pub fn bytes(&self, c: &Config, b: usize) -> (usize, usize, usize) {
        let loss = if self.loss_len > 0 { GpuActs::bytes(c, b, self.loss_len, 0, false, true) } else { 0 };
        (GpuModel::weight_bytes(c), loss, self.plan(b).bytes(c))
    }
}

/// The largest batch `fit_batch` picks by itself.
const MAX_AUTO_BATCH: usize = 256;

/// The batch of an evaluation on a GPU with `free` bytes: `asked` if it
/// fits, else an error naming the sizes; with none asked, the largest that
/// fits in 90% of free memory, at most `cap` (the largest set) and 256.
pub fn fit_batch(c: &Config, free: usize, asked: Option<usize>, cap: usize, shape: EvalShape) -> Result<usize> {
    let usable = free / 10 * 9;
    let total = |b: usize| {
        let (w, l, d) = shape.bytes(c, b);
        w + l + d
    };
    let gib = |x: usize| x as f64 / (1u64 << 30) as f64;
    let explain = |b: usize| {
        let (w, l, d) = shape.bytes(c, b);
        format!(
            "batch {b} needs {:.2} GiB (weights {:.2}, loss buffers {:.2} for {b} x {} tokens, KV cache and decoding \
             buffers {:.2} for {b} prompts of up to {} tokens, {} new, {} beams); {:.2} GiB of the GPU are free",
            gib(w + l + d),
            gib(w),
            gib(l),
            shape.loss_len,
            gib(d),
            shape.prompt_len,
            shape.max_new,
            shape.beams,
            gib(free)
        )
    };
    if let Some(b) = asked {
        if total(b) > usable {
            bail!("--device cuda: {} (a smaller --batch-size or --max-new-tokens fits)", explain(b));
        }
        return Ok(b);
    }
    if total(1) > usable {
        bail!("--device cuda: the model does not fit: {}", explain(1));
    }
    let (mut lo, mut hi) = (1, cap.clamp(1, MAX_AUTO_BATCH));
    while lo < hi {
        let mid = (lo + hi).div_ceil(2);
        if total(mid) <= usable { lo = mid } else { hi = mid - 1 }
    }
    Ok(lo)
}

/// The activations of one pass over n rows (the padded prefill's B*Tmax, or
/// a step's R), reused from pass to pass.
struct Acts {
    x: Buf<Bf16>,     // (n, C) the residual stream: layer input and output
    x_mid: Buf<Bf16>, // (n, C) after the attention block
    xn: Buf<Bf16>,    // (n, C)
    rstd: Buf<f32>,   // (n)
    q: Buf<Bf16>,     // (n, NH*HS)
    att: Buf<Bf16>,   // (n, NH*HS)
    lse: Buf<f32>,    // (n, NH) the prefill attention's
    tmp: Buf<Bf16>,   // (n, C)
    gate: Buf<Bf16>,  // (n, F)
    up: Buf<Bf16>,    // (n, F)
    h: Buf<Bf16>,     // (n, F)
}

impl Acts {
    fn new(g: &Gpu, c: &Config, n: usize) -> Result<Acts> {
        let z = |len: usize| g.zeros::<Bf16>(len);
        let (d, q, f) = (c.dim, c.q_dim(), c.ffn_dim);
        Ok(Acts {
            x: z(n * d)?,
            x_mid: z(n * d)?,
            xn: z(n * d)?,
            rstd: g.zeros(n)?,
            q: z(n * q)?,
            att: z(n * q)?,
            lse: g.zeros(n * c.n_heads)?,
            tmp: z(n * d)?,
            gate: z(n * f)?,
            up: z(n * f)?,
            h: z(n * f)?,
        })
    }
}

/// `model` behind the LogitSource calls, with its cache for one Plan.
pub struct GpuSource<'a> {
    g: &'a Gpu,
    model: &'a GpuModel,
    plan: Plan,
    k: Vec<Buf<Bf16>>, // L x (slots, KVH*HS)
    v: Vec<Buf<Bf16>>, // L x (slots, KVH*HS)
    /// The slot table (rows, stride) and its double for reordering.
    table: Buf<u32>,
    table_alt: Buf<u32>,
    tokens: Buf<u32>, // (n) ids of the pass
    pos: Buf<u32>,    // (R) each row's new position in a step
    index: Buf<u32>,  // (n) rows to gather / to select
    acts: Acts,
    xl: Buf<Bf16>,      // (R, C) the rows whose logits are wanted
    xf: Buf<Bf16>,      // (R, C) after the final norm
    logits: Buf<f32>,   // (R, V)
    top: Buf<u32>,      // logits_topk's ids, values and lse
    o_part: Buf<f32>,   // decode_attention's partial outputs
    lse_part: Buf<f32>, // and their lse
    /// Host state: each row's positions so far (its new token's position
    /// in a step), and the pool's next free slot.
    row_pos: Vec<u32>,
    next_slot: usize,
    /// Full logits whatever the search wants: lets gpu-check run the
    /// search on the host from the same logits.
    pub full_logits: bool,
}

impl<'a> GpuSource<'a> {
    /// Allocates everything for `plan`; the model's RoPE table must reach
    /// plan.stride() positions (GpuModel::ensure_rope).
    pub fn new(g: &'a Gpu, model: &'a GpuModel, plan: Plan) -> Result<GpuSource<'a>> {
        let c = &model.config;
        if model.rope.max_pos() < plan.stride() {
            bail!("GpuSource: the RoPE table has {} positions, the plan needs {}", model.rope.max_pos(), plan.stride());
        }
        if plan.batch == 0 || plan.prompt_len == 0 {
            bail!("GpuSource: an empty plan ({plan:?})");
        }
        let (kvd, n, r) = (c.kv_dim(), plan.act_rows(), plan.rows());
        let cache = |_| g.zeros::<Bf16>(plan.slots() * kvd);
        Ok(GpuSource {
            g,
            model,
            plan,
            k: (0..c.n_layers).map(cache).collect::<Result<_>>()?,
            v: (0..c.n_layers).map(cache).collect::<Result<_>>()?,
            table: g.zeros(r * plan.stride())?,
            table_alt: g.zeros(r * plan.stride())?,
            tokens: g.zeros(n)?,
            pos: g.zeros(r)?,
            index: g.zeros(n)?,
            acts: Acts::new(g, c, n)?,
            xl: g.zeros(r * c.dim)?,
            xf: g.zeros(r * c.dim)?,
            logits: g.zeros(r * c.vocab_size)?,
            top: g.zeros(r * (2 * TOPK_MAX + 1))?,
            o_part: g.zeros(plan.parts(c) * c.head_dim)?,
            lse_part: g.zeros(plan.parts(c))?,
            row_pos: Vec::new(),
            next_slot: 0,
            full_logits: false,
        })
    }

    pub fn plan(&self) -> Plan {
        self.plan
    }

    /// Rows live now.
    pub fn rows(&self) -> usize {
        self.row_pos.len()
    }

    fn check_ids(&self, ids: &[u32]) -> Result<()> {
        let v = self.model.config.vocab_size;
        if let Some(&bad) = ids.iter().find(|&&id| id as usize >= v) {
            bail!("token id {bad} is out of range (vocab {v})");
        }
        Ok(())
    }
}

/// out (n, OC) at address `out` = inp (n, IC) @ W^T, bf16 in and out, f32
/// accumulation (GpuModel::linear_forward without adapters).
fn linear_at(g: &Gpu, out: u64, inp: &Buf<Bf16>, w: &Buf<Bf16>, n: usize, ic: usize, oc: usize) -> Result<()> {
    g.gemm(false, true, n, oc, ic, 1.0, inp.ptr(), w.ptr(), 0.0, out, Dt::Bf16, Dt::Bf16)
}

/// linear_at into the start of a buffer.
fn linear(g: &Gpu, out: &Buf<Bf16>, inp: &Buf<Bf16>, w: &Buf<Bf16>, n: usize, ic: usize, oc: usize) -> Result<()> {
    assert!(out.len() >= n * oc && inp.len() >= n * ic && w.len() >= oc * ic, "linear: buffers smaller than the shape");
    linear_at(g, out.ptr(), inp, w, n, ic, oc)
}

/// Which pass the layers run: the padded prompts (B, T), or one token for
/// each of R rows whose new keys go to slots base..base+R.
#[derive(Clone, Copy)]
enum Pass {
    Prefill { b: usize, t: usize },
    Step { r: usize, base: usize, max_len: usize },
}

impl GpuSource<'_> {
    /// Runs acts.tokens (n) through every layer (Model::forward's loop body,
    /// without the activations a backward pass would keep), writing each
    /// layer's keys and values into the cache; the output is in acts.x.
    fn layers(&mut self, n: usize, pass: Pass) -> Result<()> {
        let m = self.model;
        launch::embedding_forward(self.g, &mut self.acts.x, &self.tokens, &m.embed, n, m.config.dim)?;
        for l in 0..m.config.n_layers {
            self.attention_block(l, n, pass)?;
            self.mlp_block(l, n)?;
        }
        Ok(())
    }

    /// x_mid = x + o(attention(rope(q), rope(k), v)) of layer l, with k and
    /// v written into the cache at the pass's slots.
    fn attention_block(&mut self, l: usize, n: usize, pass: Pass) -> Result<()> {
        let (g, m) = (self.g, self.model);
        let (c, w) = (&m.config, &m.layers[l]);
        let (d, qd, kvd) = (c.dim, c.q_dim(), c.kv_dim());
        let a = &mut self.acts;
        launch::rmsnorm_forward(g, &mut a.xn, &mut a.rstd, &a.x, &w.attn_norm, n, d, c.norm_eps)?;
        let at = match pass {
            Pass::Prefill { .. } => 0,
            Pass::Step { base, .. } => base * kvd,
        };
        assert!(at + n * kvd <= self.k[l].len(), "attention_block: cache slots past the pool");
        let a = &self.acts;
        g.timed("gemm fwd", || {
            linear_at(g, a.q.ptr(), &a.xn, &w.wq, n, d, qd)?;
            linear_at(g, self.k[l].at(at), &a.xn, &w.wk, n, d, kvd)?;
            linear_at(g, self.v[l].at(at), &a.xn, &w.wv, n, d, kvd)
        })?;
        match pass {
            Pass::Prefill { b, t } => self.prefill_attention(l, b, t)?,
            Pass::Step { r, base, max_len } => self.step_attention(l, r, base, max_len)?,
        }
        let a = &mut self.acts;
        g.timed("gemm fwd", || linear(g, &a.tmp, &a.att, &w.wo, n, qd, d))?;
        launch::residual_forward(g, &mut a.x_mid, &a.x, &a.tmp, n * d)
    }

    /// The prefill's attention of layer l: q and the cache's first B*T slots
    /// (the padded prompts) rotated at t, then causal attention over them
    /// with the training kernels (attention.cu or attention_tc.cu).
    fn prefill_attention(&mut self, l: usize, b: usize, t: usize) -> Result<()> {
        let (g, m) = (self.g, self.model);
        let c = &m.config;
        let (n, a) = (b * t, &mut self.acts);
        launch::rope_rotate(g, &mut a.q, &m.rope, n, t, c.n_heads, c.head_dim, 0, 1.0)?;
        launch::rope_rotate(g, &mut self.k[l], &m.rope, n, t, c.n_kv_heads, c.head_dim, 0, 1.0)?;
        let dims = Attn { b, t, nh: c.n_heads, kvh: c.n_kv_heads, hs: c.head_dim };
        g.timed("attention prefill", || {
            launch::attention_forward(g, &mut a.att, &mut a.lse, &a.q, &self.k[l], &self.v[l], None, dims)
        })
    }

    /// A step's attention of layer l: q and the new keys (slots base..base+R)
    /// rotated at each row's position, then one query per row over its slots
    /// (decode_attention.cu, split over the cache length).
    fn step_attention(&mut self, l: usize, r: usize, base: usize, max_len: usize) -> Result<()> {
        let (g, m) = (self.g, self.model);
        let c = &m.config;
        let (top, at) = (max_len - 1, base * c.kv_dim());
        let a = &mut self.acts;
        launch::rope_rotate_at(g, &mut a.q, 0, &m.rope, &self.pos, top, r, c.n_heads, c.head_dim, 1.0)?;
        launch::rope_rotate_at(g, &mut self.k[l], at, &m.rope, &self.pos, top, r, c.n_kv_heads, c.head_dim, 1.0)?;
        let (nh, kvh, hs, stride) = (c.n_heads, c.n_kv_heads, c.head_dim, self.plan.stride());
        let dims = DecodeAttn { r, nh, kvh, hs, slots: base + r, stride, max_len };
        let splits = launch::decode_splits(&dims, TARGET_BLOCKS);
        let (k, v, table, pos) = (&self.k[l], &self.v[l], &self.table, &self.pos);
        g.timed("attention decode", || {
            let (op, lp) = (&mut self.o_part, &mut self.lse_part);
            launch::decode_attention(g, &mut a.att, op, lp, &a.q, k, v, table, pos, dims, splits)
        })
    }

    /// x = x_mid + down(silu(gate(xn)) * up(xn)) of layer l, xn = rmsnorm(x_mid).
    fn mlp_block(&mut self, l: usize, n: usize) -> Result<()> {
        let (g, m) = (self.g, self.model);
        let (c, w) = (&m.config, &m.layers[l]);
        let (d, f) = (c.dim, c.ffn_dim);
        let a = &mut self.acts;
        launch::rmsnorm_forward(g, &mut a.xn, &mut a.rstd, &a.x_mid, &w.mlp_norm, n, d, c.norm_eps)?;
        g.timed("gemm fwd", || {
            linear(g, &a.gate, &a.xn, &w.w_gate, n, d, f)?;
            linear(g, &a.up, &a.xn, &w.w_up, n, d, f)
        })?;
        launch::swiglu_forward(g, &mut a.h, &a.gate, &a.up, n * f)?;
        g.timed("gemm fwd", || linear(g, &a.tmp, &a.h, &w.w_down, n, f, d))?;
        launch::residual_forward(g, &mut a.x, &a.x_mid, &a.tmp, n * d)
    }

    /// The final norm and the LM head (f32 logits, f32 accumulation) on R
    /// rows: rows[i] of acts.x when `rows` is given (the prefill's last
    /// prompt positions), else its first R. Then what the search wants.
    fn head(&mut self, rows: Option<&[u32]>, r: usize, want: Want) -> Result<Scores> {
        let (g, m) = (self.g, self.model);
        let c = &m.config;
        let (d, v) = (c.dim, c.vocab_size);
        let x = match rows {
            Some(rows) => {
                g.write(&mut self.index, 0, rows)?;
                launch::gather_rows(g, &mut self.xl, &self.acts.x, &self.index, r, d)?;
                &self.xl
            }
            None => &self.acts.x,
        };
        launch::rmsnorm_forward(g, &mut self.xf, &mut self.acts.rstd, x, &m.norm, r, d, c.norm_eps)?;
        g.timed("lm head", || {
            let (xf, head, out) = (self.xf.ptr(), m.head().ptr(), self.logits.ptr());
            g.gemm(false, true, r, v, d, 1.0, xf, head, 0.0, out, Dt::Bf16, Dt::F32)
        })?;
        self.scores(r, want)
    }

    /// The search's share of the logits (R, V): the top k by logits_topk in
    /// one copy, or the whole array for Want::Full (or a k above TOPK_MAX).
    fn scores(&mut self, r: usize, want: Want) -> Result<Scores> {
        let v = self.model.config.vocab_size;
        let k = match want {
            _ if self.full_logits => None,
            Want::Argmax => Some(1),
            Want::Top(k) if k <= TOPK_MAX && k <= v => Some(k),
            Want::Top(_) | Want::Full => None,
        };
        let Some(k) = k else {
            return Ok(Scores::Full(self.g.download(&self.logits, r * v)?));
        };
        launch::logits_topk(self.g, &mut self.top, &self.logits, r, v, k)?;
        let out = self.g.download(&self.top, r * (2 * k + 1))?;
        let floats = |s: &[u32]| s.iter().map(|&b| f32::from_bits(b)).collect::<Vec<f32>>();
        let (ids, rest) = out.split_at(r * k);
        let (vals, lse) = rest.split_at(r * k);
        Ok(Scores::Top { k, logits: floats(vals), ids: ids.to_vec(), lse: floats(lse) })
    }
}

impl LogitSource for GpuSource<'_> {
    fn vocab_size(&self) -> usize {
        self.model.config.vocab_size
    }

    /// The prompts right-padded to (B, Tmax), one causal pass; prompt b's
    /// position t is slot b*Tmax + t, and row b lists its len_b slots.
    fn prefill(&mut self, prompts: &[Vec<u32>], want: Want) -> Result<Scores> {
        let (b, t) = (prompts.len(), prompts.iter().map(Vec::len).max().unwrap_or(0));
        let p = self.plan;
        if b > p.batch || t > p.prompt_len || t == 0 {
            bail!(
                "prefill: {b} prompts of up to {t} tokens, the GPU buffers were made for {} of {}",
                p.batch,
                p.prompt_len
            );
        }
        let mut padded = vec![0u32; b * t];
        for (row, prompt) in padded.chunks_mut(t).zip(prompts) {
            self.check_ids(prompt)?;
            row[..prompt.len()].copy_from_slice(prompt);
        }
        self.g.write(&mut self.tokens, 0, &padded)?;
        let stride = p.stride();
        let mut table = vec![0u32; b * stride];
        for (i, prompt) in prompts.iter().enumerate() {
            for j in 0..prompt.len() {
                table[i * stride + j] = (i * t + j) as u32;
            }
        }
        self.g.write(&mut self.table, 0, &table)?;
        self.row_pos = prompts.iter().map(|p| p.len() as u32).collect();
        self.next_slot = b * t;
        self.layers(b * t, Pass::Prefill { b, t })?;
        let lasts: Vec<u32> = prompts.iter().enumerate().map(|(i, p)| (i * t + p.len() - 1) as u32).collect();
        self.head(Some(&lasts), b, want)
    }

    fn step(&mut self, tokens: &[u32], want: Want) -> Result<Scores> {
        let r = tokens.len();
        if r != self.row_pos.len() {
            bail!("step: {r} tokens for {} rows", self.row_pos.len());
        }
        self.check_ids(tokens)?;
        let (base, stride) = (self.next_slot, self.plan.stride());
        let max_len = self.row_pos.iter().max().map_or(0, |&p| p as usize + 1);
        if base + r > self.plan.slots() || max_len > stride {
            bail!(
                "step: the KV cache is full ({} of {} slots, a row at position {max_len} of {stride}): \
                 more new tokens than the plan's {}",
                base + r,
                self.plan.slots(),
                self.plan.max_new
            );
        }
        self.g.write(&mut self.tokens, 0, tokens)?;
        self.g.write(&mut self.pos, 0, &self.row_pos)?;
        launch::kv_table_append(self.g, &mut self.table, &self.pos, base as u32, stride, r)?;
        self.layers(r, Pass::Step { r, base, max_len })?;
        self.next_slot += r;
        self.row_pos.iter_mut().for_each(|p| *p += 1);
        self.head(None, r, want)
    }

    /// New row i continues old row src[i]: the table's rows are copied on
    /// the device (keys and values stay where they are).
    fn select(&mut self, src: &[usize]) -> Result<()> {
        let rows = self.row_pos.len();
        if src.len() == rows && src.iter().enumerate().all(|(i, &s)| i == s) {
            return Ok(());
        }
        if src.len() > self.plan.rows() || src.iter().any(|&s| s >= rows) {
            bail!("select: rows {src:?} of {rows} (at most {})", self.plan.rows());
        }
        let from: Vec<u32> = src.iter().map(|&s| s as u32).collect();
        self.g.write(&mut self.index, 0, &from)?;
        launch::kv_table_select(self.g, &mut self.table_alt, &self.table, &self.index, self.plan.stride(), src.len())?;
        std::mem::swap(&mut self.table, &mut self.table_alt);
        self.row_pos = src.iter().map(|&s| self.row_pos[s]).collect();
        Ok(())
    }
}

/// `lift generate --device cuda`: decodes `prompts` as one batch on the GPU,
/// its buffers made for exactly these prompts (an error naming the sizes if
/// they do not fit, before the weights are uploaded).
pub fn generate(g: &Gpu, model: &Model, prompts: &[Vec<u32>], o: &DecodeOptions) -> Result<Decoded> {
    let c = &model.config;
    let beams = match o.strategy {
        Strategy::Beam { num_beams, .. } => num_beams,
        _ => 1,
    };
    let shape = EvalShape {
        loss_len: 0,
        prompt_len: prompts.iter().map(Vec::len).max().unwrap_or(1).max(1),
        max_new: o.max_new_tokens.max(1),
        beams,
    };
    let batch = prompts.len().max(1);
    fit_batch(c, g.mem_info().0, Some(batch), batch, shape)?;
    let plan = shape.plan(batch);
    let mut gm = GpuModel::upload(g, model, plan.stride())?;
    gm.ensure_rope(g, plan.stride())?;
    let mut source = GpuSource::new(g, &gm, plan)?;
    decode::decode(&mut source, prompts, o)
}
