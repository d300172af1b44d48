// Schema and dispatch of the lune_fast ops. The fake (meta) implementations and autograd live on the
// Python side (lune_fast/ops.py) so that torch.compile traces the op without a graph break.
#include <torch/library.h>
#include <torch/extension.h>

#include "decode_attention.h"
#include "decode_layer.h"
#include "few_rows_linear.h"
#include "linear_logprob.h"
#include "rms_norm.h"

TORCH_LIBRARY(lune_fast, m) {
  m.def(
      "linear_logprob(Tensor h, Tensor w, Tensor y, int chunk_rows, int chunk_vocab, bool with_grad)"
      " -> (Tensor logp, Tensor grad_dir)");
  m.def("rms_norm(Tensor x, Tensor w, float eps, float offset) -> Tensor");
  m.def("few_rows_linear(Tensor x, Tensor w, Tensor? b) -> Tensor");
  m.def(
      "decode_attention(Tensor q, Tensor k, Tensor v, Tensor cos, Tensor sin, Tensor(a!) cache_k,"
      " Tensor(b!) cache_v, int start, Tensor? allowed, int window, float scale) -> Tensor");
  m.def(
      "decode_layer(Tensor x, Tensor ln1, Tensor wq, Tensor? bq, Tensor wk, Tensor? bk, Tensor wv, Tensor? bv,"
      " Tensor wo, Tensor ln2, Tensor wg, Tensor wu, Tensor wd, Tensor cos, Tensor sin, Tensor(a!) cache_k,"
      " Tensor(b!) cache_v, int start, Tensor? allowed, int window, float scale, float eps, int n_heads,"
      " int n_kv, Tensor? down_a, Tensor? down_b) -> Tensor");
}

TORCH_LIBRARY_IMPL(lune_fast, CPU, m) {
  m.impl("linear_logprob", &lune_fast::linear_logprob);
  m.impl("rms_norm", &lune_fast::rms_norm);
  m.impl("few_rows_linear", &lune_fast::few_rows_linear);
  m.impl("decode_attention", &lune_fast::decode_attention);
  m.impl("decode_layer", &lune_fast::decode_layer);
}

#ifdef LUNE_FAST_WITH_CUDA
TORCH_LIBRARY_IMPL(lune_fast, CUDA, m) { m.impl("linear_logprob", &lune_fast::linear_logprob); }
#endif

PYBIND11_MODULE(TORCH_EXTENSION_NAME, mod) {
  mod.attr("with_cuda") =
#ifdef LUNE_FAST_WITH_CUDA
      true;
#else
      false;
#endif
  mod.def("bf16_dot_supported", &lune_fast::bf16_dot_supported);
  mod.attr("few_rows") = lune_fast::kFewRows;
}
