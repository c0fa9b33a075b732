// Baichuan2's lm_head in training, fp32 on CPU: logits = (x . W^T) * inv_norm, inv_norm[v] = 1 / max(||W[v]||, 1e-12).
//
// Why: written with MindSpore ops, the row norms and their gradient are a dozen memory-bound passes over the
// (V, h) weight and the (T, V) logits each step (Mul, ReduceSum, Tile, their gradients, the AddN of the two
// weight gradients): at the bench shape (V = 125696, h = 1024, T = 512) 0.25 s of a 3.65 s step
// (2026-12-04, an AVX-512 host, before these kernels). These kernels do the same arithmetic in one pass
// over each operand:
//   RowInvNorm(W)                      -> inv (V)             reads W once
//   ScaleColumns(raw, inv)             -> raw * inv           one pass over (T, V)
//   ScaleColumnsGrad(dout, out, inv)   -> g = dout * inv, s[v] = sum_t dout[t, v] * out[t, v]
//   NormHeadWeightGrad(gw, W, inv, s)  -> gw + c[v] * W[v], c[v] = -s[v] * inv[v]^2 where ||W[v]|| > 1e-12, else 0
// With raw = x . W^T, d logits / d W[v] through the norm is -inv^3 * W[v] * sum_t dout * raw, and
// sum_t dout * raw = s / inv, hence c. gw is the MatMul's gradient g^T . x.
//
// Called by MindSpore as AOT custom operators (mindspore.ops.Custom(func_type="aot"), CPU): params are the
// inputs then the outputs, all float32 and contiguous. Built by baichuan2_kernel_build.py with the host
// compiler (-O3 -march=native -pthread). Each call splits its rows (or columns) over the CPUs the process
// may run on, with plain threads (see baichuan2_rows_matmul.cc for why not OpenMP). Sums run in a fixed
// order, so results do not depend on the thread count.
#include <cmath>
#include <cstdint>
#include <cstring>
#include <sched.h>
#include <thread>
#include <vector>

static const float kNormFloor = 1e-12f;  // F.normalize's eps, as the reference model

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

// Sum of squares of one row, 8 partial sums (vectorised by the compiler, fixed order).
static inline float row_sum_squares(const float* __restrict w, int64_t h) {
  float part[8] = {0, 0, 0, 0, 0, 0, 0, 0};
  int64_t k = 0;
  for (; k + 8 <= h; k += 8)
    for (int j = 0; j < 8; ++j) part[j] += w[k + j] * w[k + j];
  float s = 0.f;
  for (int j = 0; j < 8; ++j) s += part[j];
  for (; k < h; ++k) s += w[k] * w[k];
  return s;
}

static bool all_float32(int nparam, const char** dtypes) {
  for (int i = 0; i < nparam; ++i)
    if (std::strcmp(dtypes[i], "float32") != 0) return false;
  return true;
}

static int64_t leading(int ndim, const int64_t* shape) {
  int64_t n = 1;
  for (int i = 0; i < ndim - 1; ++i) n *= shape[i];
  return n;
}

// W (V, h) -> inv (V).
extern "C" int RowInvNorm(int nparam, void** params, int* ndims, int64_t** shapes, const char** dtypes, void*, void*) {
  if (nparam != 2 || !all_float32(nparam, dtypes) || ndims[0] != 2) return 1;
  const float* w = static_cast<const float*>(params[0]);
  float* inv = static_cast<float*>(params[1]);
  const int64_t V = shapes[0][0], h = shapes[0][1];
  parallel_ranges(V, [=](int64_t b, int64_t e) {
    for (int64_t v = b; v < e; ++v) inv[v] = 1.f / std::fmax(std::sqrt(row_sum_squares(w + v * h, h)), kNormFloor);
  });
  return 0;
}

// raw (T, V), inv (V) -> raw * inv (T, V).
extern "C" int ScaleColumns(int nparam, void** params, int* ndims, int64_t** shapes, const char** dtypes, void*, void*) {
  if (nparam != 3 || !all_float32(nparam, dtypes)) return 1;
  const float* raw = static_cast<const float*>(params[0]);
  const float* inv = static_cast<const float*>(params[1]);
  float* out = static_cast<float*>(params[2]);
  const int64_t V = shapes[0][ndims[0] - 1], T = leading(ndims[0], shapes[0]);
  parallel_ranges(T, [=](int64_t b, int64_t e) {
    for (int64_t t = b; t < e; ++t) {
      const float* r = raw + t * V;
      float* o = out + t * V;
      for (int64_t v = 0; v < V; ++v) o[v] = r[v] * inv[v];
    }
  });
  return 0;
}

// dout (T, V), out (T, V), inv (V) -> g = dout * inv (T, V), s (V) = sum over t of dout * out.
// Split over columns so that each s[v] is summed by one thread in the order t = 0, 1, ...
extern "C" int ScaleColumnsGrad(int nparam, void** params, int* ndims, int64_t** shapes, const char** dtypes, void*, void*) {
  if (nparam != 5 || !all_float32(nparam, dtypes)) return 1;
  const float* dout = static_cast<const float*>(params[0]);
  const float* out = static_cast<const float*>(params[1]);
  const float* inv = static_cast<const float*>(params[2]);
  float* g = static_cast<float*>(params[3]);
  float* s = static_cast<float*>(params[4]);
  const int64_t V = shapes[0][ndims[0] - 1], T = leading(ndims[0], shapes[0]);
  // Column blocks of 2048 (8 KiB of s) stay in L1 while the rows stream through.
  const int64_t block = 2048, blocks = (V + block - 1) / block;
  parallel_ranges(blocks, [=](int64_t b, int64_t e) {
    for (int64_t blk = b; blk < e; ++blk) {
      const int64_t v0 = blk * block, v1 = v0 + block < V ? v0 + block : V;
      for (int64_t v = v0; v < v1; ++v) s[v] = 0.f;
      for (int64_t t = 0; t < T; ++t) {
        const float* d = dout + t * V;
        const float* o = out + t * V;
        float* gt = g + t * V;
        for (int64_t v = v0; v < v1; ++v) {
          gt[v] = d[v] * inv[v];
          s[v] += d[v] * o[v];
        }
      }
    }
  });
  return 0;
}

// gw (V, h), W (V, h), inv (V), s (V) -> gw + c[v] * W[v] (V, h).
extern "C" int NormHeadWeightGrad(int nparam, void** params, int* ndims, int64_t** shapes, const char** dtypes, void*, void*) {
  if (nparam != 5 || !all_float32(nparam, dtypes) || ndims[0] != 2) return 1;
  const float* gw = static_cast<const float*>(params[0]);
  const float* w = static_cast<const float*>(params[1]);
  const float* inv = static_cast<const float*>(params[2]);
  const float* s = static_cast<const float*>(params[3]);
  float* out = static_cast<float*>(params[4]);
  const int64_t V = shapes[0][0], h = shapes[0][1];
  parallel_ranges(V, [=](int64_t b, int64_t e) {
    for (int64_t v = b; v < e; ++v) {
      // inv < 1 / floor <=> the norm is above the floor, where max() passes the gradient to the norm.
      const float c = inv[v] < 1.f / kNormFloor ? -s[v] * inv[v] * inv[v] : 0.f;
      const float* gr = gw + v * h;
      const float* wr = w + v * h;
      float* o = out + v * h;
      for (int64_t k = 0; k < h; ++k) o[k] = gr[k] + c * wr[k];
    }
  });
  return 0;
}
