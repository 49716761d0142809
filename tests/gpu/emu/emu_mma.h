// emu_mma.h: the helpers of kernels/mma.cuh on the CPU, for emu.h. Include
// after kernels/common.cuh (pack_bf16 rounds with its f2bf).
//
// mma_bf16_16816 computes D = A B + D from the fragment layouts of the PTX
// ISA ("Matrix Fragments for mma.m16n8k16 with floating point type"), with
// g = lane / 4 and t = lane % 4:
//   A (16x16, row):  a[0] = A[g][2t..2t+1],   a[1] = A[g+8][2t..2t+1],
//                    a[2] = A[g][2t+8..+9],   a[3] = A[g+8][2t+8..+9]
//   B (16x8, col):   b[0] = B[2t..2t+1][g],   b[1] = B[2t+8..2t+9][g]
//   C, D (16x8 f32): d[0] = D[g][2t], d[1] = D[g][2t+1], d[2] = D[g+8][2t], d[3] = D[g+8][2t+1]
// and two bf16 in a 32-bit register hold the lower column in the low half.
#pragma once

inline float emu_bf(u32 word, int half) { return __uint_as_float(half ? (word & 0xffff0000u) : (word << 16)); }

inline void mma_bf16_16816(float* d, const u32* a, const u32* b) {
    uint64_t mine[6] = {a[0], a[1], a[2], a[3], b[0], b[1]};
    emu::Warp& w = emu::exchange(mine, 6);
    int g = emu::lane_id / 4, t = emu::lane_id % 4;
    auto A = [&](int row, int k) {
        int lane = (row % 8) * 4 + (k % 8) / 2;
        int reg = (row >= 8) + 2 * (k >= 8);
        return emu_bf((u32)w.slot[lane][reg], k & 1);
    };
    auto B = [&](int k, int col) {
        int lane = col * 4 + (k % 8) / 2;
        int reg = 4 + (k >= 8);
        return emu_bf((u32)w.slot[lane][reg], k & 1);
    };
    float out[4];
    for (int i = 0; i < 4; i++) {
        int row = g + 8 * (i >= 2), col = 2 * t + (i & 1);
        double s = d[i];
        for (int k = 0; k < 16; k++) s += (double)A(row, k) * (double)B(k, col);
        out[i] = (float)s;
    }
    emu::done(w);
    for (int i = 0; i < 4; i++) d[i] = out[i];
}

inline u32 pack_bf16(float lo, float hi) { return (u32)f2bf(lo) | ((u32)f2bf(hi) << 16); }
