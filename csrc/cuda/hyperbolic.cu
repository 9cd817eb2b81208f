// CUDA kernels of the hyperbolic family. Each op is one memory-bound pass over (rows, D): a group
// of G threads owns a row, loads it in 16-byte packs where alignment allows, reduces the row's dot
// products with warp shuffles and writes the result from the registers it loaded the row into.
// Half types compute in float32.
#include "../hyperbolic_math.h"
#include "../ops.h"

#include <ATen/ATen.h>
#include <ATen/Dispatch.h>
#include <ATen/OpMathType.h>
#include <ATen/cuda/CUDAContext.h>
#include <c10/cuda/CUDAGuard.h>
#include <torch/library.h>

#include <cstdint>

namespace lfi_fast {
namespace {

constexpr int kBlock = 256;
// Packs per thread and tensor kept in registers for rows longer than one pack per thread: rows of
// up to 4 * 32 packs (512 floats) are read once; longer ones are read again for the write.
constexpr int kChunks = 4;

// Packs move as one unsigned word through __ldg/__stwb: nvcc splits plain copies of an array (or
// of a uint4) into element accesses for all but the first pack of a tile.
template <int BYTES>
struct Word;
template <>
struct Word<16> {
  using type = uint4;
};
template <>
struct Word<8> {
  using type = uint2;
};
template <>
struct Word<4> {
  using type = uint32_t;
};
template <>
struct Word<2> {
  using type = uint16_t;
};

template <typename T, int N>
using PackWord = typename Word<sizeof(T) * N>::type;

template <typename T, int N>
union Pack {
  T v[N];
  PackWord<T, N> w;
};

// The packs one thread owns in a tile of its row: CHUNKS packs, one group's width apart.
template <typename scalar_t, int VEC, int CHUNKS>
struct Tile {
  using acc_t = at::opmath_type<scalar_t>;
  Pack<scalar_t, VEC> p[CHUNKS];

