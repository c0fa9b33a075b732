// What the project's CPU kernels (baichuan2_rows_matmul.cc, baichuan2_norm_head.cc,
// baichuan2_decode_attention.cc) share: 8-float vectors and the threads that split a call over the CPUs.
//
// Vectors: GCC's vector extensions, which become the widest SIMD the host has (-march=native); loads and stores
// through memcpy, so no operand has to be aligned.
//
// Threads: plain std::threads, the calling thread taking a share. An OpenMP team would keep spinning after
// each call and take the cores from MindSpore's own kernels in between.
#pragma once
#include <cstdint>
#include <cstring>
#include <sched.h>
#include <thread>
#include <vector>

typedef float v8 __attribute__((vector_size(32)));
static inline v8 load8(const float* p) { v8 v; std::memcpy(&v, p, sizeof(v)); return v; }
static inline void store8(float* p, v8 v) { std::memcpy(p, &v, sizeof(v)); }
static inline float hsum(v8 v) { float s = 0.f; for (int j = 0; j < 8; ++j) s += v[j]; return s; }

// The CPUs this process may run on (its affinity mask), at least 1.
static int worker_count() {
  cpu_set_t set;
  if (sched_getaffinity(0, sizeof(set), &set) == 0) return CPU_COUNT(&set) > 0 ? CPU_COUNT(&set) : 1;
  return 1;
}

// Runs body(begin, end) over [0, n) split into one contiguous range per worker (the caller takes the first).
template <typename Body>
static void parallel_ranges(int64_t n, Body body) {
  static const int workers = worker_count();
  const int64_t per = (n + workers - 1) / workers;
  std::vector<std::thread> threads;
  for (int t = 1; t < workers && t * per < n; ++t)
    threads.emplace_back(body, t * per, (t + 1) * per < n ? (t + 1) * per : n);
  body(0, per < n ? per : n);
  for (auto& th : threads) th.join();
}

// Runs body(first, stride) once per worker (at most n of them): worker t takes items t, t + stride, ...
// (the caller takes item 0's). For items of uneven cost in runs, where contiguous ranges would not balance.
template <typename Body>
static void parallel_strided(int64_t n, Body body) {
  static const int workers = worker_count();
  const int64_t used = workers < n ? workers : n;
  std::vector<std::thread> threads;
  for (int64_t t = 1; t < used; ++t) threads.emplace_back(body, t, used);
  body(0, used);
  for (auto& th : threads) th.join();
}
