// decode.cu: the bookkeeping of a decoding step around the model's layers:
// the KV cache's slot table (which cache slots each row sees), the gather of
// the rows whose logits are wanted, and the reduction of a row of logits to
// what a search reads (the k best tokens and the log-sum-exp), so that only
// a few numbers per row cross to the host (decode.rs, `Scores::Top`).
//
// The slot table is (R, stride) u32: row r sees slots table[r * stride + j]
// for j <= pos[r] (decode_attention.cu). Rows are rearranged by copying
// table rows, never keys and values (generate.rs does the same on the CPU
// with lists of slots).

// table[r * stride + pos[r]] = base + r for each of the R rows: the step's
// new keys and values are written to slots base .. base + R, one per row.
extern "C" __global__ void kv_table_append(u32* table, const u32* pos, u32 base, int stride, int R) {
    int r = blockIdx.x * blockDim.x + threadIdx.x;
    if (r < R) table[(i64)r * stride + pos[r]] = base + (u32)r;
}

// dst row i = src row from[i], i < R (decode.rs `select`: beams that change
// parents, rows that finish). dst and src are (R_max, stride).
extern "C" __global__ void kv_table_select(u32* dst, const u32* src, const u32* from, int stride, int R) {
    i64 total = (i64)R * stride;
    for (i64 i = blockIdx.x * (i64)blockDim.x + threadIdx.x; i < total; i += (i64)gridDim.x * blockDim.x) {
        i64 row = i / stride, j = i % stride;
        dst[i] = src[(i64)from[row] * stride + j];
    }
}

// out (N, C) row n = x row rows[n] (the last prompt position of each prompt).
extern "C" __global__ void gather_rows(bf16* out, const bf16* x, const u32* rows, int n, int c) {
    i64 total = (i64)n * c;
    for (i64 i = blockIdx.x * (i64)blockDim.x + threadIdx.x; i < total; i += (i64)gridDim.x * blockDim.x) {
        i64 row = i / c, col = i % c;
        out[i] = x[(i64)rows[row] * c + col];
    }
}

#define TOPK_MAX 16
#define TOPK_THREADS 256

// The order of the search: the larger logit first, and of equal logits the
// lower id (torch.topk and torch.argmax; decode.rs top_k_ids).
__device__ __forceinline__ bool better(float a, u32 ia, float b, u32 ib) { return a > b || (a == b && ia < ib); }

// The best (value, id) of the block by `better`; every thread gets it.
// sv, si: 32 entries of shared memory.
__device__ __forceinline__ void block_best(float* v, u32* id, float* sv, u32* si) {
    int lane = threadIdx.x & 31, warp = threadIdx.x >> 5, nwarps = blockDim.x >> 5;
    float bv = *v;
    u32 bi = *id;
    for (int o = 16; o > 0; o >>= 1) {
        float ov = __shfl_xor_sync(0xffffffffu, bv, o);
        u32 oi = __shfl_xor_sync(0xffffffffu, bi, o);
        if (better(ov, oi, bv, bi)) bv = ov, bi = oi;
    }
    __syncthreads(); // sv may still be read by a previous call
    if (lane == 0) sv[warp] = bv, si[warp] = bi;
    __syncthreads();
    bv = lane < nwarps ? sv[lane] : NEG_INF;
    bi = lane < nwarps ? si[lane] : 0xffffffffu;
    for (int o = 16; o > 0; o >>= 1) {
        float ov = __shfl_xor_sync(0xffffffffu, bv, o);
        u32 oi = __shfl_xor_sync(0xffffffffu, bi, o);
        if (better(ov, oi, bv, bi)) bv = ov, bi = oi;
    }
    *v = bv;
    *id = bi;
}

// Mirrors decode.rs `Scores::top_logp` on full logits (top_k_ids and
// cpu::logsumexp per row): for each row of logits (R, V) f32, the k <=
// TOPK_MAX best (value, id), best first, into top_val and top_id (R, k),
// and the row's log-sum-exp into lse (R). grid (R), block TOPK_THREADS.
//
// One pass over the row: each thread keeps the TOPK_MAX best of its own
// elements (a sorted list in registers, insertion by compare-and-swap down
// the list) and a running max and sum of exp (online log-sum-exp). Then k
// rounds of a block-wide best over the threads' list heads; the thread
// whose head wins pops it.
extern "C" __global__ void __launch_bounds__(TOPK_THREADS)
    logits_topk(float* top_val, u32* top_id, float* lse, const float* logits, int V, int k) {
    __shared__ float sv[32];
    __shared__ u32 si[32];
    __shared__ float scratch[32];
    const float* x = logits + (i64)blockIdx.x * V;
    float tv[TOPK_MAX];
    u32 ti[TOPK_MAX];
#pragma unroll
    for (int j = 0; j < TOPK_MAX; j++) tv[j] = NEG_INF, ti[j] = 0xffffffffu;
    float m = NEG_INF, sum = 0.0f;
    for (int i = threadIdx.x; i < V; i += blockDim.x) {
        float cv = x[i];
        u32 ci = (u32)i;
        if (cv > m) {
            sum = sum * __expf(m - cv) + 1.0f; // 0 * 0 + 1 on the first element
            m = cv;
        } else if (cv != NEG_INF) {
            sum += __expf(cv - m);
        }
#pragma unroll
        for (int j = 0; j < TOPK_MAX; j++) {
            if (better(cv, ci, tv[j], ti[j])) {
                float t = tv[j];
                u32 u = ti[j];
                tv[j] = cv, ti[j] = ci;
                cv = t, ci = u;
            }
        }
    }
    float mb = block_max(m, scratch);
    float sb = block_sum(m == NEG_INF ? 0.0f : sum * __expf(m - mb), scratch);
    if (threadIdx.x == 0) lse[blockIdx.x] = mb + logf(sb);
    for (int round = 0; round < k; round++) {
        float bv = tv[0];
        u32 bi = ti[0];
        block_best(&bv, &bi, sv, si);
        if (threadIdx.x == 0) {
            top_val[(i64)blockIdx.x * k + round] = bv;
            top_id[(i64)blockIdx.x * k + round] = bi;
        }
        if (ti[0] == bi) { // this thread's head won: pop it
#pragma unroll
            for (int j = 0; j + 1 < TOPK_MAX; j++) tv[j] = tv[j + 1], ti[j] = ti[j + 1];
            tv[TOPK_MAX - 1] = NEG_INF, ti[TOPK_MAX - 1] = 0xffffffffu;
        }
    }
}
