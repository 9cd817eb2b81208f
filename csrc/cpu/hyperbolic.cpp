// CPU kernels of the hyperbolic family. Row ops are one pass over the rows, OpenMP across rows:
// the row's dot products and its output are computed while the row is in L1. The ops built on a
// matrix product (mobius_matvec, pairwise_dist) leave the product to ATen's GEMM and fuse the
// rest. float16 computes in float32, bfloat16 in float64 (compute_t, common.h: a finite bfloat16
// input of any size gives a finite output). The per-row math is hyperbolic_math.h.
#include "../hyperbolic_math.h"
#include "../ops.h"

#include <ATen/Dispatch.h>
#include <ATen/OpMathType.h>
#include <ATen/Parallel.h>
#include <c10/util/accumulate.h>
#include <torch/library.h>

namespace lfi_fast {
namespace {

using at::Tensor;

// Rows per parallel task: enough work per task to amortise the OpenMP fork.
int64_t grain_rows(int64_t d) { return std::max<int64_t>(1, 32768 / std::max<int64_t>(d, 1)); }

const at::Device kCPU(at::kCPU);

void check_vec(const Tensor& t, const char* name) {
  TORCH_CHECK(at::isFloatingType(t.scalar_type()), name, " must be a floating tensor (got ",
              t.scalar_type(), ")");
  TORCH_CHECK(t.device() == kCPU, name, " must be on the CPU (got ", t.device(), ")");
  TORCH_CHECK(t.dim() >= 1, name, " must have at least 1 dim (the coordinates)");
}

void check_pair(const Tensor& x, const Tensor& y, const char* xn, const char* yn) {
  check_vec(x, xn);
  check_vec(y, yn);
  TORCH_CHECK(x.scalar_type() == y.scalar_type(), xn, " and ", yn,
              " must have the same dtype (got ", x.scalar_type(), " and ", y.scalar_type(), ")");
}

double curvature(const Tensor& c) {
  LFI_CHECK_SCALAR(c);
  LFI_CHECK_DEVICE(c, kCPU);
  return c.item<double>();
}

void check_grad(const Tensor& grad, const Tensor& like, at::IntArrayRef shape) {
  TORCH_CHECK(grad.scalar_type() == like.scalar_type() && grad.device() == like.device(),
              "grad must have the inputs' dtype and device");
  TORCH_CHECK(grad.sizes() == shape, "grad must have shape ", shape, " (got ", grad.sizes(), ")");
}

Tensor empty_like_shape(const Tensor& like, at::IntArrayRef shape) {
  return at::empty(shape, like.options().memory_format(at::MemoryFormat::Contiguous));
}

// The shape of a row-wise op's scalar output: the broadcast shape without its last dim.
std::vector<int64_t> rows_shape(std::vector<int64_t> shape) {
  shape.pop_back();
  return shape;
}

// Sums over the rows of a parallel loop, in double: the gradient of c (and of r).
template <typename F>
double sum_rows(int64_t n, int64_t d, const F& f) {
  return at::parallel_reduce(
      0, n, grain_rows(d), 0.0,
      [&](int64_t b, int64_t e, double acc) {
        for (int64_t i = b; i < e; ++i) acc += f(i);
        return acc;
      },
      std::plus<double>());
}

// ---- binary row ops: out = a x + b y, (a, b) from (|x|^2, |y|^2, <x,y>) -----------------------

template <typename Op, typename scalar_t>
void binary_fwd_kernel(const RowView& xv, const RowView& yv, Tensor& out, int64_t n, int64_t d,
                       double cv, bool project) {
  using acc_t = compute_t<scalar_t>;
  const scalar_t* xp = xv.t.const_data_ptr<scalar_t>();
  const scalar_t* yp = yv.t.const_data_ptr<scalar_t>();
  scalar_t* op = out.mutable_data_ptr<scalar_t>();
  const acc_t cc = static_cast<acc_t>(cv), eps = acc_t(ball_eps<scalar_t>());
  at::parallel_for(0, n, grain_rows(d), [&](int64_t begin, int64_t end) {
    for (int64_t i = begin; i < end; ++i) {
      const scalar_t* xr = xp + i * xv.row_stride;
      const scalar_t* yr = yp + i * yv.row_stride;
      scalar_t* orow = op + i * d;
      acc_t x2 = 0, y2 = 0, xy = 0;
#pragma omp simd reduction(+ : x2, y2, xy)
      for (int64_t j = 0; j < d; ++j) {
        const acc_t a = xr[j], b = yr[j];
        x2 += a * a;
        y2 += b * b;
        xy += a * b;
      }
      acc_t a, b;
      hyp::binary_fwd<Op>(x2, y2, xy, cc, eps, project, a, b);
#pragma omp simd
      for (int64_t j = 0; j < d; ++j) {
        orow[j] = static_cast<scalar_t>(a * acc_t(xr[j]) + b * acc_t(yr[j]));
      }
    }
  });
}

template <typename Op, typename scalar_t>
double binary_bwd_kernel(const RowView& gv, const RowView& xv, const RowView& yv, Tensor& gx,
                         Tensor& gy, int64_t n, int64_t d, double cv, bool project) {
  using acc_t = compute_t<scalar_t>;
  const scalar_t* xp = xv.t.const_data_ptr<scalar_t>();
  const scalar_t* yp = yv.t.const_data_ptr<scalar_t>();
  const scalar_t* gp = gv.t.const_data_ptr<scalar_t>();
  scalar_t* gxp = gx.mutable_data_ptr<scalar_t>();
  scalar_t* gyp = gy.mutable_data_ptr<scalar_t>();
  const acc_t cc = static_cast<acc_t>(cv), eps = acc_t(ball_eps<scalar_t>());
  return sum_rows(n, d, [&](int64_t i) {
    const scalar_t* xr = xp + i * xv.row_stride;
    const scalar_t* yr = yp + i * yv.row_stride;
    const scalar_t* gr = gp + i * gv.row_stride;
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
    const auto k = hyp::binary_bwd<Op>(x2, y2, xy, gxd, gyd, cc, eps, project);
    scalar_t* oxr = gxp + i * d;
    scalar_t* oyr = gyp + i * d;
#pragma omp simd
    for (int64_t j = 0; j < d; ++j) {
      const acc_t a = xr[j], b = yr[j], g = gr[j];
      oxr[j] = static_cast<scalar_t>(k.gx_g * g + k.gx_x * a + k.gx_y * b);
      oyr[j] = static_cast<scalar_t>(k.gy_g * g + k.gy_x * a + k.gy_y * b);
    }
    return static_cast<double>(k.gc);
  });
}

template <typename Op>
Tensor binary_fwd(const Tensor& x, const Tensor& y, const Tensor& c, bool project,
                  const char* xn, const char* yn) {
  check_pair(x, y, xn, yn);
  const double cv = curvature(c);
  const auto shape = broadcast_shape(x, y);
  Tensor out = empty_like_shape(x, shape);
  if (out.numel() == 0) return out;
  const int64_t d = shape.back();
  const RowView xv = row_view(x, shape), yv = row_view(y, shape);
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, x.scalar_type(), "binary_fwd", [&] {
    binary_fwd_kernel<Op, scalar_t>(xv, yv, out, out.numel() / d, d, cv, project);
  });
  return out;
}

template <typename Op>
std::tuple<Tensor, Tensor, Tensor> binary_bwd(const Tensor& grad, const Tensor& x,
                                              const Tensor& y, const Tensor& c, bool project,
                                              bool needs_grad_c, const char* xn, const char* yn) {
  check_pair(x, y, xn, yn);
  const double cv = curvature(c);
  const auto shape = broadcast_shape(x, y);
  check_grad(grad, x, shape);
  Tensor gx = empty_like_shape(x, shape), gy = empty_like_shape(x, shape);
  Tensor gc = at::zeros({}, c.options());
  if (gx.numel() == 0) return {gx, gy, gc};
  const int64_t d = shape.back();
  const RowView xv = row_view(x, shape), yv = row_view(y, shape), gv = row_view(grad, shape);
  double total = 0;
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, x.scalar_type(), "binary_bwd", [&] {
    total = binary_bwd_kernel<Op, scalar_t>(gv, xv, yv, gx, gy, gx.numel() / d, d, cv, project);
  });
  if (needs_grad_c) gc.fill_(total);
  return {gx, gy, gc};
}

