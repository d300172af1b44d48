// CPU row passes of the fused head log-prob op.
//
// The loops are plain float code over 16-wide accumulator arrays so that GCC vectorises them, and each
// entry point is compiled for AVX-512, AVX2 and baseline x86-64 (target_clones picks one at load time):
// portable like a source build, fast like -march=native. exp is our own (Cody-Waite range reduction and a
// degree-7 polynomial, ~2 ulp on x <= 0) because libm's expf does not vectorise without -ffast-math.
#include <ATen/ATen.h>
#include <ATen/Parallel.h>

#include <cmath>
#include <cstdint>
#include <cstring>
#include <limits>

#include "../linear_logprob.h"

#if defined(__x86_64__) && defined(__linux__) && defined(__GNUC__) && !defined(__clang__)
#define LF_CLONES __attribute__((target_clones("arch=sapphirerapids", "avx512f", "avx2", "default")))
#else
#define LF_CLONES
#endif
#define LF_INLINE inline __attribute__((always_inline))

namespace lune_fast {
namespace {

constexpr int W = 16;  // accumulator lanes: one AVX-512 register of floats

LF_INLINE float ld(float x) { return x; }
LF_INLINE float ld(uint16_t b) {  // bfloat16 bits -> float
  uint32_t u = uint32_t(b) << 16;
  float f;
  std::memcpy(&f, &u, 4);
  return f;
}
LF_INLINE void st(float* p, float x) { *p = x; }
LF_INLINE void st(uint16_t* p, float x) {  // float -> bfloat16, round to nearest even
  uint32_t u;
  std::memcpy(&u, &x, 4);
  u += 0x7FFFu + ((u >> 16) & 1u);
  *p = uint16_t(u >> 16);
}

LF_INLINE float fast_exp(float x) {
  x = x < -87.0f ? -87.0f : (x > 88.0f ? 88.0f : x);
  float k = std::floor(x * 1.44269504f + 0.5f);
  float r = x - k * 0.693145752f - k * 1.42860677e-06f;
  float p = 1.0f / 5040;
  p = p * r + 1.0f / 720;
  p = p * r + 1.0f / 120;
  p = p * r + 1.0f / 24;
  p = p * r + 1.0f / 6;
  p = p * r + 0.5f;
  p = p * r + 1.0f;
  p = p * r + 1.0f;
  uint32_t bits = uint32_t(int32_t(k) + 127) << 23;
  float scale;
  std::memcpy(&scale, &bits, 4);
  return p * scale;
}

template <typename T>
LF_INLINE float row_max(const T* x, int64_t n) {
  float acc[W];
  for (int j = 0; j < W; ++j) acc[j] = -std::numeric_limits<float>::infinity();
  int64_t i = 0;
  for (; i + W <= n; i += W)
    for (int j = 0; j < W; ++j) {
      float v = ld(x[i + j]);
      acc[j] = v > acc[j] ? v : acc[j];
    }
  float m = -std::numeric_limits<float>::infinity();
  for (int j = 0; j < W; ++j) m = acc[j] > m ? acc[j] : m;
  for (; i < n; ++i) m = ld(x[i]) > m ? ld(x[i]) : m;
  return m;
}

template <typename T>
LF_INLINE float row_sum_exp(const T* x, int64_t n, float shift) {
  float acc[W] = {0};
  int64_t i = 0;
  for (; i + W <= n; i += W)
    for (int j = 0; j < W; ++j) acc[j] += fast_exp(ld(x[i + j]) - shift);
  float s = 0;
  for (int j = 0; j < W; ++j) s += acc[j];
  for (; i < n; ++i) s += fast_exp(ld(x[i]) - shift);
  return s;
}

// x <- exp(x - shift) in place; returns the sum of the (rounded-before-store) values.
template <typename T>
LF_INLINE float row_exp_inplace(T* x, int64_t n, float shift) {
  float acc[W] = {0};
  int64_t i = 0;
  for (; i + W <= n; i += W)
    for (int j = 0; j < W; ++j) {
      float e = fast_exp(ld(x[i + j]) - shift);
      acc[j] += e;
      st(&x[i + j], e);
    }
  float s = 0;
  for (int j = 0; j < W; ++j) s += acc[j];
  for (; i < n; ++i) {
    float e = fast_exp(ld(x[i]) - shift);
    s += e;
    st(&x[i], e);
  }
  return s;
}

template <typename T>
LF_INLINE void row_zero(T* x, int64_t n) {
  for (int64_t i = 0; i < n; ++i) st(&x[i], 0.0f);
}

// ---- whole-row entry points, one per storage type, each cloned per ISA ---------------------------------
template <typename T>
LF_INLINE void stats_rows(const T* L, int64_t rows, int64_t cols, int64_t ld_, const int64_t* y, int64_t v0,
                          float* m, float* s, float* t, int64_t r_begin, int64_t r_end) {
  for (int64_t r = r_begin; r < r_end; ++r) {
    const T* x = L + r * ld_;
    const float cm = row_max(x, cols);
    const float nm = cm > m[r] ? cm : m[r];
    const float old = m[r] == -std::numeric_limits<float>::infinity() ? 0.0f : s[r] * std::exp(m[r] - nm);
    s[r] = old + row_sum_exp(x, cols, nm);
    m[r] = nm;
    const int64_t j = y[r] - v0;
    if (j >= 0 && j < cols) t[r] = ld(x[j]);
  }
}

template <typename T>
LF_INLINE void softmax_grad_rows(T* L, int64_t cols, int64_t ld_, const int64_t* y, float* m, float* s, float* t,
                                 int64_t r_begin, int64_t r_end) {
  for (int64_t r = r_begin; r < r_end; ++r) {
    T* x = L + r * ld_;
    const int64_t j = y[r];
    if (j == kIgnoreIndex) {
      row_zero(x, cols);
      m[r] = 0;
      s[r] = 1;
      t[r] = 0;
      continue;
    }
    const float mx = row_max(x, cols);
    t[r] = ld(x[j]);
    const float sum = row_exp_inplace(x, cols, mx);
    m[r] = mx;
    s[r] = sum;
    st(&x[j], fast_exp(t[r] - mx) - sum);  // so that x / s = softmax - onehot
  }
}

template <typename T>
LF_INLINE void exp_normalized_rows(T* L, int64_t cols, int64_t ld_, const int64_t* y, int64_t v0, const float* lse,
                                   int64_t r_begin, int64_t r_end) {
  for (int64_t r = r_begin; r < r_end; ++r) {
    T* x = L + r * ld_;
    if (y[r] == kIgnoreIndex) {
      row_zero(x, cols);
      continue;
    }
    const int64_t j = y[r] - v0;
    const bool has_target = j >= 0 && j < cols;
    const float target = has_target ? ld(x[j]) : 0.0f;
    row_exp_inplace(x, cols, lse[r]);
    if (has_target) st(&x[j], std::expm1(target - lse[r]));  // softmax - 1 without cancellation
  }
}

#define LF_DEFINE(T, SUFFIX)                                                                                    \
  LF_CLONES void stats_##SUFFIX(const T* L, int64_t rows, int64_t cols, int64_t ld_, const int64_t* y,         \
                                int64_t v0, float* m, float* s, float* t, int64_t b, int64_t e) {               \
    stats_rows(L, rows, cols, ld_, y, v0, m, s, t, b, e);                                                        \
  }                                                                                                              \
  LF_CLONES void softmax_grad_##SUFFIX(T* L, int64_t cols, int64_t ld_, const int64_t* y, float* m, float* s,   \
                                       float* t, int64_t b, int64_t e) {                                         \
    softmax_grad_rows(L, cols, ld_, y, m, s, t, b, e);                                                          \
  }                                                                                                              \
  LF_CLONES void exp_normalized_##SUFFIX(T* L, int64_t cols, int64_t ld_, const int64_t* y, int64_t v0,         \
                                         const float* lse, int64_t b, int64_t e) {                              \
    exp_normalized_rows(L, cols, ld_, y, v0, lse, b, e);                                                        \
  }

