// attention.cu: causal grouped-query attention, flash-attention style: the
// (T, T) score matrix of a head is never written to global memory. Each
// block takes TILE rows of one head and walks the other side in tiles of
// TILE rows staged in shared memory, keeping a running (online) softmax.
//
// Layouts as in cpu.rs: q and out are (B, T, NH, HS); k and v (B, T, KVH, HS);
// lse and delta (B, T, NH) in f32; query head h reads kv head h / (NH / KVH).
// A packed batch (pack.rs) gives seg0 (B, T): for each position, the position
// in its row where its example starts (common.cuh's seg_start; null: whole
// rows). Query t then attends to keys seg0[t] ..= t only, which is
// cpu::attention_forward run on each example alone (model.rs); tiles wholly
// outside a query's example are skipped.
//
// Work split inside a block (8 warps, 4 rows each): when scoring, lane j of
// a warp takes key (or query) j of the staged tile, so one dot product is one
// lane's loop and the softmax statistics of a tile are one warp reduction;
// when accumulating an output row, lane j owns elements j, j+32, j+64, j+96
// of the head (HS <= 128) and the tile's weights are broadcast by shuffles.
// Shared rows are bf16 with a stride of HS_MAX + 2 values (65 words, odd),
// so 32 lanes reading 32 different rows hit 32 different banks.
//
// This is the plain CUDA-core version, written to be checked against
// cpu::attention_forward/backward line by line.

#define TILE 32
#define HS_MAX 128
#define LD (HS_MAX + 2)
#define EPL (HS_MAX / 32)
#define ROWS_PER_WARP 4
#define FULL 0xffffffffu

// dot of two bf16 rows in shared memory, two values per 32-bit load.
__device__ __forceinline__ float dot_row(const bf16* a, const bf16* b, int hs) {
    const u32* a2 = (const u32*)a;
    const u32* b2 = (const u32*)b;
    float s = 0.0f;
    for (int d = 0; d < hs / 2; d++) {
        u32 x = a2[d], y = b2[d];
        s += __uint_as_float(x << 16) * __uint_as_float(y << 16);
        s += __uint_as_float(x & 0xffff0000u) * __uint_as_float(y & 0xffff0000u);
    }
    return s;
}

// Copies TILE rows (row0.., zero past T) of one head of x (B, T, H, HS) into
// shared memory `dst` (TILE, LD).
__device__ __forceinline__ void stage_rows(bf16* dst, const bf16* x, int b, int row0, int head, int T, int H, int hs) {
    for (int i = threadIdx.x; i < TILE * hs; i += blockDim.x) {
        int r = i / hs, d = i % hs, t = row0 + r;
        dst[r * LD + d] = t < T ? x[((i64)(b * T + t) * H + head) * hs + d] : (bf16)0;
    }
}

