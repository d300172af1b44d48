// One decoding step through a Llama-family layer in one op: the model's decoding path (lune_fast/model.py,
// Block.forward at one token with a KV cache) with the same kernels — the one-op RMSNorm, the few-rows product,
// the decoding attention, ATen's add, SiLU and multiply — called from C++ instead of ~40 Python-level calls a
// layer: the same bits, without the interpreter. A decoding step of the default model spent ~5 of its 15.6 ms
// outside the products, most of it there (AMX Xeon, 2 cores). down_a/down_b: the ranks of an adapter on down_proj
// (all of them: LoRALinear.ranks_as), added as LoRALinear's inference adds them.
#include <ATen/ATen.h>

#include "../decode_attention.h"
#include "../decode_layer.h"
#include "../few_rows_linear.h"
#include "../rms_norm.h"

namespace lune_fast {

at::Tensor decode_layer(const at::Tensor& x, const at::Tensor& ln1, const at::Tensor& wq,
                        const c10::optional<at::Tensor>& bq, const at::Tensor& wk, const c10::optional<at::Tensor>& bk,
                        const at::Tensor& wv, const c10::optional<at::Tensor>& bv, const at::Tensor& wo,
                        const at::Tensor& ln2, const at::Tensor& wg, const at::Tensor& wu, const at::Tensor& wd,
                        const at::Tensor& cos, const at::Tensor& sin, at::Tensor& cache_k, at::Tensor& cache_v,
                        int64_t start, const c10::optional<at::Tensor>& allowed, int64_t window, double scale,
                        double eps, int64_t n_heads, int64_t n_kv,
                        const c10::optional<at::Tensor>& down_a, const c10::optional<at::Tensor>& down_b) {
  TORCH_CHECK(x.dim() == 3 && x.size(1) == 1, "decode_layer: x must be [B, 1, hidden] (one decoding step)");
  const int64_t B = x.size(0), D = wq.size(0) / n_heads;
  const c10::optional<at::Tensor> none;
  const at::Tensor n1 = rms_norm(x, ln1, eps, 0.0);
  const at::Tensor q = few_rows_linear(n1, wq, bq), k = few_rows_linear(n1, wk, bk), v = few_rows_linear(n1, wv, bv);
  const at::Tensor o = decode_attention(q.view({B, n_heads, D}), k.view({B, n_kv, D}), v.view({B, n_kv, D}),
                                        cos.view({B, D}), sin.view({B, D}), cache_k, cache_v, start, allowed,
                                        window, scale);
  const at::Tensor h = at::add(x, few_rows_linear(o.view({B, 1, n_heads * D}), wo, none));
  const at::Tensor n2 = rms_norm(h, ln2, eps, 0.0);
  const at::Tensor m = at::silu(few_rows_linear(n2, wg, none)).mul_(few_rows_linear(n2, wu, none));
  at::Tensor down = few_rows_linear(m, wd, none);
  if (down_a.has_value())  // an adapter's ranks on down_proj, as LoRALinear's inference adds them
    down.add_(few_rows_linear(few_rows_linear(m, *down_a, none), *down_b, none));
  return at::add(h, down);
}

}  // namespace lune_fast
