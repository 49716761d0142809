//! The GPU boundary: loading the CUDA libraries at run time, the context and
//! stream, device buffers, kernel launches and cuBLAS GEMMs. Every `unsafe`
//! block of the GPU path lives in this file or in `launch.rs`, each with the
//! reason it is sound.
//!
//! One stream, one context, one cuBLAS handle: every kernel and GEMM is
//! queued in order on the same stream, so the only synchronization needed is
//! before the host reads device memory (copies to the host synchronize).

use std::cell::{Cell, RefCell};
use std::collections::{BTreeMap, HashMap};
use std::sync::Arc;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::Instant;

use anyhow::{Context, Result, anyhow, bail};
use cudarc::cublas::sys as blas;
use cudarc::driver::{
    CudaContext, CudaEvent, CudaFunction, CudaSlice, CudaStream, DevicePtr, DeviceRepr, LaunchConfig, PushKernelArg,
};

use super::kernels;

/// Which attention kernels run (`--attention`).
#[derive(Debug, Clone, Copy, PartialEq, Eq, clap::ValueEnum, serde::Serialize, serde::Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Attention {
    /// Tensor cores where the head size allows (64, 128) and a quick check
    /// against the plain kernels passes, else plain.
    Auto,
    /// The tensor-core kernels (attention_tc.cu); an error if their check fails.
    Tc,
    /// The CUDA-core kernels (attention.cu).
    Plain,
}

/// bf16 values on the device are stored as their 16-bit patterns.
pub type Bf16 = u16;

/// Which libraries the GPU path needs, and whether each can be loaded. Asking
/// cudarc to load a missing library would panic; this asks first.
pub fn missing_libraries() -> Vec<&'static str> {
    let mut missing = Vec::new();
    // SAFETY: these functions only try to dlopen the library by name and
    // close it again; no symbol of it is called.
    unsafe {
        if !cudarc::driver::sys::is_culib_present() {
            missing.push("libcuda.so (the NVIDIA driver)");
        }
        if !cudarc::nvrtc::sys::is_culib_present() {
            missing.push("libnvrtc.so.13 (NVRTC, CUDA 13)");
        }
        if !cudarc::cublas::sys::is_culib_present() {
            missing.push("libcublas.so.13 (cuBLAS, CUDA 13)");
        }
    }
    missing
}

/// Checks that the CUDA libraries load and the driver sees a GPU, without
/// opening it: the one-line error names what is missing. Commands call it
/// before any work (`lift eval --device cuda` before loading the model).
pub fn probe() -> Result<()> {
    let missing = missing_libraries();
    if !missing.is_empty() {
        bail!(
            "--device cuda: cannot load {} (put the CUDA 13 libraries on LD_LIBRARY_PATH; see the README)",
            missing.join(", ")
        );
    }
    let count =
        CudaContext::device_count().map_err(|e| anyhow!("--device cuda: the CUDA driver found no GPU ({e})"))?;
    if count < 1 {
        bail!("--device cuda: the CUDA driver found no GPU");
    }
    Ok(())
}

/// Whether a usable GPU is present (for `--device auto`).
pub fn gpu_available() -> bool {
    // SAFETY: as in `missing_libraries`.
    if !unsafe { cudarc::driver::sys::is_culib_present() } {
        return false;
    }
    missing_libraries().is_empty() && CudaContext::device_count().map(|n| n > 0).unwrap_or(false)
}

// ----------------------------------------------------------------------------
// Device memory

static LIVE_BYTES: AtomicUsize = AtomicUsize::new(0);
static PEAK_BYTES: AtomicUsize = AtomicUsize::new(0);

/// Bytes of device memory held in `Buf`s now, and at most so far (the
/// analogue of torch.cuda.max_memory_allocated).
pub fn mem_live() -> usize {
    LIVE_BYTES.load(Ordering::Relaxed)
}
pub fn mem_peak() -> usize {
    PEAK_BYTES.load(Ordering::Relaxed)
}
pub fn reset_peak() {
    PEAK_BYTES.store(LIVE_BYTES.load(Ordering::Relaxed), Ordering::Relaxed);
}

