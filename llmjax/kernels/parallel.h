// parallel_for over XLA's intra-op thread pool, shared by the llmjax CPU kernels (cpu_attention.cc,
// cpu_matmul.cc). Work items are handed out by an atomic counter to the calling thread plus
// (pool threads - 1) pool tasks: one worker per core, since the pool has a thread per core.
#pragma once

#include <algorithm>
#include <atomic>
#include <memory>
#include <thread>

#if defined(__x86_64__) || defined(_M_X64)
#include <immintrin.h>
#define LLMJAX_SPIN_PAUSE() _mm_pause()
#else
#define LLMJAX_SPIN_PAUSE() std::this_thread::yield()
#endif

#include "xla/ffi/api/ffi.h"

namespace llmjax {

struct Job {
  std::atomic<int> next{0};
  std::atomic<int> done{0};
  int total = 0;
  void* fn = nullptr;
  void (*call)(void*, int) = nullptr;
};

inline void work(Job* job) {
  for (;;) {
    const int i = job->next.fetch_add(1, std::memory_order_relaxed);
    if (i >= job->total) return;
    job->call(job->fn, i);
    job->done.fetch_add(1, std::memory_order_release);
  }
}

// Runs f(0), ..., f(total - 1), each exactly once, and returns when all have finished.
template <typename F>
void parallel_for(xla::ffi::ThreadPool& pool, int total, F&& f) {
  if (total <= 0) return;
  auto job = std::make_shared<Job>();
  job->total = total;
  job->fn = &f;
  job->call = [](void* fn, int i) { (*static_cast<std::remove_reference_t<F>*>(fn))(i); };
  const int workers = std::max(1, std::min(static_cast<int>(pool.num_threads()), total));
  for (int t = 1; t < workers; ++t) pool.Schedule([job] { work(job.get()); });
  work(job.get());
  // A late pool task only touches job->next (kept alive by the shared_ptr) and never calls f.
  while (job->done.load(std::memory_order_acquire) < total) LLMJAX_SPIN_PAUSE();
}

}  // namespace llmjax
