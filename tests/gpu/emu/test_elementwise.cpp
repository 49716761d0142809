// The vectorized elementwise kernels (kernels/swiglu.cu, residual.cu) run on
// the CPU by emu.h against the formulas of cpu.rs in f64: sizes that are and
// are not multiples of the kernels' 8, a grid smaller than the work (so the
// grid-stride loops wrap), swiglu_backward accumulating and overwriting.
#include "emu.h"
#include "../../../kernels/common.cuh"
#include "../../../kernels/swiglu.cu"
#include "../../../kernels/residual.cu"

#include <random>

static double rel(const std::vector<double>& r, const std::vector<bf16>& got) {
    double num = 0, den = 0;
    for (size_t i = 0; i < r.size(); i++) {
        double x = bf2f(got[i]);
        if (!std::isfinite(x)) return NAN;
        num += (x - r[i]) * (x - r[i]);
        den += r[i] * r[i];
    }
    return std::sqrt(num / den);
}

int main() {
    std::mt19937_64 rng(11);
    std::normal_distribution<float> nd(0.0f, 1.5f);
    int failed = 0;
    for (long n : {8L, 1000L, 12345L}) {
        auto rb = [&](long m) { std::vector<bf16> v(m); for (auto& x : v) x = f2bf(nd(rng)); return v; };
        auto g = rb(n), u = rb(n), dy = rb(n), g0 = rb(n), u0 = rb(n);
        std::vector<double> rf(n), rdg(n), rdu(n), rdg0(n), rdu0(n), rres(n);
        for (long i = 0; i < n; i++) {
            double a = bf2f(g[i]), b = bf2f(u[i]), d = bf2f(dy[i]), s = 1.0 / (1.0 + std::exp(-a));
            rf[i] = a * s * b;
            rdu[i] = d * a * s;
            rdg[i] = d * b * s * (1.0 + a * (1.0 - s));
            rdg0[i] = rdg[i] + bf2f(g0[i]);
            rdu0[i] = rdu[i] + bf2f(u0[i]);
            rres[i] = a + b;
        }
        std::vector<bf16> out(n, 0xffff), dg(n, 0xffff), du(n, 0xffff), dga = g0, dua = u0, res(n, 0xffff);
        dim3 grid{3, 1, 1}, block{64, 1, 1};
        emu::launch(grid, block, [&] { swiglu_forward(out.data(), g.data(), u.data(), n); });
        emu::launch(grid, block, [&] { swiglu_backward(dg.data(), du.data(), dy.data(), g.data(), u.data(), n, 0); });
        emu::launch(grid, block, [&] { swiglu_backward(dga.data(), dua.data(), dy.data(), g.data(), u.data(), n, 1); });
        emu::launch(grid, block, [&] { residual_forward(res.data(), g.data(), u.data(), n); });
        struct { const char* what; double err; } rows[] = {
            {"swiglu_forward", rel(rf, out)},
            {"swiglu_backward dgate (overwrite)", rel(rdg, dg)},
            {"swiglu_backward dup (overwrite)", rel(rdu, du)},
            {"swiglu_backward dgate (accumulate)", rel(rdg0, dga)},
            {"swiglu_backward dup (accumulate)", rel(rdu0, dua)},
            {"residual_forward", rel(rres, res)},
        };
        for (auto& r : rows) {
            bool ok = std::isfinite(r.err) && r.err <= 1e-2;
            failed += !ok;
            printf("%-36s n=%-6ld %10.2e  %s\n", r.what, n, r.err, ok ? "PASS" : "FAIL");
        }
    }
    printf("%s\n", failed ? "FAILED" : "all passed");
    return failed ? 1 : 0;
}
