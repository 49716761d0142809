//! One typed wrapper per kernel of `kernels/*.cu`. Each checks that the
//! buffers hold what the kernel will touch for the given shape, then queues
//! the launch (`Gpu::launch` holds the one `unsafe` call, whose soundness
//! rests on these checks). Names and argument order follow the kernels, which
//! follow the CPU ops in `cpu.rs`.

use anyhow::Result;

use super::gpu::{Arg, Bf16, Buf, Gpu};
use crate::optim::AdamW;

use Arg::{F32, I32, I64, Ptr, U32, U64};

/// Blocks of 256 threads for a grid-stride loop over n items.
fn blocks(n: usize) -> u32 {
    n.div_ceil(256).clamp(1, 65536) as u32
}

fn need<T>(b: &Buf<T>, n: usize, what: &str) {
    assert!(b.len() >= n, "{what}: device buffer of {} values, the shape needs {n}", b.len());
}

fn i32_of(x: usize) -> i32 {
    i32::try_from(x).expect("a dimension that fits i32")
}

pub fn embedding_forward(
    g: &Gpu,
    out: &mut Buf<Bf16>,
    tokens: &Buf<u32>,
    wte: &Buf<Bf16>,
    n: usize,
    c: usize,
) -> Result<()> {
    need(out, n * c, "embedding_forward out");
    need(tokens, n, "embedding_forward tokens");
    g.launch(
        "embedding_forward",
        (blocks(n * c), 1, 1),
        256,
        &[Ptr(out.ptr()), Ptr(tokens.ptr()), Ptr(wte.ptr()), I32(i32_of(n)), I32(i32_of(c))],
    )
}

/// The caller has checked every token id against V (wte has V*C values).
pub fn embedding_backward(
    g: &Gpu,
    dwte: &mut Buf<f32>,
    dout: &Buf<Bf16>,
    tokens: &Buf<u32>,
    n: usize,
    c: usize,
) -> Result<()> {
    need(dout, n * c, "embedding_backward dout");
    need(tokens, n, "embedding_backward tokens");
    g.launch(
        "embedding_backward",
        (blocks(n * c), 1, 1),
        256,
        &[Ptr(dwte.ptr()), Ptr(dout.ptr()), Ptr(tokens.ptr()), I32(i32_of(n)), I32(i32_of(c))],
    )
}

#[allow(clippy::too_many_arguments)]
pub fn rmsnorm_forward(
    g: &Gpu,
    out: &mut Buf<Bf16>,
    rstd: &mut Buf<f32>,
    inp: &Buf<Bf16>,
    weight: &Buf<Bf16>,
    n: usize,
    c: usize,
    eps: f32,
) -> Result<()> {
    need(out, n * c, "rmsnorm_forward out");
    need(inp, n * c, "rmsnorm_forward inp");
    need(rstd, n, "rmsnorm_forward rstd");
    need(weight, c, "rmsnorm_forward weight");
    g.launch(
        "rmsnorm_forward",
        (n as u32, 1, 1),
        256,
        &[Ptr(out.ptr()), Ptr(rstd.ptr()), Ptr(inp.ptr()), Ptr(weight.ptr()), I32(i32_of(c)), F32(eps)],
    )
}

#[allow(clippy::too_many_arguments)]
pub fn rmsnorm_backward(
    g: &Gpu,
    dinp: &mut Buf<Bf16>,
    dweight: Option<&mut Buf<f32>>,
    dout: &Buf<Bf16>,
    inp: &Buf<Bf16>,
    weight: &Buf<Bf16>,
    rstd: &Buf<f32>,
    n: usize,
    c: usize,
) -> Result<()> {
    for (b, what) in [(&*dinp, "dinp"), (dout, "dout"), (inp, "inp")] {
        need(b, n * c, what);
    }
    need(rstd, n, "rmsnorm_backward rstd");
    let dw = match dweight {
        Some(d) => {
            need(d, c, "rmsnorm_backward dweight");
            d.ptr()
        }
        None => 0,
    };
    g.launch(
        "rmsnorm_backward",
        (n as u32, 1, 1),
        256,
        &[
            Ptr(dinp.ptr()),
            Ptr(dw),
            Ptr(dout.ptr()),
            Ptr(inp.ptr()),
            Ptr(weight.ptr()),
            Ptr(rstd.ptr()),
            I32(i32_of(c)),
        ],
    )
}

/// The RoPE table on the device: cos and sin, (max_pos, HS/2) each.
pub struct RopeDev {
    pub cos: Buf<f32>,
    pub sin: Buf<f32>,
    pub half: usize,
}

impl RopeDev {
    pub fn max_pos(&self) -> usize {
        self.cos.len() / self.half
    }
}

