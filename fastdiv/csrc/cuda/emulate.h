// Host emulation of the CUDA execution model, for testing the kernels of fastdiv/csrc/cuda/ without a GPU.
//
// With FASTDIV_CUDA_EMULATE defined, device.cuh includes this header instead of cuda_runtime.h, and a
// .cu file compiles as plain C++ (tests/native/test_cuda_emulation*.cpp #include them). Every launch
// then runs on the host:
//  - blocks run one after another; the threads of a block run concurrently, one host thread each, so
//    a missing __syncthreads() is a real data race and a __syncthreads() that not every thread reaches
//    hangs (CTest's timeout turns that into a failure), as on a GPU. The host threads are kept from
//    block to block (starting a thread per emulated thread per block was most of a launch's time);
//  - __shared__ variables become function-local statics: one copy, shared by the threads of the
//    block in flight, left over from the previous block (like uninitialized shared memory);
//  - dynamic shared memory is filled with 0xFF bytes (NaN for floats) before each block, so a read of
//    shared memory that was never written shows up as NaN;
//  - warp shuffles exchange values through a per-warp buffer between two warp-wide barriers, so all
//    32 lanes must take part, as __shfl_*_sync(0xffffffff, ...) requires.
// "Device" pointers are host pointers. Only what the fastdiv kernels use is emulated.
#pragma once

#include <cuda_bf16.h>
#include <cuda_fp16.h>
#include <driver_types.h>
#include <vector_types.h>

#include <atomic>
#include <barrier>
#include <functional>
#include <mutex>
#include <semaphore>
#include <cstdint>
#include <cstring>
#include <memory>
#include <stdexcept>
#include <string>
#include <thread>
#include <utility>
#include <vector>

// The CUDA headers define these for a host compiler as attributes it ignores (or warns about);
// here they must mean host code and a block-shared static.
#undef __global__
#undef __device__
#undef __host__
#undef __forceinline__
#undef __launch_bounds__
#undef __shared__
#define __global__
#define __device__
#define __host__
#define __forceinline__ inline
#define __launch_bounds__(...)
#define __shared__ static

namespace fastdiv::emu {

struct Block {
  explicit Block(unsigned threads, size_t smem_bytes)
      : sync(threads), votes{0, 0, 0}, smem(smem_bytes, static_cast<unsigned char>(0xFF)) {
    for (unsigned w = 0; w < (threads + 31) / 32; ++w) {
      const unsigned lanes = std::min(32u, threads - 32 * w);
      warp_sync.push_back(std::make_unique<std::barrier<>>(lanes));
    }
    exchange.resize(warp_sync.size() * 32);
  }
  std::barrier<> sync;
  // __syncthreads_or: call k of the block votes in votes[k % 3] (see syncthreads_or)
  std::atomic<int> votes[3];
  std::vector<std::unique_ptr<std::barrier<>>> warp_sync;
  std::vector<uint64_t> exchange;  // one 8-byte slot per lane
  std::vector<unsigned char> smem;
};

struct Thread {
  uint3 thread_idx, block_idx;
  dim3 block_dim, grid_dim;
  Block* block = nullptr;
  unsigned votes = 0;  // __syncthreads_or calls of this thread in the current block
  unsigned linear() const {
    return thread_idx.x + block_dim.x * (thread_idx.y + block_dim.y * thread_idx.z);
  }
};

inline thread_local Thread self;

inline void sync_block() { self.block->sync.arrive_and_wait(); }

// __syncthreads_or: a barrier that returns whether pred was non-zero in any thread of the block. Call k
// uses votes[k % 3]; before arriving, thread 0 clears votes[(k + 1) % 3], last read in call k - 2 (every
// thread has passed call k - 1's barrier since, so it is done reading) and next written in call k + 1
// (by threads past this call's barrier, so after the clearing).
inline int syncthreads_or(int pred) {
  Block& b = *self.block;
  const unsigned k = self.votes++;
  if (self.linear() == 0) b.votes[(k + 1) % 3].store(0);
  if (pred) b.votes[k % 3].store(1);
  b.sync.arrive_and_wait();
  return b.votes[k % 3].load();
}

inline unsigned char* dynamic_smem() { return self.block->smem.data(); }

// Value of `value` in lane src(lane) of the calling thread's warp.
template <typename V, typename Src>
V exchange(V value, Src src) {
  static_assert(sizeof(V) <= sizeof(uint64_t), "emulated shuffles move at most 8 bytes");
  const unsigned t = self.linear(), warp = t / 32, lane = t % 32;
  Block& b = *self.block;
  std::memcpy(&b.exchange[warp * 32 + lane], &value, sizeof(V));
  b.warp_sync[warp]->arrive_and_wait();
  const unsigned from = src(lane);
  V out;
  std::memcpy(&out, &b.exchange[warp * 32 + (from < 32 ? from : lane)], sizeof(V));
  b.warp_sync[warp]->arrive_and_wait();
  return out;
}

template <typename V>
V shfl_xor(V value, int lane_mask) {
  return exchange(value, [=](unsigned lane) { return lane ^ static_cast<unsigned>(lane_mask); });
}

template <typename V>
V shfl_down(V value, unsigned delta) {
  return exchange(value, [=](unsigned lane) { return lane + delta < 32 ? lane + delta : lane; });
}

inline cudaError_t& last_error() {
  static thread_local cudaError_t err = cudaSuccess;
  return err;
}

// Host threads kept across blocks and launches. run(count, job) calls job(0) ... job(count - 1) each on
// a thread of its own, all at once (the threads of a block wait for each other at barriers), and
// returns when every call has returned. Only the workers a block needs are woken.
class Workers {
 public:
  ~Workers() {
    stop_ = true;
    for (auto& w : workers_) w->go.release();
    for (auto& w : workers_) w->thread.join();
  }