  // Packs past the row's end read as zeros, so that they add nothing to the dot products.
  __device__ __forceinline__ void load(const scalar_t* __restrict__ row, int64_t col, int64_t step,
                                       int64_t d) {
#pragma unroll
    for (int k = 0; k < CHUNKS; ++k, col += step) {
      if (col < d) {
        p[k].w = __ldg(reinterpret_cast<const PackWord<scalar_t, VEC>*>(row + col));
      } else {
#pragma unroll
        for (int i = 0; i < VEC; ++i) p[k].v[i] = scalar_t(0);
      }
    }
  }
  __device__ __forceinline__ void store(scalar_t* __restrict__ row, int64_t col, int64_t step,
                                        int64_t d) const {
#pragma unroll
    for (int k = 0; k < CHUNKS; ++k, col += step) {
      if (col < d) __stwb(reinterpret_cast<PackWord<scalar_t, VEC>*>(row + col), p[k].w);
    }
  }
  __device__ __forceinline__ acc_t operator()(int k, int i) const {
    return static_cast<acc_t>(p[k].v[i]);
  }
};

// c as the kernel sees it: read from device memory when c lives on the GPU, so that the host never
// waits for the stream; otherwise the value the host read.
template <typename T>
struct Curvature {
  const T* ptr;
  T value;
  __device__ __forceinline__ T get() const { return ptr != nullptr ? *ptr : value; }
};

// Where a thread sits: its row, its first column and the shuffle mask of its group (G lanes of one
// warp; a group always exits together, so the other lanes of the warp need not take part).
struct Lane {
  int64_t row, col;
  unsigned mask;
};

__device__ __forceinline__ Lane lane_of(int group, int vec) {
  const int lane = threadIdx.x & (group - 1);
  const int first = (threadIdx.x & 31) & ~(group - 1);
  const unsigned bits = group == 32 ? ~0u : (1u << group) - 1;
  return {static_cast<int64_t>(blockIdx.x) * (kBlock / group) + threadIdx.x / group,
          static_cast<int64_t>(lane) * vec, bits << first};
}

template <typename T, int N>
__device__ __forceinline__ void group_sum(T (&v)[N], int group, unsigned mask) {
  for (int o = group / 2; o > 0; o /= 2) {
#pragma unroll
    for (int i = 0; i < N; ++i) v[i] += __shfl_xor_sync(mask, v[i], o, group);
  }
}

template <typename scalar_t, int VEC, int CHUNKS>
__global__ void __launch_bounds__(kBlock)
    mobius_add_fwd_kernel(const scalar_t* __restrict__ x, int64_t sx,
                          const scalar_t* __restrict__ y, int64_t sy, scalar_t* __restrict__ out,
                          int64_t rows, int64_t d, int group,
                          Curvature<at::opmath_type<scalar_t>> c, bool project) {
  using acc_t = at::opmath_type<scalar_t>;
  constexpr acc_t eps = acc_t(ball_eps<scalar_t>());
  const Lane L = lane_of(group, VEC);
  if (L.row >= rows) return;
  const acc_t cv = c.get();
  x += L.row * sx;
  y += L.row * sy;
  out += L.row * d;
  const int64_t step = static_cast<int64_t>(group) * VEC, tile = step * CHUNKS;

  Tile<scalar_t, VEC, CHUNKS> xt, yt;
  acc_t s[3] = {acc_t(0), acc_t(0), acc_t(0)};  // x2, y2, xy
  // Tile loops stay rolled: rows are one tile but for the longest, and unrolling a loop of unknown
  // trip count costs a 64-bit division per thread.
#pragma unroll 1
  for (int64_t base = 0; base < d; base += tile) {
    xt.load(x, base + L.col, step, d);
    yt.load(y, base + L.col, step, d);
#pragma unroll
    for (int k = 0; k < CHUNKS; ++k) {
#pragma unroll
      for (int i = 0; i < VEC; ++i) {
        const acc_t a = xt(k, i), b = yt(k, i);
        s[0] += a * a;
        s[1] += b * b;
        s[2] += a * b;
      }
    }
  }
  group_sum(s, group, L.mask);
  const auto f =
      hyp::mobius_add_fwd<acc_t>(s[0], s[1], s[2], cv, hyp::max_norm<acc_t>(cv, eps), project);

  Tile<scalar_t, VEC, CHUNKS> ot;
#pragma unroll 1
  for (int64_t base = 0; base < d; base += tile) {
    if (d > tile) {  // a row longer than one tile was not kept in registers
      xt.load(x, base + L.col, step, d);
      yt.load(y, base + L.col, step, d);
    }
#pragma unroll
    for (int k = 0; k < CHUNKS; ++k) {
#pragma unroll
      for (int i = 0; i < VEC; ++i) {
        ot.p[k].v[i] = static_cast<scalar_t>(f.alpha * xt(k, i) + f.beta * yt(k, i));
      }
    }
    ot.store(out, base + L.col, step, d);
  }
}

// gc_rows: one entry per row (its contribution to the gradient of c), or null when not needed.
template <typename scalar_t, int VEC, int CHUNKS>
__global__ void __launch_bounds__(kBlock)
    mobius_add_bwd_kernel(const scalar_t* __restrict__ g, int64_t sg,
                          const scalar_t* __restrict__ x, int64_t sx,
                          const scalar_t* __restrict__ y, int64_t sy,
                          scalar_t* __restrict__ gx, scalar_t* __restrict__ gy,
                          at::opmath_type<scalar_t>* __restrict__ gc_rows, int64_t rows, int64_t d,
                          int group, Curvature<at::opmath_type<scalar_t>> c, bool project) {
  using acc_t = at::opmath_type<scalar_t>;
  constexpr acc_t eps = acc_t(ball_eps<scalar_t>());
  const Lane L = lane_of(group, VEC);
  if (L.row >= rows) return;
  const acc_t cv = c.get();
  g += L.row * sg;
  x += L.row * sx;
  y += L.row * sy;
  gx += L.row * d;
  gy += L.row * d;
  const int64_t step = static_cast<int64_t>(group) * VEC, tile = step * CHUNKS;

  Tile<scalar_t, VEC, CHUNKS> gt, xt, yt;
  acc_t s[5] = {acc_t(0), acc_t(0), acc_t(0), acc_t(0), acc_t(0)};  // x2, y2, xy, <g,x>, <g,y>
#pragma unroll 1
  for (int64_t base = 0; base < d; base += tile) {
    gt.load(g, base + L.col, step, d);
    xt.load(x, base + L.col, step, d);
    yt.load(y, base + L.col, step, d);
#pragma unroll
    for (int k = 0; k < CHUNKS; ++k) {
#pragma unroll
      for (int i = 0; i < VEC; ++i) {
        const acc_t a = xt(k, i), b = yt(k, i), e = gt(k, i);
        s[0] += a * a;
        s[1] += b * b;
        s[2] += a * b;
        s[3] += e * a;
        s[4] += e * b;
      }
    }
  }
  group_sum(s, group, L.mask);
  const auto w = hyp::mobius_add_bwd<acc_t>(s[0], s[1], s[2], s[3], s[4], cv,
                                            hyp::max_norm<acc_t>(cv, eps), project);
  if (gc_rows != nullptr && L.col == 0) gc_rows[L.row] = w.gc;

  Tile<scalar_t, VEC, CHUNKS> ot;
#pragma unroll 1
  for (int64_t base = 0; base < d; base += tile) {
    if (d > tile) {  // a row longer than one tile was not kept in registers
      gt.load(g, base + L.col, step, d);
      xt.load(x, base + L.col, step, d);
      yt.load(y, base + L.col, step, d);
    }
#pragma unroll
    for (int k = 0; k < CHUNKS; ++k) {
#pragma unroll
      for (int i = 0; i < VEC; ++i) {
        ot.p[k].v[i] = static_cast<scalar_t>(w.gx_g * gt(k, i) + w.gx_x * xt(k, i) +
                                             w.gx_y * yt(k, i));
      }
    }
    ot.store(gx, base + L.col, step, d);
#pragma unroll
    for (int k = 0; k < CHUNKS; ++k) {
#pragma unroll
      for (int i = 0; i < VEC; ++i) {
        ot.p[k].v[i] = static_cast<scalar_t>(w.gy_g * gt(k, i) + w.gy_x * xt(k, i) +
                                             w.gy_y * yt(k, i));
      }
    }
    ot.store(gy, base + L.col, step, d);
  }
}

// ---- host side ---------------------------------------------------------------------------------

void check_inputs(const at::Tensor& x, const at::Tensor& y, const at::Tensor& c) {
  LFI_CHECK_FLOATING(x);
  LFI_CHECK_SAME_DTYPE(x, y);
  TORCH_CHECK(x.is_cuda(), "x must be a CUDA tensor (got ", x.device(), ")");
  LFI_CHECK_DEVICE(y, x.device());
  LFI_CHECK_SCALAR(c);
  TORCH_CHECK(c.is_cpu() || c.device() == x.device(), "c must be on the CPU or on ", x.device(),
              " (got ", c.device(), ")");
}

// c for a launch: on the GPU, a copy in the compute dtype that the kernel reads (converted on the
// stream, never read back); on the CPU, its value.
struct CurvatureArg {
  at::Tensor dev;
  double value = 0;