// ---- unary row ops: out = f x, f from (|x|^2, c, r) with r an optional per-row scalar ----------

template <typename Op, typename scalar_t>
void unary_fwd_kernel(const RowView& xv, const scalar_t* rp, int64_t sr, Tensor& out, int64_t n,
                      int64_t d, double cv, bool project) {
  using acc_t = compute_t<scalar_t>;
  const scalar_t* xp = xv.t.const_data_ptr<scalar_t>();
  scalar_t* op = out.mutable_data_ptr<scalar_t>();
  const acc_t cc = static_cast<acc_t>(cv), eps = acc_t(ball_eps<scalar_t>());
  at::parallel_for(0, n, grain_rows(d), [&](int64_t begin, int64_t end) {
    for (int64_t i = begin; i < end; ++i) {
      const scalar_t* xr = xp + i * xv.row_stride;
      scalar_t* orow = op + i * d;
      acc_t x2 = 0;
#pragma omp simd reduction(+ : x2)
      for (int64_t j = 0; j < d; ++j) x2 += acc_t(xr[j]) * acc_t(xr[j]);
      const acc_t r = rp != nullptr ? acc_t(rp[i * sr]) : acc_t(0);
      const acc_t f = hyp::unary_fwd<Op>(x2, cc, r, eps, project);
#pragma omp simd
      for (int64_t j = 0; j < d; ++j) orow[j] = static_cast<scalar_t>(f * acc_t(xr[j]));
    }
  });
}

