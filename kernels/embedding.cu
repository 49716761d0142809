// embedding.cu: the token embedding, forward and backward.

// Mirrors cpu::embedding_forward.
// tokens is (N), wte is (V, C); out will be (N, C), row n = wte[tokens[n]].
// One thread per output element; the host has checked every id against V.
extern "C" __global__ void embedding_forward(bf16* out, const u32* tokens, const bf16* wte, int n, int c) {
    i64 total = (i64)n * c;
    for (i64 i = blockIdx.x * (i64)blockDim.x + threadIdx.x; i < total; i += (i64)gridDim.x * blockDim.x) {
        i64 row = i / c, col = i % c;
        out[i] = wte[(i64)tokens[row] * c + col];
    }
}

// Mirrors cpu::embedding_backward.
// dwte (V, C) f32 += scatter of dout (N, C) into the rows named by tokens (N).
// The CPU loops serially because two positions may share a token; here the
// collisions are resolved by atomicAdd (so the summation order may vary).
extern "C" __global__ void embedding_backward(float* dwte, const bf16* dout, const u32* tokens, int n, int c) {
    i64 total = (i64)n * c;
    for (i64 i = blockIdx.x * (i64)blockDim.x + threadIdx.x; i < total; i += (i64)gridDim.x * blockDim.x) {
        i64 row = i / c, col = i % c;
        atomicAdd(&dwte[(i64)tokens[row] * c + col], bf2f(dout[i]));
    }
}
