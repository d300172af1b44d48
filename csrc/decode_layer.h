// One decoding step through a Llama-family layer (RMSNorm, attention, SiLU MLP, the two residual adds) in one
// CPU op of our kernels and ATen's (csrc/cpu/decode_layer.cpp).
#pragma once
#include <ATen/ATen.h>

namespace lune_fast {

at::Tensor decode_layer(const at::Tensor& x, const at::Tensor& ln1, const at::Tensor& wq,
                        const c10::optional<at::Tensor>& bq, const at::Tensor& wk, const c10::optional<at::Tensor>& bk,
                        const at::Tensor& wv, const c10::optional<at::Tensor>& bv, const at::Tensor& wo,
                        const at::Tensor& ln2, const at::Tensor& wg, const at::Tensor& wu, const at::Tensor& wd,
                        const at::Tensor& cos, const at::Tensor& sin, at::Tensor& cache_k, at::Tensor& cache_v,
                        int64_t start, const c10::optional<at::Tensor>& allowed, int64_t window, double scale,
                        double eps, int64_t n_heads, int64_t n_kv,
                        const c10::optional<at::Tensor>& down_a, const c10::optional<at::Tensor>& down_b);

}  // namespace lune_fast