LF_DEFINE(float, f32)
LF_DEFINE(uint16_t, bf16)

// Rows are independent: split them across threads, a few rows per task so each row stays in one cache.
constexpr int64_t kGrain = 4;

void check_cpu(const at::Tensor& L) {
  TORCH_CHECK(L.stride(1) == 1, "linear_logprob (CPU): chunk buffer must be row-contiguous");
  TORCH_CHECK(L.scalar_type() == at::kFloat || L.scalar_type() == at::kBFloat16,
              "linear_logprob (CPU): supports float32 and bfloat16, got ", L.scalar_type());
}

void stats_cpu(const at::Tensor& L, const at::Tensor& y, int64_t v0, at::Tensor& m, at::Tensor& s, at::Tensor& t) {
  check_cpu(L);
  const int64_t rows = L.size(0), cols = L.size(1), ldl = L.stride(0);
  const int64_t* yp = y.data_ptr<int64_t>();
  float *mp = m.data_ptr<float>(), *sp = s.data_ptr<float>(), *tp = t.data_ptr<float>();
  const bool bf = L.scalar_type() == at::kBFloat16;
  const void* base = L.data_ptr();
  at::parallel_for(0, rows, kGrain, [&](int64_t b, int64_t e) {
    if (bf)
      stats_bf16(static_cast<const uint16_t*>(base), rows, cols, ldl, yp, v0, mp, sp, tp, b, e);
    else
      stats_f32(static_cast<const float*>(base), rows, cols, ldl, yp, v0, mp, sp, tp, b, e);
  });
}

