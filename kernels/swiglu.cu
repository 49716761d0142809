// swiglu.cu: the SwiGLU gate of the MLP, elementwise. Both kernels take
// eight values per thread and step (16-byte loads and stores: the tensors
// are N x F, tens of MB, and bandwidth is the whole cost) over the first
// n - n % 8 values, then one value per thread for the rest; the arithmetic
// per value is the same in both loops. Buffers are device allocations
// (256-byte aligned).

// out = silu(g) * u
__device__ __forceinline__ float swiglu_value(float g, float u) { return g / (1.0f + __expf(-g)) * u; }

// Mirrors cpu::swiglu_forward. gate and up are (N, F) (n values); out = silu(gate) * up.
extern "C" __global__ void swiglu_forward(bf16* out, const bf16* gate, const bf16* up, i64 n) {
    i64 tid = blockIdx.x * (i64)blockDim.x + threadIdx.x, stride = (i64)gridDim.x * blockDim.x, n8 = n / 8;
    for (i64 v = tid; v < n8; v += stride) {
        float g[8], u[8], o[8];
        unpack8(((const u32x4*)gate)[v], g);
        unpack8(((const u32x4*)up)[v], u);
#pragma unroll
        for (int e = 0; e < 8; e++) o[e] = swiglu_value(g[e], u[e]);
        ((u32x4*)out)[v] = pack8(o);
    }
    for (i64 i = n8 * 8 + tid; i < n; i += stride) out[i] = f2bf(swiglu_value(bf2f(gate[i]), bf2f(up[i])));
}

// With s = sigmoid(g): d(up) = dy * g * s,  d(gate) = dy * u * s * (1 + g * (1 - s)).
__device__ __forceinline__ void swiglu_grads(float g, float u, float dy, float* dg, float* du) {
    float s = 1.0f / (1.0f + __expf(-g));
    *du = dy * g * s;
    *dg = dy * u * s * (1.0f + g * (1.0f - s));
}

// Mirrors cpu::swiglu_backward: dup += dout * gate * s, dgate += dout * up *
// s * (1 + gate * (1 - s)) when accumulate is 1, as the CPU op does; with 0
// the gradients are written instead, so the model need not zero them first
// (it never accumulates into them).
extern "C" __global__ void swiglu_backward(bf16* dgate, bf16* dup, const bf16* dout, const bf16* gate, const bf16* up,
                                           i64 n, int accumulate) {
    i64 tid = blockIdx.x * (i64)blockDim.x + threadIdx.x, stride = (i64)gridDim.x * blockDim.x, n8 = n / 8;
    for (i64 v = tid; v < n8; v += stride) {
        float g[8], u[8], dy[8], dg[8], du[8];
        unpack8(((const u32x4*)gate)[v], g);
        unpack8(((const u32x4*)up)[v], u);
        unpack8(((const u32x4*)dout)[v], dy);
        float ag[8] = {0}, au[8] = {0};
        if (accumulate) {
            unpack8(((const u32x4*)dgate)[v], ag);
            unpack8(((const u32x4*)dup)[v], au);
        }
#pragma unroll
        for (int e = 0; e < 8; e++) {
            swiglu_grads(g[e], u[e], dy[e], &dg[e], &du[e]);
            dg[e] += ag[e];
            du[e] += au[e];
        }
        ((u32x4*)dgate)[v] = pack8(dg);
        ((u32x4*)dup)[v] = pack8(du);
    }
    for (i64 i = n8 * 8 + tid; i < n; i += stride) {
        float dg, du;
        swiglu_grads(bf2f(gate[i]), bf2f(up[i]), bf2f(dout[i]), &dg, &du);
        dup[i] = f2bf((accumulate ? bf2f(dup[i]) : 0.0f) + du);
        dgate[i] = f2bf((accumulate ? bf2f(dgate[i]) : 0.0f) + dg);
    }
}