// Mirrors cpu::attention_forward (training shapes: Tq = Tk = T, no padding).
// out (B, T, NH, HS) = softmax(q k^T / sqrt(HS) + causal mask) v; lse (B, T, NH).
// grid (ceil(T / TILE), NH, B), block 256.
extern "C" __global__ void __launch_bounds__(256) attention_forward(bf16* out, float* lse, const bf16* q, const bf16* k,
                                                                     const bf16* v, const int* seg0, int T, int NH,
                                                                     int KVH, int hs) {
    __shared__ __align__(16) bf16 qs[TILE * LD];
    __shared__ __align__(16) bf16 ks[TILE * LD];
    __shared__ __align__(16) bf16 vs[TILE * LD];
    int t0 = blockIdx.x * TILE, h = blockIdx.y, b = blockIdx.z;
    int kvh = h / (NH / KVH);
    int lane = threadIdx.x & 31, warp = threadIdx.x >> 5;
    float scale = 1.0f / sqrtf((float)hs);
    stage_rows(qs, q, b, t0, h, T, NH, hs);

    float m[ROWS_PER_WARP], l[ROWS_PER_WARP], o[ROWS_PER_WARP][EPL];
#pragma unroll
    for (int r = 0; r < ROWS_PER_WARP; r++) {
        m[r] = NEG_INF;
        l[r] = 0.0f;
#pragma unroll
        for (int e = 0; e < EPL; e++) o[r][e] = 0.0f;
    }
    int last = min(t0 + TILE, T) - 1; // the last query of this block sees keys up to last
    // (the first sees keys from seg_start(t0) on, the earliest of the block)
    for (int j0 = seg_start(seg0, b, t0, T) / TILE * TILE; j0 <= last; j0 += TILE) {
        __syncthreads(); // the previous tile is consumed
        stage_rows(ks, k, b, j0, kvh, T, KVH, hs);
        stage_rows(vs, v, b, j0, kvh, T, KVH, hs);
        __syncthreads();
#pragma unroll
        for (int r = 0; r < ROWS_PER_WARP; r++) {
            int qr = warp * ROWS_PER_WARP + r, t = t0 + qr, first = seg_start(seg0, b, t, T);
            if (t >= T || j0 > t || j0 + TILE <= first) continue; // uniform across the warp
            int j = j0 + lane;
            bool seen = j >= first && j <= t;
            float s = seen ? dot_row(qs + qr * LD, ks + lane * LD, hs) * scale : NEG_INF;
            float m_new = fmaxf(m[r], warp_max(s)); // finite: key max(j0, first) <= t is seen
            float p = seen ? __expf(s - m_new) : 0.0f;
            float corr = __expf(m[r] - m_new); // 0 on the first tile (m = -inf)
            l[r] = l[r] * corr + warp_sum(p);
            int nk = min(TILE, t - j0 + 1);
#pragma unroll
            for (int e = 0; e < EPL; e++) o[r][e] *= corr;
            for (int jj = 0; jj < nk; jj++) {
                float pj = __shfl_sync(FULL, p, jj);
#pragma unroll
                for (int e = 0; e < EPL; e++) {
                    int d = e * 32 + lane;
                    if (d < hs) o[r][e] += pj * bf2f(vs[jj * LD + d]);
                }
            }
            m[r] = m_new;
        }
    }
#pragma unroll
    for (int r = 0; r < ROWS_PER_WARP; r++) {
        int t = t0 + warp * ROWS_PER_WARP + r;
        if (t >= T) continue;
        i64 row = (i64)(b * T + t) * NH + h;
#pragma unroll
        for (int e = 0; e < EPL; e++) {
            int d = e * 32 + lane;
            if (d < hs) out[row * hs + d] = f2bf(o[r][e] / l[r]);
        }
        if (lane == 0) lse[row] = m[r] + logf(l[r]);
    }
}

// Mirrors the first loop of cpu::attention_backward: delta (B, T, NH) =
// dout . out per row and head. One warp per (row, head).
extern "C" __global__ void attention_delta(float* delta, const bf16* dout, const bf16* out, i64 rows_heads, int hs) {
    i64 w = (blockIdx.x * (i64)blockDim.x + threadIdx.x) >> 5;
    int lane = threadIdx.x & 31;
    if (w >= rows_heads) return;
    float s = 0.0f;
    for (int d = lane; d < hs; d += 32) s += bf2f(dout[w * hs + d]) * bf2f(out[w * hs + d]);
    s = warp_sum(s);
    if (lane == 0) delta[w] = s;
}

