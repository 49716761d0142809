// dora.cu: the three pieces DoRA (src/dora.rs) adds to a LoRA layer on the
// GPU. With V = W + s B A and c = m / ||V||_row (OC), the layer's output is
// y = c * (x V^T) per output column; the GPU runs the adapter unmerged, so
// it scales the LoRA output by c, scales dout by c for the input and adapter
// gradients, and sums the magnitude's gradient over the rows.

// out (rows, cols) = inp * c[col], bf16 in and out, c f32 (out may be inp).
// Mirrors dora.rs: the merged weight's diag(c) in the forward pass, and
// `dout * (m / norm)` in dora::backward.
extern "C" __global__ void scale_columns(bf16* out, const bf16* inp, const float* c, i64 rows, int cols) {
    i64 n = rows * cols;
    for (i64 i = blockIdx.x * (i64)blockDim.x + threadIdx.x; i < n; i += (i64)gridDim.x * blockDim.x)
        out[i] = f2bf(bf2f(inp[i]) * c[i % cols]);
}

// dm[o] += sum_n dout[n, o] z[n, o] / norm[o], with z = x V^T (rows, cols):
// dora::backward's magnitude gradient. One thread per column walks the rows
// in order (deterministic; neighbouring threads read neighbouring columns),
// summing in f64 as the CPU does.
extern "C" __global__ void column_dot(float* dm, const bf16* dout, const bf16* z, const float* norm, i64 rows, int cols) {
    for (int o = blockIdx.x * blockDim.x + threadIdx.x; o < cols; o += gridDim.x * blockDim.x) {
        double acc = 0.0;
        for (i64 r = 0; r < rows; r++) acc += (double)bf2f(dout[r * cols + o]) * (double)bf2f(z[r * cols + o]);
        dm[o] += (float)(acc / (double)norm[o]);
    }
}

// Per row o of v (rows, cols, f32): norm[o] = ||v_o||, c[o] = m[o] / norm[o]
// (dora.rs row_norms and merge_into's scale). One block per row, the sum in
// f64 through shared memory, in a fixed order.
extern "C" __global__ void dora_norms(float* norm, float* c, const float* v, const float* m, int cols) {
    __shared__ double part[256];
    int o = blockIdx.x;
    const float* row = v + (i64)o * cols;
    double acc = 0.0;
    for (int j = threadIdx.x; j < cols; j += blockDim.x) acc += (double)row[j] * (double)row[j];
    part[threadIdx.x] = acc;
    __syncthreads();
    for (int s = blockDim.x / 2; s > 0; s >>= 1) {
        if (threadIdx.x < s) part[threadIdx.x] += part[threadIdx.x + s];
        __syncthreads();
    }
    if (threadIdx.x == 0) {
        float nr = (float)sqrt(part[0]);
        norm[o] = nr;
        c[o] = m[o] / nr;
    }
}