/// sign 1: cpu::rope_forward; sign -1: cpu::rope_backward.
#[allow(clippy::too_many_arguments)]
pub fn rope_rotate(
    g: &Gpu,
    x: &mut Buf<Bf16>,
    rope: &RopeDev,
    n_rows: usize,
    t: usize,
    h: usize,
    hs: usize,
    pos0: usize,
    sign: f32,
) -> Result<()> {
    need(x, n_rows * h * hs, "rope x");
    assert_eq!(hs / 2, rope.half, "rope: head size does not match the table");
    assert!(pos0 + t <= rope.max_pos(), "rope: positions past the table");
    g.launch(
        "rope_rotate",
        (blocks(n_rows * h * hs / 2), 1, 1),
        256,
        &[
            Ptr(x.ptr()),
            Ptr(rope.cos.ptr()),
            Ptr(rope.sin.ptr()),
            I32(i32_of(n_rows)),
            I32(i32_of(t)),
            I32(i32_of(h)),
            I32(i32_of(hs)),
            I32(i32_of(pos0)),
            F32(sign),
        ],
    )
}

/// The shape of a training attention call (Tq = Tk = T).
#[derive(Clone, Copy, Debug)]
pub struct Attn {
    pub b: usize,
    pub t: usize,
    pub nh: usize,
    pub kvh: usize,
    pub hs: usize,
}

impl Attn {
    fn check(&self) {
        assert!(
            self.hs <= 128 && self.hs.is_multiple_of(2),
            "attention kernels take an even head size up to 128 (got {})",
            self.hs
        );
        assert!(self.nh.is_multiple_of(self.kvh), "attention: NH must be a multiple of KVH");
    }
    fn q_len(&self) -> usize {
        self.b * self.t * self.nh * self.hs
    }
    fn kv_len(&self) -> usize {
        self.b * self.t * self.kvh * self.hs
    }
}

const TILE: usize = 32; // attention.cu's rows per block
const TC_ROWS: usize = 64; // attention_tc.cu's rows per block

/// The tensor-core kernels' name suffix when they serve this shape (head
/// size 64 or 128 and `Attention::Tc` selected), else None (attention.cu).
fn tc_kernel(g: &Gpu, d: &Attn) -> Option<&'static str> {
    match (g.attention(), d.hs) {
        (super::gpu::Attention::Tc, 64) => Some("64"),
        (super::gpu::Attention::Tc, 128) => Some("128"),
        _ => None,
    }
}

/// Whether attention_backward adds into dq, dk, dv (the plain kernels) or
/// overwrites them (the tensor-core ones). Either way the result is right
/// when the caller zeroes them first; model.rs skips that when it can.
pub fn attention_accumulates(g: &Gpu, d: Attn) -> bool {
    tc_kernel(g, &d).is_none()
}

fn aligned16<T>(bufs: &[&Buf<T>]) -> bool {
    bufs.iter().all(|b| b.ptr() % 16 == 0)
}

/// The kernels' seg0 argument: a packed batch's segment starts (B, T)
/// (GpuPacking::seg0), or null for whole rows.
fn seg0_arg(seg0: Option<&Buf<i32>>, d: &Attn) -> Arg {
    match seg0 {
        Some(s) => {
            need(s, d.b * d.t, "attention seg0");
            Ptr(s.ptr())
        }
        None => Ptr(0),
    }
}

/// cpu::attention_forward over whole rows (seg0 None), or over each example
/// of a packed batch on its own (seg0: where each position's example starts
/// in its row, as model.rs's rope_attention_forward does segment by segment).
#[allow(clippy::too_many_arguments)]
pub fn attention_forward(
    g: &Gpu,
    out: &mut Buf<Bf16>,
    lse: &mut Buf<f32>,
    q: &Buf<Bf16>,
    k: &Buf<Bf16>,
    v: &Buf<Bf16>,
    seg0: Option<&Buf<i32>>,
    d: Attn,
) -> Result<()> {
    d.check();
    need(out, d.q_len(), "attention out");
    need(q, d.q_len(), "attention q");
    need(k, d.kv_len(), "attention k");
    need(v, d.kv_len(), "attention v");
    need(lse, d.b * d.t * d.nh, "attention lse");
    let dims = [I32(i32_of(d.t)), I32(i32_of(d.nh)), I32(i32_of(d.kvh))];
    let mut a = vec![Ptr(out.ptr()), Ptr(lse.ptr()), Ptr(q.ptr()), Ptr(k.ptr()), Ptr(v.ptr()), seg0_arg(seg0, &d)];
    a.extend(dims.iter().copied());
    match tc_kernel(g, &d) {
        Some(hs) => {
            // 16-byte loads of rows of q, k, v
            assert!(aligned16(&[&*out, q, k, v]), "attention_forward_tc: buffers must be 16-byte aligned");
            let name = if hs == "64" { "attention_forward_tc64" } else { "attention_forward_tc128" };
            // (heads, query blocks, B): the longest blocks first (attention_tc.cu)
            g.launch(name, (d.nh as u32, d.t.div_ceil(TC_ROWS) as u32, d.b as u32), 128, &a)
        }
        None => {
            a.push(I32(i32_of(d.hs)));
            g.launch("attention_forward", (d.t.div_ceil(TILE) as u32, d.nh as u32, d.b as u32), 256, &a)
        }
    }
}

