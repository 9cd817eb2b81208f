// Helpers shared by the CPU and CUDA kernels: argument checks with named messages and the
// (rows, D) views that every row-wise op works on.
#pragma once

#include <ATen/ATen.h>
#include <ATen/OpMathType.h>
#include <c10/util/Exception.h>

#include <cstdint>
#include <vector>

#if defined(__CUDACC__) || defined(__HIPCC__)
#define LFI_HD __host__ __device__ __forceinline__
#else
#define LFI_HD inline
#endif

// Checks at the C++ boundary. The Python layer validates first and gives friendlier messages;
// these make a direct torch.ops call safe as well (an error, never a crash).
#define LFI_CHECK_FLOATING(t)                                                               \
  TORCH_CHECK(at::isFloatingType((t).scalar_type()), #t " must be a floating tensor (got ", \
              (t).scalar_type(), ")")
#define LFI_CHECK_SAME_DTYPE(a, b)                                                     \
  TORCH_CHECK((a).scalar_type() == (b).scalar_type(), #a " and " #b                   \
              " must have the same dtype (got ", (a).scalar_type(), " and ", (b).scalar_type(), \
              ")")
#define LFI_CHECK_DEVICE(t, dev)                                                            \
  TORCH_CHECK((t).device() == (dev), #t " must be on ", (dev), " (got ", (t).device(), ")")
#define LFI_CHECK_SCALAR(t)                                                        \
  TORCH_CHECK((t).dim() == 0, #t " must be a 0-dim tensor (got shape ", (t).sizes(), \
              ")");                                                                \
  LFI_CHECK_FLOATING(t)

namespace lfi_fast {

// The compute type of the row kernels: float32 for float16 and float32 (at::opmath_type), float64
// for float64 and for bfloat16, whose range is float32's: |x|^2 of a finite bfloat16 vector can
// overflow float32, and a finite input must never give a non-finite output.
template <typename scalar_t>
using compute_t = std::conditional_t<std::is_same_v<scalar_t, c10::BFloat16>, double,
                                     at::opmath_type<scalar_t>>;

// compute_t as a runtime dtype (row_compute_type), for the ATen calls (GEMMs) of the kernels built on them.
inline at::ScalarType row_compute_type(at::ScalarType t) {
  return t == at::kBFloat16 ? at::kDouble : at::toOpMathType(t);
}

// Projection margin below the ball's radius, as geoopt: 4e-3 for float32 and 1e-5 for float64.
// Half types compute in float32 and take float32's margin, which is above their step below 1
// (bfloat16: 3.9e-3), so a stored result never rounds onto or over the boundary.
template <typename scalar_t>
constexpr double ball_eps() {
  return std::is_same_v<scalar_t, double> ? 1e-5 : 4e-3;
}

// A (rows, D) view of `t` broadcast to `shape`: the last dim has stride 1 and the leading dims
// collapse into one row stride (0 when t is broadcast along every leading dim, as a bias is).
// Copies only when the broadcast cannot be expressed that way.
struct RowView {
  at::Tensor t;  // keeps a copy alive when one was needed
  int64_t row_stride;
};

inline RowView row_view(const at::Tensor& t, at::IntArrayRef shape) {
  const int64_t d = shape.empty() ? 1 : shape.back();
  at::Tensor v = t.expand(shape).reshape({-1, d});
  if (d > 1 && v.stride(1) != 1) v = v.contiguous();
  return {v, v.size(0) > 1 ? v.stride(0) : d};
}

inline std::vector<int64_t> broadcast_shape(const at::Tensor& a, const at::Tensor& b) {
  auto s = at::infer_size(a.sizes(), b.sizes());
  return std::vector<int64_t>(s.begin(), s.end());
}

}  // namespace lfi_fast
