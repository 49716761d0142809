// swiglu.cu: the SwiGLU gate of the MLP, elementwise.

// Mirrors cpu::swiglu_forward. gate and up are (N, F); out = silu(gate) * up.
extern "C" __global__ void swiglu_forward(bf16* out, const bf16* gate, const bf16* up, i64 n) {
    for (i64 i = blockIdx.x * (i64)blockDim.x + threadIdx.x; i < n; i += (i64)gridDim.x * blockDim.x) {
        float g = bf2f(gate[i]);
        out[i] = f2bf(g / (1.0f + __expf(-g)) * bf2f(up[i]));
    }
}

// Mirrors cpu::swiglu_backward: with s = sigmoid(gate),
//   dup += dout * gate * s,   dgate += dout * up * s * (1 + gate * (1 - s)).
extern "C" __global__ void swiglu_backward(bf16* dgate, bf16* dup, const bf16* dout, const bf16* gate, const bf16* up,
                                           i64 n) {
    for (i64 i = blockIdx.x * (i64)blockDim.x + threadIdx.x; i < n; i += (i64)gridDim.x * blockDim.x) {
        float g = bf2f(gate[i]), u = bf2f(up[i]), dy = bf2f(dout[i]);
        float s = 1.0f / (1.0f + __expf(-g));
        dup[i] = f2bf(bf2f(dup[i]) + dy * g * s);
        dgate[i] = f2bf(bf2f(dgate[i]) + dy * u * s * (1.0f + g * (1.0f - s)));
    }
}
