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

use crate::formats::checkpoint::{self, DType};
use crate::limits::{plain, shorten};
use crate::lora::Adapter;
use crate::method::{Magnitude, Trainable, extra_params};
use crate::model::{Config, Param, Weights, matrices, matrix};
use crate::optim::{DenseState, SparseState};
use crate::options::{Method, MethodOptions, TrainOptions};

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
    /// A block at a time, as model.bin's writer: no byte copy of a whole tensor.
    fn f32s(&mut self, xs: &[f32]) -> Result<()> {
        checkpoint::write_values(&mut self.w, xs, DType::F32)?;
        Ok(())
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
/// base checkpoint's), the rest is returned. Everything is checked against
/// the model and the header's method before it is used: the tensor list,
/// every count and size, the masks (ascending, unique, inside their
/// weight), and every value (finite; second moments not negative). An
/// error names the file and the record it is in.
pub fn load(dir: &Path, c: &Config, weights: &mut Weights) -> Result<Saved> {
    let path = dir.join("state.bin");
    let p = path.display().to_string();
    let bytes = std::fs::read(&path)
        .with_context(|| format!("{p}: cannot read (is {} the --out of a training run?)", dir.display()))?;
    let mut r = Reader { bytes: &bytes, pos: 0 };
    read_state(&mut r, c, weights).map_err(|e| anyhow!("{p}: {}", one_line(&e)))
}

/// An error and its causes on one line, outermost first.
fn one_line(e: &anyhow::Error) -> String {
    e.chain().map(|c| c.to_string()).collect::<Vec<_>>().join(": ")
}

fn read_state(r: &mut Reader, c: &Config, weights: &mut Weights) -> Result<Saved> {
    if r.bytes(8).ok() != Some(b"LIFTSTAT".as_slice()) {
        bail!("not a lift training state");
    }
    let hlen = r.len().context("the header length")?;
    let json = r.bytes(hlen).context("the header")?;
    let header: StateHeader =
        serde_json::from_slice(json).map_err(|e| anyhow!("corrupt header: {}", shorten(&e.to_string())))?;
    let step = header.step;
    let o = &header.options.method;
    let saved = saved_tensors(c, o.kind, &extra_params(c, o));
    check_tensor_list(&header.tensors, &saved, o.kind)?;
    for param in saved {
        let name = param.name();
        let dst = weights.get_mut(param);
        let values = r.f32s(dst.len()).with_context(|| format!("tensor {name}"))?;
        finite(&values, &format!("tensor {name}")).with_context(|| format!("saved at step {step}"))?;
        dst.copy_from_slice(&values);
    }
    let (trainable, extras) = read_optimizer(r, c, o).with_context(|| format!("saved at step {step}"))?;
    if r.pos != r.bytes.len() {
        bail!("{} bytes after the last record (corrupt, or not written by this lift)", r.bytes.len() - r.pos);
    }
    Ok(Saved { header, trainable, extras })
}

/// The header's tensor list is the one the header's method saves for this model.
fn check_tensor_list(names: &[String], saved: &[Param], kind: Method) -> Result<()> {
    if names.len() != saved.len() {
        bail!(
            "the header lists {} tensors, but a --method {kind:?} run of this model saves {} (another model, or corrupt)",
            names.len(),
            saved.len()
        );
    }
    if let Some((got, want)) = names.iter().zip(saved).find(|(n, p)| **n != p.name()) {
        bail!("the header lists tensor {} where {} belongs (another model, or corrupt)", plain(got), want.name());
    }
    Ok(())
}

/// Reads the optimizer records and the extras' states, each checked
/// against the size of its weight and the method the header names.
fn read_optimizer(r: &mut Reader, c: &Config, o: &MethodOptions) -> Result<(Trainable, Vec<DenseState>)> {
    let kind = r.bytes(1).context("the optimizer kind")?.first().copied().unwrap_or(u8::MAX);
    if kind != kind_byte(o.kind) {
        bail!("optimizer records of kind {kind}, but --method {:?} writes kind {}", o.kind, kind_byte(o.kind));
    }
    let count = r.len().context("the number of optimizer records")?;
    // One record per linear weight of this model: a state from another
    // model must fail here, not index out of bounds later.
    if count != c.n_layers * 7 {
        bail!("optimizer state for {count} linear weights, the model has {}", c.n_layers * 7);
    }
    let what = |id: usize| {
        let (l, w) = matrix(id);
        format!("optimizer record {id} ({})", w.hf_name(l))
    };
    let trainable = match kind {
        0 => Trainable::Sparse {
            states: (0..count).map(|id| sparse(r, c, id).with_context(|| what(id))).collect::<Result<_>>()?,
        },
        1 => Trainable::Full {
            states: (0..count).map(|id| dense(r, numel(c, id)).with_context(|| what(id))).collect::<Result<_>>()?,
        },
        2 | 3 => {
            let mut adapters = Vec::with_capacity(count);
            let mut states = Vec::with_capacity(count);
            let mut magnitudes = Vec::new();
            for id in 0..count {
                let (ad, sa, sb) = lora(r, c, id).with_context(|| what(id))?;
                if kind == 3 {
                    magnitudes.push(magnitude(r, ad.oc).with_context(|| what(id))?);
                }
                adapters.push(ad);
                states.push((sa, sb));
            }
            if kind == 3 {
                Trainable::Dora { adapters, states, magnitudes }
            } else {
                Trainable::Lora { adapters, states }
            }
        }
        k => bail!("unknown optimizer kind {k}"),
    };
    let n_extra = r.len().context("the number of extra tensors")?;
    let wanted = extra_params(c, o);
    if n_extra != wanted.len() {
        bail!("{n_extra} extra tensors' states, but the header's options train {}", wanted.len());
    }
    let extras = wanted
        .iter()
        .map(|p| {
            let n = p.shape(c).iter().product();
            dense(r, n).with_context(|| format!("the optimizer state of {}", p.name()))
        })
        .collect::<Result<_>>()?;
    Ok((trainable, extras))
}

/// The entries of linear weight `id`.
fn numel(c: &Config, id: usize) -> usize {
    let (out, inp) = matrix(id).1.shape(c);
    out * inp
}

/// A sparse record: the mask (ascending, unique, inside its weight) and its moments.
fn sparse(r: &mut Reader, c: &Config, id: usize) -> Result<SparseState> {
    let (out, inp) = matrix(id).1.shape(c);
    let k = r.len()?;
    if k > out * inp {
        bail!("a mask of {k} entries in a {out}x{inp} weight");
    }
    let indices = r.u32s(k)?;
    if indices.iter().any(|&i| i as usize >= out * inp) {
        bail!("the mask has an index beyond its {out}x{inp} weight");
    }
    if indices.windows(2).any(|p| p[0] >= p[1]) {
        bail!("the mask's indices are not ascending and unique");
    }
    let (m, v) = (r.f32s(k)?, r.f32s(k)?);
    moments(&m, &v)?;
    Ok(SparseState { indices, m, v })
}

/// A dense record of `n` entries (the length is checked before anything
/// is read).
fn dense(r: &mut Reader, n: usize) -> Result<DenseState> {
    let len = r.len()?;
    if len != n {
        bail!("a state of {len} values for a tensor of {n}");
    }
    let (m, v) = (r.f32s(n)?, r.f32s(n)?);
    moments(&m, &v)?;
    Ok(DenseState { m, v })
}

/// A LoRA record: the adapter (rank at most its weight's smaller side,
/// finite values) and the states of A and B.
/// DoRA's magnitude after its LoRA record: m (OC), finite, and its state.
fn magnitude(r: &mut Reader, oc: usize) -> Result<Magnitude> {
    let n = r.len()?;
    if n != oc {
        bail!("a magnitude of {n} values for a weight of {oc} rows");
    }
    let m = r.f32s(n)?;
    finite(&m, "the magnitude")?;
    let state = dense(r, oc).context("the state of the magnitude")?;
    Ok(Magnitude { m, state })
}

fn lora(r: &mut Reader, c: &Config, id: usize) -> Result<(Adapter, DenseState, DenseState)> {
    let (rank, oc, ic) = (r.len()?, r.len()?, r.len()?);
    let (want_oc, want_ic) = matrix(id).1.shape(c);
    if (oc, ic) != (want_oc, want_ic) {
        bail!("an adapter of {oc}x{ic} for a {want_oc}x{want_ic} weight");
    }
    if rank == 0 || rank > oc.min(ic) {
        bail!("an adapter of rank {rank} for a {oc}x{ic} weight");
    }
    let scale = r.f32s(1)?.first().copied().unwrap_or(f32::NAN);
    let (a, b) = (r.f32s(rank * ic)?, r.f32s(oc * rank)?);
    finite(&[scale], "the adapter's scale")?;
    finite(&a, "the adapter's A")?;
    finite(&b, "the adapter's B")?;
    let sa = dense(r, rank * ic).context("the state of A")?;
    let sb = dense(r, oc * rank).context("the state of B")?;
    Ok((Adapter { r: rank, oc, ic, scale, a, b }, sa, sb))
}

/// Every value of `what` finite; the error gives the first one that is not.
fn finite(xs: &[f32], what: &str) -> Result<()> {
    match xs.iter().position(|x| !x.is_finite()) {
        None => Ok(()),
        Some(i) => bail!("{what} holds {} at index {i} of {}", xs[i], xs.len()),
    }
}

/// AdamW moments as a step leaves them: finite, the second not negative.
fn moments(m: &[f32], v: &[f32]) -> Result<()> {
    finite(m, "the first moment")?;
    finite(v, "the second moment")?;
    if let Some(i) = v.iter().position(|&x| x < 0.0) {
        bail!("the second moment is negative ({}) at index {i}", v[i]);
    }
    Ok(())
}

/// Reads little-endian values from a byte buffer; a read past the end is
/// an error that says where, and a length is checked against the bytes
/// left before anything is allocated for it.
struct Reader<'a> {
    bytes: &'a [u8],
    pos: usize,
}

