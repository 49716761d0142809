//! Optimizers: AdamW on the selected entries of a weight (LIFT's sparse
//! AdamW), on every entry (the `full` baseline), and the state bookkeeping of
//! a mask refresh.
//!
//! The update follows the paper's implementation (AdamW as in GaLore /
//! Hugging Face `transformers.AdamW`), for one entry with gradient g at step t:
//!   m <- b1 m + (1 - b1) g
//!   v <- b2 v + (1 - b2) g^2
//!   w <- w - lr * sqrt(1 - b2^t) / (1 - b1^t) * m / (sqrt(v) + eps)
//!   w <- w - lr * wd * w                       (decoupled weight decay)
//!
//! torch.optim.AdamW (which the authors' LoRA, DoRA and PiSSA scripts use)
//! adds eps to sqrt(v / (1 - b2^t)) instead, which is the update above with
//! eps * sqrt(1 - b2^t) in place of eps: `--adamw torch` runs that form.

use serde::{Deserialize, Serialize};

/// AdamW's hyperparameters; `lr` is the rate of the current step.
#[derive(Debug, Clone, Copy, PartialEq, Serialize, Deserialize)]
pub struct AdamW {
    pub lr: f32,
    pub beta1: f32,
    pub beta2: f32,
    pub eps: f32,
    pub weight_decay: f32,
    /// Where eps enters (see the module comment).
    pub form: EpsForm,
}

/// Where AdamW's eps enters (`--adamw`).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, Serialize, Deserialize, clap::ValueEnum)]
#[serde(rename_all = "lowercase")]
pub enum EpsForm {
    /// m / (sqrt(v) + eps) with the bias correction in the step size: Hugging
    /// Face's former transformers.AdamW, and LIFT's sparse AdamW.
    #[default]
    Hf,
    /// m_hat / (sqrt(v_hat) + eps): torch.optim.AdamW.
    Torch,
}

impl Default for AdamW {
    /// The paper's settings: betas (0.9, 0.95), eps 1e-6, no weight decay.
    fn default() -> AdamW {
        AdamW { lr: 2e-4, beta1: 0.9, beta2: 0.95, eps: 1e-6, weight_decay: 0.0, form: EpsForm::Hf }
    }
}

impl AdamW {
    /// lr * sqrt(1 - b2^t) / (1 - b1^t): the bias-corrected step size of step t >= 1.
    pub fn step_size(&self, t: u64) -> f32 {
        let bc1 = 1.0 - (self.beta1 as f64).powi(t as i32);
        let bc2 = 1.0 - (self.beta2 as f64).powi(t as i32);
        (self.lr as f64 * bc2.sqrt() / bc1) as f32
    }

    /// The eps of step t in the update's form m / (sqrt(v) + eps).
    pub fn eps_at(&self, t: u64) -> f32 {
        match self.form {
            EpsForm::Hf => self.eps,
            EpsForm::Torch => (self.eps as f64 * (1.0 - (self.beta2 as f64).powi(t as i32)).sqrt()) as f32,
        }
    }

    /// One AdamW update of a single entry.
    #[inline]
    fn update(&self, w: &mut f32, m: &mut f32, v: &mut f32, g: f32, step_size: f32, eps: f32) {
        *m = self.beta1 * *m + (1.0 - self.beta1) * g;
        *v = self.beta2 * *v + (1.0 - self.beta2) * g * g;
        *w -= step_size * *m / (v.sqrt() + eps);
        *w -= self.lr * self.weight_decay * *w;
    }
}

/// Sparse AdamW state of one weight matrix: the selected entries (flat
/// indices into the (out, in) matrix, ascending) and their moments. Nothing
/// is stored for the other entries, which never change.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct SparseState {
    pub indices: Vec<u32>, // (k)
    pub m: Vec<f32>,       // (k)
    pub v: Vec<f32>,       // (k)
}

impl SparseState {
    pub fn new(indices: Vec<u32>) -> SparseState {
        let k = indices.len();
        SparseState { indices, m: vec![0.0; k], v: vec![0.0; k] }
    }

    pub fn k(&self) -> usize {
        self.indices.len()
    }

    /// Sparse AdamW step t (t >= 1) of weight w with gradients g (k), one per
    /// selected entry in the order of `indices`.
    pub fn step(&mut self, opt: &AdamW, t: u64, w: &mut [f32], g: &[f32]) {
        assert_eq!(g.len(), self.k(), "sparse AdamW: one gradient per selected entry");
        let (step_size, eps) = (opt.step_size(t), opt.eps_at(t));
        for (j, &i) in self.indices.iter().enumerate() {
            opt.update(&mut w[i as usize], &mut self.m[j], &mut self.v[j], g[j], step_size, eps);
        }
    }

    /// Switches to a new mask (a refresh): entries selected before and after
    /// keep their m and v; newly selected entries start from zero.
    pub fn refresh(&mut self, new_indices: Vec<u32>) -> RefreshStats {
        let k = new_indices.len();
        let (mut m, mut v) = (vec![0.0; k], vec![0.0; k]);
        let pairs = refresh_pairs(&self.indices, &new_indices);
        for (j, &old) in pairs.iter().enumerate() {
            if let Some(i) = old {
                m[j] = self.m[i];
                v[j] = self.v[i];
            }
        }
        *self = SparseState { indices: new_indices, m, v };
        RefreshStats { kept: pairs.iter().flatten().count(), total: k }
    }

    /// Bytes of optimizer state (index, m, v per entry).
    pub fn bytes(&self) -> usize {
        self.k() * (4 + 4 + 4)
    }
}

/// The pairing of a mask refresh: for each entry j of the new mask, the
/// position in the old mask of the same index, if it was selected before.
/// Both index lists are ascending, so one merge pass pairs them up. Both
/// devices carry their state across a refresh by this pairing.
pub fn refresh_pairs(old: &[u32], new: &[u32]) -> Vec<Option<usize>> {
    let mut i = 0;
    new.iter()
        .map(|&idx| {
            while i < old.len() && old[i] < idx {
                i += 1;
            }
            (i < old.len() && old[i] == idx).then_some(i)
        })
        .collect()
}

/// How many selected entries survived a mask refresh.
#[derive(Debug, Clone, Copy, Default)]
pub struct RefreshStats {
    pub kept: usize,
    pub total: usize,
}

/// Dense AdamW state of one tensor (the `full` baseline).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct DenseState {
    pub m: Vec<f32>,
    pub v: Vec<f32>,
}

impl DenseState {
    pub fn new(n: usize) -> DenseState {
        DenseState { m: vec![0.0; n], v: vec![0.0; n] }
    }

    /// Dense AdamW step t (t >= 1) of w with gradient g, both of the tensor's size.
    pub fn step(&mut self, opt: &AdamW, t: u64, w: &mut [f32], g: &[f32]) {
        assert_eq!(w.len(), g.len());
        let (step_size, eps) = (opt.step_size(t), opt.eps_at(t));
        for i in 0..w.len() {
            opt.update(&mut w[i], &mut self.m[i], &mut self.v[i], g[i], step_size, eps);
        }
    }

    pub fn bytes(&self) -> usize {
        self.m.len() * 8
    }
}

/// Scale factor that brings the global L2 norm of the gradients down to
/// `max_norm` (1 when it is already below, or clipping is off).
pub fn clip_scale(sum_sq: f64, max_norm: f32) -> f32 {
    let norm = sum_sq.sqrt();
    if max_norm > 0.0 && norm > max_norm as f64 { (max_norm as f64 / (norm + 1e-6)) as f32 } else { 1.0 }
}