// Mirrors pass 1 of cpu::attention_backward: dq (B, T, NH, HS) +=
// scale * sum_j dS_tj k_j with dS_tj = P_tj (dout_t . v_j - D_t), P rebuilt
// from lse. grid (ceil(T / TILE), NH, B), block 256.
extern "C" __global__ void __launch_bounds__(256) attention_backward_dq(bf16* dq, const bf16* dout, const float* lse,
                                                                         const float* delta, const bf16* q, const bf16* k,
                                                                         const bf16* v, const int* seg0, int T, int NH,
                                                                         int KVH, int hs) {
    __shared__ __align__(16) bf16 qs[TILE * LD];
    __shared__ __align__(16) bf16 dos[TILE * LD];
    __shared__ __align__(16) bf16 ks[TILE * LD];
    __shared__ __align__(16) bf16 vs[TILE * LD];
    int t0 = blockIdx.x * TILE, h = blockIdx.y, b = blockIdx.z;
    int kvh = h / (NH / KVH);
    int lane = threadIdx.x & 31, warp = threadIdx.x >> 5;
    float scale = 1.0f / sqrtf((float)hs);
    stage_rows(qs, q, b, t0, h, T, NH, hs);
    stage_rows(dos, dout, b, t0, h, T, NH, hs);

    float acc[ROWS_PER_WARP][EPL], lse_r[ROWS_PER_WARP], dl_r[ROWS_PER_WARP];
#pragma unroll
    for (int r = 0; r < ROWS_PER_WARP; r++) {
        int t = t0 + warp * ROWS_PER_WARP + r;
        i64 row = (i64)(b * T + min(t, T - 1)) * NH + h;
        lse_r[r] = lse[row];
        dl_r[r] = delta[row];
#pragma unroll
        for (int e = 0; e < EPL; e++) acc[r][e] = 0.0f;
    }
    int last = min(t0 + TILE, T) - 1;
    for (int j0 = seg_start(seg0, b, t0, T) / TILE * TILE; j0 <= last; j0 += TILE) {
        __syncthreads();
        stage_rows(ks, k, b, j0, kvh, T, KVH, hs);
        stage_rows(vs, v, b, j0, kvh, T, KVH, hs);
        __syncthreads();
#pragma unroll
        for (int r = 0; r < ROWS_PER_WARP; r++) {
            int qr = warp * ROWS_PER_WARP + r, t = t0 + qr, first = seg_start(seg0, b, t, T);
            if (t >= T || j0 > t || j0 + TILE <= first) continue;
            int j = j0 + lane;
            float ds = 0.0f;
            if (j >= first && j <= t) {
                float p = __expf(dot_row(qs + qr * LD, ks + lane * LD, hs) * scale - lse_r[r]);
                ds = p * (dot_row(dos + qr * LD, vs + lane * LD, hs) - dl_r[r]);
            }
            int nk = min(TILE, t - j0 + 1);
            for (int jj = 0; jj < nk; jj++) {
                float g = __shfl_sync(FULL, ds, jj) * scale;
#pragma unroll
                for (int e = 0; e < EPL; e++) {
                    int d = e * 32 + lane;
                    if (d < hs) acc[r][e] += g * bf2f(ks[jj * LD + d]);
                }
            }
        }
    }
#pragma unroll
    for (int r = 0; r < ROWS_PER_WARP; r++) {
        int t = t0 + warp * ROWS_PER_WARP + r;
        if (t >= T) continue;
        i64 row = (i64)(b * T + t) * NH + h;
#pragma unroll
        for (int e = 0; e < EPL; e++) {
            int d = e * 32 + lane;
            if (d < hs) dq[row * hs + d] = f2bf(bf2f(dq[row * hs + d]) + acc[r][e]);
        }
    }
}

