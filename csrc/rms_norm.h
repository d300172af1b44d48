// RMSNorm of rows in one CPU op, without autograd (csrc/cpu/rms_norm.cpp).
#pragma once
#include <ATen/ATen.h>

namespace lune_fast {

at::Tensor rms_norm(const at::Tensor& x, const at::Tensor& w, double eps, double offset);

}  // namespace lune_fast
