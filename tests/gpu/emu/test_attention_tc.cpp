// The attention kernels, tensor-core (kernels/attention_tc.cu) and plain
// (kernels/attention.cu), run on the CPU by emu.h, against causal GQA
// attention computed here in f64 from the same bf16 inputs: forward out and
// lse, backward dq, dk, dv (given the reference lse and delta, so each pass
// is checked alone). The tensor-core kernels' outputs are poisoned (NaN)
// before each launch, so an unwritten element fails (the plain ones add into
// zeroed dq, dk, dv). Shapes include T not a multiple of the tiles, one row,
// GQA groups of 1, 2 and 4, HS 64 and 128, and packed rows (seg0): examples
// of 1 token, examples across tile edges, starting inside a tile, B = 2.
#include "emu.h"
#include "../../../kernels/common.cuh"
#include "emu_mma.h"
#include "../../../kernels/attention_tc.cu"
#include "../../../kernels/attention.cu"

#include <random>
#include <string>

static float bfv(bf16 x) { return bf2f(x); }

struct Shape {
    int b, t, nh, kvh, hs;
    bool plain;                   // attention.cu's kernels, not attention_tc.cu's
    std::vector<int> segs;        // the examples' lengths, row after row (empty: whole rows)
};

static double rel(const std::vector<double>& ref, const std::vector<float>& got) {
    double num = 0, den = 0;
    for (size_t i = 0; i < ref.size(); i++) {
        if (!std::isfinite(got[i])) return NAN;
        num += (got[i] - ref[i]) * (got[i] - ref[i]);
        den += ref[i] * ref[i];
    }
    return std::sqrt(num / (den > 0 ? den : 1));
}