/// A device array of `len` values of T. The raw address is read once at
/// allocation; kernels receive it as a u64.
pub struct Buf<T> {
    slice: CudaSlice<T>,
    ptr: u64,
    len: usize,
}

impl<T> Buf<T> {
    pub fn len(&self) -> usize {
        self.len
    }
    pub fn is_empty(&self) -> bool {
        self.len == 0
    }
    /// The device address of element 0.
    pub fn ptr(&self) -> u64 {
        self.ptr
    }
    /// The device address of element `i` (i <= len).
    pub fn at(&self, i: usize) -> u64 {
        assert!(i <= self.len, "device buffer index {i} past its length {}", self.len);
        self.ptr + (i * std::mem::size_of::<T>()) as u64
    }
    pub fn bytes(&self) -> usize {
        self.len * std::mem::size_of::<T>()
    }
}

impl<T> Drop for Buf<T> {
    fn drop(&mut self) {
        LIVE_BYTES.fetch_sub(self.bytes(), Ordering::Relaxed);
    }
}

// ----------------------------------------------------------------------------
// The context

/// Element types of GEMM operands.
#[derive(Clone, Copy, Debug, PartialEq)]
pub enum Dt {
    Bf16,
    F32,
    /// f32 operands multiplied on the tensor cores in TF32 (10-bit mantissa
    /// inputs, f32 sums): several times the f32 rate, for LIFT's sketches
    /// where --sketch tf32 asks for it. Only as the operand type `ab`.
    Tf32,
}

/// A kernel argument: device addresses and scalars.
#[derive(Clone, Copy, Debug)]
pub enum Arg {
    Ptr(u64),
    I32(i32),
    I64(i64),
    U32(u32),
    U64(u64),
    F32(f32),
}

pub struct Gpu {
    pub ctx: Arc<CudaContext>,
    pub stream: Arc<CudaStream>,
    blas: cudarc::cublas::CudaBlas,
    functions: HashMap<&'static str, CudaFunction>,
    pub name: String,
    pub cc: (i32, i32),
    pub compile_s: f64,
    /// Tc or Plain (never Auto): which attention kernels launch.rs runs.
    attention: Cell<Attention>,
    /// `Some` while op timing is on (`lift bench --profile`).
    profile: RefCell<Option<Profiler>>,
    /// Whether the tensor-core dk/dv kernel splits a kv head's group into
    /// one block per query head (attention_tc.cu), the default, or walks
    /// the whole group in one block (LIFT_DKDV=group; for comparisons).
    dkdv_per_head: Cell<bool>,
    /// The per-head parts of dk and dv for that split (f32), made on first
    /// use and grown for larger shapes.
    attention_parts: RefCell<Option<(Buf<f32>, Buf<f32>)>>,
}

/// Op timing with CUDA events: `Gpu::timed` records an event before and after
/// the work it wraps, under the name of its op class; `Gpu::take_profile`
/// waits for the GPU and sums the elapsed times per class. The events are
/// kept and reused, so a profiled step allocates nothing. Spans must not nest
/// (a nested span's time would be counted twice).
struct Profiler {
    pool: Vec<(CudaEvent, CudaEvent)>,
    spans: Vec<&'static str>, // span i used pool[i]
    /// Host-measured seconds per class (work done on the CPU, e.g. the
    /// eigenproblems of the mask selection), added by `add_host_time`.
    host: BTreeMap<&'static str, f64>,
}

/// One op class of a profile: GPU milliseconds and the number of spans.
#[derive(Clone, Debug, Default)]
pub struct ProfileRow {
    pub ms: f64,
    pub calls: usize,
    /// Measured on the host (not GPU time; may overlap GPU work).
    pub host: bool,
}