impl Reader<'_> {
    fn bytes(&mut self, n: usize) -> Result<&[u8]> {
        let left = self.bytes.len() - self.pos;
        if n > left {
            bail!("truncated: {n} bytes needed at offset {}, {left} left in the file", self.pos);
        }
        let s = &self.bytes[self.pos..self.pos + n];
        self.pos += n;
        Ok(s)
    }
    fn len(&mut self) -> Result<usize> {
        let at = self.pos;
        let b = self.bytes(8)?;
        let n = u64::from_le_bytes([b[0], b[1], b[2], b[3], b[4], b[5], b[6], b[7]]);
        usize::try_from(n).map_err(|_| anyhow!("corrupt length {n} at offset {at}"))
    }
    fn words(&mut self, n: usize) -> Result<&[u8]> {
        let bytes = n.checked_mul(4).ok_or_else(|| anyhow!("corrupt length {n} at offset {}", self.pos))?;
        self.bytes(bytes)
    }
    fn f32s(&mut self, n: usize) -> Result<Vec<f32>> {
        Ok(self.words(n)?.chunks_exact(4).map(|c| f32::from_le_bytes([c[0], c[1], c[2], c[3]])).collect())
    }
    fn u32s(&mut self, n: usize) -> Result<Vec<u32>> {
        Ok(self.words(n)?.chunks_exact(4).map(|c| u32::from_le_bytes([c[0], c[1], c[2], c[3]])).collect())
    }
}
