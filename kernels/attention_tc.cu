// attention_tc.cu: the tensor-core twin of attention.cu, for head sizes 64
// and 128 (attention.cu stays the readable reference and serves every other
// head size). Same causal grouped-query attention, same layouts and the same
// outputs (out, lse; dq, dk, dv), computed FlashAttention-2 style with the
// bf16 mma.sync of mma.cuh:
//
//   forward  one block per 64 query rows of a head; S = Q K^T and O += P V
//            are tensor-core products, the online softmax runs on S's
//            fragments in registers, and P goes to the second product as its
//            A operand straight from the registers (mma.cuh's coincidence).
//   backward two kernels, like attention.cu's, so no two blocks write the
//            same row and nothing needs atomics: dq (per query block, walking
//            the keys) and dk/dv (per key block, walking the queries of every
//            head of its group). Each recomputes P from lse, as the plain
//            kernels do.
//
// What differs from attention.cu in the numbers: the products' inputs are
// bf16 (q, k, v, dout are bf16 already; P and dS are rounded to bf16 before
// the second product, as FlashAttention does), the sums are f32 in the
// tensor cores' order, and exp is exp2 of pre-scaled values.
//
// Layouts as in attention.cu: q, out, dout, dq (B, T, NH, HS); k, v, dk, dv
// (B, T, KVH, HS); lse, delta (B, T, NH) f32, lse in natural log. seg0
// (B, T) as in attention.cu (packed batches: the position in its row where
// each position's example starts; null: whole rows): the loops start at the
// tile of the block's first segment start and stop past the last segment end
// they can see, so a packed row costs what its examples would one by one
// (plus the partly used tiles at their edges).
//
// Work split: 4 warps, each owning 16 rows of the block's 64 (query rows in
// the forward and dq kernels, key rows in dk/dv). A thread holds rows g and
// g + 8 of its warp's 16 (g = lane / 4) in every fragment. Tiles of the other
// side are staged in shared memory, row-major when the fragment wants rows of
// the tile (B = X^T for S = Q K^T: a lane reads row g), transposed when it
// wants columns (B = X for O = P V). Shared rows are padded by 8 bf16 (16
// bytes): the 8 rows a fragment load touches then start 4 banks apart, and
// the 4 lanes of a row read 4 consecutive words, so 32 lanes hit 32 banks.

#define TC_ROWS 64 // rows of a block: 4 warps x 16
#define PAD 8      // bf16 of padding per shared row
#define LOG2E 1.4426950408889634f
#define LN2 0.6931471805599453f
#define POS_INF (__int_as_float(0x7f800000))

// Two bf16 at even element offset `col` of a row, as one 32-bit word.
__device__ __forceinline__ u32 ld2(const bf16* row, int col) { return *(const u32*)(row + col); }

// The A fragments of 16 rows (row0 .. row0 + 15) of one head of x (B, T, H,
// HS), for the HS / 16 steps of a product over the head dimension; rows past
// T read as zeros. Read straight from global memory, once per block.
template <int HS>
__device__ __forceinline__ void load_a_rows(u32 (&a)[HS / 16][4], const bf16* x, int b, int row0, int head, int T,
                                            int H) {
    int lane = threadIdx.x & 31, g = lane >> 2, t = lane & 3;
    int ra = row0 + g, rb = ra + 8;
    const bf16* pa = x + ((i64)(b * T + min(ra, T - 1)) * H + head) * HS;
    const bf16* pb = x + ((i64)(b * T + min(rb, T - 1)) * H + head) * HS;
#pragma unroll
    for (int ks = 0; ks < HS / 16; ks++) {
        int c = ks * 16 + 2 * t;
        a[ks][0] = ra < T ? ld2(pa, c) : 0u;
        a[ks][1] = rb < T ? ld2(pb, c) : 0u;
        a[ks][2] = ra < T ? ld2(pa, c + 8) : 0u;
        a[ks][3] = rb < T ? ld2(pb, c + 8) : 0u;
    }
}

// dst (ROWS, HS + PAD) = rows row0 .. row0 + ROWS - 1 of one head of x
// (B, T, H, HS), zeros past T; 16-byte copies, consecutive threads along a row.
template <int HS, int ROWS>
__device__ __forceinline__ void stage_rows_tc(bf16* dst, const bf16* x, int b, int row0, int head, int T, int H) {
    const int CH = HS / 8;
    for (int i = threadIdx.x; i < ROWS * CH; i += blockDim.x) {
        int r = i / CH, c = i % CH, t = row0 + r;
        u32x4 val = {0u, 0u, 0u, 0u};
        if (t < T) val = *(const u32x4*)(x + ((i64)(b * T + t) * H + head) * HS + c * 8);
        *(u32x4*)(dst + r * (HS + PAD) + c * 8) = val;
    }
}