impl Gpu {
    /// Opens GPU 0: loads the libraries, creates the context, compiles every
    /// kernel with NVRTC for the GPU's compute capability (once per run) and
    /// loads them. Any missing piece is an error naming it.
    pub fn new() -> Result<Gpu> {
        probe()?;
        let ctx = CudaContext::new(0).map_err(|e| anyhow!("--device cuda: cannot open GPU 0: {e}"))?;
        // One stream carries all work in order, so cudarc's per-buffer event
        // tracking (for multi-stream use) is pure overhead here.
        // SAFETY: no buffer is ever used from a second stream.
        unsafe { ctx.disable_event_tracking() };
        let stream = ctx.default_stream();
        let name = ctx.name().unwrap_or_else(|_| "unknown GPU".into());
        let cc = ctx.compute_capability().map_err(|e| anyhow!("--device cuda: {e}"))?;
        let blas =
            cudarc::cublas::CudaBlas::new(stream.clone()).map_err(|e| anyhow!("--device cuda: cuBLAS: {e:?}"))?;
        let t0 = Instant::now();
        let arch = kernels::arch_name(cc.0, cc.1);
        let mut functions = HashMap::new();
        for file in kernels::FILES {
            let ptx = kernels::compile(file, arch).with_context(|| format!("kernels/{}", file.name))?;
            let module =
                ctx.load_module(ptx).map_err(|e| anyhow!("kernels/{}: cannot load the module: {e}", file.name))?;
            for &f in file.functions {
                let func =
                    module.load_function(f).map_err(|e| anyhow!("kernels/{}: no function {f}: {e}", file.name))?;
                functions.insert(f, func);
            }
        }
        let compile_s = t0.elapsed().as_secs_f64();
        // LIFT_ATTENTION=plain forces the CUDA-core kernels from the start
        // (for `lift train`, whose options live elsewhere).
        let attention = match std::env::var("LIFT_ATTENTION").as_deref() {
            Ok("plain") => Attention::Plain,
            _ => Attention::Tc,
        };
        let dkdv_per_head = std::env::var("LIFT_DKDV").as_deref() != Ok("group");
        Ok(Gpu {
            ctx,
            stream,
            blas,
            functions,
            name,
            cc,
            compile_s,
            attention: Cell::new(attention),
            profile: RefCell::new(None),
            dkdv_per_head: Cell::new(dkdv_per_head),
            attention_parts: RefCell::new(None),
        })
    }

    /// Whether the tensor-core dk/dv kernel runs one block per query head.
    pub fn dkdv_per_head(&self) -> bool {
        self.dkdv_per_head.get()
    }

    /// Sets how the tensor-core dk/dv kernel splits its work (gpu-check runs both).
    pub fn set_dkdv_per_head(&self, per_head: bool) {
        self.dkdv_per_head.set(per_head);
    }

    /// Device addresses of two f32 buffers of at least n values each, the
    /// per-head parts of dk and dv: made on first use, remade larger when a
    /// shape needs more, else reused (their contents are scratch).
    pub fn attention_parts(&self, n: usize) -> Result<(u64, u64)> {
        let mut parts = self.attention_parts.borrow_mut();
        if parts.as_ref().is_none_or(|(k, _)| k.len() < n) {
            *parts = None; // the old pair goes first
            *parts = Some((self.zeros(n)?, self.zeros(n)?));
        }
        let (k, v) = parts.as_ref().expect("made above");
        Ok((k.ptr(), v.ptr()))
    }

    /// The attention kernels in use (Tc or Plain).
    pub fn attention(&self) -> Attention {
        self.attention.get()
    }

    /// Selects the attention kernels (Auto counts as Tc); see attention::choose.
    pub fn set_attention(&self, a: Attention) {
        self.attention.set(if a == Attention::Plain { Attention::Plain } else { Attention::Tc });
    }

    // ------------------------------------------------------------------------
    // Profiling

    /// Turns op timing on (`lift bench --profile`).
    pub fn enable_profiling(&self) {
        *self.profile.borrow_mut() = Some(Profiler { pool: Vec::new(), spans: Vec::new(), host: BTreeMap::new() });
    }

    pub fn profiling(&self) -> bool {
        self.profile.borrow().is_some()
    }

