// y = x Wᵀ (+ b) in bf16 for a few rows of x (a decoding step: one row a prompt), with AVX512-BF16 dot products.
//
// At one to a few rows the product only streams W: ~270 MB a token on the default model. oneDNN's packed bf16
// product reads it at 10-24 GB/s there on 2 cores (AMX Xeon; its blocked layout is made for many rows); a
// row-major dot product per output with a software prefetch ahead reads it at 18-28 GB/s, what the memory gives
// (`lune-fast bench frozen-linear`, RESULTS.md section 13). Each output is one dot product summed in one order (32-wide
// vdpbf16ps steps along K, a float32 lane sum, one rounding to bf16, the bias added in float32 before it),
// whatever the number of rows or threads: a row's result does not depend on the rows beside it.
#include <ATen/ATen.h>
#include <ATen/Parallel.h>
#include <c10/util/BFloat16.h>

#include <algorithm>
#include <cstdint>

#include "../few_rows_linear.h"

#if defined(__x86_64__) && defined(__GNUC__) && !defined(__clang__)
#include <immintrin.h>
#define LF_BF16_DOT 1
#define LF_TARGET __attribute__((target("avx512f,avx512bw,avx512bf16")))
#else
#define LF_BF16_DOT 0
#endif

namespace lune_fast {

bool bf16_dot_supported() {
#if LF_BF16_DOT
  return __builtin_cpu_supports("avx512bf16") && __builtin_cpu_supports("avx512bw");
#else
  return false;
#endif
}

#if LF_BF16_DOT
namespace {

using bf16 = c10::BFloat16;
constexpr int64_t kAhead = 16;  // rows of W prefetched ahead (prefetching past W's end does not fault)

// MB rows of x against RB rows of W at a time (MB * RB <= 16 accumulators), for W rows [n0, n1)
template <int MB, int RB>
LF_TARGET void block_rows(const bf16* x, const bf16* w, const float* bias, bf16* y, int64_t ldy, int64_t n0,
                          int64_t n1, int64_t K) {
  const int64_t kv = K / 32 * 32;
  const __mmask32 tail = static_cast<__mmask32>((1ull << (K % 32)) - 1);
  for (int64_t n = n0; n + RB <= n1; n += RB) {
    __m512 acc[MB][RB];
    for (int m = 0; m < MB; ++m)
      for (int r = 0; r < RB; ++r) acc[m][r] = _mm512_setzero_ps();
    const bf16* wn = w + n * K;
    for (int64_t k = 0; k < kv; k += 32) {
      __m512bh wv[RB];
      for (int r = 0; r < RB; ++r) {
        wv[r] = (__m512bh)_mm512_loadu_si512(wn + r * K + k);
        // W's rows are short (1-3 KB): too short for the hardware prefetcher to ramp up on, so fetch ahead
        _mm_prefetch(reinterpret_cast<const char*>(wn + (kAhead + r) * K + k), _MM_HINT_T0);
      }
      for (int m = 0; m < MB; ++m) {
        const __m512bh xv = (__m512bh)_mm512_loadu_si512(x + m * K + k);
        for (int r = 0; r < RB; ++r) acc[m][r] = _mm512_dpbf16_ps(acc[m][r], xv, wv[r]);
      }
    }
    if (tail) {
      __m512bh wv[RB];
      for (int r = 0; r < RB; ++r) wv[r] = (__m512bh)_mm512_maskz_loadu_epi16(tail, wn + r * K + kv);
      for (int m = 0; m < MB; ++m) {
        const __m512bh xv = (__m512bh)_mm512_maskz_loadu_epi16(tail, x + m * K + kv);
        for (int r = 0; r < RB; ++r) acc[m][r] = _mm512_dpbf16_ps(acc[m][r], xv, wv[r]);
      }
    }
    for (int m = 0; m < MB; ++m)
      for (int r = 0; r < RB; ++r) {
        const float b = bias ? bias[n + r] : 0.f;
        y[m * ldy + n + r] = static_cast<bf16>(_mm512_reduce_add_ps(acc[m][r]) + b);
      }
  }
}

template <int MB>
LF_TARGET void rows_of(const bf16* x, const bf16* w, const float* bias, bf16* y, int64_t ldy, int64_t n0,
                       int64_t n1, int64_t K) {
  constexpr int RB = MB <= 2 ? 8 : MB <= 4 ? 4 : 2;
  const int64_t whole = n0 + (n1 - n0) / RB * RB;
  block_rows<MB, RB>(x, w, bias, y, ldy, n0, whole, K);
  block_rows<MB, 1>(x, w, bias, y, ldy, whole, n1, K);
}

using RowsFn = void (*)(const bf16*, const bf16*, const float*, bf16*, int64_t, int64_t, int64_t, int64_t);
constexpr RowsFn kRows[kFewRows] = {rows_of<1>, rows_of<2>, rows_of<3>, rows_of<4>,
                                    rows_of<5>, rows_of<6>, rows_of<7>, rows_of<8>};

}  // namespace
#endif

at::Tensor few_rows_linear(const at::Tensor& x, const at::Tensor& w, const c10::optional<at::Tensor>& b) {
  TORCH_CHECK(bf16_dot_supported(), "few_rows_linear: this CPU has no AVX512-BF16");
  TORCH_CHECK(x.device().is_cpu() && w.device().is_cpu(), "few_rows_linear: CPU tensors only");
  TORCH_CHECK(x.scalar_type() == at::kBFloat16 && w.scalar_type() == at::kBFloat16,
              "few_rows_linear: bfloat16 x and W");
  TORCH_CHECK(w.dim() == 2 && x.size(-1) == w.size(1), "few_rows_linear: x's last dimension must be W's columns");
  const int64_t N = w.size(0), K = w.size(1), M = K ? x.numel() / K : 0;
  TORCH_CHECK(M <= kFewRows, "few_rows_linear: at most ", kFewRows, " rows, got ", M);
  std::vector<int64_t> shape(x.sizes().begin(), x.sizes().end());
  shape.back() = N;
  at::Tensor y = at::empty(shape, x.options());
  if (M == 0 || N == 0) return y;
#if LF_BF16_DOT
  const at::Tensor xc = x.contiguous(), wc = w.contiguous();
  at::Tensor bf;
  if (b.has_value() && b->defined()) {
    TORCH_CHECK(b->dim() == 1 && b->numel() == N, "few_rows_linear: the bias must hold W's rows");
    bf = b->to(at::kFloat).contiguous();
  }
  const bf16* xp = xc.data_ptr<bf16>();
  const bf16* wp = wc.data_ptr<bf16>();
  const float* bp = bf.defined() ? bf.data_ptr<float>() : nullptr;
  bf16* yp = y.data_ptr<bf16>();
  const RowsFn rows = kRows[M - 1];
  constexpr int64_t kBlock = 16;  // W rows a task: each thread streams a long contiguous stretch of W
  at::parallel_for(0, (N + kBlock - 1) / kBlock, 8, [&](int64_t b0, int64_t b1) {
    rows(xp, wp, bp, yp, N, b0 * kBlock, std::min(N, b1 * kBlock), K);
  });
#endif
  return y;
}

}  // namespace lune_fast
