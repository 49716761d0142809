//! GpuModel: the Llama of `model.rs` on the GPU. `forward` and `backward`
//! call the kernels in the order Model::forward and Model::backward call the
//! CPU ops, line for line, so the two can be read side by side. Weights and
//! activations are bf16; rstd, lse and losses f32.
//!
//! Differences from the CPU model, all deliberate:
//! - only training shapes (no KV cache: generation stays on the CPU);
//! - the gradients of the norms and embeddings are formed only when the sink
//!   asks for them (`--train-norms`, `--train-embeddings`);
//! - LoRA adapters run unmerged (W x + s B A x), as LoRA does on a GPU, so
//!   the frozen base needs no second copy; the CPU merges instead;
//! - with `recompute` (`--recompute`), the forward pass keeps only each
//!   layer's input, and the backward pass runs each layer's forward again
//!   just before its backward (one layer's activations live at a time).
//!
//! A packed batch (pack.rs: one row of examples end to end) goes through the
//! same calls: `GpuActs::set_segments` writes where each position's example
//! starts and its position in it, and RoPE and the attention kernels follow
//! those (the CPU runs them example by example instead; same numbers).

use anyhow::{Result, bail};
use half::bf16;

use super::gpu::{Bf16, Buf, Dt, Gpu};
use super::launch::{self, Attn, RopeDev};
use crate::data::Segment;
use crate::model::{Config, Linear, Model, Param, Weights, matrix_id};

/// bf16 bit patterns of f32 values (round to nearest even).
pub fn to_bf16(x: &[f32]) -> Vec<Bf16> {
    x.iter().map(|&v| bf16::from_f32(v).to_bits()).collect()
}

pub fn from_bf16(x: &[Bf16]) -> Vec<f32> {
    x.iter().map(|&v| bf16::from_bits(v).to_f32()).collect()
}

/// The weights of one transformer block on the device.
pub struct GpuLayer {
    pub attn_norm: Buf<Bf16>,
    pub wq: Buf<Bf16>,
    pub wk: Buf<Bf16>,
    pub wv: Buf<Bf16>,
    pub wo: Buf<Bf16>,
    pub mlp_norm: Buf<Bf16>,
    pub w_gate: Buf<Bf16>,
    pub w_up: Buf<Bf16>,
    pub w_down: Buf<Bf16>,
}

impl GpuLayer {
    pub fn linear(&self, w: Linear) -> &Buf<Bf16> {
        match w {
            Linear::Q => &self.wq,
            Linear::K => &self.wk,
            Linear::V => &self.wv,
            Linear::O => &self.wo,
            Linear::Gate => &self.w_gate,
            Linear::Up => &self.w_up,
            Linear::Down => &self.w_down,
        }
    }
    pub fn linear_mut(&mut self, w: Linear) -> &mut Buf<Bf16> {
        match w {
            Linear::Q => &mut self.wq,
            Linear::K => &mut self.wk,
            Linear::V => &mut self.wv,
            Linear::O => &mut self.wo,
            Linear::Gate => &mut self.w_gate,
            Linear::Up => &mut self.w_up,
            Linear::Down => &mut self.w_down,
        }
    }
}

/// A LoRA adapter on the device: A (r, IC), B (OC, r) in bf16 (their f32
/// masters live in the optimizer state), scale s = alpha / r; with DoRA also
/// the row norms of V = W + s B A and the output scale c = m / ||V||.
pub struct GpuAdapter {
    pub r: usize,
    pub scale: f32,
    pub a: Buf<Bf16>,
    pub b: Buf<Bf16>,
    pub dora: Option<GpuDora>,
}

/// DoRA's per-output values of one matrix (dora.rs): ||V||_row and c (OC),
/// recomputed after every optimizer step.
pub struct GpuDora {
    pub norm: Buf<f32>,
    pub c: Buf<f32>,
}

pub struct GpuModel {
    pub config: Config,
    pub embed: Buf<Bf16>,
    pub layers: Vec<GpuLayer>,
    pub norm: Buf<Bf16>,
    pub lm_head: Option<Buf<Bf16>>,
    pub rope: RopeDev,
    /// LoRA adapters, one per linear matrix (L*7, matrix_id order), or empty.
    pub adapters: Vec<GpuAdapter>,
}

impl GpuModel {
    /// Uploads a CPU model, rounding every weight to bf16, with a RoPE table
    /// for positions up to `max_t`.
    pub fn upload(g: &Gpu, model: &Model, max_t: usize) -> Result<GpuModel> {
        let c = &model.config;
        if c.head_dim > 128 {
            bail!("--device cuda: head size {} is above the attention kernels' 128", c.head_dim);
        }
        let w = &model.weights;
        let up = |x: &[f32]| g.upload(&to_bf16(x));
        let mut layers = Vec::with_capacity(c.n_layers);
        for lw in &w.layers {
            layers.push(GpuLayer {
                attn_norm: up(&lw.attn_norm)?,
                wq: up(&lw.wq)?,
                wk: up(&lw.wk)?,
                wv: up(&lw.wv)?,
                wo: up(&lw.wo)?,
                mlp_norm: up(&lw.mlp_norm)?,
                w_gate: up(&lw.w_gate)?,
                w_up: up(&lw.w_up)?,
                w_down: up(&lw.w_down)?,
            });
        }
        let table = crate::cpu::RopeTable::new(&c.rope_inv_freq(), max_t.max(1));
        let rope = RopeDev { cos: g.upload(&table.cos)?, sin: g.upload(&table.sin)?, half: table.half };
        Ok(GpuModel {
            config: c.clone(),
            embed: up(&w.embed)?,
            layers,
            norm: up(&w.norm)?,
            lm_head: match &w.lm_head {
                Some(h) => Some(up(h)?),
                None => None,
            },
            rope,
            adapters: Vec::new(),
        })
    }

