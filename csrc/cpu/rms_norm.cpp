// RMSNorm of rows in one op, for forwards without autograd (decoding, the moments' reads): the model's torch
// path is seven ATen calls (~44 us a norm in a decoding step of the default model, 61 norms a token). The
// arithmetic is that path's: the row's mean square and x * rsqrt(ms + eps) in float32, then either cast to x's
// dtype and times w in that dtype (offset 0: Llama) or times (offset + w) in float32 and cast (Gemma).
#include <ATen/ATen.h>
#include <ATen/Parallel.h>
#include <c10/util/BFloat16.h>

#include <cmath>

#include "../rms_norm.h"

namespace lune_fast {
namespace {

template <typename T>
void norm_rows(const T* x, const T* w, T* y, int64_t n, int64_t d, float eps, float offset) {
  at::parallel_for(0, n, 64, [&](int64_t begin, int64_t end) {
    for (int64_t i = begin; i < end; ++i) {
      const T* xi = x + i * d;
      T* yi = y + i * d;
      float ss = 0.f;
      for (int64_t j = 0; j < d; ++j) {
        const float v = static_cast<float>(xi[j]);
        ss += v * v;
      }
      const float r = 1.0f / std::sqrt(ss / static_cast<float>(d) + eps);
      if (offset == 0.f) {
        for (int64_t j = 0; j < d; ++j) {
          const T normed = static_cast<T>(static_cast<float>(xi[j]) * r);  // rounded to x's dtype first
          yi[j] = static_cast<T>(static_cast<float>(w[j]) * static_cast<float>(normed));
        }
      } else {
        for (int64_t j = 0; j < d; ++j)
          yi[j] = static_cast<T>(static_cast<float>(xi[j]) * r * (offset + static_cast<float>(w[j])));
      }
    }
  });
}

}  // namespace

at::Tensor rms_norm(const at::Tensor& x, const at::Tensor& w, double eps, double offset) {
  TORCH_CHECK(x.device().is_cpu() && w.device().is_cpu(), "rms_norm: CPU tensors only");
  TORCH_CHECK(x.scalar_type() == w.scalar_type(), "rms_norm: x and w must have one dtype");
  TORCH_CHECK(w.dim() == 1 && x.size(-1) == w.numel(), "rms_norm: w must hold x's last dimension");
  const at::Tensor xc = x.contiguous(), wc = w.contiguous();
  at::Tensor y = at::empty_like(xc);
  const int64_t d = wc.numel(), n = d ? xc.numel() / d : 0;
  if (x.scalar_type() == at::kBFloat16) {
    norm_rows(xc.data_ptr<c10::BFloat16>(), wc.data_ptr<c10::BFloat16>(), y.data_ptr<c10::BFloat16>(), n, d,
              static_cast<float>(eps), static_cast<float>(offset));
  } else {
    TORCH_CHECK(x.scalar_type() == at::kFloat, "rms_norm: bfloat16 or float32");
    norm_rows(xc.data_ptr<float>(), wc.data_ptr<float>(), y.data_ptr<float>(), n, d, static_cast<float>(eps),
              static_cast<float>(offset));
  }
  return y;
}

}  // namespace lune_fast