int main() {
    std::mt19937_64 rng(7);
    std::normal_distribution<float> nd(0.0f, 1.0f);
    std::vector<Shape> shapes = {
        {1, 37, 2, 1, 64, false, {}},
        {2, 70, 4, 2, 64, false, {}},
        {1, 1, 2, 2, 64, false, {}},
        {1, 64, 4, 1, 64, false, {}},
        {1, 130, 2, 1, 128, false, {}},
        {1, 17, 2, 2, 128, false, {}},
        {1, 150, 4, 2, 64, false, {40, 1, 70, 39}},
        {2, 130, 2, 1, 128, false, {64, 66, 3, 100, 27}},
        {1, 70, 4, 2, 32, true, {}},
        {1, 100, 4, 2, 64, true, {33, 1, 30, 36}},
        {2, 45, 2, 1, 128, true, {45, 5, 40}},
    };
    int failed = 0;
    for (Shape s : shapes) {
        int B = s.b, T = s.t, NH = s.nh, KVH = s.kvh, HS = s.hs, G = NH / KVH;
        // seg0 (B, T): where each position's example starts in its row
        std::vector<int> seg0((size_t)B * T, 0);
        for (size_t i = 0, at = 0; i < s.segs.size(); at += s.segs[i], i++)
            for (int e = 0; e < s.segs[i]; e++) seg0[at + e] = (int)(at % T);
        const int* sp = s.segs.empty() ? nullptr : seg0.data();
        size_t nq = (size_t)B * T * NH * HS, nkv = (size_t)B * T * KVH * HS, nr = (size_t)B * T * NH;
        auto randb = [&](size_t n) {
            std::vector<bf16> v(n);
            for (auto& x : v) x = f2bf(nd(rng));
            return v;
        };
        std::vector<bf16> q = randb(nq), k = randb(nkv), v = randb(nkv), dout = randb(nq);
        double scale = 1.0 / std::sqrt((double)HS);
        auto Q = [&](int b, int t, int h, int d) { return (double)bfv(q[(((size_t)b * T + t) * NH + h) * HS + d]); };
        auto K = [&](int b, int t, int h, int d) { return (double)bfv(k[(((size_t)b * T + t) * KVH + h) * HS + d]); };
        auto V = [&](int b, int t, int h, int d) { return (double)bfv(v[(((size_t)b * T + t) * KVH + h) * HS + d]); };
        auto DO = [&](int b, int t, int h, int d) { return (double)bfv(dout[(((size_t)b * T + t) * NH + h) * HS + d]); };

        // Reference, f64.
        std::vector<double> rout(nq), rlse(nr), rdelta(nr), rdq(nq, 0.0), rdk(nkv, 0.0), rdv(nkv, 0.0);
        for (int b = 0; b < B; b++)
            for (int h = 0; h < NH; h++) {
                int kh = h / G;
                for (int t = 0; t < T; t++) {
                    int j0 = seg0[(size_t)b * T + t]; // keys j0 ..= t
                    std::vector<double> sc(t + 1);
                    double m = -1e300;
                    for (int j = j0; j <= t; j++) {
                        double d = 0;
                        for (int e = 0; e < HS; e++) d += Q(b, t, h, e) * K(b, j, kh, e);
                        sc[j] = d * scale;
                        m = std::max(m, sc[j]);
                    }
                    double l = 0;
                    for (int j = j0; j <= t; j++) l += std::exp(sc[j] - m);
                    double lse = m + std::log(l);
                    size_t row = ((size_t)b * T + t) * NH + h;
                    rlse[row] = lse;
                    double delta = 0;
                    for (int e = 0; e < HS; e++) {
                        double o = 0;
                        for (int j = j0; j <= t; j++) o += std::exp(sc[j] - lse) * V(b, j, kh, e);
                        rout[row * HS + e] = o;
                        delta += o * DO(b, t, h, e);
                    }
                    rdelta[row] = delta;
                    for (int j = j0; j <= t; j++) {
                        double p = std::exp(sc[j] - lse), dp = 0;
                        for (int e = 0; e < HS; e++) dp += DO(b, t, h, e) * V(b, j, kh, e);
                        double ds = p * (dp - delta);
                        size_t kr = ((size_t)b * T + j) * KVH + kh;
                        for (int e = 0; e < HS; e++) {
                            rdq[row * HS + e] += scale * ds * K(b, j, kh, e);
                            rdk[kr * HS + e] += scale * ds * Q(b, t, h, e);
                            rdv[kr * HS + e] += p * DO(b, t, h, e);
                        }
                    }
                }
            }

        // Kernels, outputs poisoned first.
        const bf16 POISON = 0xffff; // a NaN
        std::vector<bf16> out(nq, POISON), dq(nq, POISON), dk(nkv, POISON), dv(nkv, POISON), dk_head, dv_head;
        std::vector<float> lse(nr, NAN), flse(nr), fdelta(nr);
        for (size_t i = 0; i < nr; i++) {
            flse[i] = (float)rlse[i];
            fdelta[i] = (float)rdelta[i];
        }
        if (s.plain) {
            std::fill(dq.begin(), dq.end(), f2bf(0.0f));
            std::fill(dk.begin(), dk.end(), f2bf(0.0f));
            std::fill(dv.begin(), dv.end(), f2bf(0.0f));
            unsigned gx = (T + 31) / 32;
            emu::launch({gx, (unsigned)NH, (unsigned)B}, {256, 1, 1}, [&] {
                attention_forward(out.data(), lse.data(), q.data(), k.data(), v.data(), sp, T, NH, KVH, HS);
            });
            emu::launch({gx, (unsigned)NH, (unsigned)B}, {256, 1, 1}, [&] {
                attention_backward_dq(dq.data(), dout.data(), flse.data(), fdelta.data(), q.data(), k.data(), v.data(),
                                      sp, T, NH, KVH, HS);
            });
            emu::launch({gx, (unsigned)KVH, (unsigned)B}, {256, 1, 1}, [&] {
                attention_backward_dkdv(dk.data(), dv.data(), dout.data(), flse.data(), fdelta.data(), q.data(),
                                        k.data(), v.data(), sp, T, NH, KVH, HS);
            });
        } else {
            // grids (heads, blocks of 64 rows, B), as launch.rs gives them
            unsigned gy = (T + 63) / 64;
            auto fwd = HS == 64 ? attention_forward_tc64 : attention_forward_tc128;
            auto bdq = HS == 64 ? attention_backward_dq_tc64 : attention_backward_dq_tc128;
            auto bdkdv = HS == 64 ? attention_backward_dkdv_tc64 : attention_backward_dkdv_tc128;
            emu::launch({(unsigned)NH, gy, (unsigned)B}, {128, 1, 1},
                        [&] { fwd(out.data(), lse.data(), q.data(), k.data(), v.data(), sp, T, NH, KVH); });
            emu::launch({(unsigned)NH, gy, (unsigned)B}, {128, 1, 1}, [&] {
                bdq(dq.data(), dout.data(), flse.data(), fdelta.data(), q.data(), k.data(), v.data(), sp, T, NH, KVH);
            });
            // dk, dv: the whole group in one block (here), then per head (below)
            emu::launch({(unsigned)KVH, gy, (unsigned)B}, {128, 1, 1}, [&] {
                bdkdv(dk.data(), dv.data(), nullptr, nullptr, dout.data(), flse.data(), fdelta.data(), q.data(),
                      k.data(), v.data(), sp, T, NH, KVH);
            });
            if (NH > KVH) {
                std::vector<float> pk(nq, NAN), pv(nq, NAN);
                dk_head.assign(nkv, POISON);
                dv_head.assign(nkv, POISON);
                emu::launch({(unsigned)NH, gy, (unsigned)B}, {128, 1, 1}, [&] {
                    bdkdv(nullptr, nullptr, pk.data(), pv.data(), dout.data(), flse.data(), fdelta.data(), q.data(),
                          k.data(), v.data(), sp, T, NH, KVH);
                });
                emu::launch({4, 1, 1}, {64, 1, 1}, [&] {
                    attention_dkdv_sum(dk_head.data(), dv_head.data(), pk.data(), pv.data(), (i64)B * T, NH, KVH, HS);
                });
            }
        }
        auto tof = [](const std::vector<bf16>& x) {
            std::vector<float> r(x.size());
            for (size_t i = 0; i < x.size(); i++) r[i] = bfv(x[i]);
            return r;
        };
        char name[128];
        snprintf(name, sizeof name, "%s(B=%d, T=%d, NH=%d, KVH=%d, HS=%d%s)", s.plain ? "plain " : "", B, T, NH, KVH,
                 HS, s.segs.empty() ? "" : ", packed");
        struct Row {
            const char* what;
            double err, tol;
        } rows[] = {
            {"forward out", rel(rout, tof(out)), 1e-2},
            {"forward lse", rel(rlse, lse), 1e-4},
            {"backward dq", rel(rdq, tof(dq)), 1e-2},
            {"backward dk", rel(rdk, tof(dk)), 1e-2},
            {"backward dv", rel(rdv, tof(dv)), 1e-2},
        };
        std::vector<Row> all(std::begin(rows), std::end(rows));
        if (!dk_head.empty()) {
            all.push_back({"dk per head", rel(rdk, tof(dk_head)), 1e-2});
            all.push_back({"dv per head", rel(rdv, tof(dv_head)), 1e-2});
        }
        for (auto& r : all) {
            bool ok = std::isfinite(r.err) && r.err <= r.tol;
            failed += !ok;
            printf("attention %-12s %-52s %10.2e %8.1e  %s\n", r.what, name, r.err, r.tol, ok ? "PASS" : "FAIL");
        }
        fflush(stdout);
    }
    printf("%s\n", failed ? "FAILED" : "all passed");
    return failed ? 1 : 0;
}