    /// Makes the RoPE table cover positions 0..max_t (generation runs past
    /// the lengths the model was uploaded for).
    pub fn ensure_rope(&mut self, g: &Gpu, max_t: usize) -> Result<()> {
        if self.rope.max_pos() < max_t {
            let table = crate::cpu::RopeTable::new(&self.config.rope_inv_freq(), max_t);
            self.rope = RopeDev { cos: g.upload(&table.cos)?, sin: g.upload(&table.sin)?, half: table.half };
        }
        Ok(())
    }

    /// Bytes of the weights on the device (bf16), for memory plans.
    pub fn weight_bytes(c: &Config) -> usize {
        let (d, q, kv, f) = (c.dim, c.q_dim(), c.kv_dim(), c.ffn_dim);
        let layer = 2 * d + 2 * q * d + 2 * kv * d + 3 * f * d;
        let head = if c.tied_embeddings { 1 } else { 2 };
        2 * (c.n_layers * layer + head * c.vocab_size * d + d)
    }

    /// The matrix the LM head multiplies by: its own, or the embedding.
    pub fn head(&self) -> &Buf<Bf16> {
        self.lm_head.as_ref().unwrap_or(&self.embed)
    }

    /// The parameter whose gradient the LM head's dW is: its own, or the
    /// embedding's when tied.
    fn head_param(&self) -> Param {
        if self.lm_head.is_some() { Param::LmHead } else { Param::Embed }
    }

    /// The device tensor of a parameter (Weights::get on the GPU).
    pub fn param(&self, p: Param) -> &Buf<Bf16> {
        match p {
            Param::Embed => &self.embed,
            Param::AttnNorm(l) => &self.layers[l].attn_norm,
            Param::MlpNorm(l) => &self.layers[l].mlp_norm,
            Param::Linear(l, w) => self.layers[l].linear(w),
            Param::Norm => &self.norm,
            Param::LmHead => self.head(),
        }
    }

    pub fn param_mut(&mut self, p: Param) -> &mut Buf<Bf16> {
        match p {
            Param::Embed => &mut self.embed,
            Param::AttnNorm(l) => &mut self.layers[l].attn_norm,
            Param::MlpNorm(l) => &mut self.layers[l].mlp_norm,
            Param::Linear(l, w) => self.layers[l].linear_mut(w),
            Param::Norm => &mut self.norm,
            Param::LmHead => match self.lm_head.as_mut() {
                Some(h) => h,
                None => &mut self.embed,
            },
        }
    }

    /// Every weight back on the host in f32 (the bf16 values, widened).
    pub fn download(&self, g: &Gpu) -> Result<Weights> {
        let c = &self.config;
        let mut w = Weights::zeros(c);
        let get = |b: &Buf<Bf16>| -> Result<Vec<f32>> { Ok(from_bf16(&g.download(b, b.len())?)) };
        w.embed = get(&self.embed)?;
        w.norm = get(&self.norm)?;
        if let Some(h) = &self.lm_head {
            w.lm_head = Some(get(h)?);
        }
        for (lw, gl) in w.layers.iter_mut().zip(&self.layers) {
            lw.attn_norm = get(&gl.attn_norm)?;
            lw.mlp_norm = get(&gl.mlp_norm)?;
            for which in Linear::ALL {
                *lw.linear_mut(which) = get(gl.linear(which))?;
            }
        }
        Ok(w)
    }
}

/// What the forward pass of one block keeps for the backward pass (N = B*T),
/// besides its input (GpuActs::x).
pub struct GpuLayerActs {
    pub xn1: Buf<Bf16>,   // (N, C)
    pub rstd1: Buf<f32>,  // (N)
    pub q: Buf<Bf16>,     // (N, NH*HS) after RoPE
    pub k: Buf<Bf16>,     // (N, KVH*HS) after RoPE
    pub v: Buf<Bf16>,     // (N, KVH*HS)
    pub att: Buf<Bf16>,   // (N, NH*HS)
    pub lse: Buf<f32>,    // (N, NH)
    pub x_mid: Buf<Bf16>, // (N, C)
    pub xn2: Buf<Bf16>,   // (N, C)
    pub rstd2: Buf<f32>,  // (N)
    pub gate: Buf<Bf16>,  // (N, F)
    pub up: Buf<Bf16>,    // (N, F)
    pub h: Buf<Bf16>,     // (N, F)
    /// LoRA only: inp @ A^T of each of the 7 linears, (N, r).
    pub xa: Vec<Buf<Bf16>>,
}

