// decode_attention.cu: the attention of one decoding step, one new query per
// row over that row's cached keys and values, flash-decoding style.
//
// Mirrors cpu::decode_attention. The KV cache of a layer is a pool of slots,
// k and v (S, KVH, HS) bf16, after RoPE; row r sees the slots listed in
// table[r * stride + 0 .. len_r), in position order, with len_r = pos[r] + 1
// (its own new key, written before this call, is the last). Rows share
// slots (beams that share a prompt), so a row is its list, never a copy.
//
// A decoding step has one query per (row, head): too few to fill a GPU when
// the batch is small and the cache long. So the cache length is split: block
// (s, h, r) takes positions [s * chunk, (s + 1) * chunk) of row r's list and
// writes a partial result, its softmax-weighted mean of v and the log-sum-exp
// of its scores (an empty range writes lse = -inf); decode_attention_merge
// then combines the partials of each (row, head) by their lse:
//   out = sum_s exp(lse_s - M) o_s / sum_s exp(lse_s - M),  M = max_s lse_s.
// The host picks the split count from the batch (launch.rs, decode_splits).
//
// One warp per block. It walks its range in tiles of 32 positions: the
// tile's 32 key and value rows are copied into shared memory (each row read
// whole by consecutive lanes, through the slot table), then lane j scores
// key j (one dot product per lane, as attention.cu does), the warp updates
// its running max and sum (online softmax), and accumulates the output, lane
// j owning the value pairs (2w, 2w + 1) for w = j, j + 32 of the head.
// Shared rows have a stride of HS_MAX + 2 bf16 (65 words, odd), so 32 lanes
// reading 32 different rows hit 32 different banks.

#define DTILE 32
#define DHS_MAX 128
#define DLD (DHS_MAX + 2)
#define DPAIRS (DHS_MAX / 64)
#define DFULL 0xffffffffu

// q (HS, f32 in shared memory) . one bf16 row of shared memory.
__device__ __forceinline__ float dot_q_row(const float* q, const bf16* row, int hs) {
    const u32* r2 = (const u32*)row;
    float s = 0.0f;
    for (int w = 0; w < hs / 2; w++) {
        u32 x = r2[w];
        s += q[2 * w] * __uint_as_float(x << 16);
        s += q[2 * w + 1] * __uint_as_float(x & 0xffff0000u);
    }
    return s;
}

// Copies the key and value rows of the nk slots (slot i in lane i's `slot`)
// of kv head kvh into shared ks and vs, (DTILE, DLD) each.
__device__ __forceinline__ void stage_slots(bf16* ks, bf16* vs, const bf16* kc, const bf16* vc, u32 slot, int nk,
                                            int kvh, int KVH, int hs, int lane) {
    for (int i = 0; i < nk; i++) {
        u32 si = __shfl_sync(DFULL, slot, i);
        i64 at = ((i64)si * KVH + kvh) * hs;
        const u32* ksrc = (const u32*)(kc + at);
        const u32* vsrc = (const u32*)(vc + at);
        u32* kdst = (u32*)(ks + i * DLD);
        u32* vdst = (u32*)(vs + i * DLD);
        for (int w = lane; w < hs / 2; w += 32) {
            kdst[w] = ksrc[w];
            vdst[w] = vsrc[w];
        }
    }
}