// Returns the gradient of c; writes grad_x and, when gr is not null, each row's d/dr.
template <typename Op, typename scalar_t>
double unary_bwd_kernel(const RowView& gv, const RowView& xv, const scalar_t* rp, int64_t sr,
                        Tensor& gx, scalar_t* gr, int64_t n, int64_t d, double cv, bool project) {
  using acc_t = compute_t<scalar_t>;
  const scalar_t* xp = xv.t.const_data_ptr<scalar_t>();
  const scalar_t* gp = gv.t.const_data_ptr<scalar_t>();
  scalar_t* gxp = gx.mutable_data_ptr<scalar_t>();
  const acc_t cc = static_cast<acc_t>(cv), eps = acc_t(ball_eps<scalar_t>());
  return sum_rows(n, d, [&](int64_t i) {
    const scalar_t* xr = xp + i * xv.row_stride;
    const scalar_t* grow = gp + i * gv.row_stride;
    acc_t x2 = 0, gxd = 0;
#pragma omp simd reduction(+ : x2, gxd)
    for (int64_t j = 0; j < d; ++j) {
      const acc_t a = xr[j];
      x2 += a * a;
      gxd += acc_t(grow[j]) * a;
    }
    const acc_t r = rp != nullptr ? acc_t(rp[i * sr]) : acc_t(0);
    const auto k = hyp::unary_bwd<Op>(x2, gxd, cc, r, eps, project);
    scalar_t* oxr = gxp + i * d;
#pragma omp simd
    for (int64_t j = 0; j < d; ++j) {
      oxr[j] = static_cast<scalar_t>(k.gx_g * acc_t(grow[j]) + k.gx_x * acc_t(xr[j]));
    }
    if (gr != nullptr) gr[i] = static_cast<scalar_t>(k.gr);
    return static_cast<double>(k.gc);
  });
}

// r (optional): a per-row scalar, broadcast against x's rows as (..., 1).
struct RowScalar {
  Tensor t;
  int64_t stride = 0;
};

RowScalar row_scalar(const Tensor& r, at::IntArrayRef shape) {
  std::vector<int64_t> rs(shape.begin(), shape.end());
  rs.back() = 1;
  Tensor v = r.expand(rs).reshape({-1});
  return {v, v.numel() > 1 ? v.stride(0) : 1};
}

template <typename Op>
Tensor unary_fwd(const Tensor& x, const Tensor& c, const Tensor* r, bool project,
                 const char* xn) {
  check_vec(x, xn);
  const double cv = curvature(c);
  auto shape = x.sizes().vec();
  RowScalar rv;
  if (r != nullptr) {
    TORCH_CHECK(r->scalar_type() == x.scalar_type() && r->device() == x.device(), "r and ", xn,
                " must have the same dtype and device");
    auto rs = shape;
    rs.back() = 1;
    shape = at::infer_size(r->sizes(), rs);
    TORCH_CHECK(shape.back() == 1, "r must broadcast against the rows of ", xn,
                " as (..., 1) (got r: ", r->sizes(), ")");
    shape.back() = x.size(-1);
  }
  Tensor out = empty_like_shape(x, shape);
  if (out.numel() == 0) return out;
  const int64_t d = shape.back();
  const RowView xv = row_view(x, shape);
  if (r != nullptr) rv = row_scalar(*r, shape);
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, x.scalar_type(), "unary_fwd", [&] {
    const scalar_t* rp = r != nullptr ? rv.t.const_data_ptr<scalar_t>() : nullptr;
    unary_fwd_kernel<Op, scalar_t>(xv, rp, rv.stride, out, out.numel() / d, d, cv, project);
  });
  return out;
}

// Returns (grad_x, grad_r or undefined, grad_c); grad_r has the rows' shape (..., 1).
template <typename Op>
std::tuple<Tensor, Tensor, Tensor> unary_bwd(const Tensor& grad, const Tensor& x,
                                             const Tensor& c, const Tensor* r, bool project,
                                             bool needs_grad_c, const char* xn) {
  check_vec(x, xn);
  const double cv = curvature(c);
  auto shape = grad.sizes().vec();
  TORCH_CHECK(!shape.empty() && shape.back() == x.size(-1), "grad must be (..., ", x.size(-1),
              ") (got ", grad.sizes(), ")");
  check_grad(grad, x, shape);
  Tensor gx = empty_like_shape(x, shape);
  Tensor gc = at::zeros({}, c.options());
  auto rs = shape;
  rs.back() = 1;
  Tensor gr = r != nullptr ? at::zeros(rs, x.options()) : Tensor();
  if (gx.numel() == 0) return {gx, gr, gc};
  const int64_t d = shape.back();
  const RowView xv = row_view(x, shape), gv = row_view(grad, shape);
  RowScalar rv;
  if (r != nullptr) rv = row_scalar(*r, shape);
  double total = 0;
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, x.scalar_type(), "unary_bwd", [&] {
    const scalar_t* rp = r != nullptr ? rv.t.const_data_ptr<scalar_t>() : nullptr;
    scalar_t* grp = r != nullptr ? gr.mutable_data_ptr<scalar_t>() : nullptr;
    total = unary_bwd_kernel<Op, scalar_t>(gv, xv, rp, rv.stride, gx, grp, gx.numel() / d, d,
                                           cv, project);
  });
  if (needs_grad_c) gc.fill_(total);
  return {gx, gr, gc};
}

// ---- dist and dist0: a scalar per row ----------------------------------------------------------

