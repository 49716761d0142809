// rmsnorm.cu: RMSNorm, forward and backward. One block per row of C values;
// the sums over the row are block reductions in f32.

// Mirrors cpu::rmsnorm_forward.
// inp is (N, C), weight is (C); out will be (N, C) and rstd (N) (f32).
// out = inp * rstd * weight with rstd = 1 / sqrt(mean(inp^2) + eps).
extern "C" __global__ void rmsnorm_forward(bf16* out, float* rstd, const bf16* inp, const bf16* weight, int c, float eps) {
    __shared__ float scratch[32];
    i64 row = blockIdx.x;
    const bf16* x = inp + row * c;
    float ss = 0.0f;
    for (int i = threadIdx.x; i < c; i += blockDim.x) {
        float v = bf2f(x[i]);
        ss += v * v;
    }
    ss = block_sum(ss, scratch);
    float s = rsqrtf(ss / c + eps);
    if (threadIdx.x == 0) rstd[row] = s;
    for (int i = threadIdx.x; i < c; i += blockDim.x) {
        out[row * c + i] = f2bf(bf2f(x[i]) * s * bf2f(weight[i]));
    }
}

// Mirrors cpu::rmsnorm_backward. With xhat = inp * rstd and g = dout * weight:
//   dinp += rstd * (g - xhat * mean(g * xhat)),  dweight += sum_n dout * xhat.
// dinp is (N, C) bf16, accumulated; dweight (C) f32 may be null (frozen
// norm), else it is accumulated with atomicAdd across rows.
extern "C" __global__ void rmsnorm_backward(bf16* dinp, float* dweight, const bf16* dout, const bf16* inp,
                                            const bf16* weight, const float* rstd, int c) {
    __shared__ float scratch[32];
    i64 row = blockIdx.x;
    const bf16* dy = dout + row * c;
    const bf16* x = inp + row * c;
    float s = rstd[row];
    float dot = 0.0f;
    for (int i = threadIdx.x; i < c; i += blockDim.x) {
        dot += bf2f(dy[i]) * bf2f(weight[i]) * bf2f(x[i]) * s;
    }
    float mean = block_sum(dot, scratch) / c;
    for (int i = threadIdx.x; i < c; i += blockDim.x) {
        float xhat = bf2f(x[i]) * s;
        i64 j = row * c + i;
        dinp[j] = f2bf(bf2f(dinp[j]) + s * (bf2f(dy[i]) * bf2f(weight[i]) - xhat * mean));
        if (dweight) atomicAdd(&dweight[i], bf2f(dy[i]) * xhat);
    }
}