/// Gradient buffers of the backward pass, reused layer after layer.
pub struct GpuScratch {
    pub dres: Buf<Bf16>,  // (N, C)
    pub dxn: Buf<Bf16>,   // (N, C)
    pub dq: Buf<Bf16>,    // (N, NH*HS)
    pub dk: Buf<Bf16>,    // (N, KVH*HS)
    pub dv: Buf<Bf16>,    // (N, KVH*HS)
    pub datt: Buf<Bf16>,  // (N, NH*HS)
    pub delta: Buf<f32>,  // (N, NH)
    pub dgate: Buf<Bf16>, // (N, F)
    pub dup: Buf<Bf16>,   // (N, F)
    pub dh: Buf<Bf16>,    // (N, F)
    pub dyb: Buf<Bf16>,   // (N, r) LoRA: dout @ B
    pub dsc: Buf<Bf16>,   // (N, max(C, NH*HS, F)) DoRA: dout * c
}

/// A packed batch's layout on the device, for each of its N = B*T positions:
/// where its example starts in its row (the attention kernels' seg0) and its
/// position inside the example (RoPE's).
pub struct GpuPacking {
    pub seg0: Buf<i32>, // (N)
    pub pos: Buf<u32>,  // (N)
    /// The longest example of the batch (RoPE reaches position longest - 1).
    pub longest: usize,
}

/// seg0 and pos (N = B*T each) of a packed batch's segments, which must
/// cover every position of the (B, T) batch once, in order: the kernels
/// attend from seg0 up to the position itself, so a gap would join two
/// examples (pack.rs makes none).
pub fn packing_of(segments: &[Segment], b: usize, t: usize) -> Result<(Vec<i32>, Vec<u32>)> {
    let (mut seg0, mut pos) = (Vec::with_capacity(b * t), Vec::with_capacity(b * t));
    for sg in segments {
        if sg.len == 0 || sg.row * t + sg.start != seg0.len() || sg.start + sg.len > t {
            bail!("packed batch: the examples must fill the ({b}, {t}) rows in order, without gaps");
        }
        seg0.extend(std::iter::repeat_n(sg.start as i32, sg.len));
        pos.extend(0..sg.len as u32);
    }
    if seg0.len() != b * t {
        bail!("packed batch: the examples fill {} of the ({b}, {t}) positions", seg0.len());
    }
    Ok((seg0, pos))
}

/// Every buffer of a forward and backward pass for batches up to (B, T).
pub struct GpuActs {
    pub b: usize,
    pub t: usize,
    pub cap: usize, // B*T the buffers were made for
    pub tokens: Buf<u32>,
    pub targets: Buf<i32>,
    /// The residual stream, L + 1 of (N, C): x[l] is layer l's input, x[L]
    /// the last layer's output.
    pub x: Vec<Buf<Bf16>>,
    /// What each layer keeps: L sets, or with `recompute` one set that each
    /// layer fills in turn (in the forward pass, and again in the backward).
    pub layers: Vec<GpuLayerActs>,
    pub recompute: bool,
    pub tmp: Buf<Bf16>,
    pub xf: Buf<Bf16>,
    pub rstd_f: Buf<f32>,
    /// (N, V) logits after forward; dlogits after backward.
    pub logits: Buf<Bf16>,
    pub losses: Buf<f32>,
    pub lse_ce: Buf<f32>,
    pub scratch: GpuScratch,
    /// Targets counted in the loss, from the last forward.
    pub n_counted: usize,
    /// Made by the first packed batch (set_segments), for B*T = cap positions.
    packing: Option<GpuPacking>,
    /// Whether the current batch is packed (its layout is in `packing`).
    packed: bool,
}

impl GpuActs {
    /// Allocates for batches of up to b * t rows; `lora_r` > 0 adds the
    /// adapters' buffers, `dora` DoRA's; `recompute` keeps one layer's
    /// activations, not L.
    #[allow(clippy::too_many_arguments)]
    pub fn new(g: &Gpu, c: &Config, b: usize, t: usize, lora_r: usize, dora: bool, recompute: bool) -> Result<GpuActs> {
        let n = b * t;
        let (d, q, kv, f) = (c.dim, c.q_dim(), c.kv_dim(), c.ffn_dim);
        let z = |len: usize| g.zeros::<Bf16>(len);
        let zf = |len: usize| g.zeros::<f32>(len);
        let sets = if recompute { 1 } else { c.n_layers };
        let mut layers = Vec::with_capacity(sets);
        for _ in 0..sets {
            layers.push(GpuLayerActs {
                xn1: z(n * d)?,
                rstd1: zf(n)?,
                q: z(n * q)?,
                k: z(n * kv)?,
                v: z(n * kv)?,
                att: z(n * q)?,
                lse: zf(n * c.n_heads)?,
                x_mid: z(n * d)?,
                xn2: z(n * d)?,
                rstd2: zf(n)?,
                gate: z(n * f)?,
                up: z(n * f)?,
                h: z(n * f)?,
                xa: if lora_r > 0 { (0..7).map(|_| z(n * lora_r)).collect::<Result<_>>()? } else { Vec::new() },
            });
        }
        Ok(GpuActs {
            b,
            t,
            cap: n,
            tokens: g.zeros(n)?,
            targets: g.zeros(n)?,
            x: (0..=c.n_layers).map(|_| z(n * d)).collect::<Result<_>>()?,
            layers,
            recompute,
            tmp: z(n * d)?,
            xf: z(n * d)?,
            rstd_f: zf(n)?,
            logits: z(n * c.vocab_size)?,
            losses: zf(n)?,
            lse_ce: zf(n)?,
            scratch: GpuScratch {
                dres: z(n * d)?,
                dxn: z(n * d)?,
                dq: z(n * q)?,
                dk: z(n * kv)?,
                dv: z(n * kv)?,
                datt: z(n * q)?,
                delta: zf(n * c.n_heads)?,
                dgate: z(n * f)?,
                dup: z(n * f)?,
                dh: z(n * f)?,
                dyb: z(n * lora_r.max(1))?,
                dsc: z(if dora { n * d.max(q).max(f) } else { 1 })?,
            },
            n_counted: 0,
            packing: None,
            packed: false,
        })
    }