// dst (HS, ROWS + PAD) = the same rows transposed, dst[d][r] = x[row0 + r][d].
// A thread takes two consecutive rows and 8 dims and writes 8 words, each the
// pair (row 2p, row 2p + 1) of one dim; consecutive threads take consecutive
// row pairs, so the words of a warp land in consecutive banks.
template <int HS, int ROWS>
__device__ __forceinline__ void stage_cols_tc(bf16* dst, const bf16* x, int b, int row0, int head, int T, int H) {
    const int CH = HS / 8, PAIRS = ROWS / 2;
    for (int i = threadIdx.x; i < PAIRS * CH; i += blockDim.x) {
        int p = i % PAIRS, c = i / PAIRS, t = row0 + 2 * p;
        u32x4 v0 = {0u, 0u, 0u, 0u}, v1 = {0u, 0u, 0u, 0u};
        if (t < T) v0 = *(const u32x4*)(x + ((i64)(b * T + t) * H + head) * HS + c * 8);
        if (t + 1 < T) v1 = *(const u32x4*)(x + ((i64)(b * T + t + 1) * H + head) * HS + c * 8);
        const u32 w0[4] = {v0.x, v0.y, v0.z, v0.w}, w1[4] = {v1.x, v1.y, v1.z, v1.w};
#pragma unroll
        for (int e = 0; e < 8; e++) {
            u32 lo = (w0[e / 2] >> (16 * (e & 1))) & 0xffffu, hi = (w1[e / 2] >> (16 * (e & 1))) & 0xffffu;
            *(u32*)(dst + (c * 8 + e) * (ROWS + PAD) + 2 * p) = lo | (hi << 16);
        }
    }
}

// acc[N / 8][4] += A (16 rows, in registers, HS / 16 fragments) times the
// transpose of the shared tile xs (N rows of HS, row-major): the warp's 16 x N
// block of A X^T (S = Q K^T, dP = dO V^T, and their transposes).
template <int HS, int N>
__device__ __forceinline__ void mma_a_xt(float (&acc)[N / 8][4], const u32 (&a)[HS / 16][4], const bf16* xs) {
    int lane = threadIdx.x & 31, g = lane >> 2, t = lane & 3;
#pragma unroll
    for (int nt = 0; nt < N / 8; nt++) {
        acc[nt][0] = acc[nt][1] = acc[nt][2] = acc[nt][3] = 0.0f;
        const bf16* row = xs + (nt * 8 + g) * (HS + PAD);
#pragma unroll
        for (int ks = 0; ks < HS / 16; ks++) {
            u32 bb[2] = {ld2(row, ks * 16 + 2 * t), ld2(row, ks * 16 + 8 + 2 * t)};
            mma_bf16_16816(acc[nt], a[ks], bb);
        }
    }
}

// out[HS / 8][4] += P X, P (16 x N) given as the D fragments p[N / 8][4] of
// an earlier product (rounded to bf16 here), X the shared tile stored
// transposed, xt (HS, N + PAD). (O += P V, dQ += dS K, dV += P^T dO, dK += dS^T Q.)
template <int HS, int N>
__device__ __forceinline__ void mma_p_x(float (&out)[HS / 8][4], const float (&p)[N / 8][4], const bf16* xt) {
    int lane = threadIdx.x & 31, g = lane >> 2, t = lane & 3;
#pragma unroll
    for (int ks = 0; ks < N / 16; ks++) {
        u32 pa[4] = {pack_bf16(p[2 * ks][0], p[2 * ks][1]), pack_bf16(p[2 * ks][2], p[2 * ks][3]),
                     pack_bf16(p[2 * ks + 1][0], p[2 * ks + 1][1]), pack_bf16(p[2 * ks + 1][2], p[2 * ks + 1][3])};
#pragma unroll
        for (int dt = 0; dt < HS / 8; dt++) {
            const bf16* row = xt + (dt * 8 + g) * (N + PAD);
            u32 bb[2] = {ld2(row, ks * 16 + 2 * t), ld2(row, ks * 16 + 8 + 2 * t)};
            mma_bf16_16816(out[dt], pa, bb);
        }
    }
}