    /// Runs `f`, which queues GPU work, and when profiling counts the GPU time
    /// of that work under `name`. Without profiling it is just `f()`.
    pub fn timed<T>(&self, name: &'static str, f: impl FnOnce() -> Result<T>) -> Result<T> {
        if !self.profiling() {
            return f();
        }
        // The borrow ends before f runs, so f may time work of its own.
        let i = {
            let mut p = self.profile.borrow_mut();
            let p = p.as_mut().expect("profiling is on");
            let i = p.spans.len();
            if i == p.pool.len() {
                let timing = Some(cudarc::driver::sys::CUevent_flags::CU_EVENT_DEFAULT);
                let a = self.ctx.new_event(timing).map_err(|e| anyhow!("CUDA event: {e}"))?;
                let b = self.ctx.new_event(timing).map_err(|e| anyhow!("CUDA event: {e}"))?;
                p.pool.push((a, b));
            }
            p.spans.push(name);
            p.pool[i].0.record(&self.stream).map_err(|e| anyhow!("CUDA event: {e}"))?;
            i
        };
        let r = f();
        if let Some(p) = self.profile.borrow().as_ref() {
            p.pool[i].1.record(&self.stream).map_err(|e| anyhow!("CUDA event: {e}"))?;
        }
        r
    }

    /// Adds host-measured seconds to a class of the profile (when profiling).
    pub fn add_host_time(&self, name: &'static str, seconds: f64) {
        if let Some(p) = self.profile.borrow_mut().as_mut() {
            *p.host.entry(name).or_insert(0.0) += seconds;
        }
    }

