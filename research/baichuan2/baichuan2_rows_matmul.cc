// Small-row fp32 matrix product for decode steps: y[M, N] = x[M, K] . W[N, K]^T, M <= 8.
//
// Why: MindSpore 2.7's CPU MatMul is oneDNN 2.2's gemm. For 1 row it runs a matrix-vector kernel that reads
// the weight once; for 2 to 15 rows it runs a "small n" gemm that reads the whole weight once per group of
// 2-3 rows (or, on AVX2, slower still), so a batch-4 decode step reads every weight 2-3 times although
// decode is bound by reading the weights (benchmarks/bench_matmul_shapes.py, docs/serving.md). This kernel
// reads each weight row once for all M rows.
//
// Called by MindSpore as an AOT custom operator (mindspore.ops.Custom(func_type="aot"), CPU): params are
// the inputs x (..., K) and W (N, K) and the output y (..., N), all float32 and contiguous. Built by
// baichuan2_rows_matmul.py with the host compiler (-O3 -march=native -pthread); GCC's vector extensions
// become the widest SIMD the host has. Returns non-zero for M > 8 (the caller never passes it).
#include "baichuan2_kernel_common.h"
// y[M, N] = x[M, K] . W[N, K]^T for small M: one pass over W. R weight rows at a time share each x load
// and M rows share each weight load (register blocking); M*R accumulators also hide the FMA latency.
//
// With more than one row the loop computes M times more per byte, so it issues its loads more slowly and
// the hardware prefetchers (which restart at every 4 KiB page; one weight row is a page at K = 1024) leave
// each block's first lines to demand misses. So multi-row blocks prefetch the next block's rows, one cache
// line per row every two steps, into L2. Measured on an AVX2 host (AMD EPYC family 23), 4 rows of the
// 125696 x 1024 lm_head: 27.1 -> 20.8 ms on transparent huge pages (where MindSpore keeps weights), 29.3
// -> 25.9 ms on 4 KiB pages; 1 row runs at 18.9 ms, and slower with it (its prefetchers keep up), so 1 row
// does not.
template <int M, int R>
static void kernel_range(const float* __restrict x, const float* __restrict xp, const float* __restrict w,
                         float* __restrict y, int64_t K, int64_t N, int64_t b_begin, int64_t b_end) {
  for (int64_t b = b_begin; b < b_end; ++b) {
    const int64_t n0 = b * R;
    if (n0 + R > N) {  // tail rows one at a time
      for (int64_t n = n0; n < N; ++n)
        for (int m = 0; m < M; ++m) {
          float s = 0.f;
          for (int64_t k = 0; k < K; ++k) s += x[m * K + k] * w[n * K + k];
          y[m * N + n] = s;
        }
      continue;
    }
    v8 acc[M][R];
    for (int m = 0; m < M; ++m) for (int r = 0; r < R; ++r) acc[m][r] = v8{};
    const bool prefetch = M > 1 && b + 1 < b_end && (b + 2) * R <= N;
    const float* next = w + (n0 + R) * K;
    int64_t k = 0;
    for (; k + 8 <= K; k += 8) {
      if (prefetch && (k & 15) == 0)
        for (int r = 0; r < R; ++r) __builtin_prefetch(next + r * K + k, 0, 2);
      v8 wv[R];
      for (int r = 0; r < R; ++r) wv[r] = load8(w + (n0 + r) * K + k);
      for (int m = 0; m < M; ++m) {
        const v8 xv = load8(xp + (k / 8 * M + m) * 8);
        for (int r = 0; r < R; ++r) acc[m][r] += xv * wv[r];
      }
    }
    for (int m = 0; m < M; ++m)
      for (int r = 0; r < R; ++r) {
        float s = hsum(acc[m][r]);
        for (int64_t kk = k; kk < K; ++kk) s += x[m * K + kk] * w[(n0 + r) * K + kk];
        y[m * N + n0 + r] = s;
      }
  }
}

// One contiguous range of R-row blocks per thread (parallel_ranges).
template <int M, int R>
static void kernel(const float* __restrict x, const float* __restrict w, float* __restrict y, int64_t K, int64_t N) {
  const int64_t blocks = N / R + (N % R ? 1 : 0);
  // x interleaved as [K/8][M][8]: one contiguous stream instead of M rows whose 16 KiB stride (K = 4096)
  // maps them all to the same L1 sets as the weight rows.
  std::vector<float> packed((K / 8) * M * 8);
  for (int64_t k8 = 0; k8 < K / 8; ++k8)
    for (int m = 0; m < M; ++m) std::memcpy(&packed[(k8 * M + m) * 8], x + m * K + k8 * 8, 8 * sizeof(float));
  const float* xp = packed.data();
  parallel_ranges(blocks, [=](int64_t begin, int64_t end) { kernel_range<M, R>(x, xp, w, y, K, N, begin, end); });
}
extern "C" int RowsMatMul(int nparam, void** params, int* ndims, int64_t** shapes, const char** dtypes, void* stream, void* extra) {
  if (nparam != 3 || std::strcmp(dtypes[0], "float32") != 0 || std::strcmp(dtypes[1], "float32") != 0) return 2;
  const float* x = static_cast<const float*>(params[0]);
  const float* w = static_cast<const float*>(params[1]);
  float* y = static_cast<float*>(params[2]);
  int64_t M = 1; for (int i = 0; i < ndims[0] - 1; ++i) M *= shapes[0][i];
  int64_t K = shapes[0][ndims[0] - 1];
  int64_t N = shapes[1][0];
  // R weight rows per block (at most 4): M*R accumulators + R weights + 1 x must fit the vector registers
  // (16 with AVX2, 32 with AVX-512); a spilled accumulator costs more than sharing each x load across fewer
  // rows. Measured on an AVX2 host (AMD EPYC family 23), 4 rows: 4x3 blocks 9-20% faster than 4x4, which spill.
  switch (M) {
    case 1: kernel<1, 4>(x, w, y, K, N); break;
    case 2: kernel<2, 4>(x, w, y, K, N); break;
#if defined(__AVX512F__)
    case 3: kernel<3, 4>(x, w, y, K, N); break;
    case 4: kernel<4, 4>(x, w, y, K, N); break;
    case 5: kernel<5, 4>(x, w, y, K, N); break;
    case 6: kernel<6, 4>(x, w, y, K, N); break;
    case 7: kernel<7, 3>(x, w, y, K, N); break;
    case 8: kernel<8, 3>(x, w, y, K, N); break;
#else
    case 3: kernel<3, 3>(x, w, y, K, N); break;
    case 4: kernel<4, 3>(x, w, y, K, N); break;
    case 5: kernel<5, 2>(x, w, y, K, N); break;
    case 6: kernel<6, 2>(x, w, y, K, N); break;
    case 7: kernel<7, 1>(x, w, y, K, N); break;
    case 8: kernel<8, 1>(x, w, y, K, N); break;
#endif
    default: return 1;
  }
  return 0;
}