// Two consecutive values of an output row: bf16 (packed in one word) or f32.
__device__ __forceinline__ void store2(bf16* p, float a, float b) { *(u32*)p = pack_bf16(a, b); }
__device__ __forceinline__ void store2(float* p, float a, float b) { *(float2*)p = {a, b}; }

// Writes the warp's 16 x HS block acc * scale (D fragments) to rows row0 ..
// of one head of y (B, T, H, HS), bf16 or f32, skipping rows past T.
template <int HS, typename T_OUT>
__device__ __forceinline__ void store_rows(T_OUT* y, const float (&acc)[HS / 8][4], float scale, int b, int row0,
                                           int head, int T, int H) {
    int lane = threadIdx.x & 31, g = lane >> 2, t = lane & 3;
    int ra = row0 + g, rb = ra + 8;
#pragma unroll
    for (int dt = 0; dt < HS / 8; dt++) {
        int c = dt * 8 + 2 * t;
        if (ra < T) store2(y + ((i64)(b * T + ra) * H + head) * HS + c, acc[dt][0] * scale, acc[dt][1] * scale);
        if (rb < T) store2(y + ((i64)(b * T + rb) * H + head) * HS + c, acc[dt][2] * scale, acc[dt][3] * scale);
    }
}

// ----------------------------------------------------------------------------
// Forward. Mirrors cpu::attention_forward (training shapes, Tq = Tk = T), as
// attention.cu's attention_forward does. Keys come in tiles of 64.
// grid (NH, ceil(T / 64), B), block 128: every head's last query block (the
// one with the most keys) is launched first, the first blocks last, so the
// short blocks fill the tail of the launch.