    /// The bytes `new` allocates for the same arguments (for memory plans
    /// made before any work: `lift eval --device cuda`).
    pub fn bytes(c: &Config, b: usize, t: usize, lora_r: usize, dora: bool, recompute: bool) -> usize {
        let n = b * t;
        let (d, q, kv, f) = (c.dim, c.q_dim(), c.kv_dim(), c.ffn_dim);
        let sets = if recompute { 1 } else { c.n_layers };
        // bf16 and f32 values per set of layer activations, then the rest
        let layer = 2 * (3 * n * d + 2 * n * q + 2 * n * kv + 3 * n * f + 7 * n * lora_r) + 4 * (2 * n + n * c.n_heads);
        let top = 2 * ((c.n_layers + 3) * n * d + n * c.vocab_size) + 4 * 5 * n;
        let scratch = 2 * (2 * n * d + 2 * n * q + 2 * n * kv + 3 * n * f + n * lora_r.max(1))
            + 4 * n * c.n_heads
            + 2 * if dora { n * d.max(q).max(f) } else { 1 };
        sets * layer + top + scratch
    }

    /// Uses the buffers for a batch of (B, T); B*T must fit what they were made for.
    pub fn set_shape(&mut self, b: usize, t: usize) -> Result<()> {
        if b * t > self.cap {
            bail!("batch ({b}, {t}) is larger than the GPU buffers ({} rows)", self.cap);
        }
        self.b = b;
        self.t = t;
        self.packed = false;
        Ok(())
    }

    /// A packed batch's segments (data::Batch::segments), after set_shape:
    /// RoPE and attention then work example by example. Empty: whole rows.
    pub fn set_segments(&mut self, g: &Gpu, segments: &[Segment]) -> Result<()> {
        self.packed = !segments.is_empty();
        if !self.packed {
            return Ok(());
        }
        let (seg0, pos) = packing_of(segments, self.b, self.t)?;
        if self.packing.is_none() {
            self.packing = Some(GpuPacking { seg0: g.zeros(self.cap)?, pos: g.zeros(self.cap)?, longest: 0 });
        }
        let p = self.packing.as_mut().expect("made above");
        g.write(&mut p.seg0, 0, &seg0)?;
        g.write(&mut p.pos, 0, &pos)?;
        p.longest = segments.iter().map(|sg| sg.len).max().unwrap_or(0);
        Ok(())
    }

    /// The current batch's packing, if it is packed.
    pub fn packing(&self) -> Option<&GpuPacking> {
        if self.packed { self.packing.as_ref() } else { None }
    }

    /// Which activation set layer l uses.
    fn slot(&self, l: usize) -> usize {
        if self.recompute { 0 } else { l }
    }
}

/// Where the backward pass delivers the weight gradients (the GPU's
/// GradSink). `linear`: dW (OC, IC) += dout^T @ inp of linear matrix `id`,
/// or whatever part of it the method keeps; `xa` is the adapter's
/// inp @ A^T under LoRA. `dense`: the f32 gradient buffer of a norm, the
/// embedding or an untied LM head, if that tensor is trained.
pub trait GpuSink {
    #[allow(clippy::too_many_arguments)]
    fn linear(
        &mut self,
        g: &Gpu,
        id: usize,
        dout: &Buf<Bf16>,
        inp: &Buf<Bf16>,
        xa: Option<&Buf<Bf16>>,
        n: usize,
        ic: usize,
        oc: usize,
    ) -> Result<()>;
    fn dense(&mut self, p: Param) -> Option<&mut Buf<f32>>;
}

