//! The CUDA backend: the same Llama, LIFT selection and optimizers as the CPU
//! path, on an NVIDIA GPU. Weights and activations are bf16 on the device;
//! every sum, norm, softmax and loss is f32; GEMMs are cuBLAS with f32
//! compute. The CPU path (`cpu.rs`, `model.rs`, `lift.rs`, `optim.rs`) is the
//! reference each piece here is checked against (`lift gpu-check`).
//!
//!   gpu.rs        loading the libraries, context, buffers, launches, GEMMs
//!   kernels.rs    the CUDA C of kernels/*.cu and its NVRTC compilation
//!   launch.rs     one typed wrapper per kernel (shapes checked, then launched)
//!   attention.rs  the attention kernels a run uses: tensor cores once checked
//!   model.rs      GpuModel: Model::forward/backward, op for op, on the GPU
//!   select.rs     principal-weight selection (lift.rs) on the GPU
//!   train.rs      the methods' optimizer state and the training step / loop
//!   check.rs      `lift gpu-check`: every kernel and a LIFT step vs the CPU
//!
//! Kernels with a fast twin (attention: attention.cu, CUDA cores, any head
//! size; attention_tc.cu, tensor cores, head sizes 64 and 128) are picked at
//! run time (`Attention`); the plain one is the reference the fast one is
//! checked against, on the GPU before use (attention::self_check) and
//! against the CPU in gpu-check. tests/gpu/emu runs kernels on the CPU.

pub mod attention;
pub mod check;
pub mod gpu;
pub mod kernels;
pub mod launch;
pub mod model;
pub mod select;
pub mod train;

/// Where the numbers are computed (`--device`).
#[derive(Debug, Clone, Copy, PartialEq, Eq, clap::ValueEnum, serde::Serialize, serde::Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Device {
    /// CUDA when a usable GPU and the CUDA libraries are found, else CPU.
    Auto,
    Cpu,
    Cuda,
}

impl Device {
    /// Resolves `auto`; `cuda` is checked later, where the error can name
    /// the missing piece.
    pub fn resolve(self) -> Device {
        match self {
            Device::Auto if gpu::gpu_available() => Device::Cuda,
            Device::Auto => Device::Cpu,
            d => d,
        }
    }
}

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
