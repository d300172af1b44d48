// CUDA row passes of the fused head log-prob op. CUDA headers only (no torch), so `nvcc -c` checks this
// file on a machine whose torch has no CUDA; the torch binding (rows_cuda.cpp) calls the C-ABI launchers.
//
// One block per row. Each pass streams the row once with 16-byte vector loads when the row is aligned; the
// row max and the exp-sum are block reductions (warp shuffles, then one shared-memory step).
#include <cuda_bf16.h>
#include <cuda_fp16.h>
#include <cuda_runtime.h>
#include <stdint.h>

namespace {

constexpr int kThreads = 256;
constexpr int64_t kIgnore = -100;

__device__ __forceinline__ float to_f(float x) { return x; }
__device__ __forceinline__ float to_f(__nv_bfloat16 x) { return __bfloat162float(x); }
__device__ __forceinline__ float to_f(__half x) { return __half2float(x); }
template <typename T> __device__ __forceinline__ T from_f(float x);
template <> __device__ __forceinline__ float from_f<float>(float x) { return x; }
template <> __device__ __forceinline__ __nv_bfloat16 from_f<__nv_bfloat16>(float x) { return __float2bfloat16(x); }
template <> __device__ __forceinline__ __half from_f<__half>(float x) { return __float2half(x); }

__device__ __forceinline__ float warp_max(float v) {
  for (int o = 16; o > 0; o >>= 1) v = fmaxf(v, __shfl_xor_sync(0xffffffffu, v, o));
  return v;
}
__device__ __forceinline__ float warp_sum(float v) {
  for (int o = 16; o > 0; o >>= 1) v += __shfl_xor_sync(0xffffffffu, v, o);
  return v;
}
// All threads get the result. `smem` holds one float per warp.
template <bool kMax>
__device__ __forceinline__ float block_reduce(float v, float* smem) {
  v = kMax ? warp_max(v) : warp_sum(v);
  const int lane = threadIdx.x & 31, wid = threadIdx.x >> 5;
  __syncthreads();  // smem may still be read by a previous reduction
  if (lane == 0) smem[wid] = v;
  __syncthreads();
  v = lane < (blockDim.x >> 5) ? smem[lane] : (kMax ? -INFINITY : 0.0f);
  return kMax ? warp_max(v) : warp_sum(v);
}

// Elements per 16-byte vector.
template <typename T> constexpr int kVec = 16 / sizeof(T);

template <typename T>
__device__ __forceinline__ bool row_vectorisable(const T* x, int64_t cols) {
  return (reinterpret_cast<uintptr_t>(x) % 16 == 0) && (cols % kVec<T> == 0);
}

// f(i, value) over the row, read-only.
template <typename T, typename F>
__device__ __forceinline__ void for_each(const T* x, int64_t cols, F f) {
  if (row_vectorisable(x, cols)) {
    const int64_t nv = cols / kVec<T>;
    for (int64_t v = threadIdx.x; v < nv; v += blockDim.x) {
      uint4 raw = reinterpret_cast<const uint4*>(x)[v];
      const T* e = reinterpret_cast<const T*>(&raw);
#pragma unroll
      for (int k = 0; k < kVec<T>; ++k) f(v * kVec<T> + k, to_f(e[k]));
    }
  } else {
    for (int64_t i = threadIdx.x; i < cols; i += blockDim.x) f(i, to_f(x[i]));
  }
}

// x[i] <- g(x[i]) over the row; returns this thread's sum of the new values (as stored, before rounding).
template <typename T, typename G>
__device__ __forceinline__ float transform(T* x, int64_t cols, G g) {
  float acc = 0.f;
  if (row_vectorisable(x, cols)) {
    const int64_t nv = cols / kVec<T>;
    for (int64_t v = threadIdx.x; v < nv; v += blockDim.x) {
      uint4 raw = reinterpret_cast<uint4*>(x)[v];
      T* e = reinterpret_cast<T*>(&raw);
#pragma unroll
      for (int k = 0; k < kVec<T>; ++k) {
        const float r = g(to_f(e[k]));
        acc += r;
        e[k] = from_f<T>(r);
      }
      reinterpret_cast<uint4*>(x)[v] = raw;
    }
  } else {
    for (int64_t i = threadIdx.x; i < cols; i += blockDim.x) {
      const float r = g(to_f(x[i]));
      acc += r;
      x[i] = from_f<T>(r);
    }
  }
  return acc;
}

template <typename T>
__global__ void __launch_bounds__(kThreads) stats_kernel(const T* L, int64_t cols, int64_t ld, const int64_t* y,
                                                         int64_t v0, float* m, float* s, float* t) {
  __shared__ float smem[kThreads / 32];
  const int64_t r = blockIdx.x;
  const T* x = L + r * ld;
  float cm = -INFINITY;
  for_each(x, cols, [&](int64_t, float v) { cm = fmaxf(cm, v); });
  cm = block_reduce<true>(cm, smem);
  const float nm = fmaxf(cm, m[r]);
  float sum = 0.f;
  for_each(x, cols, [&](int64_t, float v) { sum += __expf(v - nm); });
  sum = block_reduce<false>(sum, smem);
  if (threadIdx.x == 0) {
    const float old = m[r] == -INFINITY ? 0.f : s[r] * __expf(m[r] - nm);
    s[r] = old + sum;
    m[r] = nm;
    const int64_t j = y[r] - v0;
    if (j >= 0 && j < cols) t[r] = to_f(x[j]);
  }
}

template <typename T>
__global__ void __launch_bounds__(kThreads) softmax_grad_kernel(T* L, int64_t cols, int64_t ld, const int64_t* y,
                                                                float* m, float* s, float* t) {
  __shared__ float smem[kThreads / 32];
  const int64_t r = blockIdx.x;
  T* x = L + r * ld;
  const int64_t j = y[r];
  if (j == kIgnore) {
    transform(x, cols, [](float) { return 0.f; });
    if (threadIdx.x == 0) { m[r] = 0.f; s[r] = 1.f; t[r] = 0.f; }
    return;
  }
  const float target = to_f(x[j]);  // read before the row is overwritten
  float mx = -INFINITY;
  for_each(x, cols, [&](int64_t, float v) { mx = fmaxf(mx, v); });
  mx = block_reduce<true>(mx, smem);
  float sum = transform(x, cols, [&](float v) { return __expf(v - mx); });
  sum = block_reduce<false>(sum, smem);  // its barriers also order every write above before the fix below
  if (threadIdx.x == 0) {
    m[r] = mx;
    s[r] = sum;
    t[r] = target;
    x[j] = from_f<T>(__expf(target - mx) - sum);  // so that x / s = softmax - onehot
  }
}

template <typename T>
__global__ void __launch_bounds__(kThreads) exp_normalized_kernel(T* L, int64_t cols, int64_t ld, const int64_t* y,
                                                                  int64_t v0, const float* lse) {
  const int64_t r = blockIdx.x;
  T* x = L + r * ld;
  if (y[r] == kIgnore) {
    transform(x, cols, [](float) { return 0.f; });
    return;
  }
  const float shift = lse[r];
  const int64_t j = y[r] - v0;
  const bool has_target = j >= 0 && j < cols;
  const float target = has_target ? to_f(x[j]) : 0.f;
  __syncthreads();  // every thread has read the target before any thread overwrites the row
  transform(x, cols, [&](float v) { return __expf(v - shift); });
  __syncthreads();
  if (threadIdx.x == 0 && has_target) x[j] = from_f<T>(expm1f(target - shift));  // softmax - 1, no cancellation
}

template <typename T>
cudaError_t launch_all(int op, void* L, int64_t rows, int64_t cols, int64_t ld, const int64_t* y, int64_t v0,
                       float* m, float* s, float* t, const float* lse, cudaStream_t stream) {
  if (rows == 0) return cudaSuccess;
  dim3 grid(static_cast<unsigned>(rows)), block(kThreads);
  switch (op) {
    case 0: stats_kernel<T><<<grid, block, 0, stream>>>(static_cast<const T*>(L), cols, ld, y, v0, m, s, t); break;
    case 1: softmax_grad_kernel<T><<<grid, block, 0, stream>>>(static_cast<T*>(L), cols, ld, y, m, s, t); break;
    default: exp_normalized_kernel<T><<<grid, block, 0, stream>>>(static_cast<T*>(L), cols, ld, y, v0, lse); break;
  }
  return cudaGetLastError();
}

}  // namespace

// dtype: 0 float32, 1 bfloat16, 2 float16. op: 0 stats, 1 softmax_grad, 2 exp_normalized.
extern "C" cudaError_t lune_fast_rows_launch(int dtype, int op, void* L, int64_t rows, int64_t cols, int64_t ld,
                                             const int64_t* y, int64_t v0, float* m, float* s, float* t,
                                             const float* lse, cudaStream_t stream) {
  switch (dtype) {
    case 0: return launch_all<float>(op, L, rows, cols, ld, y, v0, m, s, t, lse, stream);
    case 1: return launch_all<__nv_bfloat16>(op, L, rows, cols, ld, y, v0, m, s, t, lse, stream);
    case 2: return launch_all<__half>(op, L, rows, cols, ld, y, v0, m, s, t, lse, stream);
    default: return cudaErrorInvalidValue;
  }
}