impl GpuModel {
    /// out (N, OC) = inp @ W^T (+ s (inp @ A^T) @ B^T with an adapter,
    /// keeping inp @ A^T in `xa` for the backward pass).
    #[allow(clippy::too_many_arguments)]
    fn linear_forward(
        &self,
        g: &Gpu,
        out: &Buf<Bf16>,
        inp: &Buf<Bf16>,
        w: &Buf<Bf16>,
        id: usize,
        xa: Option<&Buf<Bf16>>,
        n: usize,
        ic: usize,
        oc: usize,
    ) -> Result<()> {
        g.gemm(false, true, n, oc, ic, 1.0, inp.ptr(), w.ptr(), 0.0, out.ptr(), Dt::Bf16, Dt::Bf16)?;
        if let (Some(ad), Some(xa)) = (self.adapters.get(id), xa) {
            g.gemm(false, true, n, ad.r, ic, 1.0, inp.ptr(), ad.a.ptr(), 0.0, xa.ptr(), Dt::Bf16, Dt::Bf16)?;
            g.gemm(false, true, n, oc, ad.r, ad.scale, xa.ptr(), ad.b.ptr(), 1.0, out.ptr(), Dt::Bf16, Dt::Bf16)?;
            if let Some(dora) = &ad.dora {
                // y = c * (x V^T): the merged weight diag(c) V of the CPU
                launch::scale_columns(g, out, out, &dora.c, n, oc)?;
            }
        }
        Ok(())
    }

    /// dinp (N, IC) = (beta * dinp) + dout @ W (+ s (dout @ B) @ A), with
    /// DoRA's dout * c in place of dout. `s` lends its dyb and dsc scratch.
    #[allow(clippy::too_many_arguments)]
    fn linear_backward_input(
        &self,
        g: &Gpu,
        dinp: &Buf<Bf16>,
        dout: &Buf<Bf16>,
        w: &Buf<Bf16>,
        id: usize,
        s: &GpuScratch,
        beta: f32,
        n: usize,
        ic: usize,
        oc: usize,
    ) -> Result<()> {
        let dyb = &s.dyb;
        let dout = match self.adapters.get(id).and_then(|ad| ad.dora.as_ref()) {
            Some(dora) => {
                launch::scale_columns(g, &s.dsc, dout, &dora.c, n, oc)?;
                &s.dsc
            }
            None => dout,
        };
        g.gemm(false, false, n, ic, oc, 1.0, dout.ptr(), w.ptr(), beta, dinp.ptr(), Dt::Bf16, Dt::Bf16)?;
        if let Some(ad) = self.adapters.get(id) {
            g.gemm(false, false, n, ad.r, oc, 1.0, dout.ptr(), ad.b.ptr(), 0.0, dyb.ptr(), Dt::Bf16, Dt::Bf16)?;
            g.gemm(false, false, n, ic, ad.r, ad.scale, dyb.ptr(), ad.a.ptr(), 1.0, dinp.ptr(), Dt::Bf16, Dt::Bf16)?;
        }
        Ok(())
    }

    /// One block's forward pass, Model::forward's loop body: x_out (N, C) =
    /// x_in + attention(x_in) + mlp(...), keeping in `a` what the backward
    /// pass needs. `x_out` None (recomputation, in the backward pass) skips
    /// the last residual add: the output is known already, only the
    /// activations are wanted. `tmp` (N, C) is scratch.
    #[allow(clippy::too_many_arguments)]
    fn block_forward(
        &self,
        g: &Gpu,
        l: usize,
        a: &mut GpuLayerActs,
        x_in: &Buf<Bf16>,
        x_out: Option<&mut Buf<Bf16>>,
        tmp: &Buf<Bf16>,
        pk: Option<&GpuPacking>,
        b: usize,
        t: usize,
    ) -> Result<()> {
        let c = &self.config;
        let n = b * t;
        let (d, qd, kvd, f) = (c.dim, c.q_dim(), c.kv_dim(), c.ffn_dim);
        let dims = Attn { b, t, nh: c.n_heads, kvh: c.n_kv_heads, hs: c.head_dim };
        let w = &self.layers[l];
        let id = |which| matrix_id(l, which);
        // Attention block: x_mid = x_in + o(attention(rope(q), rope(k), v)).
        g.timed("rmsnorm", || {
            launch::rmsnorm_forward(g, &mut a.xn1, &mut a.rstd1, x_in, &w.attn_norm, n, d, c.norm_eps)
        })?;
        g.timed("gemm fwd", || {
            self.linear_forward(g, &a.q, &a.xn1, &w.wq, id(Linear::Q), a.xa.first(), n, d, qd)?;
            self.linear_forward(g, &a.k, &a.xn1, &w.wk, id(Linear::K), a.xa.get(1), n, d, kvd)?;
            self.linear_forward(g, &a.v, &a.xn1, &w.wv, id(Linear::V), a.xa.get(2), n, d, kvd)
        })?;
        g.timed("rope", || self.rope_qk(g, &mut a.q, &mut a.k, pk, n, t, 1.0))?;
        let seg0 = pk.map(|p| &p.seg0);
        g.timed("attention fwd", || {
            launch::attention_forward(g, &mut a.att, &mut a.lse, &a.q, &a.k, &a.v, seg0, dims)
        })?;
        g.timed("gemm fwd", || self.linear_forward(g, tmp, &a.att, &w.wo, id(Linear::O), a.xa.get(3), n, qd, d))?;
        g.timed("residual", || launch::residual_forward(g, &mut a.x_mid, x_in, tmp, n * d))?;
        // MLP block: x_out = x_mid + down(silu(gate(x)) * up(x)).
        g.timed("rmsnorm", || {
            launch::rmsnorm_forward(g, &mut a.xn2, &mut a.rstd2, &a.x_mid, &w.mlp_norm, n, d, c.norm_eps)
        })?;
        g.timed("gemm fwd", || {
            self.linear_forward(g, &a.gate, &a.xn2, &w.w_gate, id(Linear::Gate), a.xa.get(4), n, d, f)?;
            self.linear_forward(g, &a.up, &a.xn2, &w.w_up, id(Linear::Up), a.xa.get(5), n, d, f)
        })?;
        g.timed("swiglu", || launch::swiglu_forward(g, &mut a.h, &a.gate, &a.up, n * f))?;
        // (With LoRA this also refills the down adapter's xa, which a
        // recomputation needs, so it runs even when x_out is not wanted.)
        g.timed("gemm fwd", || self.linear_forward(g, tmp, &a.h, &w.w_down, id(Linear::Down), a.xa.get(6), n, f, d))?;
        if let Some(x_out) = x_out {
            g.timed("residual", || launch::residual_forward(g, x_out, &a.x_mid, tmp, n * d))?;
        }
        Ok(())
    }

