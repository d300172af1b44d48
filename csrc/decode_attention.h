// One decoding step's attention (rope, KV-cache write, one query against the cache) in one CPU op
// (csrc/cpu/decode_attention.cpp).
#pragma once
#include <ATen/ATen.h>

namespace lune_fast {

at::Tensor decode_attention(const at::Tensor& q, const at::Tensor& k, const at::Tensor& v, const at::Tensor& cos,
                            const at::Tensor& sin, at::Tensor& cache_k, at::Tensor& cache_v, int64_t start,
                            const c10::optional<at::Tensor>& allowed, int64_t window, double scale);

}  // namespace lune_fast