  template <typename acc_t>
  Curvature<acc_t> get() const {
    return {dev.defined() ? dev.const_data_ptr<acc_t>() : nullptr, static_cast<acc_t>(value)};
  }
};

CurvatureArg curvature(const at::Tensor& c, at::ScalarType x_dtype) {
  if (c.is_cpu()) return {at::Tensor(), c.item<double>()};
  return {c.to(at::toOpMathType(x_dtype)), 0.0};
}

// 16-byte packs need every row to start on 16 bytes: aligned base pointers and row strides (and
// D) that are multiples of the pack.
bool packable(const void* p, int64_t row_stride, int vec) {
  return reinterpret_cast<std::uintptr_t>(p) % 16 == 0 && row_stride % vec == 0;
}

// G: the smallest power of two that gives each thread at most one pack, capped at a warp; rows
// longer than a warp's packs take kChunks packs per thread.
struct Grid {
  int group;
  bool one_chunk;
  unsigned blocks;
};

Grid grid_for(int64_t rows, int64_t d, int vec) {
  const int64_t packs = (d + vec - 1) / vec;
  int group = 1;
  while (group < 32 && group < packs) group *= 2;
  const int64_t rows_per_block = kBlock / group;
  return {group, packs <= group,
          static_cast<unsigned>((rows + rows_per_block - 1) / rows_per_block)};
}

template <typename scalar_t>
void mobius_add_launch(const RowView& xv, const RowView& yv, at::Tensor& out, int64_t rows,
                       int64_t d, const CurvatureArg& c, bool project) {
  using acc_t = at::opmath_type<scalar_t>;
  constexpr int kVec = 16 / sizeof(scalar_t);
  const scalar_t* xp = xv.t.const_data_ptr<scalar_t>();
  const scalar_t* yp = yv.t.const_data_ptr<scalar_t>();
  scalar_t* op = out.mutable_data_ptr<scalar_t>();
  const bool vec = d % kVec == 0 && packable(xp, xv.row_stride, kVec) &&
                   packable(yp, yv.row_stride, kVec) && packable(op, d, kVec);
  const Grid grid = grid_for(rows, d, vec ? kVec : 1);
  const auto kernel =
      vec ? (grid.one_chunk ? mobius_add_fwd_kernel<scalar_t, kVec, 1>
                            : mobius_add_fwd_kernel<scalar_t, kVec, kChunks>)
          : (grid.one_chunk ? mobius_add_fwd_kernel<scalar_t, 1, 1>
                            : mobius_add_fwd_kernel<scalar_t, 1, kChunks>);
  kernel<<<grid.blocks, kBlock, 0, at::cuda::getCurrentCUDAStream()>>>(
      xp, xv.row_stride, yp, yv.row_stride, op, rows, d, grid.group, c.get<acc_t>(), project);
  C10_CUDA_KERNEL_LAUNCH_CHECK();
}

template <typename scalar_t>
void mobius_add_backward_launch(const RowView& gv, const RowView& xv, const RowView& yv,
                                at::Tensor& gx, at::Tensor& gy, at::Tensor& gc_rows, int64_t rows,
                                int64_t d, const CurvatureArg& c, bool project) {
  using acc_t = at::opmath_type<scalar_t>;
  constexpr int kVec = 16 / sizeof(scalar_t);
  const scalar_t* gp = gv.t.const_data_ptr<scalar_t>();
  const scalar_t* xp = xv.t.const_data_ptr<scalar_t>();
  const scalar_t* yp = yv.t.const_data_ptr<scalar_t>();
  scalar_t* gxp = gx.mutable_data_ptr<scalar_t>();
  scalar_t* gyp = gy.mutable_data_ptr<scalar_t>();
  const bool vec = d % kVec == 0 && packable(gp, gv.row_stride, kVec) &&
                   packable(xp, xv.row_stride, kVec) && packable(yp, yv.row_stride, kVec) &&
                   packable(gxp, d, kVec) && packable(gyp, d, kVec);
  const Grid grid = grid_for(rows, d, vec ? kVec : 1);
  const auto kernel =
      vec ? (grid.one_chunk ? mobius_add_bwd_kernel<scalar_t, kVec, 1>
                            : mobius_add_bwd_kernel<scalar_t, kVec, kChunks>)
          : (grid.one_chunk ? mobius_add_bwd_kernel<scalar_t, 1, 1>
                            : mobius_add_bwd_kernel<scalar_t, 1, kChunks>);
  kernel<<<grid.blocks, kBlock, 0, at::cuda::getCurrentCUDAStream()>>>(
      gp, gv.row_stride, xp, xv.row_stride, yp, yv.row_stride, gxp, gyp,
      gc_rows.defined() ? gc_rows.mutable_data_ptr<acc_t>() : nullptr, rows, d, grid.group,
      c.get<acc_t>(), project);
  C10_CUDA_KERNEL_LAUNCH_CHECK();
}

}  // namespace

at::Tensor mobius_add_cuda(const at::Tensor& x, const at::Tensor& y, const at::Tensor& c,
                           bool project) {
  check_inputs(x, y, c);
  const c10::cuda::CUDAGuard guard(x.device());
  const auto shape = broadcast_shape(x, y);
  TORCH_CHECK(!shape.empty(), "x and y must have at least 1 dim (the coordinates)");
  at::Tensor out = at::empty(shape, x.options().memory_format(at::MemoryFormat::Contiguous));
  if (out.numel() == 0) return out;
  const int64_t d = shape.back();
  const RowView xv = row_view(x, shape), yv = row_view(y, shape);
  const CurvatureArg cv = curvature(c, x.scalar_type());
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, x.scalar_type(), "mobius_add_cuda", [&] {
    mobius_add_launch<scalar_t>(xv, yv, out, out.numel() / d, d, cv, project);
  });
  return out;
}