/// cpu::attention_backward: delta, then dq (pass 1), then dk and dv (pass 2),
/// over whole rows or each example of a packed batch (seg0, as in
/// attention_forward). The plain kernels add into dq, dk, dv, the
/// tensor-core ones overwrite them (attention_accumulates).
#[allow(clippy::too_many_arguments)]
pub fn attention_backward(
    g: &Gpu,
    dq: &mut Buf<Bf16>,
    dk: &mut Buf<Bf16>,
    dv: &mut Buf<Bf16>,
    delta: &mut Buf<f32>,
    dout: &Buf<Bf16>,
    out: &Buf<Bf16>,
    lse: &Buf<f32>,
    q: &Buf<Bf16>,
    k: &Buf<Bf16>,
    v: &Buf<Bf16>,
    seg0: Option<&Buf<i32>>,
    d: Attn,
) -> Result<()> {
    d.check();
    for (b, what) in [(&*dq, "dq"), (dout, "dout"), (out, "out"), (q, "q")] {
        need(b, d.q_len(), what);
    }
    for (b, what) in [(&*dk, "dk"), (&*dv, "dv"), (k, "k"), (v, "v")] {
        need(b, d.kv_len(), what);
    }
    let rows_heads = d.b * d.t * d.nh;
    need(delta, rows_heads, "attention delta");
    need(lse, rows_heads, "attention lse");
    // timed kernel by kernel (the profile's "attention bwd" rows)
    g.timed("attention bwd delta", || {
        g.launch(
            "attention_delta",
            ((rows_heads * 32).div_ceil(256) as u32, 1, 1),
            256,
            &[Ptr(delta.ptr()), Ptr(dout.ptr()), Ptr(out.ptr()), I64(rows_heads as i64), I32(i32_of(d.hs))],
        )
    })?;
    let mut dims = vec![I32(i32_of(d.t)), I32(i32_of(d.nh)), I32(i32_of(d.kvh))];
    let tc = tc_kernel(g, &d);
    if tc.is_none() {
        dims.push(I32(i32_of(d.hs)));
    }
    let inputs = [Ptr(lse.ptr()), Ptr(delta.ptr()), Ptr(q.ptr()), Ptr(k.ptr()), Ptr(v.ptr()), seg0_arg(seg0, &d)];
    let mut a_dq = vec![Ptr(dq.ptr()), Ptr(dout.ptr())];
    a_dq.extend(inputs.iter().chain(&dims).copied());
    match tc {
        Some(hs) => {
            assert!(
                aligned16(&[&*dq, &*dk, &*dv, dout, q, k, v]),
                "attention_backward_tc: buffers must be 16-byte aligned"
            );
            let (n_dq, n_dkdv) = if hs == "64" {
                ("attention_backward_dq_tc64", "attention_backward_dkdv_tc64")
            } else {
                ("attention_backward_dq_tc128", "attention_backward_dkdv_tc128")
            };
            // (heads, query or key blocks, B): see attention_tc.cu for the order
            let tiles = d.t.div_ceil(TC_ROWS) as u32;
            g.timed("attention bwd dq", || g.launch(n_dq, (d.nh as u32, tiles, d.b as u32), 128, &a_dq))?;
            if d.nh > d.kvh && g.dkdv_per_head() {
                // a block per query head, its parts summed over each group
                let (pk, pv) = g.attention_parts(d.q_len())?;
                let mut a = vec![Ptr(dk.ptr()), Ptr(dv.ptr()), Ptr(pk), Ptr(pv), Ptr(dout.ptr())];
                a.extend(inputs.iter().chain(&dims).copied());
                g.timed("attention bwd dk dv", || g.launch(n_dkdv, (d.nh as u32, tiles, d.b as u32), 128, &a))?;
                let sum = [
                    Ptr(dk.ptr()),
                    Ptr(dv.ptr()),
                    Ptr(pk),
                    Ptr(pv),
                    I64((d.b * d.t) as i64),
                    I32(i32_of(d.nh)),
                    I32(i32_of(d.kvh)),
                    I32(i32_of(d.hs)),
                ];
                g.timed("attention bwd dk dv sum", || {
                    g.launch("attention_dkdv_sum", (blocks(d.kv_len()), 1, 1), 256, &sum)
                })
            } else {
                let mut a = vec![Ptr(dk.ptr()), Ptr(dv.ptr()), Ptr(0), Ptr(0), Ptr(dout.ptr())];
                a.extend(inputs.iter().chain(&dims).copied());
                g.timed("attention bwd dk dv", || g.launch(n_dkdv, (d.kvh as u32, tiles, d.b as u32), 128, &a))
            }
        }
        None => {
            let mut a_dkdv = vec![Ptr(dk.ptr()), Ptr(dv.ptr()), Ptr(dout.ptr())];
            a_dkdv.extend(inputs.iter().chain(&dims).copied());
            let blocks = d.t.div_ceil(TILE) as u32;
            let (dq_grid, dkdv_grid) = ((blocks, d.nh as u32, d.b as u32), (blocks, d.kvh as u32, d.b as u32));
            g.timed("attention bwd dq", || g.launch("attention_backward_dq", dq_grid, 256, &a_dq))?;
            g.timed("attention bwd dk dv", || g.launch("attention_backward_dkdv", dkdv_grid, 256, &a_dkdv))
        }
    }
}

/// The vectorized elementwise kernels (swiglu.cu, residual.cu) read 16
/// bytes at a time from the start of each buffer: whole Bufs only.
fn vec8_ok(bufs: &[&Buf<Bf16>]) -> bool {
    aligned16(bufs)
}