// Pass 1: one (split s, query head h, row r) per block, grid (n_splits, NH, R),
// block 32. q (R, NH, HS) bf16; o_part (R, NH, n_splits, HS) and lse_part
// (R, NH, n_splits) f32, the partial of positions [s*chunk, min((s+1)*chunk, len_r)).
extern "C" __global__ void __launch_bounds__(32)
    decode_attention_partial(float* o_part, float* lse_part, const bf16* q, const bf16* kc, const bf16* vc,
                             const u32* table, const u32* pos, int stride, int NH, int KVH, int hs, int n_splits,
                             int chunk) {
    __shared__ __align__(16) bf16 ks[DTILE * DLD];
    __shared__ __align__(16) bf16 vs[DTILE * DLD];
    __shared__ float qs[DHS_MAX];
    int s = blockIdx.x, h = blockIdx.y, r = blockIdx.z, lane = threadIdx.x;
    int kvh = h / (NH / KVH);
    int len = (int)pos[r] + 1;
    int j_begin = s * chunk, j_end = min(j_begin + chunk, len);
    float scale = 1.0f / sqrtf((float)hs);
    for (int d = lane; d < hs; d += 32) qs[d] = bf2f(q[((i64)r * NH + h) * hs + d]);
    __syncwarp();

    const u32* slots = table + (i64)r * stride;
    float m = NEG_INF, l = 0.0f, o[DPAIRS][2];
#pragma unroll
    for (int p = 0; p < DPAIRS; p++) o[p][0] = o[p][1] = 0.0f;
    for (int j0 = j_begin; j0 < j_end; j0 += DTILE) {
        int nk = min(DTILE, j_end - j0);
        u32 slot = lane < nk ? slots[j0 + lane] : 0u;
        __syncwarp(); // the previous tile is consumed
        stage_slots(ks, vs, kc, vc, slot, nk, kvh, KVH, hs, lane);
        __syncwarp();
        float sc = lane < nk ? dot_q_row(qs, ks + lane * DLD, hs) * scale : NEG_INF;
        float m_new = fmaxf(m, warp_max(sc)); // finite: the tile has a key
        float p = lane < nk ? __expf(sc - m_new) : 0.0f;
        float corr = __expf(m - m_new); // 0 on the first tile (m = -inf)
        l = l * corr + warp_sum(p);
#pragma unroll
        for (int pp = 0; pp < DPAIRS; pp++) o[pp][0] *= corr, o[pp][1] *= corr;
        for (int jj = 0; jj < nk; jj++) {
            float pj = __shfl_sync(DFULL, p, jj);
            const u32* vrow = (const u32*)(vs + jj * DLD);
#pragma unroll
            for (int pp = 0; pp < DPAIRS; pp++) {
                int w = pp * 32 + lane;
                if (2 * w < hs) {
                    u32 x = vrow[w];
                    o[pp][0] += pj * __uint_as_float(x << 16);
                    o[pp][1] += pj * __uint_as_float(x & 0xffff0000u);
                }
            }
        }
        m = m_new;
    }
    i64 part = ((i64)r * NH + h) * n_splits + s;
    bool empty = j_begin >= j_end;
    float inv = empty ? 0.0f : 1.0f / l;
#pragma unroll
    for (int pp = 0; pp < DPAIRS; pp++) {
        int w = pp * 32 + lane;
        if (2 * w < hs) {
            o_part[part * hs + 2 * w] = o[pp][0] * inv;
            o_part[part * hs + 2 * w + 1] = o[pp][1] * inv;
        }
    }
    if (lane == 0) lse_part[part] = empty ? NEG_INF : m + logf(l);
}

// Pass 2: the partials of each (row, head) weighted by exp(lse_s - max lse);
// out (R, NH, HS) bf16. grid (NH, R), block 32; lane j owns elements j,
// j + 32, ... of the head. Split 0 is never empty (every row has a key).
extern "C" __global__ void __launch_bounds__(32)
    decode_attention_merge(bf16* out, const float* o_part, const float* lse_part, int NH, int hs, int n_splits) {
    int h = blockIdx.x, r = blockIdx.y, lane = threadIdx.x;
    i64 rh = (i64)r * NH + h;
    const float* lse = lse_part + rh * n_splits;
    float mx = NEG_INF;
    for (int s = 0; s < n_splits; s++) mx = fmaxf(mx, lse[s]);
    float acc[DHS_MAX / 32], wsum = 0.0f;
#pragma unroll
    for (int e = 0; e < DHS_MAX / 32; e++) acc[e] = 0.0f;
    for (int s = 0; s < n_splits; s++) {
        if (lse[s] == NEG_INF) continue; // an empty split
        float w = __expf(lse[s] - mx);
        wsum += w;
        const float* o = o_part + (rh * n_splits + s) * hs;
#pragma unroll
        for (int e = 0; e < DHS_MAX / 32; e++) {
            int d = e * 32 + lane;
            if (d < hs) acc[e] += w * o[d];
        }
    }
#pragma unroll
    for (int e = 0; e < DHS_MAX / 32; e++) {
        int d = e * 32 + lane;
        if (d < hs) out[rh * hs + d] = f2bf(acc[e] / wsum);
    }
}