    /// RoPE on q (N, NH*HS) and k (N, KVH*HS), sign 1 (forward) or -1 (the
    /// backward pass's dq and dk): at positions 0..T of each row, or, packed,
    /// at each position's place in its example.
    #[allow(clippy::too_many_arguments)]
    fn rope_qk(
        &self,
        g: &Gpu,
        q: &mut Buf<Bf16>,
        k: &mut Buf<Bf16>,
        pk: Option<&GpuPacking>,
        n: usize,
        t: usize,
        sign: f32,
    ) -> Result<()> {
        let c = &self.config;
        let (nh, kvh, hs) = (c.n_heads, c.n_kv_heads, c.head_dim);
        match pk {
            None => {
                launch::rope_rotate(g, q, &self.rope, n, t, nh, hs, 0, sign)?;
                launch::rope_rotate(g, k, &self.rope, n, t, kvh, hs, 0, sign)
            }
            Some(p) => {
                let top = p.longest.saturating_sub(1);
                launch::rope_rotate_at(g, q, 0, &self.rope, &p.pos, top, n, nh, hs, sign)?;
                launch::rope_rotate_at(g, k, 0, &self.rope, &p.pos, top, n, kvh, hs, sign)
            }
        }
    }

    /// Model::forward on the GPU. Returns the mean cross-entropy over the
    /// counted targets (0 without targets); logits stay in `acts.logits`.
    pub fn forward(&self, g: &Gpu, acts: &mut GpuActs, tokens: &[u32], targets: Option<&[i32]>) -> Result<f32> {
        let c = &self.config;
        let (b, t) = (acts.b, acts.t);
        let n = b * t;
        assert_eq!(tokens.len(), n, "forward: tokens must be (B, T)");
        let longest = acts.packing().map_or(t, |p| p.longest);
        assert!(self.rope.max_pos() >= longest, "forward: the RoPE table is too short");
        if let Some(&bad) = tokens.iter().find(|&&id| id as usize >= c.vocab_size) {
            bail!("token id {bad} is out of range (vocab {})", c.vocab_size);
        }
        let d = c.dim;
        g.write(&mut acts.tokens, 0, tokens)?;
        let tg: Vec<i32> = match targets {
            Some(tg) => tg.to_vec(),
            None => vec![-1; n],
        };
        acts.n_counted = tg.iter().filter(|&&x| x >= 0).count();
        g.write(&mut acts.targets, 0, &tg)?;

        g.timed("embedding", || launch::embedding_forward(g, &mut acts.x[0], &acts.tokens, &self.embed, n, d))?;
        let pk = if acts.packed { acts.packing.as_ref() } else { None };
        for l in 0..c.n_layers {
            let slot = acts.slot(l);
            let (inputs, outputs) = acts.x.split_at_mut(l + 1);
            let a = &mut acts.layers[slot];
            self.block_forward(g, l, a, &inputs[l], Some(&mut outputs[0]), &acts.tmp, pk, b, t)?;
        }
        let x_final = &acts.x[c.n_layers];
        g.timed("rmsnorm", || {
            launch::rmsnorm_forward(g, &mut acts.xf, &mut acts.rstd_f, x_final, &self.norm, n, d, c.norm_eps)
        })?;
        g.timed("lm head fwd", || {
            g.gemm(
                false,
                true,
                n,
                c.vocab_size,
                d,
                1.0,
                acts.xf.ptr(),
                self.head().ptr(),
                0.0,
                acts.logits.ptr(),
                Dt::Bf16,
                Dt::Bf16,
            )
        })?;
        g.timed("cross-entropy fwd", || {
            launch::crossentropy_forward(
                g,
                &mut acts.losses,
                &mut acts.lse_ce,
                &acts.logits,
                &acts.targets,
                n,
                c.vocab_size,
            )
        })?;
        if acts.n_counted == 0 {
            return Ok(0.0);
        }
        // Summed in f64 on the host, as cpu::crossentropy_forward does.
        let losses = g.download(&acts.losses, n)?;
        Ok((losses.iter().map(|&l| l as f64).sum::<f64>() / acts.n_counted as f64) as f32)
    }