template <int HS>
__device__ __forceinline__ void attention_forward_tc(bf16* out, float* lse, const bf16* q, const bf16* k,
                                                     const bf16* v, const int* seg0, int T, int NH, int KVH) {
    const int BN = 64;
    __shared__ __align__(16) bf16 ks[BN * (HS + PAD)]; // the key tile (key, dim)
    __shared__ __align__(16) bf16 vt[HS * (BN + PAD)]; // the value tile transposed (dim, key)
    int lane = threadIdx.x & 31, warp = threadIdx.x >> 5, g = lane >> 2, t = lane & 3;
    int t0 = (gridDim.y - 1 - blockIdx.y) * TC_ROWS; // the blocks with the most keys start first
    int h = blockIdx.x, b = blockIdx.z, kvh = h / (NH / KVH);
    int ra = t0 + warp * 16 + g, rb = ra + 8; // this thread's two query rows
    int sa = seg_start(seg0, b, ra, T), sb = seg_start(seg0, b, rb, T); // their first keys
    const float sl2 = LOG2E / sqrtf((float)HS); // the softmax scale, in log2 units

    u32 qa[HS / 16][4];
    load_a_rows<HS>(qa, q, b, t0 + warp * 16, h, T, NH);
    float o[HS / 8][4];
#pragma unroll
    for (int dt = 0; dt < HS / 8; dt++) o[dt][0] = o[dt][1] = o[dt][2] = o[dt][3] = 0.0f;
    // running max (log2 units) and this thread's part of the running sum, rows a and b
    float ma = NEG_INF, mb = NEG_INF, la = 0.0f, lb = 0.0f;

    int last = min(t0 + TC_ROWS, T) - 1; // the block's last query sees keys up to last
    // (its first query sees keys from seg_start(t0) on, the earliest of the block)
    for (int j0 = seg_start(seg0, b, t0, T) / BN * BN; j0 <= last; j0 += BN) {
        __syncthreads(); // the previous tile is consumed
        stage_rows_tc<HS, BN>(ks, k, b, j0, kvh, T, KVH);
        stage_cols_tc<HS, BN>(vt, v, b, j0, kvh, T, KVH);
        __syncthreads();
        float s[BN / 8][4];
        mma_a_xt<HS, BN>(s, qa, ks);
        // Scale, causal mask, row maxima (a row's 64 keys live in its 4 lanes).
        float xa = NEG_INF, xb = NEG_INF;
#pragma unroll
        for (int nt = 0; nt < BN / 8; nt++)
#pragma unroll
            for (int e = 0; e < 2; e++) {
                int key = j0 + nt * 8 + 2 * t + e;
                s[nt][e] = key >= sa && key <= ra && key < T ? s[nt][e] * sl2 : NEG_INF;
                s[nt][2 + e] = key >= sb && key <= rb && key < T ? s[nt][2 + e] * sl2 : NEG_INF;
                xa = fmaxf(xa, s[nt][e]);
                xb = fmaxf(xb, s[nt][2 + e]);
            }
        xa = fmaxf(xa, __shfl_xor_sync(0xffffffffu, xa, 1));
        xa = fmaxf(xa, __shfl_xor_sync(0xffffffffu, xa, 2));
        xb = fmaxf(xb, __shfl_xor_sync(0xffffffffu, xb, 1));
        xb = fmaxf(xb, __shfl_xor_sync(0xffffffffu, xb, 2));
        // The new maxima are -inf while a row has seen no key yet (a packed
        // row's tiles before its segment): subtract 0 then, so that exp2
        // gives 0, not the NaN of -inf - -inf.
        float na = fmaxf(ma, xa), nb = fmaxf(mb, xb);
        float ua = na == NEG_INF ? 0.0f : na, ub = nb == NEG_INF ? 0.0f : nb;
        float ca = exp2f(ma - ua), cb = exp2f(mb - ub); // 0 on a row's first tile
        la *= ca;
        lb *= cb;
#pragma unroll
        for (int dt = 0; dt < HS / 8; dt++) {
            o[dt][0] *= ca;
            o[dt][1] *= ca;
            o[dt][2] *= cb;
            o[dt][3] *= cb;
        }
#pragma unroll
        for (int nt = 0; nt < BN / 8; nt++) {
            s[nt][0] = exp2f(s[nt][0] - ua); // masked: exp2(-inf) = 0
            s[nt][1] = exp2f(s[nt][1] - ua);
            s[nt][2] = exp2f(s[nt][2] - ub);
            s[nt][3] = exp2f(s[nt][3] - ub);
            la += s[nt][0] + s[nt][1];
            lb += s[nt][2] + s[nt][3];
        }
        ma = na;
        mb = nb;
        mma_p_x<HS, BN>(o, s, vt); // O += P V
    }
    la += __shfl_xor_sync(0xffffffffu, la, 1);
    la += __shfl_xor_sync(0xffffffffu, la, 2);
    lb += __shfl_xor_sync(0xffffffffu, lb, 1);
    lb += __shfl_xor_sync(0xffffffffu, lb, 2);
    // out = O / l; scale rows a and b separately
#pragma unroll
    for (int dt = 0; dt < HS / 8; dt++) {
        o[dt][0] /= la;
        o[dt][1] /= la;
        o[dt][2] /= lb;
        o[dt][3] /= lb;
    }
    store_rows<HS>(out, o, 1.0f, b, t0 + warp * 16, h, T, NH);
    if (t == 0) {
        if (ra < T) lse[(i64)(b * T + ra) * NH + h] = (ma + log2f(la)) * LN2;
        if (rb < T) lse[(i64)(b * T + rb) * NH + h] = (mb + log2f(lb)) * LN2;
    }
}

extern "C" __global__ void __launch_bounds__(128)
    attention_forward_tc64(bf16* out, float* lse, const bf16* q, const bf16* k, const bf16* v, const int* seg0, int T,
        int NH, int KVH) {
    attention_forward_tc<64>(out, lse, q, k, v, seg0, T, NH, KVH);
}

extern "C" __global__ void __launch_bounds__(128)
    attention_forward_tc128(bf16* out, float* lse, const bf16* q, const bf16* k, const bf16* v, const int* seg0, int T,
        int NH, int KVH) {
    attention_forward_tc<128>(out, lse, q, k, v, seg0, T, NH, KVH);
}

// ----------------------------------------------------------------------------
// Backward, pass 1: dq. Mirrors attention.cu's attention_backward_dq (pass 1
// of cpu::attention_backward): dq_t = scale sum_j dS_tj k_j with
// dS_tj = P_tj (dout_t . v_j - delta_t). Unlike the plain kernel, dq is
// written, not accumulated. delta comes from attention.cu's attention_delta.
// Keys in tiles of BN. grid (NH, ceil(T / 64), B), block 128, the longest
// blocks first (as the forward).