template <typename scalar_t>
void dist_fwd_kernel(const RowView& xv, const RowView& yv, Tensor& out, int64_t n, int64_t d,
                     double cv) {
  using acc_t = compute_t<scalar_t>;
  const scalar_t* xp = xv.t.const_data_ptr<scalar_t>();
  const scalar_t* yp = yv.t.const_data_ptr<scalar_t>();
  scalar_t* op = out.mutable_data_ptr<scalar_t>();
  const acc_t cc = static_cast<acc_t>(cv);
  at::parallel_for(0, n, grain_rows(d), [&](int64_t begin, int64_t end) {
    for (int64_t i = begin; i < end; ++i) {
      const scalar_t* xr = xp + i * xv.row_stride;
      const scalar_t* yr = yp + i * yv.row_stride;
      acc_t x2 = 0, y2 = 0, xy = 0;
#pragma omp simd reduction(+ : x2, y2, xy)
      for (int64_t j = 0; j < d; ++j) {
        const acc_t a = xr[j], b = yr[j];
        x2 += a * a;
        y2 += b * b;
        xy += a * b;
      }
      acc_t sa, sb, s2 = 0;
      hyp::dist_sub(x2, y2, xy, cc, sa, sb);
#pragma omp simd reduction(+ : s2)
      for (int64_t j = 0; j < d; ++j) {
        const acc_t s = sa * acc_t(xr[j]) + sb * acc_t(yr[j]);
        s2 += s * s;
      }
      op[i] = static_cast<scalar_t>(hyp::dist_from_sq(s2, cc));
    }
  });
}

// s = sa x + sb y with (sa, sb) functions of (x2, y2, xy, c); dist = F(|s|^2, c). Then
// d|s|^2 = 2 <s, ds> = 2 sa <s, dx> + 2 sb <s, dy> + 2 <s,x> dsa + 2 <s,y> dsb.
template <typename scalar_t>
double dist_bwd_kernel(const scalar_t* gp, const RowView& xv, const RowView& yv, Tensor& gx,
                       Tensor& gy, int64_t n, int64_t d, double cv) {
  using acc_t = compute_t<scalar_t>;
  using D4 = hyp::Dual<acc_t, 4>;
  using D2 = hyp::Dual<acc_t, 2>;
  const scalar_t* xp = xv.t.const_data_ptr<scalar_t>();
  const scalar_t* yp = yv.t.const_data_ptr<scalar_t>();
  scalar_t* gxp = gx.mutable_data_ptr<scalar_t>();
  scalar_t* gyp = gy.mutable_data_ptr<scalar_t>();
  const acc_t cc = static_cast<acc_t>(cv);
  return sum_rows(n, d, [&](int64_t i) {
    const scalar_t* xr = xp + i * xv.row_stride;
    const scalar_t* yr = yp + i * yv.row_stride;
    acc_t x2 = 0, y2 = 0, xy = 0;
#pragma omp simd reduction(+ : x2, y2, xy)
    for (int64_t j = 0; j < d; ++j) {
      const acc_t a = xr[j], b = yr[j];
      x2 += a * a;
      y2 += b * b;
      xy += a * b;
    }
    D4 sa, sb;
    hyp::dist_sub(D4::var(x2, 0), D4::var(y2, 1), D4::var(xy, 2), D4::var(cc, 3), sa, sb);
    acc_t s2 = 0, sx = 0, sy = 0;
#pragma omp simd reduction(+ : s2, sx, sy)
    for (int64_t j = 0; j < d; ++j) {
      const acc_t a = xr[j], b = yr[j];
      const acc_t s = sa.v * a + sb.v * b;
      s2 += s * s;
      sx += s * a;
      sy += s * b;
    }
    const D2 dist = hyp::dist_from_sq(D2::var(s2, 0), D2::var(cc, 1));
    const acc_t g = acc_t(gp[i]);
    const acc_t gs2 = g * dist.d[0];  // dL/d|s|^2
    acc_t L[4];                        // dL/d(x2, y2, xy, c) through (sa, sb)
#pragma unroll
    for (int k = 0; k < 4; ++k) L[k] = acc_t(2) * gs2 * (sx * sa.d[k] + sy * sb.d[k]);
    // grad_x = 2 gs2 sa s + 2 L_x2 x + L_xy y, s = sa x + sb y ; grad_y likewise.
    const acc_t ks = acc_t(2) * gs2;
    const acc_t gx_x = ks * sa.v * sa.v + acc_t(2) * L[0], gx_y = ks * sa.v * sb.v + L[2];
    const acc_t gy_x = ks * sb.v * sa.v + L[2], gy_y = ks * sb.v * sb.v + acc_t(2) * L[1];
    scalar_t* oxr = gxp + i * d;
    scalar_t* oyr = gyp + i * d;
#pragma omp simd
    for (int64_t j = 0; j < d; ++j) {
      const acc_t a = xr[j], b = yr[j];
      oxr[j] = static_cast<scalar_t>(gx_x * a + gx_y * b);
      oyr[j] = static_cast<scalar_t>(gy_x * a + gy_y * b);
    }
    return static_cast<double>(L[3] + g * dist.d[1]);
  });
}

template <typename scalar_t>
void dist0_fwd_kernel(const RowView& xv, Tensor& out, int64_t n, int64_t d, double cv) {
  using acc_t = compute_t<scalar_t>;
  const scalar_t* xp = xv.t.const_data_ptr<scalar_t>();
  scalar_t* op = out.mutable_data_ptr<scalar_t>();
  const acc_t cc = static_cast<acc_t>(cv);
  at::parallel_for(0, n, grain_rows(d), [&](int64_t begin, int64_t end) {
    for (int64_t i = begin; i < end; ++i) {
      const scalar_t* xr = xp + i * xv.row_stride;
      acc_t x2 = 0;
#pragma omp simd reduction(+ : x2)
      for (int64_t j = 0; j < d; ++j) x2 += acc_t(xr[j]) * acc_t(xr[j]);
      op[i] = static_cast<scalar_t>(hyp::dist0(x2, cc));
    }
  });
}

