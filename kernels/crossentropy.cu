// crossentropy.cu: the mean cross-entropy over the vocabulary with ignored
// positions. One block per row of V logits. The probabilities are never
// stored: the forward pass keeps one log-sum-exp per row, and the backward
// pass overwrites the logits with dlogits in place, so (N, V) values exist
// once, as bf16.
//
// The logits are the largest tensor of a step (2048 x 128256 bf16 = 525 MB
// for Llama 3 at T = 2048), so both kernels are built for bandwidth: one
// pass over the row (the forward keeps a running max and a sum rescaled when
// the max grows, the "online" softmax, where the CPU takes two passes) and
// eight values per 16-byte load when V is a multiple of 8 (one at a time
// otherwise, same arithmetic).

// (m, s) <- the running max and sum exp(x - m) of the values seen, plus x[0..k].
__device__ __forceinline__ void online_add(float& m, float& s, const float* x, int k) {
    float mx = m;
    for (int i = 0; i < k; i++) mx = fmaxf(mx, x[i]);
    if (mx == NEG_INF) return; // nothing finite yet
    s *= __expf(m - mx);       // m = -inf: s is 0 and stays 0
    for (int i = 0; i < k; i++) s += __expf(x[i] - mx);
    m = mx;
}

// Two partial (max, sum) pairs merged.
__device__ __forceinline__ void online_merge(float& m, float& s, float m2, float s2) {
    float mx = fmaxf(m, m2);
    if (mx == NEG_INF) return; // both empty
    s = s * __expf(m - mx) + s2 * __expf(m2 - mx);
    m = mx;
}

// Mirrors cpu::crossentropy_forward (the per-row part; the host takes the
// mean over counted rows in f64, as the CPU does).
// logits is (N, V), targets (N), negative = ignored. Writes losses (N) =
// lse(row) - row[target] (0 where ignored) and lse (N). Block of 1024.
extern "C" __global__ void crossentropy_forward(float* losses, float* lse, const bf16* logits, const int* targets, int v) {
    __shared__ float ms[32], ss[32];
    i64 row = blockIdx.x;
    const bf16* x = logits + row * v;
    float m = NEG_INF, s = 0.0f;
    if (v % 8 == 0) {
        const u32x4* x8 = (const u32x4*)x; // rows start 16-byte aligned when V % 8 == 0
        for (int i = threadIdx.x; i < v / 8; i += blockDim.x) {
            float f[8];
            unpack8(x8[i], f);
            online_add(m, s, f, 8);
        }
    } else {
        for (int i = threadIdx.x; i < v; i += blockDim.x) {
            float f = bf2f(x[i]);
            online_add(m, s, &f, 1);
        }
    }
    for (int o = 16; o > 0; o >>= 1) {
        float m2 = __shfl_xor_sync(0xffffffffu, m, o), s2 = __shfl_xor_sync(0xffffffffu, s, o);
        online_merge(m, s, m2, s2);
    }
    int lane = threadIdx.x & 31, warp = threadIdx.x >> 5;
    if (lane == 0) {
        ms[warp] = m;
        ss[warp] = s;
    }
    __syncthreads();
    if (threadIdx.x == 0) {
        float bm = NEG_INF, bs = 0.0f;
        for (int w = 0; w < (int)(blockDim.x >> 5); w++) online_merge(bm, bs, ms[w], ss[w]);
        float l = bm + logf(bs);
        int tgt = targets[row];
        lse[row] = l;
        losses[row] = tgt < 0 ? 0.0f : l - bf2f(x[tgt]);
    }
}

// Mirrors cpu::crossentropy_backward_inplace: row n of logits becomes
// (softmax(row) - onehot(target)) * inv_count, or zeros where ignored.
// lse (N) comes from crossentropy_forward on the same logits.
extern "C" __global__ void crossentropy_backward(bf16* logits, const float* lse, const int* targets, int v, float inv_count) {
    i64 row = blockIdx.x;
    bf16* x = logits + row * v;
    int tgt = targets[row];
    float l = lse[row];
    if (v % 8 == 0) {
        u32x4* x8 = (u32x4*)x;
        for (int i = threadIdx.x; i < v / 8; i += blockDim.x) {
            float f[8];
            unpack8(x8[i], f);
#pragma unroll
            for (int e = 0; e < 8; e++)
                f[e] = tgt < 0 ? 0.0f : __expf(f[e] - l) * inv_count - (i * 8 + e == tgt ? inv_count : 0.0f);
            x8[i] = pack8(f);
        }
    } else {
        for (int i = threadIdx.x; i < v; i += blockDim.x) {
            float d = tgt < 0 ? 0.0f : __expf(bf2f(x[i]) - l) * inv_count - (i == tgt ? inv_count : 0.0f);
            x[i] = f2bf(d);
        }
    }
}
