// mma.cuh: the tensor-core instruction of the *_tc kernels, as inline PTX
// (lift compiles its kernels with NVRTC and no CUDA headers). Prepended,
// after common.cuh, to the kernel files that use it (kernels.rs says which).
// tests/gpu/emu/emu_mma.h computes the same two functions on the CPU from
// the fragment layouts below, for the CPU emulation of the kernels.
//
// mma.sync.m16n8k16 (sm_80 and later, bf16 in, f32 accumulate) is one warp's
// D (16x8) = A (16x16) B (16x8) + D. Each lane holds a fixed piece of every
// operand (PTX ISA, "Matrix Fragments for mma.m16n8k16 with floating point
// type"); with g = lane / 4 and t = lane % 4:
//   A, 4 registers of 2 bf16: a[0] = A[g][2t..2t+1],  a[1] = A[g+8][2t..2t+1],
//                             a[2] = A[g][2t+8..+9],  a[3] = A[g+8][2t+8..+9]
//   B, 2 registers of 2 bf16: b[0] = B[2t..2t+1][g],  b[1] = B[2t+8..2t+9][g]
//   D, 4 floats:              d[0] = D[g][2t], d[1] = D[g][2t+1],
//                             d[2] = D[g+8][2t], d[3] = D[g+8][2t+1]
// In a register of two bf16 the lower column (or row, for B) is the low half,
// so a[0] is one 32-bit load of A's row g at column 2t when A is row-major,
// and b[0] one 32-bit load of row g of B^T.
//
// A useful coincidence (FlashAttention-2): the D fragments of two adjacent
// 16x8 tiles, rounded to bf16 and paired, are exactly the A fragment of the
// 16x16 tile they form, so a product's result feeds the next product as A
// without passing through shared memory.

// d (16x8 f32) += a (16x16 bf16) b (16x8 bf16), one warp.
__device__ __forceinline__ void mma_bf16_16816(float* d, const u32* a, const u32* b) {
    asm volatile(
        "mma.sync.aligned.m16n8k16.row.col.f32.bf16.bf16.f32 {%0, %1, %2, %3}, {%4, %5, %6, %7}, {%8, %9}, "
        "{%0, %1, %2, %3};\n"
        : "+f"(d[0]), "+f"(d[1]), "+f"(d[2]), "+f"(d[3])
        : "r"(a[0]), "r"(a[1]), "r"(a[2]), "r"(a[3]), "r"(b[0]), "r"(b[1]));
}

// Two f32 rounded to bf16 (nearest, ties to even) in one register, lo in the
// low half. cvt's first source goes to the high half (as cuda_bf16.hpp's
// __floats2bfloat162_rn writes it).
__device__ __forceinline__ u32 pack_bf16(float lo, float hi) {
    u32 r;
    asm("cvt.rn.bf16x2.f32 %0, %1, %2;\n" : "=r"(r) : "f"(hi), "f"(lo));
    return r;
}
