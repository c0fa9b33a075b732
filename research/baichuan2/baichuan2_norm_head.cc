// Baichuan2's lm_head in training, fp32 on CPU: logits = (x . W^T) * inv_norm, inv_norm[v] = 1 / max(||W[v]||, 1e-12),
// and the cross-entropy over those logits.
//
// Why: written with MindSpore ops, the row norms and their gradient are a dozen memory-bound passes over the
// (V, h) weight and the (T, V) logits each step (Mul, ReduceSum, Tile, their gradients, the AddN of the two
// weight gradients): at the bench shape (V = 125696, h = 1024, T = 512) 0.25 s of a 3.65 s step
// (2026-12-04, an AVX-512 host, before these kernels). The loss over them (log_softmax, its gather, softmax,
// the scaling and the label scatter of the backward) adds five more (T, V) passes. These kernels do the same
// arithmetic in one pass over each operand:
//   RowInvNorm(W)                      -> inv (V)             reads W once
//   ScaleColumns(raw, inv)             -> raw * inv           one pass over (T, V)
//   ScaleColumnsGrad(dout, out, inv)   -> g = dout * inv, s[v] = sum_t dout[t, v] * out[t, v]
//   NormHeadWeightGrad(gw, W, inv, s)  -> gw + c[v] * W[v], c[v] = -s[v] * inv[v]^2 where ||W[v]|| > 1e-12, else 0
//   NormHeadLogSumExp(raw, inv, labels, w)
//                                      -> lse[t] = logsumexp_v(raw[t, v] * inv[v]), nll[t] = lse[t] - logit of the label
//                                         (rows with w[t] = 0 are skipped: 0, 0)
//   NormHeadCrossEntropyGrad(raw, inv, lse, labels, scale)
//                                      -> g = d logits * inv, s[v] = sum_t d logits[t, v] * logits[t, v], where
//                                         d logits[t] = scale[t] * (softmax(logits[t]) - onehot(label[t]))
// With raw = x . W^T, d logits / d W[v] through the norm is -inv^3 * W[v] * sum_t dout * raw, and
// sum_t dout * raw = s / inv, hence c. gw is the MatMul's gradient g^T . x. The cross-entropy kernels replace
// ScaleColumns and ScaleColumnsGrad when the loss is fused with the head (baichuan2_norm_head.py).
//
// Called by MindSpore as AOT custom operators (mindspore.ops.Custom(func_type="aot"), CPU): params are the
// inputs then the outputs, contiguous, float32 except the int32 labels. Built by baichuan2_kernel_build.py
// with the host compiler (-O3 -march=native -pthread); GCC's vector extensions become the widest SIMD the
// host has. Each call splits its rows (or columns) over the CPUs the process may run on, with plain threads
// (baichuan2_kernel_common.h says why not OpenMP). Sums run in a fixed order, so results do not depend
// on the thread count.
#include <cmath>
#include "baichuan2_kernel_common.h"

static const float kNormFloor = 1e-12f;  // F.normalize's eps, as the reference model