    /// Model::backward on the GPU, for the loss of the last `forward`. Weight
    /// gradients go to `sink`; acts.logits becomes dlogits.
    pub fn backward(&self, g: &Gpu, acts: &mut GpuActs, sink: &mut dyn GpuSink) -> Result<()> {
        let c = &self.config;
        let (b, t) = (acts.b, acts.t);
        let n = b * t;
        let (d, v) = (c.dim, c.vocab_size);
        let dims = Attn { b, t, nh: c.n_heads, kvh: c.n_kv_heads, hs: c.head_dim };
        let recompute = acts.recompute;
        let GpuActs {
            x,
            layers,
            xf,
            rstd_f,
            logits,
            tokens,
            targets,
            lse_ce,
            scratch: s,
            tmp,
            n_counted,
            packing,
            packed,
            ..
        } = acts;
        let pk = if *packed { packing.as_ref() } else { None };
        let inv = 1.0 / (*n_counted).max(1) as f32;

        // Loss and LM head: dlogits (N, V), then dxn = dlogits @ W_head;
        // dW_head (V, C) += dlogits^T @ xf when the head (or the embedding
        // it is tied to) is trained.
        g.timed("cross-entropy bwd", || launch::crossentropy_backward(g, logits, lse_ce, targets, n, v, inv))?;
        if let Some(dw) = sink.dense(self.head_param()) {
            g.timed("lm head dW", || {
                g.gemm(true, false, v, d, n, 1.0, logits.ptr(), xf.ptr(), 1.0, dw.ptr(), Dt::Bf16, Dt::F32)
            })?;
        }
        g.timed("lm head dX", || {
            g.gemm(false, false, n, d, v, 1.0, logits.ptr(), self.head().ptr(), 0.0, s.dxn.ptr(), Dt::Bf16, Dt::Bf16)
        })?;
        g.timed("zero", || g.zero_range(&mut s.dres, 0, n * d))?;
        let x_final = &x[c.n_layers];
        g.timed("rmsnorm", || {
            launch::rmsnorm_backward(g, &mut s.dres, sink.dense(Param::Norm), &s.dxn, x_final, &self.norm, rstd_f, n, d)
        })?;
        let zero_attn_grads = launch::attention_accumulates(g, dims);

        for l in (0..c.n_layers).rev() {
            let x_in = &x[l];
            let a = &mut layers[if recompute { 0 } else { l }];
            if recompute {
                // This layer's activations again, from its kept input.
                self.block_forward(g, l, a, x_in, None, tmp, pk, b, t)?;
            }
            let a = &*a;
            self.mlp_backward(g, l, a, s, sink, n)?;
            self.attention_block_backward(g, l, a, x_in, s, sink, pk, dims, zero_attn_grads)?;
        }
        // s.dres is d(x[0]), the embedded tokens': scattered into the rows of dW_embed.
        if let Some(dw) = sink.dense(Param::Embed) {
            g.timed("embedding bwd", || launch::embedding_backward(g, dw, &s.dres, tokens, n, d))?;
        }
        Ok(())
    }

    /// The MLP block's backward pass of layer l: s.dres holds d(x_out) and
    /// becomes d(x_mid); the down, gate and up gradients go to the sink.
    fn mlp_backward(
        &self,
        g: &Gpu,
        l: usize,
        a: &GpuLayerActs,
        s: &mut GpuScratch,
        sink: &mut dyn GpuSink,
        n: usize,
    ) -> Result<()> {
        let (d, f) = (self.config.dim, self.config.ffn_dim);
        let w = &self.layers[l];
        let id = |which| matrix_id(l, which);
        let xa = |i: usize| a.xa.get(i);
        sink.linear(g, id(Linear::Down), &s.dres, &a.h, xa(6), n, f, d)?;
        g.timed("gemm dX", || {
            self.linear_backward_input(g, &s.dh, &s.dres, &w.w_down, id(Linear::Down), s, 0.0, n, f, d)
        })?;
        // dgate and dup are written, not accumulated: nothing else adds to them
        g.timed("swiglu", || {
            launch::swiglu_backward(g, &mut s.dgate, &mut s.dup, &s.dh, &a.gate, &a.up, n * f, false)
        })?;
        sink.linear(g, id(Linear::Gate), &s.dgate, &a.xn2, xa(4), n, d, f)?;
        sink.linear(g, id(Linear::Up), &s.dup, &a.xn2, xa(5), n, d, f)?;
        g.timed("gemm dX", || {
            self.linear_backward_input(g, &s.dxn, &s.dgate, &w.w_gate, id(Linear::Gate), s, 0.0, n, d, f)?;
            self.linear_backward_input(g, &s.dxn, &s.dup, &w.w_up, id(Linear::Up), s, 1.0, n, d, f)
        })?;
        g.timed("rmsnorm", || {
            let dw = sink.dense(Param::MlpNorm(l));
            launch::rmsnorm_backward(g, &mut s.dres, dw, &s.dxn, &a.x_mid, &w.mlp_norm, &a.rstd2, n, d)
        })?;
        Ok(())
    }

