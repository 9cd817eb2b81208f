// CPU kernels of the hyperbolic family: one pass over the rows, OpenMP across rows, the row's
// dot products and its output computed while the row is in L1. Half types compute in float32.
#include "../hyperbolic_math.h"
#include "../ops.h"

#include <ATen/Dispatch.h>
#include <ATen/OpMathType.h>
#include <ATen/Parallel.h>
#include <torch/library.h>

namespace lfi_fast {
namespace {

// Rows per parallel task: enough work per task to amortise the OpenMP fork.
int64_t grain_rows(int64_t d) { return std::max<int64_t>(1, 32768 / std::max<int64_t>(d, 1)); }

void check_inputs(const at::Tensor& x, const at::Tensor& y, const at::Tensor& c) {
  LFI_CHECK_FLOATING(x);
  LFI_CHECK_SAME_DTYPE(x, y);
  LFI_CHECK_DEVICE(x, at::Device(at::kCPU));
  LFI_CHECK_DEVICE(y, at::Device(at::kCPU));
  LFI_CHECK_DEVICE(c, at::Device(at::kCPU));
  LFI_CHECK_SCALAR(c);
}

template <typename scalar_t>
void mobius_add_kernel(const RowView& xv, const RowView& yv, at::Tensor& out, int64_t n,
                       int64_t d, double cv, bool project) {
  using acc_t = at::opmath_type<scalar_t>;
  const scalar_t* xp = xv.t.const_data_ptr<scalar_t>();
  const scalar_t* yp = yv.t.const_data_ptr<scalar_t>();
  scalar_t* op = out.mutable_data_ptr<scalar_t>();
  const acc_t cc = static_cast<acc_t>(cv);
  const acc_t maxnorm = hyp::max_norm<acc_t>(cc, acc_t(ball_eps<scalar_t>()));
  const int64_t sx = xv.row_stride, sy = yv.row_stride;
  at::parallel_for(0, n, grain_rows(d), [&](int64_t begin, int64_t end) {
    for (int64_t i = begin; i < end; ++i) {
      const scalar_t* xr = xp + i * sx;
      const scalar_t* yr = yp + i * sy;
      scalar_t* orow = op + i * d;
      acc_t x2 = 0, y2 = 0, xy = 0;
#pragma omp simd reduction(+ : x2, y2, xy)
      for (int64_t j = 0; j < d; ++j) {
        const acc_t a = xr[j], b = yr[j];
        x2 += a * a;
        y2 += b * b;
        xy += a * b;
      }
      const auto f = hyp::mobius_add_fwd<acc_t>(x2, y2, xy, cc, maxnorm, project);
#pragma omp simd
      for (int64_t j = 0; j < d; ++j) {
        orow[j] = static_cast<scalar_t>(f.alpha * acc_t(xr[j]) + f.beta * acc_t(yr[j]));
      }
    }
  });
}

// Returns the gradient of c (a sum over rows, reduced in double).
template <typename scalar_t>
double mobius_add_backward_kernel(const RowView& gv, const RowView& xv, const RowView& yv,
                                  at::Tensor& gx, at::Tensor& gy, int64_t n, int64_t d, double cv,
                                  bool project) {
  using acc_t = at::opmath_type<scalar_t>;
  const scalar_t* xp = xv.t.const_data_ptr<scalar_t>();
  const scalar_t* yp = yv.t.const_data_ptr<scalar_t>();
  const scalar_t* gp = gv.t.const_data_ptr<scalar_t>();
  scalar_t* gxp = gx.mutable_data_ptr<scalar_t>();
  scalar_t* gyp = gy.mutable_data_ptr<scalar_t>();
  const acc_t cc = static_cast<acc_t>(cv);
  const acc_t maxnorm = hyp::max_norm<acc_t>(cc, acc_t(ball_eps<scalar_t>()));
  const int64_t sx = xv.row_stride, sy = yv.row_stride, sg = gv.row_stride;
  return at::parallel_reduce(
      0, n, grain_rows(d), 0.0,
      [&](int64_t begin, int64_t end, double acc) {
        for (int64_t i = begin; i < end; ++i) {
          const scalar_t* xr = xp + i * sx;
          const scalar_t* yr = yp + i * sy;
          const scalar_t* gr = gp + i * sg;
          acc_t x2 = 0, y2 = 0, xy = 0, gxd = 0, gyd = 0;
#pragma omp simd reduction(+ : x2, y2, xy, gxd, gyd)
          for (int64_t j = 0; j < d; ++j) {
            const acc_t a = xr[j], b = yr[j], g = gr[j];
            x2 += a * a;
            y2 += b * b;
            xy += a * b;
            gxd += g * a;
            gyd += g * b;
          }
          const auto k = hyp::mobius_add_bwd<acc_t>(x2, y2, xy, gxd, gyd, cc, maxnorm, project);
          scalar_t* oxr = gxp + i * d;
          scalar_t* oyr = gyp + i * d;
#pragma omp simd
          for (int64_t j = 0; j < d; ++j) {
            const acc_t a = xr[j], b = yr[j], g = gr[j];
            oxr[j] = static_cast<scalar_t>(k.gx_g * g + k.gx_x * a + k.gx_y * b);
            oyr[j] = static_cast<scalar_t>(k.gy_g * g + k.gy_x * a + k.gy_y * b);
          }
          acc += static_cast<double>(k.gc);
        }
        return acc;
      },
      std::plus<double>());
}

}  // namespace

at::Tensor mobius_add_cpu(const at::Tensor& x, const at::Tensor& y, const at::Tensor& c,
                          bool project) {
  check_inputs(x, y, c);
  const auto shape = broadcast_shape(x, y);
  TORCH_CHECK(!shape.empty(), "x and y must have at least 1 dim (the coordinates)");
  at::Tensor out = at::empty(shape, x.options().memory_format(at::MemoryFormat::Contiguous));
  if (out.numel() == 0) return out;
  const int64_t d = shape.back();
  const RowView xv = row_view(x, shape), yv = row_view(y, shape);
  const double cv = c.item<double>();
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, x.scalar_type(), "mobius_add_cpu", [&] {
    mobius_add_kernel<scalar_t>(xv, yv, out, out.numel() / d, d, cv, project);
  });
  return out;
}

