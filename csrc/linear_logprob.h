// Fused frozen-head log-prob: logp[i] = log softmax(h[i] . W^T)[y[i]] without the N x V logits.
//
// The driver (linear_logprob.cpp) is device-agnostic: chunk matmuls go through at::mm (cuBLAS / oneDNN)
// and the per-row passes through a RowKernels table (cpu/rows.cpp, cuda/rows_cuda.cpp).
//
// The gradient direction G[i] = d(-logp[i])/dh[i] = (softmax_i - onehot(y_i)) . W is formed in the same
// forward pass from the chunk buffer, so the backward is only dh = -g[:, None] * G: two chunk matmuls in
// all (as many as eager linear + log_softmax), never a recompute.
#pragma once
#include <ATen/ATen.h>

namespace lune_fast {

constexpr int64_t kIgnoreIndex = -100;

struct RowKernels {
  // Online merge of a vocab chunk [v0, v0 + L.size(1)) into running max m, sum s (relative to m) and
  // target logit t.
  void (*stats)(const at::Tensor& L, const at::Tensor& y, int64_t v0, at::Tensor& m, at::Tensor& s,
                at::Tensor& t);
  // Whole-vocabulary rows: writes m, s, t and overwrites L with exp(L - m), the target entry with
  // exp(L_y - m) - s, so that L / s = softmax - onehot. Ignored rows become zero.
  void (*softmax_grad)(at::Tensor& L, const at::Tensor& y, at::Tensor& m, at::Tensor& s, at::Tensor& t);
  // Vocab-chunked rows, second pass: L = exp(L - lse) minus 1 at the target; ignored rows zero.
  void (*exp_normalized)(at::Tensor& L, const at::Tensor& y, int64_t v0, const at::Tensor& lse);
};

const RowKernels& cpu_row_kernels();
#ifdef LUNE_FAST_WITH_CUDA
const RowKernels& cuda_row_kernels();
#endif

std::tuple<at::Tensor, at::Tensor> linear_logprob(const at::Tensor& h, const at::Tensor& w, const at::Tensor& y,
                                                  int64_t chunk_rows, int64_t chunk_vocab, bool with_grad);

}  // namespace lune_fast
