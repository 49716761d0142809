// common.cuh: what every kernel file shares. lift prepends this text to each
// kernels/*.cu before NVRTC compiles it, so the kernels need no CUDA headers
// at all (no cuda_bf16.h): bf16 is a 16-bit integer here, converted by hand.
//
// Conventions, as in src/cpu.rs: row-major buffers; B batch, T time, C model
// dim, NH query heads, KVH key/value heads, HS head size, F FFN dim, V vocab,
// N = B*T rows. Storage is bf16 for weights and activations; every sum,
// norm, softmax and loss is computed in f32.

typedef unsigned short bf16;
typedef unsigned int u32;
typedef unsigned long long u64;
typedef long long i64;

#define NEG_INF (__int_as_float(0xff800000))

// bf16 -> f32 is exact: the bf16 bits are the top half of the f32.
__device__ __forceinline__ float bf2f(bf16 x) { return __uint_as_float(((u32)x) << 16); }

// f32 -> bf16 rounds to nearest, ties to even (what `half::bf16::from_f32`
// and PyTorch do); NaN stays NaN.
__device__ __forceinline__ bf16 f2bf(float f) {
    u32 u = __float_as_uint(f);
    if ((u & 0x7fffffffu) > 0x7f800000u) return (bf16)((u >> 16) | 0x40u);
    u += 0x7fffu + ((u >> 16) & 1u);
    return (bf16)(u >> 16);
}

// Eight bf16 in 16 bytes: the unit of the vectorized elementwise kernels and
// of the tensor-core kernels' tile copies.
struct __align__(16) u32x4 {
    u32 x, y, z, w;
};

// f[0..8] = the eight bf16 of v, in memory order (low half of x first).
__device__ __forceinline__ void unpack8(const u32x4 v, float* f) {
    const u32 w[4] = {v.x, v.y, v.z, v.w};
#pragma unroll
    for (int i = 0; i < 4; i++) {
        f[2 * i] = __uint_as_float(w[i] << 16);
        f[2 * i + 1] = __uint_as_float(w[i] & 0xffff0000u);
    }
}

// The inverse: eight floats rounded to bf16 (f2bf) and packed.
__device__ __forceinline__ u32x4 pack8(const float* f) {
    u32 w[4];
#pragma unroll
    for (int i = 0; i < 4; i++) w[i] = (u32)f2bf(f[2 * i]) | ((u32)f2bf(f[2 * i + 1]) << 16);
    return u32x4{w[0], w[1], w[2], w[3]};
}

// The attention kernels' packed batches: seg0 (B, T) holds, for each
// position, the position in its row where its example starts (attention.cu,
// attention_tc.cu); null means whole rows. Rows past T read the last one's.
__device__ __forceinline__ int seg_start(const int* seg0, int b, int t, int T) {
    return seg0 ? seg0[(i64)b * T + min(t, T - 1)] : 0;
}

__device__ __forceinline__ float warp_sum(float v) {
    for (int o = 16; o > 0; o >>= 1) v += __shfl_xor_sync(0xffffffffu, v, o);
    return v;
}

__device__ __forceinline__ float warp_max(float v) {
    for (int o = 16; o > 0; o >>= 1) v = fmaxf(v, __shfl_xor_sync(0xffffffffu, v, o));
    return v;
}

// Sum over the block (blockDim.x a multiple of 32, at most 1024). Every
// thread gets the result. `scratch` is 32 floats of shared memory.
__device__ __forceinline__ float block_sum(float v, float* scratch) {
    int lane = threadIdx.x & 31, warp = threadIdx.x >> 5, nwarps = blockDim.x >> 5;
    v = warp_sum(v);
    __syncthreads(); // scratch may still be read by a previous call
    if (lane == 0) scratch[warp] = v;
    __syncthreads();
    v = lane < nwarps ? scratch[lane] : 0.0f;
    return warp_sum(v);
}

__device__ __forceinline__ float block_max(float v, float* scratch) {
    int lane = threadIdx.x & 31, warp = threadIdx.x >> 5, nwarps = blockDim.x >> 5;
    v = warp_max(v);
    __syncthreads();
    if (lane == 0) scratch[warp] = v;
    __syncthreads();
    v = lane < nwarps ? scratch[lane] : NEG_INF;
    return warp_max(v);
}

__device__ __forceinline__ double warp_sum_f64(double v) {
    for (int o = 16; o > 0; o >>= 1) v += __shfl_xor_sync(0xffffffffu, v, o);
    return v;
}

__device__ __forceinline__ double block_sum_f64(double v, double* scratch) {
    int lane = threadIdx.x & 31, warp = threadIdx.x >> 5, nwarps = blockDim.x >> 5;
    v = warp_sum_f64(v);
    __syncthreads();
    if (lane == 0) scratch[warp] = v;
    __syncthreads();
    v = lane < nwarps ? scratch[lane] : 0.0;
    return warp_sum_f64(v);
}