pub fn swiglu_forward(g: &Gpu, out: &mut Buf<Bf16>, gate: &Buf<Bf16>, up: &Buf<Bf16>, n: usize) -> Result<()> {
    for (b, what) in [(&*out, "out"), (gate, "gate"), (up, "up")] {
        need(b, n, what);
    }
    assert!(vec8_ok(&[&*out, gate, up]), "swiglu_forward: buffers must be 16-byte aligned");
    g.launch(
        "swiglu_forward",
        (blocks(n.div_ceil(8)), 1, 1),
        256,
        &[Ptr(out.ptr()), Ptr(gate.ptr()), Ptr(up.ptr()), I64(n as i64)],
    )
}

/// cpu::swiglu_backward (accumulating into dgate and dup) with `accumulate`,
/// else the gradients are written over whatever dgate and dup held.
#[allow(clippy::too_many_arguments)]
pub fn swiglu_backward(
    g: &Gpu,
    dgate: &mut Buf<Bf16>,
    dup: &mut Buf<Bf16>,
    dout: &Buf<Bf16>,
    gate: &Buf<Bf16>,
    up: &Buf<Bf16>,
    n: usize,
    accumulate: bool,
) -> Result<()> {
    for (b, what) in [(&*dgate, "dgate"), (&*dup, "dup"), (dout, "dout"), (gate, "gate"), (up, "up")] {
        need(b, n, what);
    }
    assert!(vec8_ok(&[&*dgate, &*dup, dout, gate, up]), "swiglu_backward: buffers must be 16-byte aligned");
    g.launch(
        "swiglu_backward",
        (blocks(n.div_ceil(8)), 1, 1),
        256,
        &[
            Ptr(dgate.ptr()),
            Ptr(dup.ptr()),
            Ptr(dout.ptr()),
            Ptr(gate.ptr()),
            Ptr(up.ptr()),
            I64(n as i64),
            I32(accumulate as i32),
        ],
    )
}

pub fn residual_forward(g: &Gpu, out: &mut Buf<Bf16>, x: &Buf<Bf16>, y: &Buf<Bf16>, n: usize) -> Result<()> {
    for (b, what) in [(&*out, "out"), (x, "x"), (y, "y")] {
        need(b, n, what);
    }
    assert!(vec8_ok(&[&*out, x, y]), "residual_forward: buffers must be 16-byte aligned");
    g.launch(
        "residual_forward",
        (blocks(n.div_ceil(8)), 1, 1),
        256,
        &[Ptr(out.ptr()), Ptr(x.ptr()), Ptr(y.ptr()), I64(n as i64)],
    )
}

pub fn scale_f32(g: &Gpu, x: &mut Buf<f32>, alpha: f32, n: usize) -> Result<()> {
    need(x, n, "scale_f32");
    g.launch("scale_f32", (blocks(n), 1, 1), 256, &[Ptr(x.ptr()), F32(alpha), I64(n as i64)])
}

pub fn scale_bf16(g: &Gpu, x: &mut Buf<Bf16>, alpha: f32, n: usize) -> Result<()> {
    need(x, n, "scale_bf16");
    g.launch("scale_bf16", (blocks(n), 1, 1), 256, &[Ptr(x.ptr()), F32(alpha), I64(n as i64)])
}

/// The dtype conversions: out (n) = x (n) in another type.
pub fn convert<A, B>(g: &Gpu, kernel: &'static str, out: &mut Buf<A>, x: &Buf<B>, n: usize) -> Result<()> {
    need(out, n, kernel);
    need(x, n, kernel);
    assert!(
        matches!(kernel, "f32_to_bf16" | "bf16_to_f32" | "f32_to_f64" | "bf16_to_f64" | "f64_to_f32"),
        "not a conversion kernel: {kernel}"
    );
    let (sa, sb) = (std::mem::size_of::<A>(), std::mem::size_of::<B>());
    let ok = match kernel {
        "f32_to_bf16" => (sa, sb) == (2, 4),
        "bf16_to_f32" => (sa, sb) == (4, 2),
        "f32_to_f64" => (sa, sb) == (8, 4),
        "bf16_to_f64" => (sa, sb) == (8, 2),
        _ => (sa, sb) == (4, 8),
    };
    assert!(ok, "{kernel}: buffer element types do not match");
    g.launch(kernel, (blocks(n), 1, 1), 256, &[Ptr(out.ptr()), Ptr(x.ptr()), I64(n as i64)])
}

pub fn crossentropy_forward(
    g: &Gpu,
    losses: &mut Buf<f32>,
    lse: &mut Buf<f32>,
    logits: &Buf<Bf16>,
    targets: &Buf<i32>,
    n: usize,
    v: usize,
) -> Result<()> {
    need(logits, n * v, "crossentropy logits");
    for (b, what) in [(&*losses, "losses"), (&*lse, "lse")] {
        need(b, n, what);
    }
    need(targets, n, "crossentropy targets");
    g.launch(
        "crossentropy_forward",
        (n as u32, 1, 1),
        1024,
        &[Ptr(losses.ptr()), Ptr(lse.ptr()), Ptr(logits.ptr()), Ptr(targets.ptr()), I32(i32_of(v))],
    )
}