  void run(unsigned count, const std::function<void(unsigned)>& job) {
    const std::lock_guard<std::mutex> one_launch_at_a_time(mutex_);
    while (workers_.size() < count) {
      auto w = std::make_unique<Worker>();
      Worker* worker = w.get();
      const auto id = static_cast<unsigned>(workers_.size());
      w->thread = std::thread([this, worker, id] { loop(*worker, id); });
      workers_.push_back(std::move(w));
    }
    job_ = &job;
    pending_.store(count);
    for (unsigned t = 0; t < count; ++t) workers_[t]->go.release();  // publishes job_ to the worker
    done_.acquire();  // the last worker's release publishes every worker's writes to the caller
  }

 private:
  struct Worker {
    std::binary_semaphore go{0};
    std::thread thread;
  };

  void loop(Worker& w, unsigned id) {
    for (;;) {
      w.go.acquire();
      if (stop_) return;
      (*job_)(id);
      if (pending_.fetch_sub(1) == 1) done_.release();
    }
  }

  std::mutex mutex_;
  std::vector<std::unique_ptr<Worker>> workers_;
  const std::function<void(unsigned)>* job_ = nullptr;
  std::atomic<unsigned> pending_{0};
  std::binary_semaphore done_{0};
  std::atomic<bool> stop_{false};
};

inline Workers& workers() {
  static Workers pool;
  return pool;
}

// Runs body() once per thread of every block of the grid. Launch limits are checked as a GPU would.
template <typename Body>
void launch(dim3 grid, dim3 block, size_t smem_bytes, Body body) {
  const unsigned threads = block.x * block.y * block.z;
  if (threads == 0 || threads > 1024 || grid.x == 0 || grid.y == 0 || grid.z == 0 || grid.y > 65535 ||
      grid.z > 65535 || smem_bytes > 227 * 1024) {
    last_error() = cudaErrorInvalidConfiguration;
    return;
  }
  for (unsigned bz = 0; bz < grid.z; ++bz)
    for (unsigned by = 0; by < grid.y; ++by)
      for (unsigned bx = 0; bx < grid.x; ++bx) {
        Block blk(threads, smem_bytes);
        workers().run(threads, [&](unsigned t) {
          self.block = &blk;
          self.votes = 0;
          self.block_dim = block;
          self.grid_dim = grid;
          self.block_idx = uint3{bx, by, bz};
          self.thread_idx = uint3{t % block.x, (t / block.x) % block.y, t / (block.x * block.y)};
          body();
        });
      }
}

}  // namespace fastdiv::emu

#define threadIdx (::fastdiv::emu::self.thread_idx)
#define blockIdx (::fastdiv::emu::self.block_idx)
#define blockDim (::fastdiv::emu::self.block_dim)
#define gridDim (::fastdiv::emu::self.grid_dim)
#define __syncthreads() ::fastdiv::emu::sync_block()
#define __syncthreads_or(pred) ::fastdiv::emu::syncthreads_or(pred)
#define __shfl_xor_sync(mask, value, lane_mask) ::fastdiv::emu::shfl_xor((value), (lane_mask))
#define __shfl_down_sync(mask, value, delta) ::fastdiv::emu::shfl_down((value), (delta))

#define FASTDIV_DYNAMIC_SMEM(name) unsigned char* name = ::fastdiv::emu::dynamic_smem()
#define FASTDIV_LAUNCH(kernel, grid, block, smem, stream, ...) \
  ::fastdiv::emu::launch((grid), (block), (smem), [&] { kernel(__VA_ARGS__); })
#define FASTDIV_LAST_ERROR() std::exchange(::fastdiv::emu::last_error(), cudaSuccess)
#define FASTDIV_SET_MAX_DYNAMIC_SMEM(kernel, bytes) cudaSuccess
