#include "linear_logprob.h"

#include <limits>

namespace lune_fast {

namespace {

void check_inputs(const at::Tensor& h, const at::Tensor& w, const at::Tensor& y) {
  TORCH_CHECK(h.dim() == 2, "linear_logprob: h must be [N, H], got ", h.sizes());
  TORCH_CHECK(w.dim() == 2, "linear_logprob: W must be [V, H], got ", w.sizes());
  TORCH_CHECK(y.dim() == 1 && y.size(0) == h.size(0), "linear_logprob: y must be [N] with N = ", h.size(0),
              ", got ", y.sizes());
  TORCH_CHECK(h.size(1) == w.size(1), "linear_logprob: hidden sizes differ: h ", h.sizes(), " W ", w.sizes());
  TORCH_CHECK(h.scalar_type() == w.scalar_type(), "linear_logprob: h and W dtypes differ (", h.scalar_type(),
              " vs ", w.scalar_type(), ")");
  TORCH_CHECK(at::isFloatingType(h.scalar_type()), "linear_logprob: h must be floating point");
  TORCH_CHECK(y.scalar_type() == at::kLong, "linear_logprob: y must be int64");
  TORCH_CHECK(h.device() == w.device() && h.device() == y.device(), "linear_logprob: tensors on different devices");
}

// Row passes written with ATen ops, for the dtypes the hand-written passes do not cover (float64 for
// gradcheck, float16 on CPU). Same contract as RowKernels; slower, exact in the accumulator dtype.
at::Tensor target_cols(const at::Tensor& y, int64_t v0, int64_t cols) {
  auto j = y - v0;
  return at::where(j.ge(0).logical_and(j.lt(cols)), j, at::full_like(j, -1));
}

void generic_stats(const at::Tensor& L, const at::Tensor& y, int64_t v0, at::Tensor& m, at::Tensor& s, at::Tensor& t) {
  auto Lf = L.to(m.scalar_type());
  auto nm = at::maximum(Lf.amax(1), m);
  auto old = at::where(m.isneginf(), at::zeros_like(s), s * (m - nm).exp());
  s.copy_(old + (Lf - nm.unsqueeze(1)).exp().sum(1));
  m.copy_(nm);
  auto j = target_cols(y, v0, L.size(1));
  auto hit = j.ge(0);
  t.copy_(at::where(hit, Lf.gather(1, j.clamp_min(0).unsqueeze(1)).squeeze(1), t));
}

void generic_softmax_grad(at::Tensor& L, const at::Tensor& y, at::Tensor& m, at::Tensor& s, at::Tensor& t) {
  auto Lf = L.to(m.scalar_type());
  auto valid = y.ne(kIgnoreIndex);
  auto j = y.clamp_min(0).unsqueeze(1);
  auto mx = Lf.amax(1);
  auto E = (Lf - mx.unsqueeze(1)).exp();
  auto sum = E.sum(1);
  t.copy_(at::where(valid, Lf.gather(1, j).squeeze(1), at::zeros_like(t)));
  E.scatter_add_(1, j, -sum.unsqueeze(1));
  E.mul_(valid.unsqueeze(1));
  m.copy_(at::where(valid, mx, at::zeros_like(mx)));
  s.copy_(at::where(valid, sum, at::ones_like(sum)));
  L.copy_(E);
}

void generic_exp_normalized(at::Tensor& L, const at::Tensor& y, int64_t v0, const at::Tensor& lse) {
  auto Lf = L.to(lse.scalar_type());
  auto E = (Lf - lse.unsqueeze(1)).exp();
  auto j = target_cols(y, v0, L.size(1));
  auto hit = j.ge(0).to(E.scalar_type()).unsqueeze(1);
  E.scatter_add_(1, j.clamp_min(0).unsqueeze(1), -hit);
  E.mul_(y.ne(kIgnoreIndex).unsqueeze(1));
  L.copy_(E);
}

const RowKernels& generic_row_kernels() {
  static const RowKernels k{&generic_stats, &generic_softmax_grad, &generic_exp_normalized};
  return k;
}

}  // namespace

std::tuple<at::Tensor, at::Tensor> linear_logprob(const at::Tensor& h_in, const at::Tensor& w_in,
                                                  const at::Tensor& y_in, int64_t chunk_rows, int64_t chunk_vocab,
                                                  bool with_grad) {
  check_inputs(h_in, w_in, y_in);
  const auto h = h_in.contiguous();
  const auto w = w_in.contiguous();
  const auto y = y_in.contiguous();
  const int64_t N = h.size(0), H = h.size(1), V = w.size(0);
  TORCH_CHECK(h.is_cpu() || h.is_cuda(), "linear_logprob: unsupported device ", h.device());
  const auto dt = h.scalar_type();
  const bool fast_cpu = h.is_cpu() && (dt == at::kFloat || dt == at::kBFloat16);
  const bool fast_cuda = h.is_cuda() && dt != at::kDouble;
  const RowKernels& k =
#ifdef LUNE_FAST_WITH_CUDA
      fast_cuda ? cuda_row_kernels() :
#endif
      fast_cpu ? cpu_row_kernels() : generic_row_kernels();
  (void)fast_cuda;
  // Accumulators (and the result) are float32, or float64 for float64 inputs.
  auto f32 = h.options().dtype(dt == at::kDouble ? at::kDouble : at::kFloat);
  auto logp = at::empty({N}, f32);
  auto grad = with_grad ? at::empty({N, H}, h.options()) : at::empty({0}, h.options());
  if (N == 0) return {logp, grad};
  const int64_t cr = std::max<int64_t>(1, std::min(chunk_rows, N));
  const int64_t cv = std::max<int64_t>(1, std::min(chunk_vocab, V));
  const bool one_pass = cv >= V;
  auto logits_buf = at::empty({cr, cv}, h.options());
  auto m = at::empty({cr}, f32), s = at::empty({cr}, f32), t = at::empty({cr}, f32);
  const float neg_inf = -std::numeric_limits<float>::infinity();

  for (int64_t r0 = 0; r0 < N; r0 += cr) {
    const int64_t rows = std::min(cr, N - r0);
    auto hr = h.narrow(0, r0, rows);
    auto yr = y.narrow(0, r0, rows);
    auto mr = m.narrow(0, 0, rows), sr = s.narrow(0, 0, rows), tr = t.narrow(0, 0, rows);
    auto valid = yr.ne(kIgnoreIndex);
    if (one_pass) {
      auto L = logits_buf.narrow(0, 0, rows);
      at::mm_out(L, hr, w.t());
      if (with_grad) {
        k.softmax_grad(L, yr, mr, sr, tr);
        // G = (E . W) / s in float, then stored in the input dtype.
        auto g = at::mm(L, w).to(f32.dtype()).mul_(sr.reciprocal().unsqueeze(1));
        grad.narrow(0, r0, rows).copy_(g);
      } else {
        mr.fill_(neg_inf);
        sr.zero_();
        tr.zero_();
        k.stats(L, yr, 0, mr, sr, tr);
      }
    } else {
      mr.fill_(neg_inf);
      sr.zero_();
      tr.zero_();
      for (int64_t v0 = 0; v0 < V; v0 += cv) {
        const int64_t cols = std::min(cv, V - v0);
        auto L = logits_buf.narrow(0, 0, rows).narrow(1, 0, cols);
        at::mm_out(L, hr, w.narrow(0, v0, cols).t());
        k.stats(L, yr, v0, mr, sr, tr);
      }
      if (with_grad) {
        auto lse = mr + sr.log();
        auto acc = at::zeros({rows, H}, f32);
        for (int64_t v0 = 0; v0 < V; v0 += cv) {
          const int64_t cols = std::min(cv, V - v0);
          auto L = logits_buf.narrow(0, 0, rows).narrow(1, 0, cols);
          auto wc = w.narrow(0, v0, cols);
          at::mm_out(L, hr, wc.t());
          k.exp_normalized(L, yr, v0, lse);
          acc.add_(at::mm(L, wc));
        }
        grad.narrow(0, r0, rows).copy_(acc);
      }
    }
    auto lp = tr - (mr + sr.log());
    logp.narrow(0, r0, rows).copy_(at::where(valid, lp, at::zeros_like(lp)));
  }
  return {logp, grad};
}

}  // namespace lune_fast