std::tuple<at::Tensor, at::Tensor, at::Tensor> mobius_add_backward_cpu(
    const at::Tensor& grad, const at::Tensor& x, const at::Tensor& y, const at::Tensor& c,
    bool project, bool needs_grad_c) {
  check_inputs(x, y, c);
  LFI_CHECK_SAME_DTYPE(grad, x);
  LFI_CHECK_DEVICE(grad, at::Device(at::kCPU));
  const auto shape = broadcast_shape(x, y);
  TORCH_CHECK(!shape.empty(), "x and y must have at least 1 dim (the coordinates)");
  TORCH_CHECK(grad.sizes() == at::IntArrayRef(shape), "grad must have the broadcast shape ",
              at::IntArrayRef(shape), " (got ", grad.sizes(), ")");
  const auto opts = x.options().memory_format(at::MemoryFormat::Contiguous);
  at::Tensor gx = at::empty(shape, opts), gy = at::empty(shape, opts);
  at::Tensor gc = at::zeros({}, c.options());
  if (gx.numel() == 0) return {gx, gy, gc};
  const int64_t d = shape.back();
  const RowView xv = row_view(x, shape), yv = row_view(y, shape), gv = row_view(grad, shape);
  const double cv = c.item<double>();
  double total = 0;
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, x.scalar_type(), "mobius_add_backward_cpu", [&] {
    total = mobius_add_backward_kernel<scalar_t>(gv, xv, yv, gx, gy, gx.numel() / d, d, cv, project);
  });
  if (needs_grad_c) gc.fill_(total);
  return {gx, gy, gc};
}

TORCH_LIBRARY_IMPL(lfi_fast, CPU, m) {
  m.impl("mobius_add", &mobius_add_cpu);
  m.impl("mobius_add_backward", &mobius_add_backward_cpu);
}

}  // namespace lfi_fast
