//! What a device provides to the training loop: a model with a method's
//! trainable state, taking optimizer steps. `CpuTrainer` (cpu_trainer.rs)
//! and `GpuTrainer` (cuda/trainer.rs) implement it; the loop (train.rs) is
//! written once against it.

use anyhow::Result;

use crate::data::Batch;
use crate::formats::state::StateSource;
use crate::optim::RefreshStats;

/// What one optimizer step did.
#[derive(Debug, Clone, Copy, Default)]
pub struct StepStats {
    /// Mean of the micro-batches' losses.
    pub loss: f32,
    /// Global L2 norm of the averaged gradient, before clipping.
    pub grad_norm: f64,
    pub tokens: usize,
    pub forward_ms: f64,
    pub backward_ms: f64,
    pub optimizer_ms: f64,
}

/// A model on one device with a method's trainable state. `tensor` (from
/// `StateSource`) gives one tensor's f32 values with the training applied
/// (LoRA merged): what model.bin and state.bin get.
pub trait Trainer: StateSource {
    /// One optimizer step t (1-based) over the micro-batches at learning
    /// rate `lr`: forward and backward of each, gradients averaged and
    /// clipped by global norm, then AdamW. A non-finite loss or gradient is
    /// an error returned before anything is updated, so the weights stay
    /// those of the last good step.
    fn step(&mut self, batches: &[Batch], lr: f32, t: u64) -> Result<StepStats>;

    /// New masks from the current weights (sparse methods; round counts the
    /// refreshes): how many selected entries kept their optimizer state.
    fn refresh_masks(&mut self, round: u64) -> Result<RefreshStats>;

    /// Mean validation loss, weighted by loss tokens (`data::mean_loss`).
    fn eval_loss(&mut self, batches: &[Batch]) -> Result<f32>;

    /// Trained values in the linear layers (selected entries, or adapter values).
    fn trainable_count(&self) -> usize;

    /// Bytes of optimizer state (moments, indices, f32 masters, adapters).
    fn state_bytes(&self) -> usize;

    /// Bytes of gradient accumulators and gradient scratch.
    fn grad_bytes(&self) -> usize;

    /// Peak device memory, for a trainer on a GPU.
    fn device_peak_bytes(&self) -> Option<u64>;

    /// Host bytes of the weights (the model's, and a frozen base copy where
    /// a method keeps one) and of the activation buffers, for a trainer on
    /// the CPU: the parts of its resident memory besides state and gradients.
    fn host_parts(&self) -> Option<(usize, usize)>;
}