template <typename scalar_t>
double dist0_bwd_kernel(const scalar_t* gp, const RowView& xv, Tensor& gx, int64_t n, int64_t d,
                        double cv) {
  using acc_t = compute_t<scalar_t>;
  using D2 = hyp::Dual<acc_t, 2>;
  const scalar_t* xp = xv.t.const_data_ptr<scalar_t>();
  scalar_t* gxp = gx.mutable_data_ptr<scalar_t>();
  const acc_t cc = static_cast<acc_t>(cv);
  return sum_rows(n, d, [&](int64_t i) {
    const scalar_t* xr = xp + i * xv.row_stride;
    acc_t x2 = 0;
#pragma omp simd reduction(+ : x2)
    for (int64_t j = 0; j < d; ++j) x2 += acc_t(xr[j]) * acc_t(xr[j]);
    const D2 f = hyp::dist0(D2::var(x2, 0), D2::var(cc, 1));
    const acc_t g = acc_t(gp[i]), k = acc_t(2) * g * f.d[0];
    scalar_t* oxr = gxp + i * d;
#pragma omp simd
    for (int64_t j = 0; j < d; ++j) oxr[j] = static_cast<scalar_t>(k * acc_t(xr[j]));
    return static_cast<double>(g * f.d[1]);
  });
}

// ---- pairwise_dist: (N, D) x (M, D) -> (N, M) from |x_i|^2, |y_j|^2 and the GEMM x y^T ---------

template <typename T>
T pair_dist(T x2, T y2, T xy, T c) {
  T sa, sb;
  hyp::dist_sub(x2, y2, xy, c, sa, sb);
  return hyp::dist_from_sq(hyp::combo_sq(sa, sb, x2, y2, xy), c);
}

void check_matrix_pair(const Tensor& x, const Tensor& y) {
  check_pair(x, y, "x", "y");
  TORCH_CHECK(x.dim() == 2 && y.dim() == 2 && x.size(1) == y.size(1),
              "x and y must be (N, D) and (M, D) (got x: ", x.sizes(), ", y: ", y.sizes(), ")");
}

// Row squared norms and the Gram matrix in the compute type (compute_t).
std::tuple<Tensor, Tensor, Tensor> gram(const Tensor& x, const Tensor& y) {
  const auto acc = row_compute_type(x.scalar_type());
  const Tensor xa = x.to(acc), ya = y.to(acc);
  return {xa.square().sum(-1), ya.square().sum(-1), at::matmul(xa, ya.t())};
}

}  // namespace

// ---- the ops ----------------------------------------------------------------------------------

Tensor mobius_add_cpu(const Tensor& x, const Tensor& y, const Tensor& c, bool project) {
  return binary_fwd<hyp::MobiusAdd>(x, y, c, project, "x", "y");
}
std::tuple<Tensor, Tensor, Tensor> mobius_add_backward_cpu(const Tensor& grad, const Tensor& x,
                                                           const Tensor& y, const Tensor& c,
                                                           bool project, bool needs_grad_c) {
  return binary_bwd<hyp::MobiusAdd>(grad, x, y, c, project, needs_grad_c, "x", "y");
}

Tensor expmap_cpu(const Tensor& x, const Tensor& u, const Tensor& c, bool project) {
  return binary_fwd<hyp::Expmap>(x, u, c, project, "x", "u");
}
std::tuple<Tensor, Tensor, Tensor> expmap_backward_cpu(const Tensor& grad, const Tensor& x,
                                                       const Tensor& u, const Tensor& c,
                                                       bool project, bool needs_grad_c) {
  return binary_bwd<hyp::Expmap>(grad, x, u, c, project, needs_grad_c, "x", "u");
}

Tensor logmap_cpu(const Tensor& x, const Tensor& y, const Tensor& c) {
  return binary_fwd<hyp::Logmap>(x, y, c, false, "x", "y");
}
std::tuple<Tensor, Tensor, Tensor> logmap_backward_cpu(const Tensor& grad, const Tensor& x,
                                                       const Tensor& y, const Tensor& c,
                                                       bool needs_grad_c) {
  return binary_bwd<hyp::Logmap>(grad, x, y, c, false, needs_grad_c, "x", "y");
}

Tensor project_cpu(const Tensor& x, const Tensor& c) {
  return unary_fwd<hyp::Project>(x, c, nullptr, true, "x");
}
std::tuple<Tensor, Tensor> project_backward_cpu(const Tensor& grad, const Tensor& x,
                                                const Tensor& c, bool needs_grad_c) {
  auto [gx, gr, gc] = unary_bwd<hyp::Project>(grad, x, c, nullptr, true, needs_grad_c, "x");
  return {gx, gc};
}

Tensor expmap0_cpu(const Tensor& u, const Tensor& c, bool project) {
  return unary_fwd<hyp::Expmap0>(u, c, nullptr, project, "u");
}
std::tuple<Tensor, Tensor> expmap0_backward_cpu(const Tensor& grad, const Tensor& u,
                                                const Tensor& c, bool project,
                                                bool needs_grad_c) {
  auto [gu, gr, gc] = unary_bwd<hyp::Expmap0>(grad, u, c, nullptr, project, needs_grad_c, "u");
  return {gu, gc};
}