    /// The attention block's backward pass of layer l (input x_in): s.dres
    /// holds d(x_mid) and becomes d(x_in); the q, k, v and o gradients go to
    /// the sink. `zero_grads`: the attention kernels accumulate into dq, dk,
    /// dv, which are zeroed first.
    #[allow(clippy::too_many_arguments)]
    fn attention_block_backward(
        &self,
        g: &Gpu,
        l: usize,
        a: &GpuLayerActs,
        x_in: &Buf<Bf16>,
        s: &mut GpuScratch,
        sink: &mut dyn GpuSink,
        pk: Option<&GpuPacking>,
        dims: Attn,
        zero_grads: bool,
    ) -> Result<()> {
        let c = &self.config;
        let (n, d, qd, kvd, t) = (dims.b * dims.t, c.dim, c.q_dim(), c.kv_dim(), dims.t);
        let w = &self.layers[l];
        let id = |which| matrix_id(l, which);
        let xa = |i: usize| a.xa.get(i);
        sink.linear(g, id(Linear::O), &s.dres, &a.att, xa(3), n, qd, d)?;
        g.timed("gemm dX", || self.linear_backward_input(g, &s.datt, &s.dres, &w.wo, id(Linear::O), s, 0.0, n, qd, d))?;
        if zero_grads {
            g.timed("zero", || {
                g.zero_range(&mut s.dq, 0, n * qd)?;
                g.zero_range(&mut s.dk, 0, n * kvd)?;
                g.zero_range(&mut s.dv, 0, n * kvd)
            })?;
        }
        // (timed inside, kernel by kernel: "attention bwd delta", "... dq", "... dk dv")
        launch::attention_backward(
            g,
            &mut s.dq,
            &mut s.dk,
            &mut s.dv,
            &mut s.delta,
            &s.datt,
            &a.att,
            &a.lse,
            &a.q,
            &a.k,
            &a.v,
            pk.map(|p| &p.seg0),
            dims,
        )?;
        g.timed("rope", || self.rope_qk(g, &mut s.dq, &mut s.dk, pk, n, t, -1.0))?;
        sink.linear(g, id(Linear::Q), &s.dq, &a.xn1, xa(0), n, d, qd)?;
        sink.linear(g, id(Linear::K), &s.dk, &a.xn1, xa(1), n, d, kvd)?;
        sink.linear(g, id(Linear::V), &s.dv, &a.xn1, xa(2), n, d, kvd)?;
        g.timed("gemm dX", || {
            self.linear_backward_input(g, &s.dxn, &s.dq, &w.wq, id(Linear::Q), s, 0.0, n, d, qd)?;
            self.linear_backward_input(g, &s.dxn, &s.dk, &w.wk, id(Linear::K), s, 1.0, n, d, kvd)?;
            self.linear_backward_input(g, &s.dxn, &s.dv, &w.wv, id(Linear::V), s, 1.0, n, d, kvd)
        })?;
        g.timed("rmsnorm", || {
            let dw = sink.dense(Param::AttnNorm(l));
            launch::rmsnorm_backward(g, &mut s.dres, dw, &s.dxn, x_in, &w.attn_norm, &a.rstd1, n, d)
        })?;
        Ok(())
    }
}

impl GpuModel {
    /// A randomly initialized model made on the device (N(0, 0.02^2) weights,
    /// unit norms), for benchmarks of shapes too large to build on the host.
    pub fn random(g: &Gpu, c: &Config, seed: u64, max_t: usize) -> Result<GpuModel> {
        let mut tmp = g.zeros::<f32>(0)?;
        let mut counter = 0u64;
        let mut rand = |n: usize| -> Result<Buf<Bf16>> {
            if tmp.len() < n {
                tmp = g.zeros::<f32>(n)?;
            }
            counter += 1;
            launch::randn(g, &mut tmp, n, seed ^ (counter << 40))?;
            launch::scale_f32(g, &mut tmp, 0.02, n)?;
            let mut b = g.zeros::<Bf16>(n)?;
            launch::convert(g, "f32_to_bf16", &mut b, &tmp, n)?;
            Ok(b)
        };
        let ones = |n: usize| g.upload(&to_bf16(&vec![1.0f32; n]));
        let (d, q, kv, f) = (c.dim, c.q_dim(), c.kv_dim(), c.ffn_dim);
        let embed = rand(c.vocab_size * d)?;
        let lm_head = if c.tied_embeddings { None } else { Some(rand(c.vocab_size * d)?) };
        let mut layers = Vec::with_capacity(c.n_layers);
        for _ in 0..c.n_layers {
            layers.push(GpuLayer {
                attn_norm: ones(d)?,
                wq: rand(q * d)?,
                wk: rand(kv * d)?,
                wv: rand(kv * d)?,
                wo: rand(d * q)?,
                mlp_norm: ones(d)?,
                w_gate: rand(f * d)?,
                w_up: rand(f * d)?,
                w_down: rand(d * f)?,
            });
        }
        let table = crate::cpu::RopeTable::new(&c.rope_inv_freq(), max_t.max(1));
        let rope = RopeDev { cos: g.upload(&table.cos)?, sin: g.upload(&table.sin)?, half: table.half };
        g.sync()?;
        Ok(GpuModel { config: c.clone(), embed, layers, norm: ones(d)?, lm_head, rope, adapters: Vec::new() })
    }
}