template <int HS, int BN>
__device__ __forceinline__ void attention_backward_dq_tc(bf16* dq, const bf16* dout, const float* lse,
                                                         const float* delta, const bf16* q, const bf16* k,
                                                         const bf16* v, const int* seg0, int T, int NH, int KVH) {
    __shared__ __align__(16) bf16 ks[BN * (HS + PAD)]; // keys (key, dim), for S = Q K^T
    __shared__ __align__(16) bf16 kt[HS * (BN + PAD)]; // keys transposed (dim, key), for dQ = dS K
    __shared__ __align__(16) bf16 vs[BN * (HS + PAD)]; // values (key, dim), for dP = dO V^T
    int lane = threadIdx.x & 31, warp = threadIdx.x >> 5, g = lane >> 2, t = lane & 3;
    int t0 = (gridDim.y - 1 - blockIdx.y) * TC_ROWS;
    int h = blockIdx.x, b = blockIdx.z, kvh = h / (NH / KVH);
    int ra = t0 + warp * 16 + g, rb = ra + 8;
    int sa = seg_start(seg0, b, ra, T), sb = seg_start(seg0, b, rb, T);
    const float sl2 = LOG2E / sqrtf((float)HS);

    u32 qa[HS / 16][4], da[HS / 16][4];
    load_a_rows<HS>(qa, q, b, t0 + warp * 16, h, T, NH);
    load_a_rows<HS>(da, dout, b, t0 + warp * 16, h, T, NH);
    // lse in log2 units; rows past T get P = 0
    float lse_a = ra < T ? lse[(i64)(b * T + ra) * NH + h] * LOG2E : POS_INF;
    float lse_b = rb < T ? lse[(i64)(b * T + rb) * NH + h] * LOG2E : POS_INF;
    float del_a = ra < T ? delta[(i64)(b * T + ra) * NH + h] : 0.0f;
    float del_b = rb < T ? delta[(i64)(b * T + rb) * NH + h] : 0.0f;
    float acc[HS / 8][4];
#pragma unroll
    for (int dt = 0; dt < HS / 8; dt++) acc[dt][0] = acc[dt][1] = acc[dt][2] = acc[dt][3] = 0.0f;

    int last = min(t0 + TC_ROWS, T) - 1;
    for (int j0 = seg_start(seg0, b, t0, T) / BN * BN; j0 <= last; j0 += BN) {
        __syncthreads();
        stage_rows_tc<HS, BN>(ks, k, b, j0, kvh, T, KVH);
        stage_cols_tc<HS, BN>(kt, k, b, j0, kvh, T, KVH);
        stage_rows_tc<HS, BN>(vs, v, b, j0, kvh, T, KVH);
        __syncthreads();
        float s[BN / 8][4], dp[BN / 8][4];
        mma_a_xt<HS, BN>(s, qa, ks);  // S = Q K^T
        mma_a_xt<HS, BN>(dp, da, vs); // dP = dO V^T
#pragma unroll
        for (int nt = 0; nt < BN / 8; nt++)
#pragma unroll
            for (int e = 0; e < 4; e++) {
                int key = j0 + nt * 8 + 2 * t + (e & 1);
                int row = e < 2 ? ra : rb, first = e < 2 ? sa : sb;
                bool seen = key >= first && key <= row && key < T;
                float p = seen ? exp2f(s[nt][e] * sl2 - (e < 2 ? lse_a : lse_b)) : 0.0f;
                s[nt][e] = p * (dp[nt][e] - (e < 2 ? del_a : del_b)); // dS
            }
        mma_p_x<HS, BN>(acc, s, kt); // dQ += dS K
    }
    store_rows<HS>(dq, acc, 1.0f / sqrtf((float)HS), b, t0 + warp * 16, h, T, NH);
}

extern "C" __global__ void __launch_bounds__(128)
    attention_backward_dq_tc64(bf16* dq, const bf16* dout, const float* lse, const float* delta, const bf16* q,
        const bf16* k, const bf16* v, const int* seg0, int T, int NH, int KVH) {
    attention_backward_dq_tc<64, 64>(dq, dout, lse, delta, q, k, v, seg0, T, NH, KVH);
}

extern "C" __global__ void __launch_bounds__(128)
    attention_backward_dq_tc128(bf16* dq, const bf16* dout, const float* lse, const float* delta, const bf16* q,
        const bf16* k, const bf16* v, const int* seg0, int T, int NH, int KVH) {
    attention_backward_dq_tc<128, 32>(dq, dout, lse, delta, q, k, v, seg0, T, NH, KVH);
}