Tensor logmap0_cpu(const Tensor& y, const Tensor& c) {
  return unary_fwd<hyp::Logmap0>(y, c, nullptr, false, "y");
}
std::tuple<Tensor, Tensor> logmap0_backward_cpu(const Tensor& grad, const Tensor& y,
                                                const Tensor& c, bool needs_grad_c) {
  auto [gy, gr, gc] = unary_bwd<hyp::Logmap0>(grad, y, c, nullptr, false, needs_grad_c, "y");
  return {gy, gc};
}

Tensor mobius_scalar_mul_cpu(const Tensor& r, const Tensor& x, const Tensor& c, bool project) {
  return unary_fwd<hyp::ScalarMul>(x, c, &r, project, "x");
}
std::tuple<Tensor, Tensor, Tensor> mobius_scalar_mul_backward_cpu(const Tensor& grad,
                                                                  const Tensor& r,
                                                                  const Tensor& x,
                                                                  const Tensor& c, bool project,
                                                                  bool needs_grad_c) {
  auto [gx, gr, gc] = unary_bwd<hyp::ScalarMul>(grad, x, c, &r, project, needs_grad_c, "x");
  return {gr, gx, gc};
}

Tensor dist_cpu(const Tensor& x, const Tensor& y, const Tensor& c) {
  check_pair(x, y, "x", "y");
  const double cv = curvature(c);
  const auto shape = broadcast_shape(x, y);
  Tensor out = empty_like_shape(x, rows_shape(shape));
  const int64_t d = shape.back();
  if (out.numel() == 0) return out;
  if (d == 0) return out.zero_();
  const RowView xv = row_view(x, shape), yv = row_view(y, shape);
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, x.scalar_type(), "dist_cpu", [&] {
    dist_fwd_kernel<scalar_t>(xv, yv, out, out.numel(), d, cv);
  });
  return out;
}

std::tuple<Tensor, Tensor, Tensor> dist_backward_cpu(const Tensor& grad, const Tensor& x,
                                                     const Tensor& y, const Tensor& c,
                                                     bool needs_grad_c) {
  check_pair(x, y, "x", "y");
  const double cv = curvature(c);
  const auto shape = broadcast_shape(x, y);
  check_grad(grad, x, rows_shape(shape));
  Tensor gx = empty_like_shape(x, shape), gy = empty_like_shape(x, shape);
  Tensor gc = at::zeros({}, c.options());
  const int64_t d = shape.back();
  if (gx.numel() == 0) return {gx, gy, gc};
  const RowView xv = row_view(x, shape), yv = row_view(y, shape);
  const Tensor g = grad.contiguous();
  double total = 0;
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, x.scalar_type(), "dist_bwd", [&] {
    total = dist_bwd_kernel<scalar_t>(g.const_data_ptr<scalar_t>(), xv, yv, gx, gy, g.numel(), d,
                                      cv);
  });
  if (needs_grad_c) gc.fill_(total);
  return {gx, gy, gc};
}

Tensor dist0_cpu(const Tensor& x, const Tensor& c) {
  check_vec(x, "x");
  const double cv = curvature(c);
  Tensor out = empty_like_shape(x, rows_shape(x.sizes().vec()));
  const int64_t d = x.size(-1);
  if (out.numel() == 0) return out;
  if (d == 0) return out.zero_();
  const RowView xv = row_view(x, x.sizes());
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, x.scalar_type(), "dist0_cpu", [&] {
    dist0_fwd_kernel<scalar_t>(xv, out, out.numel(), d, cv);
  });
  return out;
}

std::tuple<Tensor, Tensor> dist0_backward_cpu(const Tensor& grad, const Tensor& x,
                                              const Tensor& c, bool needs_grad_c) {
  check_vec(x, "x");
  const double cv = curvature(c);
  check_grad(grad, x, rows_shape(x.sizes().vec()));
  Tensor gx = empty_like_shape(x, x.sizes());
  Tensor gc = at::zeros({}, c.options());
  if (gx.numel() == 0) return {gx, gc};
  const RowView xv = row_view(x, x.sizes());
  const Tensor g = grad.contiguous();
  double total = 0;
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, x.scalar_type(), "dist0_bwd", [&] {
    total = dist0_bwd_kernel<scalar_t>(g.const_data_ptr<scalar_t>(), xv, gx, g.numel(),
                                       x.size(-1), cv);
  });
  if (needs_grad_c) gc.fill_(total);
  return {gx, gc};
}

Tensor pairwise_dist_cpu(const Tensor& x, const Tensor& y, const Tensor& c) {
  check_matrix_pair(x, y);
  const double cv = curvature(c);
  Tensor out = at::empty({x.size(0), y.size(0)}, x.options());
  if (out.numel() == 0) return out;
  auto [x2, y2, xy] = gram(x, y);
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, x.scalar_type(), "pairwise_dist", [&] {
    using acc_t = compute_t<scalar_t>;
    const acc_t* x2p = x2.const_data_ptr<acc_t>();
    const acc_t* y2p = y2.const_data_ptr<acc_t>();
    const acc_t* xyp = xy.const_data_ptr<acc_t>();
    scalar_t* op = out.mutable_data_ptr<scalar_t>();
    const int64_t m = y.size(0);
    const acc_t cc = static_cast<acc_t>(cv);
    at::parallel_for(0, x.size(0), grain_rows(m), [&](int64_t b, int64_t e) {
      for (int64_t i = b; i < e; ++i) {
        for (int64_t j = 0; j < m; ++j) {
          op[i * m + j] = static_cast<scalar_t>(pair_dist(x2p[i], y2p[j], xyp[i * m + j], cc));
        }
      }
    });
  });
  return out;
}