pub fn crossentropy_backward(
    g: &Gpu,
    logits: &mut Buf<Bf16>,
    lse: &Buf<f32>,
    targets: &Buf<i32>,
    n: usize,
    v: usize,
    inv_count: f32,
) -> Result<()> {
    need(logits, n * v, "crossentropy logits");
    need(lse, n, "crossentropy lse");
    need(targets, n, "crossentropy targets");
    g.launch(
        "crossentropy_backward",
        (n as u32, 1, 1),
        1024,
        &[Ptr(logits.ptr()), Ptr(lse.ptr()), Ptr(targets.ptr()), I32(i32_of(v)), F32(inv_count)],
    )
}

/// optim::SparseState::step on the device; `n_weight` is out*in of the weight.
#[allow(clippy::too_many_arguments)]
pub fn sparse_adamw(
    g: &Gpu,
    weight: &mut Buf<Bf16>,
    n_weight: usize,
    idx: &Buf<u32>,
    m: &mut Buf<f32>,
    v: &mut Buf<f32>,
    master: &mut Buf<f32>,
    grad: &Buf<f32>,
    k: usize,
    gscale: f32,
    opt: &AdamW,
    t: u64,
) -> Result<()> {
    need(weight, n_weight, "sparse_adamw weight");
    for (b, what) in [(&*m, "m"), (&*v, "v"), (&*master, "master"), (grad, "grad")] {
        need(b, k, what);
    }
    need(idx, k, "sparse_adamw idx"); // indices < n_weight: made by select.rs
    g.launch(
        "sparse_adamw",
        (blocks(k), 1, 1),
        256,
        &[
            Ptr(weight.ptr()),
            Ptr(idx.ptr()),
            Ptr(m.ptr()),
            Ptr(v.ptr()),
            Ptr(master.ptr()),
            Ptr(grad.ptr()),
            I64(k as i64),
            F32(gscale),
            F32(opt.lr),
            F32(opt.beta1),
            F32(opt.beta2),
            F32(opt.eps_at(t)),
            F32(opt.weight_decay),
            F32(opt.step_size(t)),
        ],
    )
}

/// optim::DenseState::step on the device, with an f32 master copy.
#[allow(clippy::too_many_arguments)]
pub fn adamw(
    g: &Gpu,
    weight: &mut Buf<Bf16>,
    m: &mut Buf<f32>,
    v: &mut Buf<f32>,
    master: &mut Buf<f32>,
    grad: &Buf<f32>,
    n: usize,
    gscale: f32,
    opt: &AdamW,
    t: u64,
) -> Result<()> {
    for (b, what) in [(&*m, "m"), (&*v, "v"), (&*master, "master"), (grad, "grad")] {
        need(b, n, what);
    }
    need(weight, n, "adamw weight");
    g.launch(
        "adamw",
        (blocks(n), 1, 1),
        256,
        &[
            Ptr(weight.ptr()),
            Ptr(m.ptr()),
            Ptr(v.ptr()),
            Ptr(master.ptr()),
            Ptr(grad.ptr()),
            I64(n as i64),
            F32(gscale),
            F32(opt.lr),
            F32(opt.beta1),
            F32(opt.beta2),
            F32(opt.eps_at(t)),
            F32(opt.weight_decay),
            F32(opt.step_size(t)),
        ],
    )
}

pub fn gather_bf16(g: &Gpu, master: &mut Buf<f32>, weight: &Buf<Bf16>, idx: &Buf<u32>, k: usize) -> Result<()> {
    need(master, k, "gather_bf16 master");
    need(idx, k, "gather_bf16 idx");
    g.launch(
        "gather_bf16",
        (blocks(k), 1, 1),
        256,
        &[Ptr(master.ptr()), Ptr(weight.ptr()), Ptr(idx.ptr()), I64(k as i64)],
    )
}

pub fn gather_add(g: &Gpu, acc: &mut Buf<f32>, dw: &Buf<f32>, idx: &Buf<u32>, k: usize) -> Result<()> {
    need(acc, k, "gather_add acc");
    need(idx, k, "gather_add idx");
    g.launch("gather_add", (blocks(k), 1, 1), 256, &[Ptr(acc.ptr()), Ptr(dw.ptr()), Ptr(idx.ptr()), I64(k as i64)])
}

/// dora.cu scale_columns: out (rows, cols) = inp * c[col] (out may be inp).
pub fn scale_columns(g: &Gpu, out: &Buf<Bf16>, inp: &Buf<Bf16>, c: &Buf<f32>, rows: usize, cols: usize) -> Result<()> {
    need(out, rows * cols, "scale_columns out");
    need(inp, rows * cols, "scale_columns inp");
    need(c, cols, "scale_columns c");
    let args = [Ptr(out.ptr()), Ptr(inp.ptr()), Ptr(c.ptr()), I64(rows as i64), I32(i32_of(cols))];
    g.launch("scale_columns", (blocks(rows * cols), 1, 1), 256, &args)
}

