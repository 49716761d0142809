// adamw.cu: the optimizers of src/optim.rs on the GPU, and the gradient
// plumbing around them (gathering LIFT's selected entries out of a dense dW,
// the global gradient norm).
//
// For one entry with gradient g at step t (optim.rs, AdamW::update):
//   m <- b1 m + (1 - b1) g;  v <- b2 v + (1 - b2) g^2
//   w <- w - step_size * m / (sqrt(v) + eps);  w <- w - lr * wd * w
// with step_size = lr * sqrt(1 - b2^t) / (1 - b1^t) computed on the host.
// Weights live in bf16; the update is applied to an f32 master copy, which
// is then rounded into the bf16 weight, so small steps are not lost.

__device__ __forceinline__ void adamw_entry(float* w, float* m, float* v, float g, float lr, float b1, float b2,
                                            float eps, float wd, float step_size) {
    float mm = b1 * *m + (1.0f - b1) * g;
    float vv = b2 * *v + (1.0f - b2) * g * g;
    *m = mm;
    *v = vv;
    float x = *w - step_size * mm / (sqrtf(vv) + eps);
    *w = x - lr * wd * x;
}

// Mirrors optim::SparseState::step. LIFT's sparse AdamW over the k selected
// entries of one weight: idx (k) flat indices into weight (out*in, bf16);
// m, v, master (k) f32; g (k) f32 gradients, multiplied by gscale (gradient
// averaging and clipping folded in).
extern "C" __global__ void sparse_adamw(bf16* weight, const u32* idx, float* m, float* v, float* master, const float* g,
                                        i64 k, float gscale, float lr, float b1, float b2, float eps, float wd,
                                        float step_size) {
    for (i64 j = blockIdx.x * (i64)blockDim.x + threadIdx.x; j < k; j += (i64)gridDim.x * blockDim.x) {
        float w = master[j];
        adamw_entry(&w, &m[j], &v[j], g[j] * gscale, lr, b1, b2, eps, wd, step_size);
        master[j] = w;
        weight[idx[j]] = f2bf(w);
    }
}

// Mirrors optim::DenseState::step (the `full` baseline, and LoRA's A and B):
// every entry of a tensor of n values, with an f32 master copy.
extern "C" __global__ void adamw(bf16* weight, float* m, float* v, float* master, const float* g, i64 n, float gscale,
                                 float lr, float b1, float b2, float eps, float wd, float step_size) {
    for (i64 j = blockIdx.x * (i64)blockDim.x + threadIdx.x; j < n; j += (i64)gridDim.x * blockDim.x) {
        float w = master[j];
        adamw_entry(&w, &m[j], &v[j], g[j] * gscale, lr, b1, b2, eps, wd, step_size);
        master[j] = w;
        weight[j] = f2bf(w);
    }
}

// master (k) = weight[idx] in f32: the master copy of newly selected entries.
extern "C" __global__ void gather_bf16(float* master, const bf16* weight, const u32* idx, i64 k) {
    for (i64 j = blockIdx.x * (i64)blockDim.x + threadIdx.x; j < k; j += (i64)gridDim.x * blockDim.x)
        master[j] = bf2f(weight[idx[j]]);
}

// acc (k) += dw[idx]: the k selected entries of a weight gradient, as the
// CPU's sampled product computes them directly (cpu.rs
// matmul_backward_weight_sampled). dw (out*in, f32) is the one dense
// gradient buffer, reused matrix after matrix, and acc the k-sized
// accumulator of this matrix.
extern "C" __global__ void gather_add(float* acc, const float* dw, const u32* idx, i64 k) {
    for (i64 j = blockIdx.x * (i64)blockDim.x + threadIdx.x; j < k; j += (i64)gridDim.x * blockDim.x)
        acc[j] += dw[idx[j]];
}

// Per-block partial sums of g^2 in f64 (Grads::sum_sq), written to
// partial[blockIdx.x]; the host adds the partials in order, so the norm is
// the same from run to run. Launch with 256 threads.
extern "C" __global__ void sum_squares(double* partial, const float* g, i64 n) {
    __shared__ double scratch[32];
    double s = 0.0;
    for (i64 j = blockIdx.x * (i64)blockDim.x + threadIdx.x; j < n; j += (i64)gridDim.x * blockDim.x) {
        double x = g[j];
        s += x * x;
    }
    s = block_sum_f64(s, scratch);
    if (threadIdx.x == 0) partial[blockIdx.x] = s;
}
