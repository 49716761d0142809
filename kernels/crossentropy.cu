// crossentropy.cu: the mean cross-entropy over the vocabulary with ignored
// positions. One block per row of V logits. The probabilities are never
// stored: the forward pass keeps one log-sum-exp per row, and the backward
// pass overwrites the logits with dlogits in place, so (N, V) values exist
// once, as bf16.

// Mirrors cpu::crossentropy_forward (the per-row part; the host takes the
// mean over counted rows in f64, as the CPU does).
// logits is (N, V), targets (N), negative = ignored. Writes losses (N) =
// lse(row) - row[target] (0 where ignored) and lse (N).
extern "C" __global__ void crossentropy_forward(float* losses, float* lse, const bf16* logits, const int* targets, int v) {
    __shared__ float scratch[32];
    i64 row = blockIdx.x;
    const bf16* x = logits + row * v;
    float mx = NEG_INF;
    for (int i = threadIdx.x; i < v; i += blockDim.x) mx = fmaxf(mx, bf2f(x[i]));
    mx = block_max(mx, scratch);
    float sum = 0.0f;
    for (int i = threadIdx.x; i < v; i += blockDim.x) sum += __expf(bf2f(x[i]) - mx);
    sum = block_sum(sum, scratch);
    float l = mx + logf(sum);
    if (threadIdx.x == 0) {
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
    for (int i = threadIdx.x; i < v; i += blockDim.x) {
        float d = tgt < 0 ? 0.0f : __expf(bf2f(x[i]) - l) * inv_count - (i == tgt ? inv_count : 0.0f);
        x[i] = f2bf(d);
    }
}
