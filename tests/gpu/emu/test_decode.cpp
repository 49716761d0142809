// The decoding kernels (kernels/decode_attention.cu, decode.cu, rope.cu's
// rope_rotate_at), run on the CPU by emu.h:
// - decode_attention_partial + decode_attention_merge against the plain
//   attention of one query over a row's cached keys (cpu::decode_attention,
//   computed here in f64 from the same bf16 q, k, v), on a slot pool that the
//   rows share in shuffled order (as beams do), cache lengths 1, not a
//   multiple of the tile, and above 4096; each with one split, the host's
//   split rule (launch.rs decode_splits) and more splits than tiles, so that
//   empty splits occur. The output is poisoned (NaN) first.
// - logits_topk against a sort (value descending, id ascending) and an f64
//   log-sum-exp, on rows with many ties, V not a multiple of the block.
// - rope_rotate_at, kv_table_append, kv_table_select, gather_rows against
//   their definitions.
#include "emu.h"
#include "../../../kernels/common.cuh"
#include "../../../kernels/decode_attention.cu"
#include "../../../kernels/decode.cu"
#include "../../../kernels/rope.cu"

#include <algorithm>
#include <numeric>
#include <random>
#include <string>

static std::mt19937_64 rng(13);

static std::vector<bf16> randb(size_t n, float scale) {
    std::normal_distribution<float> nd(0.0f, scale);
    std::vector<bf16> v(n);
    for (auto& x : v) x = f2bf(nd(rng));
    return v;
}

static int failed = 0;
static void row(const std::string& what, double err, double tol) {
    bool ok = std::isfinite(err) && err <= tol;
    failed += !ok;
    printf("%-72s %10.2e  %s\n", what.c_str(), err, ok ? "PASS" : "FAIL");
}

// launch.rs decode_splits, transcribed.
static std::pair<int, int> host_splits(int r, int nh, int max_len, int target_blocks) {
    int tiles = std::max(1, (max_len + DTILE - 1) / DTILE);
    int want = std::clamp((target_blocks + r * nh - 1) / (r * nh), 1, tiles);
    int chunk = (tiles + want - 1) / want * DTILE;
    return {std::max(1, (max_len + chunk - 1) / chunk), chunk};
}

struct Case {
    std::vector<int> lens; // per row, the new key included
    int nh, kvh, hs;
};