void softmax_grad_cpu(at::Tensor& L, const at::Tensor& y, at::Tensor& m, at::Tensor& s, at::Tensor& t) {
  check_cpu(L);
  const int64_t rows = L.size(0), cols = L.size(1), ldl = L.stride(0);
  const int64_t* yp = y.data_ptr<int64_t>();
  float *mp = m.data_ptr<float>(), *sp = s.data_ptr<float>(), *tp = t.data_ptr<float>();
  const bool bf = L.scalar_type() == at::kBFloat16;
  void* base = L.data_ptr();
  at::parallel_for(0, rows, kGrain, [&](int64_t b, int64_t e) {
    if (bf)
      softmax_grad_bf16(static_cast<uint16_t*>(base), cols, ldl, yp, mp, sp, tp, b, e);
    else
      softmax_grad_f32(static_cast<float*>(base), cols, ldl, yp, mp, sp, tp, b, e);
  });
}

void exp_normalized_cpu(at::Tensor& L, const at::Tensor& y, int64_t v0, const at::Tensor& lse_in) {
  check_cpu(L);
  auto lse = lse_in.contiguous();
  const int64_t rows = L.size(0), cols = L.size(1), ldl = L.stride(0);
  const int64_t* yp = y.data_ptr<int64_t>();
  const float* lp = lse.data_ptr<float>();
  const bool bf = L.scalar_type() == at::kBFloat16;
  void* base = L.data_ptr();
  at::parallel_for(0, rows, kGrain, [&](int64_t b, int64_t e) {
    if (bf)
      exp_normalized_bf16(static_cast<uint16_t*>(base), cols, ldl, yp, v0, lp, b, e);
    else
      exp_normalized_f32(static_cast<float*>(base), cols, ldl, yp, v0, lp, b, e);
  });
}

}  // namespace

const RowKernels& cpu_row_kernels() {
  static const RowKernels k{&stats_cpu, &softmax_grad_cpu, &exp_normalized_cpu};
  return k;
}

}  // namespace lune_fast
