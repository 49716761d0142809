// emu.h: runs the CUDA C of kernels/*.cu on the CPU, to check kernels on a
// machine with no GPU (tests/gpu/emu/run.sh). Every CUDA thread of a block is
// an OS thread; blocks run one after another. __syncthreads is a barrier of
// the block, and the warp-wide operations (shuffles, the tensor-core
// instructions of kernels/mma.cuh) are barriers of the 32 threads of a warp
// that exchange values through a buffer. Slow, but it runs the kernel text
// exactly as written, so wrong indexing, wrong fragment layouts (as the PTX
// ISA documents them) and missing barriers on a warp's collective operations
// show up as wrong numbers or as a hang.
//
// What it cannot show: races between ordinary shared-memory accesses that a
// missing __syncthreads would cause on the GPU (threads here interleave
// differently), and whether the hardware's layouts are what the PTX ISA
// says; gpu-check on the GPU is the final word.
#pragma once
#include <atomic>
#include <barrier>
#include <cmath>
#include <cstdint>
#include <cstdio>
#include <cstdlib>
#include <cstring>
#include <functional>
#include <memory>
#include <mutex>
#include <thread>
#include <vector>

struct dim3 {
    unsigned x = 1, y = 1, z = 1;
};

// CUDA's built-in vector type, as the kernels use it (8-byte stores).
struct alignas(8) float2 {
    float x, y;
};

inline thread_local dim3 threadIdx;
inline dim3 blockIdx, blockDim, gridDim;

#define __global__
#define __device__
#define __forceinline__ inline
#define __launch_bounds__(...)
#define __shared__ static
#define __align__(n) __attribute__((aligned(n)))
#define __restrict__

namespace emu {
struct Warp {
    std::unique_ptr<std::barrier<>> bar;
    uint64_t slot[32][16];
};
inline std::unique_ptr<std::barrier<>> block_bar;
inline std::vector<Warp> warps;
inline thread_local int lane_id, warp_id;

// Runs kernel() for every thread of every block of grid x block.
inline void launch(dim3 grid, dim3 block, const std::function<void()>& kernel) {
    unsigned nthreads = block.x * block.y * block.z;
    if (nthreads % 32 != 0) {
        fprintf(stderr, "emu: block of %u threads is not whole warps\n", nthreads);
        abort();
    }
    gridDim = grid;
    blockDim = block;
    for (unsigned bz = 0; bz < grid.z; bz++)
        for (unsigned by = 0; by < grid.y; by++)
            for (unsigned bx = 0; bx < grid.x; bx++) {
                blockIdx = {bx, by, bz};
                block_bar = std::make_unique<std::barrier<>>(nthreads);
                warps = std::vector<Warp>(nthreads / 32);
                for (auto& w : warps) w.bar = std::make_unique<std::barrier<>>(32);
                std::vector<std::thread> ts;
                for (unsigned t = 0; t < nthreads; t++) {
                    ts.emplace_back([t, &block, &kernel] {
                        threadIdx = {t % block.x, (t / block.x) % block.y, t / (block.x * block.y)};
                        lane_id = t % 32;
                        warp_id = t / 32;
                        kernel();
                    });
                }
                for (auto& t : ts) t.join();
            }
}

// All 32 lanes put `n` 64-bit words in; returns after every lane has put its own.
inline Warp& exchange(const uint64_t* mine, int n) {
    Warp& w = warps[warp_id];
    for (int i = 0; i < n; i++) w.slot[lane_id][i] = mine[i];
    w.bar->arrive_and_wait();
    return w;
}
inline void done(Warp& w) { w.bar->arrive_and_wait(); }

template <class T>
T shfl(T v, int src) {
    uint64_t x = 0;
    memcpy(&x, &v, sizeof(T));
    Warp& w = exchange(&x, 1);
    uint64_t y = w.slot[src & 31][0];
    done(w);
    T r;
    memcpy(&r, &y, sizeof(T));
    return r;
}
} // namespace emu

inline void __syncthreads() { emu::block_bar->arrive_and_wait(); }
inline void __syncwarp(unsigned = 0xffffffffu) { emu::warps[emu::warp_id].bar->arrive_and_wait(); }
template <class T> T __shfl_sync(unsigned, T v, int src) { return emu::shfl(v, src); }
template <class T> T __shfl_xor_sync(unsigned, T v, int m) { return emu::shfl(v, emu::lane_id ^ m); }
template <class T> T __shfl_up_sync(unsigned, T v, int d) {
    T r = emu::shfl(v, emu::lane_id >= d ? emu::lane_id - d : emu::lane_id);
    return r;
}

inline float __uint_as_float(unsigned u) { float f; memcpy(&f, &u, 4); return f; }
inline unsigned __float_as_uint(float f) { unsigned u; memcpy(&u, &f, 4); return u; }
inline float __int_as_float(int u) { float f; memcpy(&f, &u, 4); return f; }
inline int __float_as_int(float f) { int u; memcpy(&u, &f, 4); return u; }
inline float __expf(float x) { return expf(x); }
inline float __logf(float x) { return logf(x); }
inline float rsqrtf(float x) { return 1.0f / sqrtf(x); }
inline float __fdividef(float a, float b) { return a / b; }
using std::max;
using std::min;

template <class T> T atomicAdd(T* p, T v) {
    static std::mutex m;
    std::lock_guard<std::mutex> g(m);
    T old = *p;
    *p = old + v;
    return old;
}