static void decode_attention_case(const Case& c) {
    int R = c.lens.size(), NH = c.nh, KVH = c.kvh, HS = c.hs, G = NH / KVH;
    int max_len = *std::max_element(c.lens.begin(), c.lens.end());
    int stride = max_len + 3;
    int S = max_len * R / 2 + max_len + 7; // rows share slots
    auto q = randb((size_t)R * NH * HS, 1.0f), k = randb((size_t)S * KVH * HS, 1.0f), v = randb((size_t)S * KVH * HS, 1.0f);
    std::vector<u32> table((size_t)R * stride, 0xdeadbeefu), pos(R);
    for (int r = 0; r < R; r++) {
        std::vector<u32> perm(S);
        std::iota(perm.begin(), perm.end(), 0u);
        std::shuffle(perm.begin(), perm.end(), rng);
        for (int j = 0; j < c.lens[r]; j++) table[(size_t)r * stride + j] = perm[j];
        pos[r] = c.lens[r] - 1;
    }
    // Reference, f64: softmax(q . k_j / sqrt(HS)) over the row's slots, times v.
    std::vector<double> ref((size_t)R * NH * HS);
    double scale = 1.0 / std::sqrt((double)HS);
    for (int r = 0; r < R; r++)
        for (int h = 0; h < NH; h++) {
            int kh = h / G, len = c.lens[r];
            std::vector<double> sc(len);
            double m = -1e300;
            for (int j = 0; j < len; j++) {
                size_t at = ((size_t)table[(size_t)r * stride + j] * KVH + kh) * HS;
                double d = 0;
                for (int e = 0; e < HS; e++) d += (double)bf2f(q[((size_t)r * NH + h) * HS + e]) * bf2f(k[at + e]);
                sc[j] = d * scale;
                m = std::max(m, sc[j]);
            }
            double l = 0;
            for (int j = 0; j < len; j++) l += std::exp(sc[j] - m);
            for (int e = 0; e < HS; e++) {
                double o = 0;
                for (int j = 0; j < len; j++) {
                    size_t at = ((size_t)table[(size_t)r * stride + j] * KVH + kh) * HS;
                    o += std::exp(sc[j] - m) / l * bf2f(v[at + e]);
                }
                ref[((size_t)r * NH + h) * HS + e] = o;
            }
        }
    int tiles = (max_len + DTILE - 1) / DTILE;
    std::vector<std::pair<int, int>> splits = {{1, tiles * DTILE}, host_splits(R, NH, max_len, 528),
                                               {tiles + 2, DTILE}};
    for (auto [n_splits, chunk] : splits) {
        std::vector<float> o_part((size_t)R * NH * n_splits * HS, NAN), lse_part((size_t)R * NH * n_splits, NAN);
        std::vector<bf16> out((size_t)R * NH * HS, 0xffff);
        emu::launch({(unsigned)n_splits, (unsigned)NH, (unsigned)R}, {32, 1, 1}, [&] {
            decode_attention_partial(o_part.data(), lse_part.data(), q.data(), k.data(), v.data(), table.data(),
                                     pos.data(), stride, NH, KVH, HS, n_splits, chunk);
        });
        emu::launch({(unsigned)NH, (unsigned)R, 1}, {32, 1, 1}, [&] {
            decode_attention_merge(out.data(), o_part.data(), lse_part.data(), NH, HS, n_splits);
        });
        double num = 0, den = 0;
        for (size_t i = 0; i < ref.size(); i++) {
            double x = bf2f(out[i]);
            if (!std::isfinite(x)) num = NAN;
            num += (x - ref[i]) * (x - ref[i]);
            den += ref[i] * ref[i];
        }
        std::string lens;
        for (size_t i = 0; i < c.lens.size() && i < 4; i++) lens += (i ? "," : "") + std::to_string(c.lens[i]);
        if (c.lens.size() > 4) lens += ",...";
        char name[200];
        snprintf(name, sizeof name, "decode_attention (R=%d, lens %s, NH=%d, KVH=%d, HS=%d) splits %d x %d", R,
                 lens.c_str(), NH, KVH, HS, n_splits, chunk);
        row(name, std::sqrt(num / den), 1e-2);
    }
}

static void topk_case(int R, int V, int k, int levels) {
    std::normal_distribution<float> nd(0.0f, 3.0f);
    std::vector<float> logits((size_t)R * V);
    for (auto& x : logits) x = levels ? std::round(nd(rng) * levels / 8.0f) : nd(rng);
    std::vector<float> tv((size_t)R * k, NAN), lse(R, NAN);
    std::vector<u32> ti((size_t)R * k, 0xdeadbeefu);
    emu::launch({(unsigned)R, 1, 1}, {TOPK_THREADS, 1, 1},
                [&] { logits_topk(tv.data(), ti.data(), lse.data(), logits.data(), V, k); });
    double wrong = 0, lse_err = 0;
    for (int r = 0; r < R; r++) {
        const float* x = logits.data() + (size_t)r * V;
        std::vector<u32> ids(V);
        std::iota(ids.begin(), ids.end(), 0u);
        std::stable_sort(ids.begin(), ids.end(), [&](u32 a, u32 b) { return x[a] > x[b]; });
        for (int i = 0; i < k; i++) wrong += ti[(size_t)r * k + i] != ids[i] || tv[(size_t)r * k + i] != x[ids[i]];
        double m = x[ids[0]], s = 0;
        for (int i = 0; i < V; i++) s += std::exp((double)x[i] - m);
        double want = m + std::log(s);
        lse_err = std::max(lse_err, std::abs(lse[r] - want) / std::max(1.0, std::abs(want)));
    }
    char name[200];
    snprintf(name, sizeof name, "logits_topk (R=%d, V=%d, k=%d, ties=%d): wrong entries", R, V, k, levels > 0);
    row(name, wrong, 0);
    snprintf(name, sizeof name, "logits_topk (R=%d, V=%d, k=%d, ties=%d): lse", R, V, k, levels > 0);
    row(name, lse_err, 1e-5);
}

