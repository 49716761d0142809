// topk.cu: LIFT's selection, the k largest |W_r| entries with ties broken
// toward the smaller index (select.rs top_k_abs), by radix select.
//
// |x| of an f32 is ordered like its bit pattern with the sign cleared, read
// as an integer (the "key", 31 bits). The k-th largest key is found digit by
// digit from histograms: bits 30..20 (11 bits), then 19..10, then 9..0, each
// among the keys that share the digits found so far. The host reads each
// small histogram and picks the bucket, as the CPU does with its two 16-bit
// digits; the threshold it arrives at is the same exact value. Then the
// selected indices are written in ascending order by a two-pass compaction
// (count per block, scan on the host, write per block), which also gives
// each key equal to the threshold its rank among the ties in index order.

#define HIST_BINS 2048
#define SEL_THREADS 256
#define SEL_ITEMS 32
#define SEL_CHUNK (SEL_THREADS * SEL_ITEMS)

__device__ __forceinline__ u32 abs_key(float x) { return __float_as_uint(x) & 0x7fffffffu; }

// hist[digit] += #{ i : (key_i >> prefix_shift) == prefix, digit = (key_i >> shift) & mask }
// (prefix_shift = 31 selects every key). Shared-memory histogram per block,
// merged with global atomics; hist has HIST_BINS zeroed u32 entries.
extern "C" __global__ void radix_histogram(u32* hist, const float* scores, i64 n, int shift, u32 mask, int prefix_shift,
                                           u32 prefix) {
    __shared__ u32 h[HIST_BINS];
    for (int b = threadIdx.x; b < HIST_BINS; b += blockDim.x) h[b] = 0;
    __syncthreads();
    for (i64 i = blockIdx.x * (i64)blockDim.x + threadIdx.x; i < n; i += (i64)gridDim.x * blockDim.x) {
        u32 key = abs_key(scores[i]);
        if (prefix_shift >= 31 || (key >> prefix_shift) == prefix) atomicAdd(&h[(key >> shift) & mask], 1u);
    }
    __syncthreads();
    for (int b = threadIdx.x; b < HIST_BINS; b += blockDim.x)
        if (h[b]) atomicAdd(&hist[b], h[b]);
}

// Inclusive scan over the block of one value per thread (SEL_THREADS).
__device__ __forceinline__ u32 block_scan_incl(u32 v, u32* warp_sums) {
    int lane = threadIdx.x & 31, warp = threadIdx.x >> 5;
    for (int o = 1; o < 32; o <<= 1) {
        u32 n = __shfl_up_sync(0xffffffffu, v, o);
        if (lane >= o) v += n;
    }
    __syncthreads();
    if (lane == 31) warp_sums[warp] = v;
    __syncthreads();
    u32 before = 0;
    for (int w = 0; w < warp; w++) before += warp_sums[w];
    return v + before;
}

// Pass 1: per block of SEL_CHUNK scores, how many keys lie above the
// threshold and how many equal it. above[blockIdx.x], ties[blockIdx.x].
extern "C" __global__ void __launch_bounds__(SEL_THREADS) select_count(u32* above, u32* ties, const float* scores, i64 n,
                                                                       u32 threshold) {
    __shared__ float scratch[32];
    i64 base = (i64)blockIdx.x * SEL_CHUNK;
    float a = 0.0f, t = 0.0f; // counts below 2^24 are exact in f32
    for (int it = 0; it < SEL_ITEMS; it++) {
        i64 i = base + (i64)it * SEL_THREADS + threadIdx.x;
        if (i < n) {
            u32 key = abs_key(scores[i]);
            a += key > threshold;
            t += key == threshold;
        }
    }
    a = block_sum(a, scratch);
    t = block_sum(t, scratch);
    if (threadIdx.x == 0) {
        above[blockIdx.x] = (u32)a;
        ties[blockIdx.x] = (u32)t;
    }
}

// Pass 2: writes the selected indices of each block, ascending, starting at
// out[out_start[block]]. tie_start[block] is the number of threshold-equal
// keys in earlier blocks; a tie is selected when its rank < ties_needed.
// Thread t takes SEL_ITEMS consecutive scores, so a scan over threads keeps
// the index order.
extern "C" __global__ void __launch_bounds__(SEL_THREADS) select_write(u32* out, const u32* out_start, const u32* tie_start,
                                                                       const float* scores, i64 n, u32 threshold,
                                                                       u32 ties_needed) {
    __shared__ u32 warp_sums[32];
    i64 base = (i64)blockIdx.x * SEL_CHUNK + (i64)threadIdx.x * SEL_ITEMS;
    u32 n_above = 0, n_ties = 0;
    for (int it = 0; it < SEL_ITEMS; it++) {
        i64 i = base + it;
        if (i < n) {
            u32 key = abs_key(scores[i]);
            n_above += key > threshold;
            n_ties += key == threshold;
        }
    }
    u32 tie_rank = tie_start[blockIdx.x] + block_scan_incl(n_ties, warp_sums) - n_ties; // of my first tie
    u32 ties_taken = tie_rank >= ties_needed ? 0 : min(n_ties, ties_needed - tie_rank);
    u32 mine = n_above + ties_taken;
    u32 pos = out_start[blockIdx.x] + block_scan_incl(mine, warp_sums) - mine;
    for (int it = 0; it < SEL_ITEMS; it++) {
        i64 i = base + it;
        if (i < n) {
            u32 key = abs_key(scores[i]);
            bool take = key > threshold;
            if (key == threshold) {
                take = tie_rank < ties_needed;
                tie_rank++;
            }
            if (take) out[pos++] = (u32)i;
        }
    }
}

// The order of |x| reversed, its ties kept: key k becomes 0x7fffffff - k
// (a 31-bit xor), so the k largest of the result are the k smallest |x| of
// the input, ties still toward the smaller index (select.rs select_k_abs
// with Smallest: the same key flip). Only the bit patterns matter to the
// kernels above; some results read as NaN as floats, which is harmless.
extern "C" __global__ void reverse_abs_order(float* scores, i64 n) {
    for (i64 i = blockIdx.x * (i64)blockDim.x + threadIdx.x; i < n; i += (i64)gridDim.x * blockDim.x)
        scores[i] = __uint_as_float(0x7fffffffu ^ abs_key(scores[i]));
}