/// dora.cu column_dot: dm (cols) += sum over rows of dout * z, / norm.
pub fn column_dot(
    g: &Gpu,
    dm: &mut Buf<f32>,
    dout: &Buf<Bf16>,
    z: &Buf<Bf16>,
    norm: &Buf<f32>,
    rows: usize,
    cols: usize,
) -> Result<()> {
    need(dm, cols, "column_dot dm");
    need(dout, rows * cols, "column_dot dout");
    need(z, rows * cols, "column_dot z");
    need(norm, cols, "column_dot norm");
    let args = [Ptr(dm.ptr()), Ptr(dout.ptr()), Ptr(z.ptr()), Ptr(norm.ptr()), I64(rows as i64), I32(i32_of(cols))];
    g.launch("column_dot", (blocks(cols), 1, 1), 256, &args)
}

/// dora.cu dora_norms: per row of v (rows, cols), its norm and c = m / norm.
pub fn dora_norms(
    g: &Gpu,
    norm: &mut Buf<f32>,
    c: &mut Buf<f32>,
    v: &Buf<f32>,
    m: &Buf<f32>,
    rows: usize,
    cols: usize,
) -> Result<()> {
    need(norm, rows, "dora_norms norm");
    need(c, rows, "dora_norms c");
    need(v, rows * cols, "dora_norms v");
    need(m, rows, "dora_norms m");
    let args = [Ptr(norm.ptr()), Ptr(c.ptr()), Ptr(v.ptr()), Ptr(m.ptr()), I32(i32_of(cols))];
    g.launch("dora_norms", (rows as u32, 1, 1), 256, &args)
}

/// select.rs select_k_abs's key flip for `Smallest`, in place on scores (n).
pub fn reverse_abs_order(g: &Gpu, scores: &mut Buf<f32>, n: usize) -> Result<()> {
    need(scores, n, "reverse_abs_order");
    g.launch("reverse_abs_order", (blocks(n), 1, 1), 256, &[Ptr(scores.ptr()), I64(n as i64)])
}

/// Partial sums of squares of g (n) into partial[off .. off + SUMSQ_BLOCKS].
pub const SUMSQ_BLOCKS: usize = 256;
pub fn sum_squares(g: &Gpu, partial: &mut Buf<f64>, off: usize, x: &Buf<f32>, n: usize) -> Result<()> {
    need(partial, off + SUMSQ_BLOCKS, "sum_squares partial");
    need(x, n, "sum_squares x");
    g.launch("sum_squares", (SUMSQ_BLOCKS as u32, 1, 1), 256, &[Ptr(partial.at(off)), Ptr(x.ptr()), I64(n as i64)])
}

/// Rng::new(seed).fill_normal(out[..n]) on the device.
pub fn randn(g: &Gpu, out: &mut Buf<f32>, n: usize, seed: u64) -> Result<()> {
    need(out, n, "randn");
    g.launch("randn_splitmix", (blocks(n.div_ceil(2)), 1, 1), 256, &[Ptr(out.ptr()), I64(n as i64), U64(seed)])
}

/// select.rs cholesky_inverse_transpose on the device for `nb` matrices at
/// once: gram (nb, q, q) f64 in, x (nb, q, q) f32 = L^{-T} out; l and m are
/// (nb, q, q) f64 scratch. One block of 1024 threads per matrix.
pub fn cholesky_inverse_transpose(
    g: &Gpu,
    x: &mut Buf<f32>,
    l: &mut Buf<f64>,
    m: &mut Buf<f64>,
    gram: &Buf<f64>,
    q: usize,
    nb: usize,
) -> Result<()> {
    assert!(q <= 1024, "cholesky kernel: q = {q} > 1024 (4 rows per quad of 1024 threads)");
    for (len, what) in [(x.len(), "x"), (l.len(), "l"), (m.len(), "m"), (gram.len(), "gram")] {
        assert!(len >= nb * q * q, "cholesky {what}: {len} values, needs {}", nb * q * q);
    }
    g.launch(
        "cholesky_inverse_transpose",
        (nb as u32, 1, 1),
        1024,
        &[Ptr(x.ptr()), Ptr(l.ptr()), Ptr(m.ptr()), Ptr(gram.ptr()), I32(i32_of(q))],
    )
}

pub const HIST_BINS: usize = 2048;
pub const SEL_CHUNK: usize = 256 * 32;

#[allow(clippy::too_many_arguments)]
pub fn radix_histogram(
    g: &Gpu,
    hist: &mut Buf<u32>,
    scores: &Buf<f32>,
    n: usize,
    shift: u32,
    mask: u32,
    prefix_shift: u32,
    prefix: u32,
) -> Result<()> {
    need(hist, HIST_BINS, "radix_histogram hist");
    need(scores, n, "radix_histogram scores");
    assert!((mask as usize) < HIST_BINS);
    g.launch(
        "radix_histogram",
        (blocks(n).min(1024), 1, 1),
        256,
        &[
            Ptr(hist.ptr()),
            Ptr(scores.ptr()),
            I64(n as i64),
            I32(shift as i32),
            U32(mask),
            I32(prefix_shift as i32),
            U32(prefix),
        ],
    )
}