static void rope_at_case() {
    int N = 5, H = 3, HS = 64, half = HS / 2, P = 300;
    std::vector<float> cs((size_t)P * half), sn((size_t)P * half);
    for (int p = 0; p < P; p++)
        for (int i = 0; i < half; i++) {
            double a = p * std::pow(10000.0, -2.0 * i / HS);
            cs[(size_t)p * half + i] = std::cos(a), sn[(size_t)p * half + i] = std::sin(a);
        }
    std::vector<u32> pos = {0, 7, 299, 31, 100};
    // sign 1 rotates by each row's angle (forward), sign -1 by its opposite
    // (backward: the packed batches' dq and dk)
    for (float sign : {1.0f, -1.0f}) {
        auto x = randb((size_t)N * H * HS, 1.0f), y = x;
        emu::launch({2, 1, 1}, {64, 1, 1},
                    [&] { rope_rotate_at(y.data(), cs.data(), sn.data(), pos.data(), N, H, HS, sign); });
        double num = 0, den = 0;
        for (int n = 0; n < N; n++)
            for (int h = 0; h < H; h++)
                for (int i = 0; i < half; i++) {
                    size_t a = ((size_t)n * H + h) * HS + i, b = a + half, t = (size_t)pos[n] * half + i;
                    double x0 = bf2f(x[a]), x1 = bf2f(x[b]), c = cs[t], s = sign * sn[t];
                    double r0 = x0 * c - x1 * s, r1 = x1 * c + x0 * s;
                    num += std::pow(bf2f(y[a]) - r0, 2) + std::pow(bf2f(y[b]) - r1, 2);
                    den += r0 * r0 + r1 * r1;
                }
        char name[96];
        snprintf(name, sizeof name, "rope_rotate_at (N=5, H=3, HS=64, positions 0..299, sign %+.0f)", sign);
        row(name, std::sqrt(num / den), 1e-2);
    }
}

static void table_cases() {
    int R = 5, stride = 9;
    std::vector<u32> table((size_t)R * stride), pos = {0, 3, 8, 2, 5}, from = {4, 4, 0, 2};
    for (size_t i = 0; i < table.size(); i++) table[i] = 1000 + i;
    auto want = table;
    for (int r = 0; r < R; r++) want[(size_t)r * stride + pos[r]] = 77 + r;
    emu::launch({1, 1, 1}, {32, 1, 1}, [&] { kv_table_append(table.data(), pos.data(), 77, stride, R); });
    row("kv_table_append (R=5): wrong entries", table != want, 0);
    std::vector<u32> dst((size_t)4 * stride, 0);
    emu::launch({2, 1, 1}, {32, 1, 1}, [&] { kv_table_select(dst.data(), table.data(), from.data(), stride, 4); });
    double wrong = 0;
    for (int i = 0; i < 4; i++)
        for (int j = 0; j < stride; j++) wrong += dst[(size_t)i * stride + j] != table[(size_t)from[i] * stride + j];
    row("kv_table_select (4 rows from 5): wrong entries", wrong, 0);
    int C = 70;
    auto x = randb((size_t)6 * C, 1.0f);
    std::vector<u32> rows = {5, 0, 3};
    std::vector<bf16> out((size_t)3 * C, 0xffff);
    emu::launch({2, 1, 1}, {64, 1, 1}, [&] { gather_rows(out.data(), x.data(), rows.data(), 3, C); });
    wrong = 0;
    for (int i = 0; i < 3; i++)
        for (int c = 0; c < C; c++) wrong += out[(size_t)i * C + c] != x[(size_t)rows[i] * C + c];
    row("gather_rows (3 of 6 rows, C=70): wrong entries", wrong, 0);
}

int main() {
    std::vector<Case> cases = {
        {{1}, 2, 1, 64},                          // a cache of one position
        {{37, 1, 70, 33}, 4, 2, 64},              // lengths around the tile, GQA 2
        {{5, 129}, 3, 3, 128},                    // HS 128, no grouping
        {{50, 64, 19}, 6, 2, 80},                 // HS not a power of two
        {{4100}, 2, 1, 64},                       // longer than 4096
        {{4133, 200}, 4, 1, 128},                 // long, GQA 4, HS 128
    };
    for (auto& c : cases) decode_attention_case(c);
    topk_case(3, 1000, 1, 0);
    topk_case(4, 4099, 8, 0);
    topk_case(2, 49152, 16, 6); // SmolLM2's vocabulary, values on few levels: ties decide
    topk_case(2, 300, 16, 2);
    rope_at_case();
    table_cases();
    printf("%s\n", failed ? "FAILED" : "all passed");
    return failed ? 1 : 0;
}