// ----------------------------------------------------------------------------
// Backward, pass 2: dk and dv. Mirrors attention.cu's attention_backward_dkdv:
// for key j of kv head kv,
//   dv_j = sum_{h in group, t >= j} P_tj dout_t,  dk_j = scale sum dS_tj q_t.
// A block owns 64 keys (K and V fragments in registers) and walks, for each
// query head of its group, the query tiles of BQ rows at or after its keys,
// computing the transposed products S^T = K Q^T and dP^T = V dO^T so that P^T
// and dS^T come out as A fragments for dV += P^T dO and dK += dS^T Q. dk and
// dv are written, not accumulated.
//
// Two ways to split the work, the same sums:
//   whole group (dk_part null): a block per (kv head, 64 keys) walks the
//     queries of all the group's heads and writes dk, dv (bf16).
//     grid (KVH, ceil(T / 64), B).
//   per head (dk_part, dv_part (B, T, NH, HS) f32): a block per (query head,
//     64 keys) walks that head's queries and writes its part of dk, dv;
//     attention_dkdv_sum adds each group's parts. grid (NH, ceil(T / 64), B).
// Per head has group-times the blocks, each with a group-th of the longest
// walk (the whole-group blocks of the first keys walk every query of the
// group: with 32 heads over 8 kv heads and T = 2048, 128 tiles against a
// mean of 66), at the cost of writing and summing the parts. Either way the
// blocks of the first keys, which have the most queries to walk, start first.

template <int HS, int BQ>
__device__ __forceinline__ void attention_backward_dkdv_tc(bf16* dk, bf16* dv, float* dk_part, float* dv_part,
                                                           const bf16* dout, const float* lse, const float* delta,
                                                           const bf16* q, const bf16* k, const bf16* v,
                                                           const int* seg0, int T, int NH, int KVH) {
    __shared__ __align__(16) bf16 qs[BQ * (HS + PAD)];  // queries (query, dim), for S^T = K Q^T
    __shared__ __align__(16) bf16 qt[HS * (BQ + PAD)];  // queries transposed, for dK += dS^T Q
    __shared__ __align__(16) bf16 dos[BQ * (HS + PAD)]; // dout (query, dim), for dP^T = V dO^T
    __shared__ __align__(16) bf16 dot[HS * (BQ + PAD)]; // dout transposed, for dV += P^T dO
    __shared__ float lse_s[BQ], del_s[BQ];
    __shared__ int seg_s[BQ]; // the queries' segment starts
    int lane = threadIdx.x & 31, warp = threadIdx.x >> 5, g = lane >> 2, t = lane & 3;
    int j0 = blockIdx.y * TC_ROWS, b = blockIdx.z, group = NH / KVH;
    bool per_head = dk_part != nullptr;
    // the query heads this block walks: one, or the kv head's whole group
    int h_first = per_head ? blockIdx.x : blockIdx.x * group, h_end = per_head ? h_first + 1 : h_first + group;
    int kvh = h_first / group;
    int ka_ = j0 + warp * 16 + g, kb_ = ka_ + 8; // this thread's two keys
    const float sl2 = LOG2E / sqrtf((float)HS);

    u32 kfr[HS / 16][4], vfr[HS / 16][4];
    load_a_rows<HS>(kfr, k, b, j0 + warp * 16, kvh, T, KVH);
    load_a_rows<HS>(vfr, v, b, j0 + warp * 16, kvh, T, KVH);
    float adk[HS / 8][4], adv[HS / 8][4];
#pragma unroll
    for (int dt = 0; dt < HS / 8; dt++)
#pragma unroll
        for (int e = 0; e < 4; e++) adk[dt][e] = adv[dt][e] = 0.0f;

    // Queries before j0 see none of these keys, nor do those whose segment
    // starts after the block's last key (seg0 only grows along a row).
    int j_last = min(j0 + TC_ROWS, T) - 1;
    for (int h = h_first; h < h_end; h++) {
        for (int t0 = j0 / BQ * BQ; t0 < T && seg_start(seg0, b, t0, T) <= j_last; t0 += BQ) {
            __syncthreads();
            stage_rows_tc<HS, BQ>(qs, q, b, t0, h, T, NH);
            stage_cols_tc<HS, BQ>(qt, q, b, t0, h, T, NH);
            stage_rows_tc<HS, BQ>(dos, dout, b, t0, h, T, NH);
            stage_cols_tc<HS, BQ>(dot, dout, b, t0, h, T, NH);
            for (int i = threadIdx.x; i < BQ; i += blockDim.x) {
                int tq = t0 + i;
                lse_s[i] = tq < T ? lse[(i64)(b * T + tq) * NH + h] * LOG2E : POS_INF;
                del_s[i] = tq < T ? delta[(i64)(b * T + tq) * NH + h] : 0.0f;
                seg_s[i] = seg_start(seg0, b, tq, T);
            }
            __syncthreads();
            float st[BQ / 8][4], dpt[BQ / 8][4];
            mma_a_xt<HS, BQ>(st, kfr, qs);   // S^T = K Q^T
            mma_a_xt<HS, BQ>(dpt, vfr, dos); // dP^T = V dO^T
#pragma unroll
            for (int nt = 0; nt < BQ / 8; nt++)
#pragma unroll
                for (int e = 0; e < 4; e++) {
                    int col = nt * 8 + 2 * t + (e & 1), tq = t0 + col;
                    int key = e < 2 ? ka_ : kb_;
                    bool seen = tq >= key && tq < T && key < T && seg_s[col] <= key;
                    float p = seen ? exp2f(st[nt][e] * sl2 - lse_s[col]) : 0.0f;
                    st[nt][e] = p;                         // P^T
                    dpt[nt][e] = p * (dpt[nt][e] - del_s[col]); // dS^T
                }
            mma_p_x<HS, BQ>(adv, st, dot);  // dV += P^T dO
            mma_p_x<HS, BQ>(adk, dpt, qt);  // dK += dS^T Q
        }
    }
    if (per_head) {
        store_rows<HS>(dk_part, adk, 1.0f / sqrtf((float)HS), b, j0 + warp * 16, h_first, T, NH);
        store_rows<HS>(dv_part, adv, 1.0f, b, j0 + warp * 16, h_first, T, NH);
    } else {
        store_rows<HS>(dk, adk, 1.0f / sqrtf((float)HS), b, j0 + warp * 16, kvh, T, KVH);
        store_rows<HS>(dv, adv, 1.0f, b, j0 + warp * 16, kvh, T, KVH);
    }
}

