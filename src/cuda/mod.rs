//! The CUDA backend: the same Llama, LIFT selection and optimizers as the CPU
//! path, on an NVIDIA GPU. Weights and activations are bf16 on the device;
//! every sum, norm, softmax and loss is f32; GEMMs are cuBLAS with f32
//! compute. The CPU path (`cpu.rs`, `model.rs`, `select.rs`, `optim.rs`) is the
//! reference each piece here is checked against (`lift gpu-check`).
//!
//!   gpu.rs        loading the libraries, context, buffers, launches, GEMMs
//!   kernels.rs    the CUDA C of kernels/*.cu and its NVRTC compilation
//!   launch.rs     one typed wrapper per kernel (shapes checked, then launched)
//!   attention.rs  the attention kernels a run uses: tensor cores once checked
//!   model.rs      GpuModel: Model::forward/backward, op for op, on the GPU
//!   select.rs     principal-weight selection (../select.rs) on the GPU
//!   trainer.rs    GpuTrainer: the methods' state on the device, one training step
//!   check.rs      `lift gpu-check`: every kernel and a LIFT step vs the CPU
//!                 (a leaf: nothing imports it)
//!
//! Kernels with a fast twin (attention: attention.cu, CUDA cores, any head
//! size; attention_tc.cu, tensor cores, head sizes 64 and 128) are picked at
//! run time (`gpu::Attention`); the plain one is the reference the fast one is
//! checked against, on the GPU before use (attention::self_check) and
//! against the CPU in gpu-check. tests/gpu/emu runs kernels on the CPU.

pub mod attention;
pub mod check;
pub mod gpu;
pub mod infer;
pub mod kernels;
pub mod launch;
pub mod model;
pub mod select;
pub mod trainer;

use anyhow::Result;

use crate::options::Device;
use gpu::{Attention, Gpu};

/// Resolves `--device auto`: CUDA when a GPU and the libraries are found.
/// `cuda` is checked when the GPU is opened, where the error can name the
/// missing piece.
pub fn resolve(d: Device) -> Device {
    match d {
        Device::Auto if gpu::gpu_available() => Device::Cuda,
        Device::Auto => Device::Cpu,
        d => d,
    }
}

/// Opens the GPU: loads the libraries, compiles the kernels with NVRTC for
/// the card found, and says which card it is.
pub fn open() -> Result<Gpu> {
    let g = Gpu::new()?;
    eprintln!("device: {} (sm_{}{}), kernels compiled in {:.2}s", g.name, g.cc.0, g.cc.1, g.compile_s);
    Ok(g)
}

/// Opens the GPU for a run and picks its attention kernels
/// (attention::choose); LIFT_ATTENTION=plain in the environment makes
/// `auto` mean plain.
pub fn open_with_attention(requested: Attention) -> Result<(Gpu, Attention)> {
    let g = open()?;
    let wanted =
        if requested == Attention::Auto && g.attention() == Attention::Plain { Attention::Plain } else { requested };
    let chosen = attention::choose(&g, wanted)?;
    Ok((g, chosen))
}

/// The GPU for `lift train --device cuda`, with the attention kernels chosen.
pub fn open_for_training() -> Result<Gpu> {
    Ok(open_with_attention(Attention::Auto)?.0)
}
