// lowrank.cu: the device half of LIFT's randomized rank-r approximation
// (src/lift.rs, randomized_range / cholesky_qr). The products themselves are
// cuBLAS GEMMs; these kernels are the pieces in between.

// Mirrors `Rng::new(seed).fill_normal(out)` (src/rng.rs) exactly: SplitMix64
// is a counter-based generator (draw i is mix(seed + (i+1) * golden)), so
// every pair of normals can be computed independently. Pair p uses draws 2p
// and 2p+1 through Box-Muller in f64; out[2p] = r cos, out[2p+1] = r sin.
// The sketch matrix Omega is therefore the CPU's, up to the last bit of
// log/cos/sin.
__device__ __forceinline__ u64 splitmix_draw(u64 seed, u64 i) {
    u64 z = seed + (i + 1) * 0x9E3779B97F4A7C15ull;
    z = (z ^ (z >> 30)) * 0xBF58476D1CE4E5B9ull;
    z = (z ^ (z >> 27)) * 0x94D049BB133111EBull;
    return z ^ (z >> 31);
}

extern "C" __global__ void randn_splitmix(float* out, i64 n, u64 seed) {
    i64 pairs = (n + 1) / 2;
    for (i64 p = blockIdx.x * (i64)blockDim.x + threadIdx.x; p < pairs; p += (i64)gridDim.x * blockDim.x) {
        double u1 = 1.0 - (double)(splitmix_draw(seed, 2 * p) >> 11) * (1.0 / 9007199254740992.0);
        double u2 = (double)(splitmix_draw(seed, 2 * p + 1) >> 11) * (1.0 / 9007199254740992.0);
        double radius = sqrt(-2.0 * log(u1));
        double angle = 6.283185307179586 * u2;
        out[2 * p] = (float)(radius * cos(angle));
        if (2 * p + 1 < n) out[2 * p + 1] = (float)(radius * sin(angle));
    }
}

// Mirrors lift.rs cholesky_inverse_transpose. g is a symmetric positive
// semi-definite (q, q) f64 matrix (the Gram matrix Y^T Y of a sketch,
// computed by a DGEMM). Computes G = L L^T, skipping (zeroing) negligible
// pivots, and writes X = L^{-T} (q, q) as f32, zero rows and columns for the
// skipped pivots; then Y X is orthonormal (Cholesky-QR).
//
// One block of 1024 threads (q <= 1024). `lt` and `mt` are (q, q) f64
// scratch in global memory (L2-resident at these sizes), both stored
// transposed (lt[k*q + i] = L[i][k]) so that thread i's reads of its own row
// are coalesced across the block.
extern "C" __global__ void __launch_bounds__(1024) cholesky_inverse_transpose(float* x, double* lt, double* mt,
                                                                              const double* g, int q) {
    __shared__ double scratch[32];
    __shared__ int kept[1024];
    __shared__ double ljj_s;
    const double DROP = 1e-10; // squared relative residual: 1e-5 in norm
    int i = threadIdx.x;
    for (int a = i; a < q * q; a += blockDim.x) {
        lt[a] = 0.0;
        mt[a] = 0.0;
    }
    __syncthreads();
    // Left-looking Cholesky, one column j per step; thread i owns row i.
    for (int j = 0; j < q; j++) {
        double part = 0.0;
        for (int kk = i; kk < j; kk += blockDim.x) {
            double v = lt[(i64)kk * q + j];
            part += v * v;
        }
        double dj = g[(i64)j * q + j] - block_sum_f64(part, scratch);
        if (i == 0) {
            // false for NaN too (non-finite weights): such a column is dropped
            int independent = dj > 0.0 && dj > DROP * g[(i64)j * q + j];
            kept[j] = independent;
            ljj_s = independent ? sqrt(dj) : 0.0;
            if (independent) lt[(i64)j * q + j] = ljj_s;
        }
        __syncthreads();
        if (kept[j] && i > j && i < q) {
            double s = g[(i64)i * q + j];
            for (int kk = 0; kk < j; kk++) s -= lt[(i64)kk * q + i] * lt[(i64)kk * q + j];
            lt[(i64)j * q + i] = s / ljj_s;
        }
        __syncthreads();
    }
    // M = L^{-1} by forward substitution; thread c builds column c of M
    // (stored as mt[i*q + c] = M[i][c], so the block reads row i together).
    int c = i;
    if (c < q && kept[c]) {
        mt[(i64)c * q + c] = 1.0 / lt[(i64)c * q + c];
        for (int r = c + 1; r < q; r++) {
            if (!kept[r]) continue;
            double s = 0.0;
            for (int t = c; t < r; t++) s += lt[(i64)t * q + r] * mt[(i64)t * q + c];
            mt[(i64)r * q + c] = -s / lt[(i64)r * q + r];
        }
    }
    __syncthreads();
    // X = M^T: x[c][r] = M[r][c].
    for (int a = i; a < q * q; a += blockDim.x) {
        int cc = a / q, r = a % q;
        x[a] = (float)mt[(i64)r * q + cc];
    }
}
