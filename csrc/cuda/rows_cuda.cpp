// Torch binding of the CUDA row passes: tensors in, C-ABI launcher (rows.cu) out. Built only where torch
// has CUDA.
#include <ATen/cuda/CUDAContext.h>
#include <cuda_runtime.h>

#include "../linear_logprob.h"

extern "C" cudaError_t lune_fast_rows_launch(int dtype, int op, void* L, int64_t rows, int64_t cols, int64_t ld,
                                             const int64_t* y, int64_t v0, float* m, float* s, float* t,
                                             const float* lse, cudaStream_t stream);

namespace lune_fast {
namespace {

int dtype_code(const at::Tensor& L) {
  switch (L.scalar_type()) {
    case at::kFloat: return 0;
    case at::kBFloat16: return 1;
    case at::kHalf: return 2;
    default: TORCH_CHECK(false, "linear_logprob (CUDA): unsupported dtype ", L.scalar_type());
  }
}

void launch(int op, const at::Tensor& L, const at::Tensor& y, int64_t v0, float* m, float* s, float* t,
            const float* lse) {
  TORCH_CHECK(L.stride(1) == 1, "linear_logprob (CUDA): chunk buffer must be row-contiguous");
  auto err = lune_fast_rows_launch(dtype_code(L), op, L.data_ptr(), L.size(0), L.size(1), L.stride(0),
                                   y.data_ptr<int64_t>(), v0, m, s, t, lse, at::cuda::getCurrentCUDAStream());
  TORCH_CHECK(err == cudaSuccess, "linear_logprob (CUDA): kernel launch failed: ", cudaGetErrorString(err));
}

void stats_cuda(const at::Tensor& L, const at::Tensor& y, int64_t v0, at::Tensor& m, at::Tensor& s, at::Tensor& t) {
  launch(0, L, y, v0, m.data_ptr<float>(), s.data_ptr<float>(), t.data_ptr<float>(), nullptr);
}
void softmax_grad_cuda(at::Tensor& L, const at::Tensor& y, at::Tensor& m, at::Tensor& s, at::Tensor& t) {
  launch(1, L, y, 0, m.data_ptr<float>(), s.data_ptr<float>(), t.data_ptr<float>(), nullptr);
}
void exp_normalized_cuda(at::Tensor& L, const at::Tensor& y, int64_t v0, const at::Tensor& lse) {
  auto l = lse.contiguous();
  launch(2, L, y, v0, nullptr, nullptr, nullptr, l.data_ptr<float>());
}

}  // namespace

const RowKernels& cuda_row_kernels() {
  static const RowKernels k{&stats_cuda, &softmax_grad_cuda, &exp_normalized_cuda};
  return k;
}

}  // namespace lune_fast
