//! The resumable training state, DIR/state.bin: where a run stands, the
//! current values of the tensors it trains, and its optimizer state. Both
//! devices write and read the same file, so a run saved on one can continue
//! on the other.
//!
//! Layout (little-endian; "len" is a u64, arrays are f32 unless marked):
//!
//! ```text
//! "LIFTSTAT" | len | header JSON (StateHeader)
//! the tensors the header names, in its order: f32 x numel each
//! kind (one byte: 0 sparse, 1 full, 2 lora, 3 dora) | count = L*7, one record per linear weight:
//!   sparse  len k | k u32 indices (ascending) | m (k) | v (k)
//!   full    len n | m (n) | v (n)
//!   lora    len r | len OC | len IC | scale (1) | A (r*IC) | B (OC*r) | A's state | B's state
//!           (each state a `full` record)
//!   dora    a `lora` record | len OC | m (OC) | m's state (a `full` record)
//! len e | e `full` records: the dense state of the extra tensors (norms, embeddings)
//! ```
//!
//! A sparse method saves every linear weight whole (f32), an adapter method
//! none: its frozen base is the checkpoint's (PiSSA's residual is recomputed
//! from it), its adapters are in the records. S2FT's mask is a sparse record.
//! Trainers hand their state over through `StateSource`, so one writer
//! serves both devices.

use std::borrow::Cow;
use std::io::Write;
use std::path::Path;

use anyhow::{Context, Result, anyhow, bail};
use serde::{Deserialize, Serialize};

use crate::formats::checkpoint;
use crate::lora::Adapter;
use crate::method::{Magnitude, Trainable, extra_params};
use crate::model::{Config, Param, Weights, matrices, matrix};
use crate::optim::{DenseState, SparseState};
use crate::options::{Method, TrainOptions};

/// What state.bin holds besides the arrays: where the run stands.
#[derive(Serialize, Deserialize)]
pub struct StateHeader {
    pub step: u64,
    pub total_steps: u64,
    pub mask_round: u64,
    pub options: TrainOptions,
    /// The trainable tensors' current values (names of Param), saved whole.
    pub tensors: Vec<String>,
}

/// The tensors a run saves whole: every linear weight unless the method is
/// LoRA, then the extra tensors it trains densely, in `extras` order.
pub fn saved_tensors(c: &Config, method: Method, extras: &[Param]) -> Vec<Param> {
    let mut v: Vec<Param> = match method {
        m if m.has_adapters() => Vec::new(),
        _ => matrices(c).map(|(_, l, w)| Param::Linear(l, w)).collect(),
    };
    v.extend_from_slice(extras);
    v
}

