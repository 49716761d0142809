// lowrank.cu: the device half of LIFT's randomized rank-r approximation
// (src/select.rs, randomized_range / cholesky_qr). The products themselves are
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

// Mirrors select.rs cholesky_inverse_transpose, for a batch of matrices (the
// seven of a layer are orthonormalized together, one block each, so the
// latency of this serial algorithm is paid once per batch instead of once
// per matrix).
//
// g (nb, q, q) f64: symmetric positive semi-definite (q, q) matrices (the
// Gram matrices Y^T Y of sketches, computed by DGEMM). For each, computes
// G = L L^T, skipping (zeroing) negligible pivots, and writes x (nb, q, q)
// f32 = L^{-T}, with zero rows and columns for the skipped pivots; then Y X
// is orthonormal (Cholesky-QR). l and m (nb, q, q) f64 are scratch for L and
// M = L^{-1}, both row-major (l[i*q + k] = L[i][k]).
//
// How the work is split (the CPU runs both halves as one loop nest):
//   Cholesky, left-looking: column j needs, for every row i >= j, the dot of
//   L[i][0..j] with L[j][0..j]. Rows are dealt to quads (4 consecutive
//   threads), and each quad splits its dot by k mod 4 and sums the four parts
//   with two shuffles; then the owner of row j decides the pivot, and after a
//   barrier every row is divided by it. Two barriers per column.
//   Inverse, by forward substitution: M[c][c] = 1 / L[c][c] and, for r > c,
//   M[r][c] = -(sum_{t=c}^{r-1} L[r][t] M[t][c]) / L[r][r]. Columns are
//   independent and dealt to quads; a quad splits each sum by t mod 4, and
//   the thread with r = part (mod 4) stores M[r][c], so every M value a
//   thread reads is one it wrote itself: no barriers at all.
// A quad owns rows (and columns) quad, quad + quads, ... (at most 4 of each:
// q <= 4 * blockDim.x / 4, checked by the caller). Every loop that contains a
// shuffle has the same trip count in all threads.
// grid (nb), block a multiple of 32 (1024 for speed).
#define CHOL_ROWS 4 // rows per quad
extern "C" __global__ void __launch_bounds__(1024) cholesky_inverse_transpose(float* x_all, double* l_all,
                                                                              double* m_all, const double* g_all,
                                                                              int q) {
    const double DROP = 1e-10; // squared relative residual: 1e-5 in norm
    __shared__ int kept[CHOL_ROWS * 256];
    __shared__ double pivot;
    const unsigned FULL = 0xffffffffu;
    i64 off = (i64)blockIdx.x * q * q;
    const double* g = g_all + off;
    double* l = l_all + off;
    double* m = m_all + off;
    float* x = x_all + off;
    int quads = blockDim.x >> 2, quad = threadIdx.x >> 2, part = threadIdx.x & 3;
    for (i64 a = threadIdx.x; a < (i64)q * q; a += blockDim.x) {
        l[a] = 0.0;
        m[a] = 0.0;
        x[a] = 0.0f;
    }
    __syncthreads();

    for (int j = 0; j < q; j++) {
        double s[CHOL_ROWS]; // g[i][j] - L[i][0..j] . L[j][0..j] for this quad's rows i >= j
#pragma unroll
        for (int u = 0; u < CHOL_ROWS; u++) {
            int i = quad + u * quads;
            double acc = 0.0;
            if (i >= j && i < q)
                for (int k = part; k < j; k += 4) acc += l[(i64)i * q + k] * l[(i64)j * q + k];
            acc += __shfl_xor_sync(FULL, acc, 1);
            acc += __shfl_xor_sync(FULL, acc, 2);
            s[u] = i >= j && i < q ? g[(i64)i * q + j] - acc : 0.0;
            if (i == j && part == 0) {
                double gjj = g[(i64)j * q + j];
                // false for NaN too (non-finite weights): such a column is dropped
                int independent = s[u] > 0.0 && s[u] > DROP * gjj;
                kept[j] = independent;
                pivot = independent ? sqrt(s[u]) : 0.0;
                if (independent) l[(i64)j * q + j] = pivot;
            }
        }
        __syncthreads(); // kept[j] and the pivot are known
        if (kept[j] && part == 0) {
#pragma unroll
            for (int u = 0; u < CHOL_ROWS; u++) {
                int i = quad + u * quads;
                if (i > j && i < q) l[(i64)i * q + j] = s[u] / pivot;
            }
        }
        __syncthreads(); // column j is complete
    }

    for (int u = 0; u < CHOL_ROWS; u++) {
        int c = quad + u * quads;
        bool active = c < q && kept[c];
        if (active && part == (c & 3)) {
            double v = 1.0 / l[(i64)c * q + c];
            m[(i64)c * q + c] = v;
            x[(i64)c * q + c] = (float)v;
        }
        for (int r = 1; r < q; r++) {
            double acc = 0.0;
            if (active && r > c)
                for (int t = c + ((part - c) & 3); t < r; t += 4) acc += l[(i64)r * q + t] * m[(i64)t * q + c];
            acc += __shfl_xor_sync(FULL, acc, 1);
            acc += __shfl_xor_sync(FULL, acc, 2);
            if (active && r > c && kept[r] && part == (r & 3)) {
                double v = -acc / l[(i64)r * q + r];
                m[(i64)r * q + c] = v;
                x[(i64)c * q + r] = (float)v; // X = M^T: column c of M is row c of X
            }
        }
    }
}