// Mirrors pass 2 of cpu::attention_backward: for key row j of kv head kv,
//   dk_j += scale * sum_{h in group, t >= j} dS_tj q_t,  dv_j += sum P_tj dout_t.
// Each block owns TILE key rows and walks the query tiles at or after them,
// for every query head of its group: no two blocks write the same row.
// grid (ceil(T / TILE), KVH, B), block 256.
extern "C" __global__ void __launch_bounds__(256) attention_backward_dkdv(bf16* dk, bf16* dv, const bf16* dout,
                                                                           const float* lse, const float* delta,
                                                                           const bf16* q, const bf16* k, const bf16* v,
                                                                           const int* seg0, int T, int NH, int KVH,
                                                                           int hs) {
    __shared__ __align__(16) bf16 ks[TILE * LD];
    __shared__ __align__(16) bf16 vs[TILE * LD];
    __shared__ __align__(16) bf16 qs[TILE * LD];
    __shared__ __align__(16) bf16 dos[TILE * LD];
    __shared__ float lses[TILE], dels[TILE];
    __shared__ int segs[TILE]; // the queries' segment starts
    int j0 = blockIdx.x * TILE, kvh = blockIdx.y, b = blockIdx.z;
    int group = NH / KVH;
    int lane = threadIdx.x & 31, warp = threadIdx.x >> 5;
    float scale = 1.0f / sqrtf((float)hs);
    stage_rows(ks, k, b, j0, kvh, T, KVH, hs);
    stage_rows(vs, v, b, j0, kvh, T, KVH, hs);

    float adk[ROWS_PER_WARP][EPL], adv[ROWS_PER_WARP][EPL];
#pragma unroll
    for (int r = 0; r < ROWS_PER_WARP; r++)
#pragma unroll
        for (int e = 0; e < EPL; e++) adk[r][e] = adv[r][e] = 0.0f;

    // Queries before j0 see none of these keys, nor do those whose segment
    // starts after the block's last key (seg0 only grows along a row).
    int j_last = min(j0 + TILE, T) - 1;
    for (int h = kvh * group; h < (kvh + 1) * group; h++) {
        for (int t0 = j0; t0 < T && seg_start(seg0, b, t0, T) <= j_last; t0 += TILE) {
            __syncthreads();
            stage_rows(qs, q, b, t0, h, T, NH, hs);
            stage_rows(dos, dout, b, t0, h, T, NH, hs);
            if (threadIdx.x < TILE) {
                int t = t0 + threadIdx.x;
                i64 row = (i64)(b * T + min(t, T - 1)) * NH + h;
                lses[threadIdx.x] = lse[row];
                dels[threadIdx.x] = delta[row];
                segs[threadIdx.x] = seg_start(seg0, b, t, T);
            }
            __syncthreads();
#pragma unroll
            for (int r = 0; r < ROWS_PER_WARP; r++) {
                int jr = warp * ROWS_PER_WARP + r, j = j0 + jr;
                if (j >= T) continue;
                int t = t0 + lane; // this lane's query
                float p = 0.0f, ds = 0.0f;
                if (t < T && t >= j && segs[lane] <= j) {
                    p = __expf(dot_row(qs + lane * LD, ks + jr * LD, hs) * scale - lses[lane]);
                    ds = p * (dot_row(dos + lane * LD, vs + jr * LD, hs) - dels[lane]);
                }
                for (int ii = 0; ii < TILE; ii++) {
                    float pi = __shfl_sync(FULL, p, ii);
                    float g = __shfl_sync(FULL, ds, ii) * scale;
#pragma unroll
                    for (int e = 0; e < EPL; e++) {
                        int d = e * 32 + lane;
                        if (d < hs) {
                            adk[r][e] += g * bf2f(qs[ii * LD + d]);
                            adv[r][e] += pi * bf2f(dos[ii * LD + d]);
                        }
                    }
                }
            }
        }
    }
#pragma unroll
    for (int r = 0; r < ROWS_PER_WARP; r++) {
        int j = j0 + warp * ROWS_PER_WARP + r;
        if (j >= T) continue;
        i64 row = (i64)(b * T + j) * KVH + kvh;
#pragma unroll
        for (int e = 0; e < EPL; e++) {
            int d = e * 32 + lane;
            if (d < hs) {
                dk[row * hs + d] = f2bf(bf2f(dk[row * hs + d]) + adk[r][e]);
                dv[row * hs + d] = f2bf(bf2f(dv[row * hs + d]) + adv[r][e]);
            }
        }
    }
}