/// One linear matrix's optimizer record, borrowed from a host trainer or
/// owned after a download from the device.
pub enum Record<'a> {
    Sparse(Cow<'a, SparseState>),
    Full(Cow<'a, DenseState>),
    /// The adapter (its A and B values) and the AdamW state of A and of B.
    Lora(Cow<'a, Adapter>, Cow<'a, DenseState>, Cow<'a, DenseState>),
    /// A LoRA record and the magnitude with its AdamW state.
    Dora(Cow<'a, Adapter>, Cow<'a, DenseState>, Cow<'a, DenseState>, Cow<'a, Magnitude>),
}

/// What a trainer hands to state.bin, piece by piece (the GPU downloads one
/// tensor or record at a time).
pub trait StateSource {
    /// One tensor's current f32 values (what model.bin would get).
    fn tensor(&self, p: Param) -> Result<Cow<'_, [f32]>>;
    /// The optimizer record of linear matrix `id`.
    fn record(&self, id: usize) -> Result<Record<'_>>;
    /// The AdamW state of extra tensor `i` (in `extra_params` order).
    fn extra(&self, i: usize) -> Result<Cow<'_, DenseState>>;
}

/// The kind byte of the optimizer records.
fn kind_byte(method: Method) -> u8 {
    match method {
        Method::Lift | Method::Magnitude | Method::Random | Method::S2ft => 0,
        Method::Full => 1,
        Method::Lora | Method::Pissa => 2,
        Method::Dora => 3,
    }
}

/// Little-endian arrays into a buffered file.
struct Writer {
    w: std::io::BufWriter<std::fs::File>,
}

impl Writer {
    fn bytes(&mut self, b: &[u8]) -> Result<()> {
        self.w.write_all(b)?;
        Ok(())
    }
    fn len(&mut self, n: usize) -> Result<()> {
        self.bytes(&(n as u64).to_le_bytes())
    }
    fn f32s(&mut self, xs: &[f32]) -> Result<()> {
        self.bytes(&xs.iter().flat_map(|v| v.to_le_bytes()).collect::<Vec<u8>>())
    }
    fn dense(&mut self, s: &DenseState) -> Result<()> {
        self.len(s.m.len())?;
        self.f32s(&s.m)?;
        self.f32s(&s.v)
    }
    fn record(&mut self, r: &Record) -> Result<()> {
        match r {
            Record::Sparse(s) => {
                self.len(s.indices.len())?;
                self.bytes(&s.indices.iter().flat_map(|i| i.to_le_bytes()).collect::<Vec<u8>>())?;
                self.f32s(&s.m)?;
                self.f32s(&s.v)
            }
            Record::Full(s) => self.dense(s),
            Record::Lora(ad, sa, sb) => self.adapter(ad, sa, sb),
            Record::Dora(ad, sa, sb, mag) => {
                self.adapter(ad, sa, sb)?;
                self.len(mag.m.len())?;
                self.f32s(&mag.m)?;
                self.dense(&mag.state)
            }
        }
    }
    fn adapter(&mut self, ad: &Adapter, sa: &DenseState, sb: &DenseState) -> Result<()> {
        for n in [ad.r, ad.oc, ad.ic] {
            self.len(n)?;
        }
        self.f32s(&[ad.scale])?;
        self.f32s(&ad.a)?;
        self.f32s(&ad.b)?;
        self.dense(sa)?;
        self.dense(sb)
    }
}

/// The optimizer record of matrix `id` of a host state.
pub fn record_of(t: &Trainable, id: usize) -> Record<'_> {
    match t {
        Trainable::Sparse { states } => Record::Sparse(Cow::Borrowed(&states[id])),
        Trainable::Full { states } => Record::Full(Cow::Borrowed(&states[id])),
        Trainable::Lora { adapters, states } => {
            Record::Lora(Cow::Borrowed(&adapters[id]), Cow::Borrowed(&states[id].0), Cow::Borrowed(&states[id].1))
        }
        Trainable::Dora { adapters, states, magnitudes } => Record::Dora(
            Cow::Borrowed(&adapters[id]),
            Cow::Borrowed(&states[id].0),
            Cow::Borrowed(&states[id].1),
            Cow::Borrowed(&magnitudes[id]),
        ),
    }
}

/// Writes DIR/state.bin atomically: the header, the tensors it names, one
/// optimizer record per linear matrix, the extras' states.
pub fn save(dir: &Path, c: &Config, header: &StateHeader, src: &dyn StateSource) -> Result<()> {
    let path = dir.join("state.bin");
    let tmp = checkpoint::tmp_path(&path);
    let o = &header.options;
    let result = (|| -> Result<()> {
        let f = std::fs::File::create(&tmp).with_context(|| format!("{}: cannot create", tmp.display()))?;
        let mut w = Writer { w: std::io::BufWriter::with_capacity(1 << 20, f) };
        let head = serde_json::to_vec(header)?;
        w.bytes(b"LIFTSTAT")?;
        w.len(head.len())?;
        w.bytes(&head)?;
        for p in saved_tensors(c, o.method.kind, &extra_params(c, &o.method)) {
            w.f32s(&src.tensor(p)?)?;
        }
        w.bytes(&[kind_byte(o.method.kind)])?;
        w.len(c.n_layers * 7)?;
        for (id, _, _) in matrices(c) {
            w.record(&src.record(id)?)?;
        }
        let n_extra = extra_params(c, &o.method).len();
        w.len(n_extra)?;
        for i in 0..n_extra {
            w.dense(src.extra(i)?.as_ref())?;
        }
        w.w.into_inner().map_err(|e| e.into_error())?.sync_all()?;
        Ok(())
    })();
    match result {
        Ok(()) => std::fs::rename(&tmp, &path).with_context(|| format!("{}: cannot write", path.display())),
        Err(e) => {
            let _ = std::fs::remove_file(&tmp);
            Err(e.context(format!("{}: cannot save the training state", path.display())))
        }
    }
}

/// A state read back: the header, the method's state and the extras' dense
/// states. The saved tensor values have been written into the weights.
pub struct Saved {
    pub header: StateHeader,
    pub trainable: Trainable,
    pub extras: Vec<DenseState>,
}

/// Reads DIR/state.bin: the saved tensors go into `weights` (which hold the
/// base checkpoint's), the rest is returned.
pub fn load(dir: &Path, c: &Config, weights: &mut Weights) -> Result<Saved> {
    let path = dir.join("state.bin");
    let p = path.display().to_string();
    let bytes = std::fs::read(&path)
        .with_context(|| format!("{p}: cannot read (is {} the --out of a training run?)", dir.display()))?;
    let mut r = Reader { bytes: &bytes, pos: 0 };
    let inner = |r: &mut Reader, weights: &mut Weights| -> Result<Saved> {
        if r.bytes(8)? != b"LIFTSTAT" {
            bail!("not a lift training state");
        }
        let hlen = r.len()?;
        let header: StateHeader = serde_json::from_slice(r.bytes(hlen)?).map_err(|e| anyhow!("corrupt header: {e}"))?;
        let params = Param::all(c);
        for name in &header.tensors {
            let param = params.iter().find(|q| q.name() == *name).ok_or_else(|| anyhow!("unknown tensor {name}"))?;
            let n = weights.get(*param).len();
            let values = r.f32s(n)?;
            weights.get_mut(*param).copy_from_slice(&values);
        }
        let (trainable, extras) = read_optimizer(r, c)?;
        Ok(Saved { header, trainable, extras })
    };
    inner(&mut r, weights).map_err(|e| anyhow!("{p}: {e}"))
}

/// Reads the optimizer records and the extras.
fn read_optimizer(r: &mut Reader, c: &Config) -> Result<(Trainable, Vec<DenseState>)> {
    let dense = |r: &mut Reader| -> Result<DenseState> {
        let n = r.len()?;
        Ok(DenseState { m: r.f32s(n)?, v: r.f32s(n)? })
    };
    let kind = r.bytes(1)?[0];
    let count = r.len()?;
    // One state per linear weight of this model, each of its size: a state
    // from another model must fail here, not index out of bounds later.
    if count != c.n_layers * 7 {
        bail!("optimizer state for {count} linear weights, the model has {}", c.n_layers * 7);
    }
    let size = |id: usize| matrix(id).1.shape(c);
    let trainable = match kind {
        0 => {
            let mut states = Vec::with_capacity(count);
            for id in 0..count {
                let k = r.len()?;
                let indices = r.u32s(k)?;
                let (out, inp) = size(id);
                if indices.iter().any(|&i| i as usize >= out * inp) {
                    bail!("mask {id} has an index beyond its {out}x{inp} weight");
                }
                if indices.windows(2).any(|p| p[0] >= p[1]) {
                    bail!("mask {id}: the indices are not ascending and unique");
                }
                states.push(SparseState { indices, m: r.f32s(k)?, v: r.f32s(k)? });
            }
            Trainable::Sparse { states }
        }
        1 => {
            let states: Vec<DenseState> = (0..count).map(|_| dense(r)).collect::<Result<_>>()?;
            if let Some(id) = (0..count).find(|&id| states[id].m.len() != size(id).0 * size(id).1) {
                bail!("optimizer state {id} does not have the size of its weight");
            }
            Trainable::Full { states }
        }
        2 | 3 => {
            let (mut adapters, mut states, mut magnitudes) = (Vec::new(), Vec::new(), Vec::new());
            for id in 0..count {
                let (rank, oc, ic) = (r.len()?, r.len()?, r.len()?);
                if (oc, ic) != size(id) {
                    bail!("adapter {id} is {oc}x{ic}, its weight {}x{}", size(id).0, size(id).1);
                }
                let scale = r.f32s(1)?[0];
                let (a, b) = (r.f32s(rank * ic)?, r.f32s(oc * rank)?);
                adapters.push(Adapter { r: rank, oc, ic, scale, a, b });
                let (sa, sb) = (dense(r)?, dense(r)?);
                if sa.m.len() != rank * ic || sb.m.len() != oc * rank {
                    bail!("adapter {id}: optimizer state of another size");
                }
                states.push((sa, sb));
                if kind == 3 {
                    let n = r.len()?;
                    let m = r.f32s(n)?;
                    let state = dense(r)?;
                    if m.len() != oc || state.m.len() != oc {
                        bail!("magnitude {id} is not of its weight's {oc} rows");
                    }
                    magnitudes.push(Magnitude { m, state });
                }
            }
            if kind == 3 {
                Trainable::Dora { adapters, states, magnitudes }
            } else {
                Trainable::Lora { adapters, states }
            }
        }
        k => bail!("unknown optimizer kind {k}"),
    };
    let n_extra = r.len()?;
    let extra = (0..n_extra).map(|_| dense(r)).collect::<Result<_>>()?;
    Ok((trainable, extra))
}

/// Reads little-endian values from a byte buffer, failing on truncation.
struct Reader<'a> {
    bytes: &'a [u8],
    pos: usize,
}

impl Reader<'_> {
    fn bytes(&mut self, n: usize) -> Result<&[u8]> {
        let end = self.pos.checked_add(n).filter(|&e| e <= self.bytes.len()).ok_or_else(|| anyhow!("truncated"))?;
        let s = &self.bytes[self.pos..end];
        self.pos = end;
        Ok(s)
    }
    fn len(&mut self) -> Result<usize> {
        Ok(u64::from_le_bytes(self.bytes(8)?.try_into().unwrap()) as usize)
    }
    fn f32s(&mut self, n: usize) -> Result<Vec<f32>> {
        let b = self.bytes(n.checked_mul(4).ok_or_else(|| anyhow!("corrupt length"))?)?;
        Ok(b.chunks_exact(4).map(|c| f32::from_le_bytes(c.try_into().unwrap())).collect())
    }
    fn u32s(&mut self, n: usize) -> Result<Vec<u32>> {
        let b = self.bytes(n.checked_mul(4).ok_or_else(|| anyhow!("corrupt length"))?)?;
        Ok(b.chunks_exact(4).map(|c| u32::from_le_bytes(c.try_into().unwrap())).collect())
    }
}