pub fn select_count(
    g: &Gpu,
    above: &mut Buf<u32>,
    ties: &mut Buf<u32>,
    scores: &Buf<f32>,
    n: usize,
    threshold: u32,
) -> Result<()> {
    let nb = n.div_ceil(SEL_CHUNK);
    need(above, nb, "select_count above");
    need(ties, nb, "select_count ties");
    need(scores, n, "select_count scores");
    g.launch(
        "select_count",
        (nb as u32, 1, 1),
        256,
        &[Ptr(above.ptr()), Ptr(ties.ptr()), Ptr(scores.ptr()), I64(n as i64), U32(threshold)],
    )
}

/// `out` must hold k values, where k = sum over blocks of the selected counts
/// that `out_start` was built from.
#[allow(clippy::too_many_arguments)]
pub fn select_write(
    g: &Gpu,
    out: &mut Buf<u32>,
    k: usize,
    out_start: &Buf<u32>,
    tie_start: &Buf<u32>,
    scores: &Buf<f32>,
    n: usize,
    threshold: u32,
    ties_needed: u32,
) -> Result<()> {
    let nb = n.div_ceil(SEL_CHUNK);
    need(out, k, "select_write out");
    need(out_start, nb, "select_write out_start");
    need(tie_start, nb, "select_write tie_start");
    need(scores, n, "select_write scores");
    g.launch(
        "select_write",
        (nb as u32, 1, 1),
        256,
        &[
            Ptr(out.ptr()),
            Ptr(out_start.ptr()),
            Ptr(tie_start.ptr()),
            Ptr(scores.ptr()),
            I64(n as i64),
            U32(threshold),
            U32(ties_needed),
        ],
    )
}

// ----------------------------------------------------------------------------
// Decoding (decode_attention.cu, decode.cu, rope.cu's rope_rotate_at)

/// rope.cu rope_rotate_at: cpu::rope_forward_at, x (N, H, HS) from address
/// `x` (a Buf of at least N*H*HS values from there: the caller's check) at
/// positions pos (N), the largest `max_pos`; sign -1 rotates back (the
/// backward pass of a packed batch).
#[allow(clippy::too_many_arguments)]
pub fn rope_rotate_at(
    g: &Gpu,
    x: &mut Buf<Bf16>,
    x_off: usize,
    rope: &RopeDev,
    pos: &Buf<u32>,
    max_pos: usize,
    n_rows: usize,
    h: usize,
    hs: usize,
    sign: f32,
) -> Result<()> {
    need(x, x_off + n_rows * h * hs, "rope_rotate_at x");
    need(pos, n_rows, "rope_rotate_at pos");
    assert_eq!(hs / 2, rope.half, "rope: head size does not match the table");
    assert!(max_pos < rope.max_pos(), "rope_rotate_at: positions past the table");
    g.launch(
        "rope_rotate_at",
        (blocks(n_rows * h * hs / 2), 1, 1),
        256,
        &[
            Ptr(x.at(x_off)),
            Ptr(rope.cos.ptr()),
            Ptr(rope.sin.ptr()),
            Ptr(pos.ptr()),
            I32(i32_of(n_rows)),
            I32(i32_of(h)),
            I32(i32_of(hs)),
            F32(sign),
        ],
    )
}

/// The shape of a decoding step's attention: R rows of one query each, over
/// a cache of `slots` positions; the slot table has `stride` entries per
/// row, of which row r uses pos[r] + 1 (at most `max_len`).
#[derive(Clone, Copy, Debug)]
pub struct DecodeAttn {
    pub r: usize,
    pub nh: usize,
    pub kvh: usize,
    pub hs: usize,
    pub slots: usize,
    pub stride: usize,
    pub max_len: usize,
}

/// decode_attention_partial's positions per tile.
pub const DECODE_TILE: usize = 32;

/// The split of the cache length for a step: (number of splits, positions
/// per split). Flash-decoding's rule: enough blocks to fill the GPU
/// (`target_blocks`, a few per multiprocessor), none shorter than a tile.
pub fn decode_splits(d: &DecodeAttn, target_blocks: usize) -> (usize, usize) {
    let tiles = d.max_len.div_ceil(DECODE_TILE).max(1);
    let want = target_blocks.div_ceil((d.r * d.nh).max(1)).clamp(1, tiles);
    let chunk = tiles.div_ceil(want) * DECODE_TILE;
    (d.max_len.div_ceil(chunk).max(1), chunk)
}