    /// Waits for the GPU and returns the time per op class since the last
    /// call (empty without profiling), then starts over.
    pub fn take_profile(&self) -> Result<BTreeMap<&'static str, ProfileRow>> {
        self.sync()?;
        let mut out = BTreeMap::new();
        let mut p = self.profile.borrow_mut();
        let Some(p) = p.as_mut() else { return Ok(out) };
        for (i, &name) in p.spans.iter().enumerate() {
            let (a, b) = &p.pool[i];
            let ms = a.elapsed_ms(b).map_err(|e| anyhow!("CUDA event: {e}"))? as f64;
            let row: &mut ProfileRow = out.entry(name).or_default();
            row.ms += ms;
            row.calls += 1;
        }
        for (&name, &s) in &p.host {
            out.insert(name, ProfileRow { ms: s * 1e3, calls: 1, host: true });
        }
        p.spans.clear();
        p.host.clear();
        Ok(out)
    }

    /// A zeroed device array.
    pub fn zeros<T: DeviceRepr + cudarc::driver::ValidAsZeroBits>(&self, len: usize) -> Result<Buf<T>> {
        let slice = self
            .stream
            .alloc_zeros::<T>(len.max(1))
            .map_err(|e| anyhow!("GPU out of memory? allocating {} bytes: {e}", len * std::mem::size_of::<T>()))?;
        let (ptr, _) = slice.device_ptr(&self.stream);
        let buf = Buf { slice, ptr, len };
        let live = LIVE_BYTES.fetch_add(buf.bytes(), Ordering::Relaxed) + buf.bytes();
        PEAK_BYTES.fetch_max(live, Ordering::Relaxed);
        Ok(buf)
    }

    /// A device copy of a host slice.
    pub fn upload<T: DeviceRepr + cudarc::driver::ValidAsZeroBits>(&self, host: &[T]) -> Result<Buf<T>> {
        let mut b = self.zeros::<T>(host.len())?;
        self.write(&mut b, 0, host)?;
        Ok(b)
    }

    /// dst[offset..offset + host.len()] = host.
    pub fn write<T: DeviceRepr>(&self, dst: &mut Buf<T>, offset: usize, host: &[T]) -> Result<()> {
        if host.is_empty() {
            return Ok(());
        }
        assert!(offset + host.len() <= dst.len, "write past the end of a device buffer");
        let mut view = dst.slice.slice_mut(offset..offset + host.len());
        self.stream.memcpy_htod(host, &mut view).map_err(|e| anyhow!("copy to GPU: {e}"))?;
        Ok(())
    }

    /// The first `n` values of a device array, on the host (synchronizes).
    pub fn download<T: DeviceRepr + Default + Clone>(&self, src: &Buf<T>, n: usize) -> Result<Vec<T>> {
        assert!(n <= src.len, "download past the end of a device buffer");
        let mut out = vec![T::default(); n];
        if n > 0 {
            self.stream.memcpy_dtoh(&src.slice.slice(0..n), &mut out).map_err(|e| anyhow!("copy from GPU: {e}"))?;
        }
        Ok(out)
    }

    /// buf[..] = 0, asynchronously.
    pub fn zero<T: DeviceRepr>(&self, buf: &mut Buf<T>) -> Result<()> {
        self.zero_range(buf, 0, buf.len)
    }

    pub fn zero_range<T: DeviceRepr>(&self, buf: &mut Buf<T>, offset: usize, n: usize) -> Result<()> {
        assert!(offset + n <= buf.len, "zero past the end of a device buffer");
        if n == 0 {
            return Ok(());
        }
        let bytes = n * std::mem::size_of::<T>();
        // SAFETY: the range lies inside the allocation (asserted above), and
        // the memset is queued on the one stream that every access uses.
        unsafe { cudarc::driver::result::memset_d8_async(buf.at(offset), 0, bytes, self.stream.cu_stream()) }
            .map_err(|e| anyhow!("memset: {e}"))?;
        Ok(())
    }

    /// Copies n values between device arrays, asynchronously.
    pub fn copy<T>(&self, dst: &mut Buf<T>, dst_off: usize, src: &Buf<T>, src_off: usize, n: usize) -> Result<()> {
        assert!(dst_off + n <= dst.len && src_off + n <= src.len, "copy past the end of a device buffer");
        if n == 0 {
            return Ok(());
        }
        // SAFETY: both ranges lie inside their allocations (asserted above);
        // `dst` is borrowed mutably, so it is not `src`.
        unsafe {
            cudarc::driver::result::memcpy_dtod_async(
                dst.at(dst_off),
                src.at(src_off),
                n * std::mem::size_of::<T>(),
                self.stream.cu_stream(),
            )
        }
        .map_err(|e| anyhow!("device copy: {e}"))?;
        Ok(())
    }

    pub fn sync(&self) -> Result<()> {
        self.stream.synchronize().map_err(|e| anyhow!("GPU error: {e}"))
    }

    /// Free and total device memory as the driver sees it.
    pub fn mem_info(&self) -> (usize, usize) {
        self.ctx.mem_get_info().unwrap_or((0, 0))
    }

    /// Queues kernel `name` on the stream. Only the typed wrappers of
    /// launch.rs call this; they check the buffer sizes against the shapes.
    pub(super) fn launch(&self, name: &str, grid: (u32, u32, u32), block: u32, args: &[Arg]) -> Result<()> {
        let f = self.functions.get(name).ok_or_else(|| anyhow!("kernel {name} is not loaded"))?;
        if grid.0 == 0 || grid.1 == 0 || grid.2 == 0 {
            return Ok(());
        }
        let mut b = self.stream.launch_builder(f);
        for a in args {
            match a {
                Arg::Ptr(p) => b.arg(p),
                Arg::I32(x) => b.arg(x),
                Arg::I64(x) => b.arg(x),
                Arg::U32(x) => b.arg(x),
                Arg::U64(x) => b.arg(x),
                Arg::F32(x) => b.arg(x),
            };
        }
        let cfg = LaunchConfig { grid_dim: grid, block_dim: (block, 1, 1), shared_mem_bytes: 0 };
        // SAFETY: the argument list matches the kernel's C signature (each
        // typed wrapper in launch.rs is written against its kernel), every
        // pointer is the address of a live Buf whose length the wrapper has
        // checked against the extents the kernel will touch, and `args`
        // outlives the launch call that copies the argument values.
        unsafe { b.launch(cfg) }.map_err(|e| anyhow!("launching {name}: {e}"))?;
        Ok(())
    }

    /// Row-major GEMM: C (m, n) = alpha op(A) op(B) + beta C, where A is
    /// stored (m, k), or (k, m) when `ta`; B is stored (k, n), or (n, k) when
    /// `tb`. A and B have type `ab`, C type `ct`; compute is f32.
    ///
    /// cuBLAS is column-major, and a row-major (r, c) array is the
    /// column-major (c, r) array of its transpose, so C^T = op(B)^T op(A)^T
    /// is asked for: the operands swap places and keep their own flags.
    #[allow(clippy::too_many_arguments)]
    pub fn gemm(
        &self,
        ta: bool,
        tb: bool,
        m: usize,
        n: usize,
        k: usize,
        alpha: f32,
        a: u64,
        b: u64,
        beta: f32,
        c: u64,
        ab: Dt,
        ct: Dt,
    ) -> Result<()> {
        if m == 0 || n == 0 {
            return Ok(());
        }
        let dt = |d: Dt| match d {
            Dt::Bf16 => blas::cudaDataType::CUDA_R_16BF,
            Dt::F32 | Dt::Tf32 => blas::cudaDataType::CUDA_R_32F,
        };
        // bf16 operands with f32 compute run on the tensor cores (f32
        // accumulation); f32 operands on the CUDA cores unless TF32 is asked for.
        let compute = match ab {
            Dt::Tf32 => blas::cublasComputeType_t::CUBLAS_COMPUTE_32F_FAST_TF32,
            _ => blas::cublasComputeType_t::CUBLAS_COMPUTE_32F,
        };
        assert!(ct != Dt::Tf32, "Dt::Tf32 is an operand type, not an output type");
        let op = |t: bool| if t { blas::cublasOperation_t::CUBLAS_OP_T } else { blas::cublasOperation_t::CUBLAS_OP_N };
        let lda = if ta { m } else { k };
        let ldb = if tb { k } else { n };
        // SAFETY: the callers (GpuModel, the LIFT selection, the checks) pass
        // addresses of Bufs sized for these shapes; the handle is bound to
        // our stream, so the product is ordered with every other access.
        unsafe {
            cudarc::cublas::result::gemm_ex(
                *self.blas.handle(),
                op(tb),
                op(ta),
                n as i32,
                m as i32,
                k as i32,
                &alpha as *const f32 as *const _,
                b as *const _,
                dt(ab),
                ldb as i32,
                a as *const _,
                dt(ab),
                lda as i32,
                &beta as *const f32 as *const _,
                c as *mut _,
                dt(ct),
                n as i32,
                compute,
                blas::cublasGemmAlgo_t::CUBLAS_GEMM_DEFAULT,
            )
        }
        .map_err(|e| anyhow!("cuBLAS GEMM ({m}x{n}x{k}): {e:?}"))
    }

    /// The same in f64 (the Gram matrices of LIFT's orthonormalization).
    #[allow(clippy::too_many_arguments)]
    pub fn dgemm(&self, ta: bool, tb: bool, m: usize, n: usize, k: usize, a: u64, b: u64, c: u64) -> Result<()> {
        if m == 0 || n == 0 {
            return Ok(());
        }
        let op = |t: bool| if t { blas::cublasOperation_t::CUBLAS_OP_T } else { blas::cublasOperation_t::CUBLAS_OP_N };
        let (alpha, beta) = (1.0f64, 0.0f64);
        let lda = if ta { m } else { k };
        let ldb = if tb { k } else { n };
        // SAFETY: as in `gemm`.
        unsafe {
            cudarc::cublas::result::gemm_ex(
                *self.blas.handle(),
                op(tb),
                op(ta),
                n as i32,
                m as i32,
                k as i32,
                &alpha as *const f64 as *const _,
                b as *const _,
                blas::cudaDataType::CUDA_R_64F,
                ldb as i32,
                a as *const _,
                blas::cudaDataType::CUDA_R_64F,
                lda as i32,
                &beta as *const f64 as *const _,
                c as *mut _,
                blas::cudaDataType::CUDA_R_64F,
                n as i32,
                blas::cublasComputeType_t::CUBLAS_COMPUTE_64F,
                blas::cublasGemmAlgo_t::CUBLAS_GEMM_DEFAULT,
            )
        }
        .map_err(|e| anyhow!("cuBLAS DGEMM ({m}x{n}x{k}): {e:?}"))
    }
}