extern "C" __global__ void __launch_bounds__(128)
    attention_backward_dkdv_tc64(bf16* dk, bf16* dv, float* dk_part, float* dv_part, const bf16* dout, const float* lse,
        const float* delta, const bf16* q, const bf16* k, const bf16* v, const int* seg0, int T, int NH, int KVH) {
    attention_backward_dkdv_tc<64, 64>(dk, dv, dk_part, dv_part, dout, lse, delta, q, k, v, seg0, T, NH, KVH);
}

extern "C" __global__ void __launch_bounds__(128)
    attention_backward_dkdv_tc128(bf16* dk, bf16* dv, float* dk_part, float* dv_part, const bf16* dout, const float* lse,
        const float* delta, const bf16* q, const bf16* k, const bf16* v, const int* seg0, int T, int NH, int KVH) {
    attention_backward_dkdv_tc<128, 16>(dk, dv, dk_part, dv_part, dout, lse, delta, q, k, v, seg0, T, NH, KVH);
}

// dk, dv (B, T, KVH, HS) = the sums of the per-head parts (B, T, NH, HS) over
// each kv head's group (attention_backward_dkdv_tc's per-head split), in
// head order. One thread per output value, grid-stride.
extern "C" __global__ void attention_dkdv_sum(bf16* dk, bf16* dv, const float* dk_part, const float* dv_part, i64 rows,
                                              int NH, int KVH, int HS) {
    int group = NH / KVH;
    i64 total = rows * KVH * HS;
    for (i64 i = blockIdx.x * (i64)blockDim.x + threadIdx.x; i < total; i += (i64)gridDim.x * blockDim.x) {
        i64 row = i / ((i64)KVH * HS);
        int kvh = (int)(i / HS % KVH), d = (int)(i % HS);
        const float *pk = dk_part + (row * NH + kvh * group) * HS + d, *pv = dv_part + (row * NH + kvh * group) * HS + d;
        float sk = 0.0f, sv = 0.0f;
        for (int h = 0; h < group; h++) {
            sk += pk[(i64)h * HS];
            sv += pv[(i64)h * HS];
        }
        dk[i] = f2bf(sk);
        dv[i] = f2bf(sv);
    }
}