/// decode_attention.cu, both passes: out (R, NH, HS) = cpu::decode_attention
/// of q (R, NH, HS) over the layer's cache k, v (slots, KVH, HS) through
/// `table` (R, stride) and `pos` (R). o_part and lse_part are scratch of
/// R*NH*n_splits*HS and R*NH*n_splits values. The host has checked every
/// pos[r] < stride and every table entry the rows use < slots (it wrote them).
#[allow(clippy::too_many_arguments)]
pub fn decode_attention(
    g: &Gpu,
    out: &mut Buf<Bf16>,
    o_part: &mut Buf<f32>,
    lse_part: &mut Buf<f32>,
    q: &Buf<Bf16>,
    k: &Buf<Bf16>,
    v: &Buf<Bf16>,
    table: &Buf<u32>,
    pos: &Buf<u32>,
    d: DecodeAttn,
    splits: (usize, usize),
) -> Result<()> {
    assert!(d.hs <= 128 && d.hs.is_multiple_of(2), "decode attention takes an even head size up to 128");
    assert!(d.nh.is_multiple_of(d.kvh), "decode attention: NH must be a multiple of KVH");
    assert!(d.max_len <= d.stride, "decode attention: rows longer than the slot table");
    let (n_splits, chunk) = splits;
    assert!(n_splits * chunk >= d.max_len, "decode attention: the splits do not cover the rows");
    need(out, d.r * d.nh * d.hs, "decode_attention out");
    need(q, d.r * d.nh * d.hs, "decode_attention q");
    need(k, d.slots * d.kvh * d.hs, "decode_attention k");
    need(v, d.slots * d.kvh * d.hs, "decode_attention v");
    need(table, d.r * d.stride, "decode_attention table");
    need(pos, d.r, "decode_attention pos");
    need(o_part, d.r * d.nh * n_splits * d.hs, "decode_attention o_part");
    need(lse_part, d.r * d.nh * n_splits, "decode_attention lse_part");
    let (nh, kvh, hs) = (I32(i32_of(d.nh)), I32(i32_of(d.kvh)), I32(i32_of(d.hs)));
    g.launch(
        "decode_attention_partial",
        (n_splits as u32, d.nh as u32, d.r as u32),
        32,
        &[
            Ptr(o_part.ptr()),
            Ptr(lse_part.ptr()),
            Ptr(q.ptr()),
            Ptr(k.ptr()),
            Ptr(v.ptr()),
            Ptr(table.ptr()),
            Ptr(pos.ptr()),
            I32(i32_of(d.stride)),
            nh,
            kvh,
            hs,
            I32(i32_of(n_splits)),
            I32(i32_of(chunk)),
        ],
    )?;
    g.launch(
        "decode_attention_merge",
        (d.nh as u32, d.r as u32, 1),
        32,
        &[Ptr(out.ptr()), Ptr(o_part.ptr()), Ptr(lse_part.ptr()), nh, hs, I32(i32_of(n_splits))],
    )
}

/// decode.cu kv_table_append: table[r * stride + pos[r]] = base + r, r < R.
pub fn kv_table_append(
    g: &Gpu,
    table: &mut Buf<u32>,
    pos: &Buf<u32>,
    base: u32,
    stride: usize,
    r: usize,
) -> Result<()> {
    need(table, r * stride, "kv_table_append table"); // pos[r] < stride: the host's check
    need(pos, r, "kv_table_append pos");
    let args = [Ptr(table.ptr()), Ptr(pos.ptr()), U32(base), I32(i32_of(stride)), I32(i32_of(r))];
    g.launch("kv_table_append", (r.div_ceil(256) as u32, 1, 1), 256, &args)
}

/// decode.cu kv_table_select: dst row i = src row from[i], i < R (from[i] < src's rows: the host's check).
pub fn kv_table_select(
    g: &Gpu,
    dst: &mut Buf<u32>,
    src: &Buf<u32>,
    from: &Buf<u32>,
    stride: usize,
    r: usize,
) -> Result<()> {
    need(dst, r * stride, "kv_table_select dst");
    need(from, r, "kv_table_select from");
    let args = [Ptr(dst.ptr()), Ptr(src.ptr()), Ptr(from.ptr()), I32(i32_of(stride)), I32(i32_of(r))];
    g.launch("kv_table_select", (blocks(r * stride), 1, 1), 256, &args)
}

/// decode.cu gather_rows: out (N, C) row i = x row rows[i] (rows[i] < x's rows: the host's check).
pub fn gather_rows(g: &Gpu, out: &mut Buf<Bf16>, x: &Buf<Bf16>, rows: &Buf<u32>, n: usize, c: usize) -> Result<()> {
    need(out, n * c, "gather_rows out");
    need(rows, n, "gather_rows rows");
    let args = [Ptr(out.ptr()), Ptr(x.ptr()), Ptr(rows.ptr()), I32(i32_of(n)), I32(i32_of(c))];
    g.launch("gather_rows", (blocks(n * c), 1, 1), 256, &args)
}

/// decode.cu logits_topk's largest k.
pub const TOPK_MAX: usize = 16;

/// decode.cu logits_topk: per row of logits (R, V) f32, the k best (value,
/// id), best first, ties to the lower id, and the log-sum-exp, all into one
/// u32 buffer so that one copy brings them to the host: ids (R, k) at 0, the
/// values' f32 bits (R, k) at R*k, the lse bits (R) at 2*R*k.
pub fn logits_topk(g: &Gpu, out: &mut Buf<u32>, logits: &Buf<f32>, r: usize, v: usize, k: usize) -> Result<()> {
    assert!((1..=TOPK_MAX).contains(&k) && k <= v, "logits_topk: k = {k} must be in 1..={TOPK_MAX} and at most V");
    need(logits, r * v, "logits_topk logits");
    need(out, r * (2 * k + 1), "logits_topk out");
    let (ids, vals, lse) = (out.ptr(), out.at(r * k), out.at(2 * r * k));
    let args = [Ptr(vals), Ptr(ids), Ptr(lse), Ptr(logits.ptr()), I32(i32_of(v)), I32(i32_of(k))];
    g.launch("logits_topk", (r as u32, 1, 1), 256, &args)
}