std::tuple<Tensor, Tensor, Tensor> pairwise_dist_backward_cpu(const Tensor& grad, const Tensor& x,
                                                              const Tensor& y, const Tensor& c,
                                                              bool needs_grad_c) {
  check_matrix_pair(x, y);
  const double cv = curvature(c);
  const int64_t n = x.size(0), m = y.size(0);
  check_grad(grad, x, {n, m});
  Tensor gc = at::zeros({}, c.options());
  if (n == 0 || m == 0 || x.size(1) == 0) return {at::zeros_like(x), at::zeros_like(y), gc};
  auto [x2, y2, xy] = gram(x, y);
  const auto acc = x2.scalar_type();
  // dL/d(xy) per pair, and dL/d|x_i|^2, dL/d|y_j|^2, dL/dc summed over the pairs.
  Tensor gxy = at::empty({n, m}, x2.options());
  Tensor gx2 = at::empty({n}, x2.options()), gy2_rows = at::empty({n, m}, x2.options());
  const Tensor g = grad.to(acc).contiguous();
  double total = 0;
  AT_DISPATCH_FLOATING_TYPES(acc, "pairwise_dist_bwd", [&] {
    using T = scalar_t;
    using D = hyp::Dual<T, 4>;
    const T *x2p = x2.const_data_ptr<T>(), *y2p = y2.const_data_ptr<T>();
    const T *xyp = xy.const_data_ptr<T>(), *gp = g.const_data_ptr<T>();
    T *gxyp = gxy.mutable_data_ptr<T>(), *gx2p = gx2.mutable_data_ptr<T>();
    T* gy2p = gy2_rows.mutable_data_ptr<T>();
    const T cc = static_cast<T>(cv);
    total = sum_rows(n, m, [&](int64_t i) {
      T sx2 = 0, sc = 0;
      for (int64_t j = 0; j < m; ++j) {
        const int64_t k = i * m + j;
        const D f = pair_dist(D::var(x2p[i], 0), D::var(y2p[j], 1), D::var(xyp[k], 2),
                              D::var(cc, 3));
        sx2 += gp[k] * f.d[0];
        gy2p[k] = gp[k] * f.d[1];
        gxyp[k] = gp[k] * f.d[2];
        sc += gp[k] * f.d[3];
      }
      gx2p[i] = sx2;
      return static_cast<double>(sc);
    });
  });
  const Tensor xa = x.to(acc), ya = y.to(acc);
  Tensor gx = at::matmul(gxy, ya).add_(xa * (2 * gx2).unsqueeze(1));
  Tensor gy = at::matmul(gxy.t(), xa).add_(ya * (2 * gy2_rows.sum(0)).unsqueeze(1));
  if (needs_grad_c) gc.fill_(total);
  return {gx.to(x.scalar_type()), gy.to(x.scalar_type()), gc};
}

// mobius_matvec: mx = x m^T by ATen's GEMM (in the compute type), then the row op on (x, mx).
Tensor mobius_matvec_cpu(const Tensor& m, const Tensor& x, const Tensor& c, bool project) {
  check_pair(x, m, "x", "m");
  TORCH_CHECK(m.dim() == 2 && m.size(1) == x.size(-1), "m must be (out, in) with in == x.shape[-1]",
              " (got m: ", m.sizes(), ", x: ", x.sizes(), ")");
  const double cv = curvature(c);
  const auto acc = row_compute_type(x.scalar_type());
  auto shape = x.sizes().vec();
  shape.back() = m.size(0);
  const int64_t din = x.size(-1), dout = m.size(0);
  const int64_t rows = c10::multiply_integers(x.sizes().begin(), x.sizes().end() - 1);
  const Tensor x2d = x.reshape({rows, din}).to(acc).contiguous();
  const Tensor mx = at::matmul(x2d, m.to(acc).t()).contiguous();
  Tensor out = at::empty(shape, x.options());
  if (out.numel() == 0) return out;
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, x.scalar_type(), "mobius_matvec", [&] {
    using acc_t = compute_t<scalar_t>;
    const acc_t *xp = x2d.const_data_ptr<acc_t>(), *mp = mx.const_data_ptr<acc_t>();
    scalar_t* op = out.mutable_data_ptr<scalar_t>();
    const acc_t cc = static_cast<acc_t>(cv), eps = acc_t(ball_eps<scalar_t>());
    at::parallel_for(0, x2d.size(0), grain_rows(din + dout), [&](int64_t b, int64_t e) {
      for (int64_t i = b; i < e; ++i) {
        const acc_t* xr = xp + i * din;
        const acc_t* mr = mp + i * dout;
        acc_t x2 = 0, m2 = 0;
        bool zero = true;
        for (int64_t j = 0; j < din; ++j) x2 += xr[j] * xr[j];
        for (int64_t j = 0; j < dout; ++j) {
          m2 += mr[j] * mr[j];
          zero = zero && mr[j] == acc_t(0);
        }
        const acc_t f = zero ? acc_t(0) : hyp::Matvec::coef(x2, m2, cc, eps, project);
        for (int64_t j = 0; j < dout; ++j) op[i * dout + j] = static_cast<scalar_t>(f * mr[j]);
      }
    });
  });
  return out;
}