// Runs row_body(t, v0, v1) for every row t = 0, 1, ... of each column block [v0, v1) of 2048 columns (8 KiB
// of s, which stays in L1 while the rows stream through), the blocks split over the workers. s[v0, v1) is
// zeroed first: each s[v] is summed by one thread, in the order of t, whatever the number of threads.
template <typename RowBody>
static void column_blocks(int64_t V, int64_t T, float* s, RowBody row_body) {
  const int64_t block = 2048, blocks = (V + block - 1) / block;
  parallel_ranges(blocks, [=](int64_t b, int64_t e) {
    for (int64_t blk = b; blk < e; ++blk) {
      const int64_t v0 = blk * block, v1 = v0 + block < V ? v0 + block : V;
      for (int64_t v = v0; v < v1; ++v) s[v] = 0.f;
      for (int64_t t = 0; t < T; ++t) row_body(t, v0, v1);
    }
  });
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

// float32 everywhere but the labels (int32) at position label_index.
static bool float32_but_labels(int nparam, const char** dtypes, int label_index) {
  for (int i = 0; i < nparam; ++i)
    if (std::strcmp(dtypes[i], i == label_index ? "int32" : "float32") != 0) return false;
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
extern "C" int ScaleColumnsGrad(int nparam, void** params, int* ndims, int64_t** shapes, const char** dtypes, void*, void*) {
  if (nparam != 5 || !all_float32(nparam, dtypes)) return 1;
  const float* dout = static_cast<const float*>(params[0]);
  const float* out = static_cast<const float*>(params[1]);
  const float* inv = static_cast<const float*>(params[2]);
  float* g = static_cast<float*>(params[3]);
  float* s = static_cast<float*>(params[4]);
  const int64_t V = shapes[0][ndims[0] - 1], T = leading(ndims[0], shapes[0]);
  column_blocks(V, T, s, [=](int64_t t, int64_t v0, int64_t v1) {
    const float* d = dout + t * V;
    const float* o = out + t * V;
    float* gt = g + t * V;
    for (int64_t v = v0; v < v1; ++v) {
      gt[v] = d[v] * inv[v];
      s[v] += d[v] * o[v];
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

// exp(x) for x <= 0, 8 lanes: Cephes' expf (range reduction by ln 2 split in two constants, degree-6
// polynomial on |r| <= ln 2 / 2, relative error below 2e-7 on [-87, 0]); written with vector extensions so it vectorises on any
// SIMD width. Below -87 it returns exp(-87) ~ 1.6e-38 instead of a denormal or 0: such a term is at most
// 1.6e-38 of the row's largest term (1), far below fp32 rounding of the sum.
typedef int32_t v8i __attribute__((vector_size(32)));
static inline v8 splat(float a) { return v8{a, a, a, a, a, a, a, a}; }

static inline v8 exp8(v8 x) {
  x = x < splat(-87.f) ? splat(-87.f) : x;
  // n = round(x / ln 2) by the 1.5 * 2^23 trick: adding it leaves n in the low mantissa bits (|n| <= 126).
  const v8 shifted = x * 1.44269504088896341f + 12582912.f;
  const v8 nf = shifted - 12582912.f;
  v8i n;
  std::memcpy(&n, &shifted, sizeof(n));
  n -= 0x4B400000;                                          // the bits of 12582912.f
  v8 r = x - nf * 0.693359375f;
  r = r + nf * 2.12194440e-4f;                              // ln 2 = 0.693359375 - 2.12194440e-4 (+ O(1e-12))
  v8 p = splat(1.9875691500e-4f);
  p = p * r + 1.3981999507e-3f;
  p = p * r + 8.3334519073e-3f;
  p = p * r + 4.1665795894e-2f;
  p = p * r + 1.6666665459e-1f;
  p = p * r + 5.0000001201e-1f;
  const v8 e = p * r * r + r + 1.f;
  v8i bits = (n + 127) << 23;                               // 2^n
  v8 scale;
  std::memcpy(&scale, &bits, sizeof(scale));
  return e * scale;
}

// The same exp for one value (row tails), through lane 0 so that it rounds exactly as the vector body.
static inline float exp1(float x) { return exp8(splat(x))[0]; }

static inline float lane_max(v8 v) {
  float m = v[0];
  for (int j = 1; j < 8; ++j) m = v[j] > m ? v[j] : m;
  return m;
}

static inline float lane_sum(v8 v) {
  float s = 0.f;
  for (int j = 0; j < 8; ++j) s += v[j];
  return s;
}

static inline int64_t clamp_label(int32_t label, int64_t V) { return label < 0 ? 0 : (label >= V ? V - 1 : label); }

// raw (T, V), inv (V), labels (T) int32, w (T) -> lse (T), nll (T). Rows split over the workers; each row is
// two passes (its maximum, then the sum of exp(logit - max)) over raw and inv, which stay in L2 between them.
extern "C" int NormHeadLogSumExp(int nparam, void** params, int* ndims, int64_t** shapes, const char** dtypes, void*, void*) {
  if (nparam != 6 || !float32_but_labels(nparam, dtypes, 2)) return 1;
  const float* raw = static_cast<const float*>(params[0]);
  const float* inv = static_cast<const float*>(params[1]);
  const int32_t* labels = static_cast<const int32_t*>(params[2]);
  const float* w = static_cast<const float*>(params[3]);
  float* lse = static_cast<float*>(params[4]);
  float* nll = static_cast<float*>(params[5]);
  const int64_t V = shapes[0][ndims[0] - 1], T = leading(ndims[0], shapes[0]);
  parallel_ranges(T, [=](int64_t b, int64_t e) {
    for (int64_t t = b; t < e; ++t) {
      if (w[t] == 0.f) {  // not counted: its loss and gradient are 0 whatever its logits
        lse[t] = 0.f;
        nll[t] = 0.f;
        continue;
      }
      const float* r = raw + t * V;
      v8 mx = splat(-INFINITY);
      int64_t v = 0;
      for (; v + 8 <= V; v += 8) {
        const v8 logit = load8(r + v) * load8(inv + v);
        mx = logit > mx ? logit : mx;
      }
      float m = lane_max(mx);
      for (int64_t u = v; u < V; ++u) m = r[u] * inv[u] > m ? r[u] * inv[u] : m;
      v8 acc = splat(0.f);
      const v8 mv = splat(m);
      for (v = 0; v + 8 <= V; v += 8) acc += exp8(load8(r + v) * load8(inv + v) - mv);
      float sum = lane_sum(acc);
      for (int64_t u = v; u < V; ++u) sum += exp1(r[u] * inv[u] - m);
      lse[t] = m + std::log(sum);
      const int64_t label = clamp_label(labels[t], V);
      nll[t] = lse[t] - r[label] * inv[label];
    }
  });
  return 0;
}

// raw (T, V), inv (V), lse (T), labels (T) int32, scale (T) -> g (T, V), s (V); scale[t] = w[t] * dloss / (sum w + eps).
extern "C" int NormHeadCrossEntropyGrad(int nparam, void** params, int* ndims, int64_t** shapes, const char** dtypes, void*,
                                        void*) {
  if (nparam != 7 || !float32_but_labels(nparam, dtypes, 3)) return 1;
  const float* raw = static_cast<const float*>(params[0]);
  const float* inv = static_cast<const float*>(params[1]);
  const float* lse = static_cast<const float*>(params[2]);
  const int32_t* labels = static_cast<const int32_t*>(params[3]);
  const float* scale = static_cast<const float*>(params[4]);
  float* g = static_cast<float*>(params[5]);
  float* s = static_cast<float*>(params[6]);
  const int64_t V = shapes[0][ndims[0] - 1], T = leading(ndims[0], shapes[0]);
  column_blocks(V, T, s, [=](int64_t t, int64_t v0, int64_t v1) {
    const float* r = raw + t * V;
    float* gt = g + t * V;
    const float sc = scale[t];
    if (sc == 0.f) {
      std::memset(gt + v0, 0, (v1 - v0) * sizeof(float));
      return;
    }
    const v8 lv = splat(lse[t]), sv = splat(sc);
    int64_t v = v0;
    for (; v + 8 <= v1; v += 8) {
      const v8 iv = load8(inv + v);
      const v8 logit = load8(r + v) * iv;
      const v8 d = exp8(logit - lv) * sv;                      // d logits, the label's -scale comes below
      store8(gt + v, d * iv);
      store8(s + v, load8(s + v) + d * logit);
    }
    for (; v < v1; ++v) {
      const float logit = r[v] * inv[v], d = exp1(logit - lse[t]) * sc;
      gt[v] = d * inv[v];
      s[v] += d * logit;
    }
    const int64_t label = clamp_label(labels[t], V);
    if (label >= v0 && label < v1) {
      gt[label] -= sc * inv[label];
      s[label] -= sc * (r[label] * inv[label]);
    }
  });
  return 0;
}
