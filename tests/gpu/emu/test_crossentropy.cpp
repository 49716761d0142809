// The cross-entropy kernels (kernels/crossentropy.cu) run on the CPU by
// emu.h against cpu.rs's formulas in f64: V a multiple of 8 (the 16-byte
// path) and not, ignored rows, logits with a wide range, and a block smaller
// than the kernels' 1024 threads (so the strided loops wrap).
#include "emu.h"
#include "../../../kernels/common.cuh"
#include "../../../kernels/crossentropy.cu"

#include <random>

int main() {
    std::mt19937_64 rng(5);
    std::normal_distribution<float> nd(0.0f, 4.0f);
    int failed = 0;
    for (int v : {1000, 1003, 50000}) {
        int n = 5;
        std::vector<bf16> logits((size_t)n * v);
        for (auto& x : logits) x = f2bf(nd(rng));
        std::vector<int> targets = {3, -100, v - 1, 0, v / 2};
        double inv = 1.0 / 4.0;
        std::vector<double> rl(n), rlse(n), rd((size_t)n * v);
        for (int r = 0; r < n; r++) {
            double m = -1e300, s = 0;
            for (int i = 0; i < v; i++) m = std::max(m, (double)bf2f(logits[(size_t)r * v + i]));
            for (int i = 0; i < v; i++) s += std::exp(bf2f(logits[(size_t)r * v + i]) - m);
            rlse[r] = m + std::log(s);
            rl[r] = targets[r] < 0 ? 0.0 : rlse[r] - bf2f(logits[(size_t)r * v + targets[r]]);
            for (int i = 0; i < v; i++)
                rd[(size_t)r * v + i] = targets[r] < 0 ? 0.0 : std::exp(bf2f(logits[(size_t)r * v + i]) - rlse[r]) * inv - (i == targets[r] ? inv : 0.0);
        }
        std::vector<float> losses(n, NAN), lse(n, NAN);
        emu::launch({(unsigned)n, 1, 1}, {256, 1, 1}, [&] { crossentropy_forward(losses.data(), lse.data(), logits.data(), targets.data(), v); });
        emu::launch({(unsigned)n, 1, 1}, {256, 1, 1}, [&] { crossentropy_backward(logits.data(), lse.data(), targets.data(), v, (float)inv); });
        double el = 0, ed = 0, nd2 = 0;
        for (int r = 0; r < n; r++) el = std::max(el, std::fabs(losses[r] - rl[r]) / std::max(1.0, std::fabs(rl[r])));
        for (size_t i = 0; i < rd.size(); i++) {
            double x = bf2f(logits[i]);
            ed += (x - rd[i]) * (x - rd[i]);
            nd2 += rd[i] * rd[i];
        }
        ed = std::sqrt(ed / nd2);
        bool ok1 = el <= 1e-5, ok2 = std::isfinite(ed) && ed <= 1e-2;
        failed += !ok1 + !ok2;
        printf("crossentropy_forward  V=%-6d %10.2e  %s\n", v, el, ok1 ? "PASS" : "FAIL");
        printf("crossentropy_backward V=%-6d %10.2e  %s\n", v, ed, ok2 ? "PASS" : "FAIL");
    }
    printf("%s\n", failed ? "FAILED" : "all passed");
    return failed ? 1 : 0;
}
