// The batched Cholesky-inverse kernel of kernels/lowrank.cu, run on the CPU
// by emu.h, against a line-by-line C++ copy of lift.rs's
// cholesky_inverse_transpose (the CPU reference the kernel mirrors), on
// Gram matrices of random sketches: full rank, rank-deficient (dropped
// pivots), and sizes that give a quad 1 to 4 rows. x is poisoned first.
#include "emu.h"
#include "../../../kernels/common.cuh"
#include "../../../kernels/lowrank.cu"

#include <random>

// lift.rs cholesky_inverse_transpose, transcribed.
static std::vector<float> reference(const std::vector<double>& g, int q) {
    const double DROP = 1e-10;
    std::vector<double> l(q * q, 0.0);
    std::vector<bool> kept(q, false);
    auto dot = [&](const double* a, const double* b, int n) {
        double s = 0;
        for (int i = 0; i < n; i++) s += a[i] * b[i];
        return s;
    };
    for (int j = 0; j < q; j++) {
        double dj = g[j * q + j] - dot(&l[j * q], &l[j * q], j);
        bool independent = dj > 0.0 && dj > DROP * g[j * q + j];
        if (!independent) continue;
        kept[j] = true;
        double ljj = std::sqrt(dj);
        l[j * q + j] = ljj;
        for (int i = j + 1; i < q; i++) l[i * q + j] = (g[i * q + j] - dot(&l[i * q], &l[j * q], j)) / ljj;
    }
    std::vector<float> x(q * q, 0.0f);
    std::vector<double> col(q);
    for (int c = 0; c < q; c++) {
        if (!kept[c]) continue;
        std::fill(col.begin(), col.end(), 0.0);
        col[c] = 1.0 / l[c * q + c];
        for (int i = c + 1; i < q; i++)
            if (kept[i]) col[i] = -dot(&l[i * q + c], &col[c], i - c) / l[i * q + i];
        for (int i = c; i < q; i++) x[c * q + i] = (float)col[i];
    }
    return x;
}

int main() {
    std::mt19937_64 rng(3);
    std::normal_distribution<double> nd(0.0, 1.0);
    struct Case {
        int q, rows, nb, threads;
    } cases[] = {{37, 300, 3, 128}, {64, 50, 2, 128}, {100, 400, 1, 128}, {128, 500, 2, 128}, {256, 600, 1, 1024}};
    int failed = 0;
    for (auto cs : cases) {
        int q = cs.q, nb = cs.nb;
        std::vector<double> g((size_t)nb * q * q), l(g.size()), m(g.size());
        std::vector<float> x(g.size(), NAN);
        for (int b = 0; b < nb; b++) {
            // G = Y^T Y, Y (rows, q) with columns of different scales
            std::vector<double> y((size_t)cs.rows * q);
            for (int r = 0; r < cs.rows; r++)
                for (int c = 0; c < q; c++) y[(size_t)r * q + c] = (float)(nd(rng) * (1.0 + c % 7));
            for (int i = 0; i < q; i++)
                for (int j = 0; j < q; j++) {
                    double s = 0;
                    for (int r = 0; r < cs.rows; r++) s += y[(size_t)r * q + i] * y[(size_t)r * q + j];
                    g[(size_t)b * q * q + i * q + j] = s;
                }
        }
        emu::launch({(unsigned)nb, 1, 1}, {(unsigned)cs.threads, 1, 1},
                    [&] { cholesky_inverse_transpose(x.data(), l.data(), m.data(), g.data(), q); });
        double worst = 0;
        for (int b = 0; b < nb; b++) {
            std::vector<double> gb(g.begin() + (size_t)b * q * q, g.begin() + (size_t)(b + 1) * q * q);
            auto r = reference(gb, q);
            double num = 0, den = 0;
            for (int i = 0; i < q * q; i++) {
                double got = x[(size_t)b * q * q + i];
                if (!std::isfinite(got)) num = INFINITY;
                num += (got - r[i]) * (got - r[i]);
                den += (double)r[i] * r[i];
            }
            worst = std::max(worst, std::sqrt(num / den));
        }
        bool ok = worst <= 1e-6;
        failed += !ok;
        printf("cholesky_inverse_transpose q=%-4d rows=%-4d nb=%d block=%-5d %10.2e %8.1e  %s\n", q, cs.rows, nb,
               cs.threads, worst, 1e-6, ok ? "PASS" : "FAIL");
        fflush(stdout);
    }
    printf("%s\n", failed ? "FAILED" : "all passed");
    return failed ? 1 : 0;
}
