// Decode-step attention read from the KV cache in place (CPU, fp32):
//   context[b, h] = sum_j p_j V[b, h, j],  p = softmax_j(scale * q[b, h] . K[b, h, j] + bias[b, h, j]),
//   over the keys j = 0 .. position[b] of row b only, scale = 1 / sqrt(D).
//
// Why: MindSpore's portable decode attention first copies each layer's cache window (B, H, W, D) out of the
// cache (a StridedSlice per key and value), then runs a per-head BatchMatMul for the scores, five elementwise
// ops over them (scale, bias, mask select, softmax) and a second BatchMatMul for the context. At 4 rows of the
// real 7B width the copies and the small products take 15 ms of a 202 ms step against 3 ms at 1 row
// (docs/serving.md). Here one pass per (row, head) reads the keys it needs once for the scores and the values
// once for the context, where they lie; the scores stay in a per-thread buffer.
//
// The keys a row sees are 0 .. position[b] (its causal window), the rule the portable path's mask
// ``key_positions <= position`` gives: a masked score there is -1e9, whose exp is exactly 0 in fp32, so the two
// paths compute the same function. Slots past a row's position are never read.
//
// Called by MindSpore as an AOT custom operator (mindspore.ops.Custom(func_type="aot"), CPU). Params, all
// contiguous: query (B, H, 1, D) float32, key cache (B, H, S, D) float32, value cache (B, H, S, D) float32,
// position (B,) int32, bias (B, H, 1, W) float32 (13B's ALiBi; W >= every position + 1) or a (1,) placeholder
// for none (7B), and the output context (B, H, 1, D) float32. Built by baichuan2_decode_attention.py with the
// host compiler (-O3 -march=native -pthread); GCC's vector extensions become the widest SIMD the host has.
// Returns non-zero on shapes it does not take (the caller never passes them).
#include <cmath>
#include "baichuan2_kernel_common.h"

// s[j] = q . k_j for j < n, k_j = k + j * D. Four keys at a time: four independent FMA chains hide the FMA
// latency (one chain would leave this latency-bound, not bandwidth-bound) and share each load of q.
static void dot_keys(const float* __restrict q, const float* __restrict k, int64_t n, int64_t D, float* __restrict s) {
  int64_t j = 0;
  for (; j + 4 <= n; j += 4) {
    const float* k0 = k + j * D;
    v8 a0{}, a1{}, a2{}, a3{};
    int64_t d = 0;
    for (; d + 8 <= D; d += 8) {
      const v8 qv = load8(q + d);
      a0 += qv * load8(k0 + d);
      a1 += qv * load8(k0 + D + d);
      a2 += qv * load8(k0 + 2 * D + d);
      a3 += qv * load8(k0 + 3 * D + d);
    }
    float s0 = hsum(a0), s1 = hsum(a1), s2 = hsum(a2), s3 = hsum(a3);
    for (; d < D; ++d) {
      s0 += q[d] * k0[d];
      s1 += q[d] * k0[D + d];
      s2 += q[d] * k0[2 * D + d];
      s3 += q[d] * k0[3 * D + d];
    }
    s[j] = s0; s[j + 1] = s1; s[j + 2] = s2; s[j + 3] = s3;
  }
  for (; j < n; ++j) {
    const float* kj = k + j * D;
    v8 a{};
    int64_t d = 0;
    for (; d + 8 <= D; d += 8) a += load8(q + d) * load8(kj + d);
    float sj = hsum(a);
    for (; d < D; ++d) sj += q[d] * kj[d];
    s[j] = sj;
  }
}

// One (row, head): scores into s (n floats), softmax, then out[D] = sum_j p_j v_j / sum_j e_j.
static void attend(const float* q, const float* k, const float* v, const float* bias, int64_t n, int64_t D,
                   float scale, float* __restrict s, float* __restrict out) {
  dot_keys(q, k, n, D, s);
  float peak = -INFINITY;
  for (int64_t j = 0; j < n; ++j) {
    // The portable path's order: the product scaled, then the bias added, in fp32.
    s[j] = bias ? s[j] * scale + bias[j] : s[j] * scale;
    peak = s[j] > peak ? s[j] : peak;
  }
  float total = 0.f;
  for (int64_t j = 0; j < n; ++j) {
    s[j] = std::exp(s[j] - peak);
    total += s[j];
  }
  for (int64_t d = 0; d < D; ++d) out[d] = 0.f;
  for (int64_t j = 0; j < n; ++j) {
    const float p = s[j];
    const float* vj = v + j * D;
    for (int64_t d = 0; d < D; ++d) out[d] += p * vj[d];     // elementwise over D: vectorised by -O3
  }
  for (int64_t d = 0; d < D; ++d) out[d] /= total;
}

extern "C" int DecodeAttention(int nparam, void** params, int* ndims, int64_t** shapes, const char** dtypes,
                               void*, void*) {
  if (nparam != 6 || ndims[0] != 4 || ndims[1] != 4 || ndims[2] != 4 || ndims[3] != 1) return 1;
  const int64_t B = shapes[0][0], H = shapes[0][1], D = shapes[0][3], S = shapes[1][2];
  if (shapes[0][2] != 1 || shapes[1][0] != B || shapes[1][1] != H || shapes[1][3] != D || shapes[3][0] != B)
    return 2;
  for (int i = 0; i < 3; ++i)
    if (shapes[2][i] != shapes[1][i] || shapes[2][3] != D) return 2;
  for (int i = 0; i < 6; ++i)
    if (std::strcmp(dtypes[i], i == 3 ? "int32" : "float32") != 0) return 4;
  const float* q = static_cast<const float*>(params[0]);
  const float* k = static_cast<const float*>(params[1]);
  const float* v = static_cast<const float*>(params[2]);
  const int32_t* position = static_cast<const int32_t*>(params[3]);
  const bool has_bias = ndims[4] == 4;
  const float* bias = has_bias ? static_cast<const float*>(params[4]) : nullptr;
  const int64_t W = has_bias ? shapes[4][3] : S;
  if (has_bias && (shapes[4][0] != B || shapes[4][1] != H || shapes[4][2] != 1)) return 3;
  float* out = static_cast<float*>(params[5]);
  // The model's 1 / sqrt(head_dim), rounded to fp32 as the portable path's Python float is.
  const float scale = static_cast<float>(1.0 / std::sqrt(static_cast<double>(D)));
  const int64_t limit = W < S ? W : S;

  // Thread t takes pairs t, t + threads, ... (parallel_strided): the heads of one row have the same length, so strided pairs
  // balance rows of different lengths (contiguous ranges would give one thread the long rows).
  const int64_t pairs = B * H;
  parallel_strided(pairs, [=](int64_t first, int64_t stride) {
    std::vector<float> scores(limit);
    for (int64_t pair = first; pair < pairs; pair += stride) {
      int64_t n = static_cast<int64_t>(position[pair / H]) + 1;
      n = n < 1 ? 1 : (n > limit ? limit : n);
      attend(q + pair * D, k + pair * S * D, v + pair * S * D, has_bias ? bias + pair * W : nullptr, n, D, scale,
             scores.data(), out + pair * D);
    }
  });
  return 0;
}
