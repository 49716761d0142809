// residual.cu: the residual stream's additions, and the dtype conversions
// that move values between the f32 host world and bf16 device storage.

// Mirrors `out.copy_from_slice(x); cpu::residual_forward(out, y)` in
// Model::forward: out (N, C) = x + y, in one pass; eight values per thread
// and step through 16-byte accesses, then the n % 8 left one by one (as in
// swiglu.cu).
extern "C" __global__ void residual_forward(bf16* out, const bf16* x, const bf16* y, i64 n) {
    i64 tid = blockIdx.x * (i64)blockDim.x + threadIdx.x, stride = (i64)gridDim.x * blockDim.x, n8 = n / 8;
    for (i64 v = tid; v < n8; v += stride) {
        float a[8], b[8];
        unpack8(((const u32x4*)x)[v], a);
        unpack8(((const u32x4*)y)[v], b);
#pragma unroll
        for (int e = 0; e < 8; e++) a[e] += b[e];
        ((u32x4*)out)[v] = pack8(a);
    }
    for (i64 i = n8 * 8 + tid; i < n; i += stride) out[i] = f2bf(bf2f(x[i]) + bf2f(y[i]));
}

// x (n) *= alpha, f32 (gradient averaging, LoRA's scale).
extern "C" __global__ void scale_f32(float* x, float alpha, i64 n) {
    for (i64 i = blockIdx.x * (i64)blockDim.x + threadIdx.x; i < n; i += (i64)gridDim.x * blockDim.x) x[i] *= alpha;
}

// x (n) *= alpha, bf16.
extern "C" __global__ void scale_bf16(bf16* x, float alpha, i64 n) {
    for (i64 i = blockIdx.x * (i64)blockDim.x + threadIdx.x; i < n; i += (i64)gridDim.x * blockDim.x)
        x[i] = f2bf(bf2f(x[i]) * alpha);
}

extern "C" __global__ void f32_to_bf16(bf16* out, const float* x, i64 n) {
    for (i64 i = blockIdx.x * (i64)blockDim.x + threadIdx.x; i < n; i += (i64)gridDim.x * blockDim.x) out[i] = f2bf(x[i]);
}

extern "C" __global__ void bf16_to_f32(float* out, const bf16* x, i64 n) {
    for (i64 i = blockIdx.x * (i64)blockDim.x + threadIdx.x; i < n; i += (i64)gridDim.x * blockDim.x) out[i] = bf2f(x[i]);
}

extern "C" __global__ void f32_to_f64(double* out, const float* x, i64 n) {
    for (i64 i = blockIdx.x * (i64)blockDim.x + threadIdx.x; i < n; i += (i64)gridDim.x * blockDim.x) out[i] = x[i];
}

extern "C" __global__ void bf16_to_f64(double* out, const bf16* x, i64 n) {
    for (i64 i = blockIdx.x * (i64)blockDim.x + threadIdx.x; i < n; i += (i64)gridDim.x * blockDim.x) out[i] = bf2f(x[i]);
}

extern "C" __global__ void f64_to_f32(float* out, const double* x, i64 n) {
    for (i64 i = blockIdx.x * (i64)blockDim.x + threadIdx.x; i < n; i += (i64)gridDim.x * blockDim.x) out[i] = (float)x[i];
}
