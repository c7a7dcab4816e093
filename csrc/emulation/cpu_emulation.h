// CPU emulation of the small CUDA subset the resnet_fast kernels use, so that the kernels in
// add_relu.cu / batch_norm_act.cu can be compiled by g++ and executed on a machine without a GPU
// (tests/test_cuda_ext.py builds emulation/emulate.cpp). Not part of the extension.
//
// A launch runs the grid's blocks one after another. The threads of a block are fibers (ucontext) run
// round-robin on the calling thread: each runs until its next __syncthreads (a yield) or its end, so
// every thread reaches barrier k before any passes it, exactly the CUDA contract, deterministically.
// __shared__ variables are function statics (shared by the block's threads); blockIdx/threadIdx/
// blockDim/gridDim are set before each switch.
#pragma once

#include <ucontext.h>

#include <cstdint>
#include <functional>
#include <memory>
#include <stdexcept>
#include <vector>

struct dim3 {
  unsigned int x, y, z;
  constexpr dim3(unsigned int x_ = 1, unsigned int y_ = 1, unsigned int z_ = 1) : x(x_), y(y_), z(z_) {}
};
using cudaStream_t = void*;

namespace rf_emu {
inline dim3 t_block_idx, t_thread_idx, t_block_dim, t_grid_dim;

struct Fiber {
  ucontext_t ctx;
  bool done = false;
};
inline ucontext_t g_scheduler;
inline Fiber* g_current = nullptr;
inline const std::function<void()>* g_body = nullptr;

inline void fiber_main() {
  (*g_body)();
  g_current->done = true;  // returning resumes g_scheduler (uc_link)
}

template <typename F>
void launch(dim3 grid, dim3 block, F&& body) {
  constexpr size_t kStack = 64 * 1024;
  const unsigned int nthreads = block.x * block.y * block.z;
  const std::function<void()> fn = body;
  std::unique_ptr<char[]> stacks(new char[kStack * nthreads]);
  std::vector<Fiber> fibers(nthreads);
  g_body = &fn;
  t_block_dim = block;
  t_grid_dim = grid;
  for (unsigned int bz = 0; bz < grid.z; ++bz)
    for (unsigned int by = 0; by < grid.y; ++by)
      for (unsigned int bx = 0; bx < grid.x; ++bx) {
        for (unsigned int i = 0; i < nthreads; ++i) {
          Fiber& f = fibers[i];
          f.done = false;
          if (getcontext(&f.ctx) != 0) throw std::runtime_error("getcontext failed");
          f.ctx.uc_stack.ss_sp = stacks.get() + i * kStack;
          f.ctx.uc_stack.ss_size = kStack;
          f.ctx.uc_link = &g_scheduler;
          makecontext(&f.ctx, &fiber_main, 0);
        }
        for (unsigned int remaining = nthreads; remaining > 0;) {
          remaining = 0;
          for (unsigned int i = 0; i < nthreads; ++i) {
            Fiber& f = fibers[i];
            if (f.done) continue;
            t_block_idx = dim3(bx, by, bz);
            t_thread_idx = dim3(i % block.x, (i / block.x) % block.y, i / (block.x * block.y));
            g_current = &f;
            swapcontext(&g_scheduler, &f.ctx);  // runs to the next __syncthreads or to the end
            if (!f.done) ++remaining;
          }
        }
      }
  g_current = nullptr;
  g_body = nullptr;
}

inline void syncthreads() { swapcontext(&g_current->ctx, &g_scheduler); }
}  // namespace rf_emu

#define blockIdx ::rf_emu::t_block_idx
#define threadIdx ::rf_emu::t_thread_idx
#define blockDim ::rf_emu::t_block_dim
#define gridDim ::rf_emu::t_grid_dim
#define __syncthreads() ::rf_emu::syncthreads()
#define __global__
#define __device__
#define __host__
#define __forceinline__ inline
#define __shared__ static
#define RF_LAUNCH(KERNEL, GRID, BLOCK, STREAM, ...) \
  ::rf_emu::launch(dim3(GRID), dim3(BLOCK), [&] { KERNEL(__VA_ARGS__); })
