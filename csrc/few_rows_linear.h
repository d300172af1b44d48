// y = x Wᵀ (+ b) in bf16 for at most kFewRows rows of x, with AVX512-BF16 dot products (csrc/cpu/few_rows_linear.cpp).
#pragma once
#include <ATen/ATen.h>

namespace lune_fast {

constexpr int64_t kFewRows = 8;

bool bf16_dot_supported();
at::Tensor few_rows_linear(const at::Tensor& x, const at::Tensor& w, const c10::optional<at::Tensor>& b);

}  // namespace lune_fast