std::tuple<at::Tensor, at::Tensor, at::Tensor> mobius_add_backward_cuda(
    const at::Tensor& grad, const at::Tensor& x, const at::Tensor& y, const at::Tensor& c,
    bool project, bool needs_grad_c) {
  check_inputs(x, y, c);
  LFI_CHECK_SAME_DTYPE(grad, x);
  LFI_CHECK_DEVICE(grad, x.device());
  const c10::cuda::CUDAGuard guard(x.device());
  const auto shape = broadcast_shape(x, y);
  TORCH_CHECK(!shape.empty(), "x and y must have at least 1 dim (the coordinates)");
  TORCH_CHECK(grad.sizes() == at::IntArrayRef(shape), "grad must have the broadcast shape ",
              at::IntArrayRef(shape), " (got ", grad.sizes(), ")");
  const auto opts = x.options().memory_format(at::MemoryFormat::Contiguous);
  at::Tensor gx = at::empty(shape, opts), gy = at::empty(shape, opts);
  at::Tensor gc = at::zeros({}, c.options());
  if (gx.numel() == 0) return {gx, gy, gc};
  const int64_t d = shape.back();
  const int64_t rows = gx.numel() / d;
  const RowView xv = row_view(x, shape), yv = row_view(y, shape), gv = row_view(grad, shape);
  const CurvatureArg cv = curvature(c, x.scalar_type());
  // Per-row contributions summed by at::sum afterwards: deterministic, unlike atomics.
  at::Tensor gc_rows;
  if (needs_grad_c) gc_rows = at::empty({rows}, opts.dtype(at::toOpMathType(x.scalar_type())));
  AT_DISPATCH_FLOATING_TYPES_AND2(
      at::kHalf, at::kBFloat16, x.scalar_type(), "mobius_add_backward_cuda", [&] {
        mobius_add_backward_launch<scalar_t>(gv, xv, yv, gx, gy, gc_rows, rows, d, cv, project);
      });
  if (needs_grad_c) gc = at::sum(gc_rows, at::kDouble).to(c.options());
  return {gx, gy, gc};
}

TORCH_LIBRARY_IMPL(lfi_fast, CUDA, m) {
  m.impl("mobius_add", &mobius_add_cuda);
  m.impl("mobius_add_backward", &mobius_add_backward_cuda);
}

}  // namespace lfi_fast