std::tuple<Tensor, Tensor, Tensor> mobius_matvec_backward_cpu(const Tensor& grad, const Tensor& m,
                                                              const Tensor& x, const Tensor& c,
                                                              bool project, bool needs_grad_c) {
  check_pair(x, m, "x", "m");
  const double cv = curvature(c);
  const auto acc = row_compute_type(x.scalar_type());
  TORCH_CHECK(m.dim() == 2 && m.size(1) == x.size(-1), "m must be (out, in) with in == x.shape[-1]");
  const int64_t din = x.size(-1), dout = m.size(0);
  const int64_t n = c10::multiply_integers(x.sizes().begin(), x.sizes().end() - 1);
  auto out_shape = x.sizes().vec();
  out_shape.back() = dout;
  check_grad(grad, x, out_shape);
  const Tensor x2d = x.reshape({n, din}).to(acc).contiguous();
  const Tensor ma = m.to(acc);
  const Tensor mx = at::matmul(x2d, ma.t()).contiguous();
  const Tensor g = grad.reshape({n, dout}).to(acc).contiguous();
  // grad_mx = f g + 2 L_m2 mx ; grad_x (direct) = 2 L_x2 x ; then grad_x += grad_mx m.
  Tensor gmx = at::empty({n, dout}, mx.options()), gxd = at::empty({n, din}, mx.options());
  double total = 0;
  if (n > 0) {
    AT_DISPATCH_FLOATING_TYPES(acc, "mobius_matvec_bwd", [&] {
      using T = scalar_t;
      using D = hyp::Dual<T, 3>;
      const T *xp = x2d.const_data_ptr<T>(), *mp = mx.const_data_ptr<T>();
      const T* gp = g.const_data_ptr<T>();
      T *gmp = gmx.mutable_data_ptr<T>(), *gxp = gxd.mutable_data_ptr<T>();
      const T cc = static_cast<T>(cv);
      const T eps = x.scalar_type() == at::kDouble ? T(ball_eps<double>()) : T(ball_eps<float>());
      total = sum_rows(n, din + dout, [&](int64_t i) {
        const T *xr = xp + i * din, *mr = mp + i * dout, *gr = gp + i * dout;
        T x2 = 0, m2 = 0, gm = 0;
        bool zero = true;
        for (int64_t j = 0; j < din; ++j) x2 += xr[j] * xr[j];
        for (int64_t j = 0; j < dout; ++j) {
          m2 += mr[j] * mr[j];
          gm += gr[j] * mr[j];
          zero = zero && mr[j] == T(0);
        }
        T* gmr = gmp + i * dout;
        T* gxr = gxp + i * din;
        if (zero) {  // geoopt's torch.where(all(mx == 0), 0, ...): no gradient flows
          for (int64_t j = 0; j < dout; ++j) gmr[j] = T(0);
          for (int64_t j = 0; j < din; ++j) gxr[j] = T(0);
          return 0.0;
        }
        const D f = hyp::Matvec::coef(D::var(x2, 0), D::var(m2, 1), D::var(cc, 2), eps, project);
        const T k_m = T(2) * gm * f.d[1], k_x = T(2) * gm * f.d[0];
        for (int64_t j = 0; j < dout; ++j) gmr[j] = f.v * gr[j] + k_m * mr[j];
        for (int64_t j = 0; j < din; ++j) gxr[j] = k_x * xr[j];
        return static_cast<double>(gm * f.d[2]);
      });
    });
  }
  Tensor gx = gxd.add_(at::matmul(gmx, ma)).to(x.scalar_type()).reshape(x.sizes());
  Tensor gm = at::matmul(gmx.t(), x2d).to(m.scalar_type());
  Tensor gc = at::zeros({}, c.options());
  if (needs_grad_c) gc.fill_(total);
  return {gm, gx, gc};
}

TORCH_LIBRARY_IMPL(lfi_fast, CPU, m) {
  m.impl("mobius_add", &mobius_add_cpu);
  m.impl("mobius_add_backward", &mobius_add_backward_cpu);
  m.impl("expmap", &expmap_cpu);
  m.impl("expmap_backward", &expmap_backward_cpu);
  m.impl("logmap", &logmap_cpu);
  m.impl("logmap_backward", &logmap_backward_cpu);
  m.impl("project", &project_cpu);
  m.impl("project_backward", &project_backward_cpu);
  m.impl("expmap0", &expmap0_cpu);
  m.impl("expmap0_backward", &expmap0_backward_cpu);
  m.impl("logmap0", &logmap0_cpu);
  m.impl("logmap0_backward", &logmap0_backward_cpu);
  m.impl("mobius_scalar_mul", &mobius_scalar_mul_cpu);
  m.impl("mobius_scalar_mul_backward", &mobius_scalar_mul_backward_cpu);
  m.impl("dist", &dist_cpu);
  m.impl("dist_backward", &dist_backward_cpu);
  m.impl("dist0", &dist0_cpu);
  m.impl("dist0_backward", &dist0_backward_cpu);
  m.impl("pairwise_dist", &pairwise_dist_cpu);
  m.impl("pairwise_dist_backward", &pairwise_dist_backward_cpu);
  m.impl("mobius_matvec", &mobius_matvec_cpu);
  m.impl("mobius_matvec_backward", &mobius_matvec_backward_cpu);
}

}  // namespace lfi_fast
