// rope.cu: rotary position embeddings, Hugging Face's "rotate_half" layout
// (element i pairs with element i + HS/2). The angles come from the same
// table the CPU builds (cpu::RopeTable, llama3 scaling included), uploaded
// once as f32 cos and sin of shape (max_pos, HS/2).

// Mirrors cpu::rope_forward (sign = 1) and cpu::rope_backward (sign = -1,
// the rotation by the opposite angle). x is (B, T, H, HS), rotated in place;
// the row of time t sits at position pos0 + t. One thread per pair.
extern "C" __global__ void rope_rotate(bf16* x, const float* cos_t, const float* sin_t, int n_rows, int t, int h,
                                       int hs, int pos0, float sign) {
    int half = hs / 2;
    i64 total = (i64)n_rows * h * half;
    for (i64 idx = blockIdx.x * (i64)blockDim.x + threadIdx.x; idx < total; idx += (i64)gridDim.x * blockDim.x) {
        int i = idx % half;
        i64 head = idx / half; // row * h + head index
        i64 row = head / h;
        int p = pos0 + (int)(row % t);
        float c = cos_t[(i64)p * half + i];
        float s = sign * sin_t[(i64)p * half + i];
        bf16* a = x + head * hs;
        float x0 = bf2f(a[i]), x1 = bf2f(a[i + half]);
        a[i] = f2bf(x0 * c - x1 * s);
        a[i + half] = f2bf(x1 * c + x0 * s);
    }
}

// Mirrors cpu::rope_forward_at (sign = 1): x (N, H, HS) rotated in place,
// row n by the angles of its own position pos[n] (the decoding step, whose
// rows stand at different positions; a packed batch, whose examples each
// start at position 0). sign = -1 rotates back (the packed backward pass,
// cpu::rope_backward on each example). One thread per pair.
extern "C" __global__ void rope_rotate_at(bf16* x, const float* cos_t, const float* sin_t, const u32* pos, int n_rows,
                                          int h, int hs, float sign) {
    int half = hs / 2;
    i64 total = (i64)n_rows * h * half;
    for (i64 idx = blockIdx.x * (i64)blockDim.x + threadIdx.x; idx < total; idx += (i64)gridDim.x * blockDim.x) {
        int i = idx % half;
        i64 head = idx / half; // row * h + head index
        i64 p = pos[head / h];
        float c = cos_t[p * half + i];
        float s = sign * sin_t[p * half + i];
        bf16* a = x + head * hs;
        float x0 = bf2f(a[i]), x1 = bf2f(a[i + half]);
        a[i] = f2bf(x0 * c - x1 * s);
        a[i + half] = f2bf(x1 * c + x0 * s);
    }
}
