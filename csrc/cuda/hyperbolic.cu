// CUDA kernels of the hyperbolic family; the semantics are those of cpu/hyperbolic.cpp.
//
// Every row op is one memory-bound pass over (rows, D), run by one generic kernel, row_kernel<P>:
// a group of G threads owns a row, loads it in 16-byte packs where alignment allows, reduces the
// row's dot products with warp shuffles, evaluates the row's scalar math (a policy P over the
// functors of hyperbolic_math.h: the coefficients of the result, or of the gradients by dual
// numbers) and writes the result from the registers it loaded the row into. Rows longer than a
// tile are read again instead. dist takes a second pass over the row (|sa x + sb y|^2 element by
// element, as the CPU code), from the registers as well when the row fits. The ops built on a
// matrix product (mobius_matvec, pairwise_dist) leave it to ATen's GEMM in the compute type and
// fuse the rest. Half types compute in float32.
//
// c is a 0-dim tensor on the CPU (its value is passed to the kernel) or on the inputs' device (the
// kernel reads it: the host never waits for the stream). The gradient of c is written per row (or
// per block) and summed by at::sum: deterministic, unlike atomics.
#include "cuda_common.cuh"
#include "../hyperbolic_math.h"
#include "../ops.h"

#include <ATen/ATen.h>
#include <ATen/Dispatch.h>
#include <ATen/OpMathType.h>
#include <ATen/cuda/CUDAContext.h>
#include <c10/cuda/CUDAGuard.h>
#include <c10/util/accumulate.h>
#include <torch/library.h>

#include <algorithm>
#include <cstdint>
#include <limits>
#include <vector>

namespace lfi_fast {
namespace {

using at::Tensor;

constexpr int kBlock = 256;
// Packs per thread and tensor kept in registers for rows longer than one pack per thread: rows of
// up to 4 * 32 packs (512 floats) are read once; longer ones are read again for each pass.
constexpr int kChunks = 4;

// ---- loads, stores and reductions shared by the row kernels ------------------------------------

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

template <typename T, int N>
LFI_D void store_pack(T* p, const Pack<T, N>& v) {
  __stwb(reinterpret_cast<PackWord<T, N>*>(p), v.w);
}

// The packs one thread owns in a tile of one of its row's tensors: CHUNKS packs, a group's width
// apart.
template <typename T, int VEC, int CHUNKS>
struct Tile {
  using acc_t = compute_t<T>;
  Pack<T, VEC> p[CHUNKS];

  // Packs past the row's end read as zeros, so that they add nothing to the dot products.
  LFI_D void load(const T* __restrict__ row, int64_t col, int64_t step, int64_t d) {
#pragma unroll
    for (int k = 0; k < CHUNKS; ++k, col += step) {
      if (col < d) {
        p[k].w = __ldg(reinterpret_cast<const PackWord<T, VEC>*>(row + col));
      } else {
#pragma unroll
        for (int i = 0; i < VEC; ++i) p[k].v[i] = T(0);
      }
    }
  }
  LFI_D acc_t operator()(int k, int i) const { return static_cast<acc_t>(p[k].v[i]); }
};

// c as the kernel sees it: read from device memory when c lives on the GPU, so that the host never
// waits for the stream; otherwise the value the host read.
template <typename T>
struct Curvature {
  const T* ptr;
  T value;
  LFI_D T get() const { return ptr != nullptr ? *ptr : value; }
};

// The projection margin of the op's dtype, in the compute type.
template <typename scalar_t>
LFI_D compute_t<scalar_t> eps() {
  return static_cast<compute_t<scalar_t>>(ball_eps<scalar_t>());
}

// Where a thread sits: its row, its first column and the shuffle mask of its group (G lanes of one
// warp; a group always exits together, so the other lanes of the warp need not take part).
struct Lane {
  int64_t row, col;
  unsigned mask;
};

LFI_D Lane lane_of(int group, int vec) {
  const int lane = threadIdx.x & (group - 1);
  const int first = (threadIdx.x & 31) & ~(group - 1);
  const unsigned bits = group == 32 ? ~0u : (1u << group) - 1;
  return {static_cast<int64_t>(blockIdx.x) * (kBlock / group) + threadIdx.x / group,
          static_cast<int64_t>(lane) * vec, bits << first};
}

template <typename T, int N>
LFI_D void group_sum(T (&v)[N], int group, unsigned mask) {
  for (int o = group / 2; o > 0; o /= 2) {
#pragma unroll
    for (int i = 0; i < N; ++i) v[i] += __shfl_xor_sync(mask, v[i], o, group);
  }
}

// ---- the generic row kernel ---------------------------------------------------------------------

// One segment of a row: NIN input tensors (row i of input k at in[k] + i * stride[k]) and NOUT
// contiguous outputs (row i at out[k] + i * d), all of length d. Most ops have one segment;
// mobius_matvec has two (x: in features, mx: out features).
template <typename in_t, typename out_t, int NIN, int NOUT>
struct Segment {
  static constexpr int kIn = NIN, kOut = NOUT;
  using in_type = in_t;
  using out_type = out_t;
  const in_t* in[NIN > 0 ? NIN : 1] = {};
  int64_t stride[NIN > 0 ? NIN : 1] = {};
  out_t* out[NOUT > 0 ? NOUT : 1] = {};
  int64_t d = 0;
};

// What every policy holds. A policy P adds, for its row math:
//   kSums, kSums2                 the number of row sums of the first pass and of the second
//   sum_a(v, s) [, sum_b(v, s)]   adds an element's values (one per input of the segment) to s
//   Row row(s, i, lead) const     the row's coefficients from its sums (lead: the group's first
//                                 lane, which writes the per-row outputs)
//   sum2(r, v, s2), finish(r, s2, i, lead) const
//                                 the second pass over segment a, where kSums2 > 0 (dist)
//   emit_a(r, v, o) [, emit_b]    an element's outputs (one per output of the segment)
template <typename scalar_t_, typename in_t_, typename out_t_, int NINA, int NOUTA, int NINB = 0,
          int NOUTB = 0>
struct RowPolicy {
  using scalar_t = scalar_t_;  // the op's dtype
  using in_t = in_t_;
  using out_t = out_t_;
  using acc_t = compute_t<scalar_t>;
  using SegA = Segment<in_t, out_t, NINA, NOUTA>;
  using SegB = Segment<in_t, out_t, NINB, NOUTB>;
  SegA a;
  SegB b;
  Curvature<acc_t> c{nullptr, acc_t(0)};
  bool project = false;
};

template <typename P, typename Seg>
struct RowPtrs {
  const typename P::in_t* in[Seg::kIn > 0 ? Seg::kIn : 1];
  typename P::out_t* out[Seg::kOut > 0 ? Seg::kOut : 1];
  int64_t d;
};

template <typename P, typename Seg>
LFI_D RowPtrs<P, Seg> row_ptrs(const Seg& s, int64_t row) {
  RowPtrs<P, Seg> r;
#pragma unroll
  for (int k = 0; k < Seg::kIn; ++k) r.in[k] = s.in[k] + row * s.stride[k];
#pragma unroll
  for (int k = 0; k < Seg::kOut; ++k) r.out[k] = s.out[k] + row * s.d;
  r.d = s.d;
  return r;
}

// Calls f(v) on every element of the thread's share of a segment, v holding the element of each
// input. Loads the tiles, unless `loaded` and the segment fits in one tile (then they already hold
// it). Tile loops stay rolled: rows are one tile but for the longest, and unrolling a loop of
// unknown trip count costs a 64-bit division per thread.
template <int VEC, int CHUNKS, typename in_t, int NIN, typename Ptrs, typename F>
LFI_D void sweep(const Ptrs& r, Tile<in_t, VEC, CHUNKS> (&t)[NIN], int64_t col, int64_t step,
                 bool loaded, F&& f) {
  using acc_t = compute_t<in_t>;
  const int64_t tile = step * CHUNKS;
  const bool keep = loaded && r.d <= tile;
#pragma unroll 1
  for (int64_t base = 0; base < r.d; base += tile) {
    if (!keep) {
#pragma unroll
      for (int j = 0; j < NIN; ++j) t[j].load(r.in[j], base + col, step, r.d);
    }
#pragma unroll
    for (int k = 0; k < CHUNKS; ++k) {
#pragma unroll
      for (int i = 0; i < VEC; ++i) {
        acc_t v[NIN];
#pragma unroll
        for (int j = 0; j < NIN; ++j) v[j] = t[j](k, i);
        f(v);
      }
    }
  }
}

// Writes the outputs of a segment, o = f(v) element by element, a pack at a time.
template <int VEC, int CHUNKS, typename in_t, int NIN, int NOUT, typename out_t, typename Ptrs,
          typename F>
LFI_D void emit(const Ptrs& r, Tile<in_t, VEC, CHUNKS> (&t)[NIN], int64_t col, int64_t step,
                F&& f) {
  using acc_t = compute_t<in_t>;
  const int64_t tile = step * CHUNKS;
  const bool keep = r.d <= tile;
#pragma unroll 1
  for (int64_t base = 0; base < r.d; base += tile) {
    if (!keep) {
#pragma unroll
      for (int j = 0; j < NIN; ++j) t[j].load(r.in[j], base + col, step, r.d);
    }
#pragma unroll
    for (int k = 0; k < CHUNKS; ++k) {
      Pack<out_t, VEC> o[NOUT];
#pragma unroll
      for (int i = 0; i < VEC; ++i) {
        acc_t v[NIN], w[NOUT];
#pragma unroll
        for (int j = 0; j < NIN; ++j) v[j] = t[j](k, i);
        f(v, w);
#pragma unroll
        for (int j = 0; j < NOUT; ++j) o[j].v[i] = static_cast<out_t>(w[j]);
      }
      const int64_t pos = base + col + k * step;
      if (pos < r.d) {
#pragma unroll
        for (int j = 0; j < NOUT; ++j) store_pack(r.out[j] + pos, o[j]);
      }
    }
  }
}

template <typename P, int VEC, int CHUNKS>
__global__ void __launch_bounds__(kBlock) row_kernel(const P p, int64_t rows, int group) {
  using in_t = typename P::in_t;
  using out_t = typename P::out_t;
  using acc_t = typename P::acc_t;
  using SegA = typename P::SegA;
  using SegB = typename P::SegB;
  using TileT = Tile<in_t, VEC, CHUNKS>;
  const Lane L = lane_of(group, VEC);
  if (L.row >= rows) return;
  const int64_t step = static_cast<int64_t>(group) * VEC;
  const bool lead = L.col == 0;

  const auto ra = row_ptrs<P>(p.a, L.row);
  const auto rb = row_ptrs<P>(p.b, L.row);
  TileT ta[SegA::kIn];
  TileT tb[SegB::kIn > 0 ? SegB::kIn : 1];

  acc_t s[P::kSums];
#pragma unroll
  for (int k = 0; k < P::kSums; ++k) s[k] = acc_t(0);
  sweep(ra, ta, L.col, step, false, [&](const auto& v) { P::sum_a(v, s); });
  if constexpr (SegB::kIn > 0) {
    sweep(rb, tb, L.col, step, false, [&](const auto& v) { P::sum_b(v, s); });
  }
  group_sum(s, group, L.mask);
  auto r = p.row(s, L.row, lead);

  if constexpr (P::kSums2 > 0) {
    acc_t s2[P::kSums2];
#pragma unroll
    for (int k = 0; k < P::kSums2; ++k) s2[k] = acc_t(0);
    sweep(ra, ta, L.col, step, true, [&](const auto& v) { P::sum2(r, v, s2); });
    group_sum(s2, group, L.mask);
    p.finish(r, s2, L.row, lead);
  }
  if constexpr (SegA::kOut > 0) {
    emit<VEC, CHUNKS, in_t, SegA::kIn, SegA::kOut, out_t>(
        ra, ta, L.col, step, [&](const auto& v, auto& o) { P::emit_a(r, v, o); });
  }
  if constexpr (SegB::kOut > 0) {
    emit<VEC, CHUNKS, in_t, SegB::kIn, SegB::kOut, out_t>(
        rb, tb, L.col, step, [&](const auto& v, auto& o) { P::emit_b(r, v, o); });
  }
}

// ---- the policies: each op's row math ----------------------------------------------------------

template <typename T>
LFI_D void gram_sums(const T (&v)[2], T (&s)[3]) {  // |x|^2, |y|^2, <x,y>
  s[0] += v[0] * v[0];
  s[1] += v[1] * v[1];
  s[2] += v[0] * v[1];
}

// Binary ops, inputs (x, y) -> out = a x + b y.
template <typename Op, typename scalar_t>
struct BinaryFwd : RowPolicy<scalar_t, scalar_t, scalar_t, 2, 1> {
  using acc_t = compute_t<scalar_t>;
  static constexpr int kSums = 3, kSums2 = 0;
  struct Row {
    acc_t a, b;
  };
  LFI_D static void sum_a(const acc_t (&v)[2], acc_t (&s)[3]) { gram_sums(v, s); }
  LFI_D Row row(const acc_t (&s)[3], int64_t, bool) const {
    Row r;
    hyp::binary_fwd<Op>(s[0], s[1], s[2], this->c.get(), eps<scalar_t>(), this->project, r.a, r.b);
    return r;
  }
  LFI_D static void emit_a(const Row& r, const acc_t (&v)[2], acc_t (&o)[1]) {
    o[0] = r.a * v[0] + r.b * v[1];
  }
};

// Binary ops' backward, inputs (g, x, y) -> (grad_x, grad_y), and each row's d/dc.
template <typename Op, typename scalar_t>
struct BinaryBwd : RowPolicy<scalar_t, scalar_t, scalar_t, 3, 2> {
  using acc_t = compute_t<scalar_t>;
  static constexpr int kSums = 5, kSums2 = 0;  // |x|^2, |y|^2, <x,y>, <g,x>, <g,y>
  acc_t* gc_rows = nullptr;
  using Row = hyp::BinaryBwd<acc_t>;
  LFI_D static void sum_a(const acc_t (&v)[3], acc_t (&s)[5]) {
    s[0] += v[1] * v[1];
    s[1] += v[2] * v[2];
    s[2] += v[1] * v[2];
    s[3] += v[0] * v[1];
    s[4] += v[0] * v[2];
  }
  LFI_D Row row(const acc_t (&s)[5], int64_t i, bool lead) const {
    const Row k = hyp::binary_bwd<Op>(s[0], s[1], s[2], s[3], s[4], this->c.get(), eps<scalar_t>(),
                                      this->project);
    if (lead && gc_rows != nullptr) gc_rows[i] = k.gc;
    return k;
  }
  LFI_D static void emit_a(const Row& k, const acc_t (&v)[3], acc_t (&o)[2]) {
    o[0] = k.gx_g * v[0] + k.gx_x * v[1] + k.gx_y * v[2];
    o[1] = k.gy_g * v[0] + k.gy_x * v[1] + k.gy_y * v[2];
  }
};

// Unary ops, input x -> out = f x, with an optional per-row scalar r (mobius_scalar_mul).
template <typename Op, typename scalar_t>
struct UnaryFwd : RowPolicy<scalar_t, scalar_t, scalar_t, 1, 1> {
  using acc_t = compute_t<scalar_t>;
  static constexpr int kSums = 1, kSums2 = 0;
  const scalar_t* r = nullptr;
  int64_t r_stride = 0;
  struct Row {
    acc_t f;
  };
  LFI_D static void sum_a(const acc_t (&v)[1], acc_t (&s)[1]) { s[0] += v[0] * v[0]; }
  LFI_D Row row(const acc_t (&s)[1], int64_t i, bool) const {
    const acc_t rv = r != nullptr ? static_cast<acc_t>(r[i * r_stride]) : acc_t(0);
    return {hyp::unary_fwd<Op>(s[0], this->c.get(), rv, eps<scalar_t>(), this->project)};
  }
  LFI_D static void emit_a(const Row& k, const acc_t (&v)[1], acc_t (&o)[1]) { o[0] = k.f * v[0]; }
};

// Unary ops' backward, inputs (g, x) -> grad_x, and each row's d/dc and d/dr.
template <typename Op, typename scalar_t>
struct UnaryBwd : RowPolicy<scalar_t, scalar_t, scalar_t, 2, 1> {
  using acc_t = compute_t<scalar_t>;
  static constexpr int kSums = 2, kSums2 = 0;  // |x|^2, <g,x>
  const scalar_t* r = nullptr;
  int64_t r_stride = 0;
  scalar_t* gr = nullptr;  // one per row
  acc_t* gc_rows = nullptr;
  using Row = hyp::UnaryBwd<acc_t>;
  LFI_D static void sum_a(const acc_t (&v)[2], acc_t (&s)[2]) {
    s[0] += v[1] * v[1];
    s[1] += v[0] * v[1];
  }
  LFI_D Row row(const acc_t (&s)[2], int64_t i, bool lead) const {
    const acc_t rv = r != nullptr ? static_cast<acc_t>(r[i * r_stride]) : acc_t(0);
    const Row k = hyp::unary_bwd<Op>(s[0], s[1], this->c.get(), rv, eps<scalar_t>(), this->project);
    if (lead) {
      if (gr != nullptr) gr[i] = static_cast<scalar_t>(k.gr);
      if (gc_rows != nullptr) gc_rows[i] = k.gc;
    }
    return k;
  }
  LFI_D static void emit_a(const Row& k, const acc_t (&v)[2], acc_t (&o)[1]) {
    o[0] = k.gx_g * v[0] + k.gx_x * v[1];
  }
};

// dist(x, y): s = sa x + sb y from the Gram entries, then |s|^2 from a second pass over the row.
template <typename scalar_t>
struct DistFwd : RowPolicy<scalar_t, scalar_t, scalar_t, 2, 0> {
  using acc_t = compute_t<scalar_t>;
  static constexpr int kSums = 3, kSums2 = 1;
  scalar_t* out = nullptr;  // one per row
  struct Row {
    acc_t sa, sb, c;
  };
  LFI_D static void sum_a(const acc_t (&v)[2], acc_t (&s)[3]) { gram_sums(v, s); }
  LFI_D Row row(const acc_t (&s)[3], int64_t, bool) const {
    Row r;
    r.c = this->c.get();
    hyp::dist_sub(s[0], s[1], s[2], r.c, r.sa, r.sb);
    return r;
  }
  LFI_D static void sum2(const Row& r, const acc_t (&v)[2], acc_t (&s)[1]) {
    const acc_t t = r.sa * v[0] + r.sb * v[1];
    s[0] += t * t;
  }
  LFI_D void finish(Row& r, const acc_t (&s)[1], int64_t i, bool lead) const {
    if (lead) out[i] = static_cast<scalar_t>(hyp::dist_from_sq(s[0], r.c));
  }
};

// dist's backward. With dist = F(|s|^2, c): d|s|^2 = 2 <s, ds>
//   = 2 sa <s, dx> + 2 sb <s, dy> + 2 <s,x> dsa + 2 <s,y> dsb.
template <typename scalar_t>
struct DistBwd : RowPolicy<scalar_t, scalar_t, scalar_t, 2, 2> {
  using acc_t = compute_t<scalar_t>;
  using D4 = hyp::Dual<acc_t, 4>;
  using D2 = hyp::Dual<acc_t, 2>;
  static constexpr int kSums = 3, kSums2 = 3;  // then |s|^2, <s,x>, <s,y>
  const scalar_t* grad = nullptr;               // one per row
  acc_t* gc_rows = nullptr;
  struct Row {
    D4 sa, sb;
    acc_t c, gx_x, gx_y, gy_x, gy_y;
  };
  LFI_D static void sum_a(const acc_t (&v)[2], acc_t (&s)[3]) { gram_sums(v, s); }
  LFI_D Row row(const acc_t (&s)[3], int64_t, bool) const {
    Row r;
    r.c = this->c.get();
    hyp::dist_sub(D4::var(s[0], 0), D4::var(s[1], 1), D4::var(s[2], 2), D4::var(r.c, 3), r.sa,
                  r.sb);
    return r;
  }
  LFI_D static void sum2(const Row& r, const acc_t (&v)[2], acc_t (&s)[3]) {
    const acc_t t = r.sa.v * v[0] + r.sb.v * v[1];
    s[0] += t * t;
    s[1] += t * v[0];
    s[2] += t * v[1];
  }
  LFI_D void finish(Row& r, const acc_t (&s)[3], int64_t i, bool lead) const {
    const D2 dist = hyp::dist_from_sq(D2::var(s[0], 0), D2::var(r.c, 1));
    const acc_t g = static_cast<acc_t>(grad[i]);
    const acc_t gs2 = g * dist.d[0];  // dL/d|s|^2
    acc_t L[4];                        // dL/d(x2, y2, xy, c) through (sa, sb)
#pragma unroll
    for (int k = 0; k < 4; ++k) L[k] = acc_t(2) * gs2 * (s[1] * r.sa.d[k] + s[2] * r.sb.d[k]);
    // grad_x = 2 gs2 sa s + 2 L_x2 x + L_xy y, s = sa x + sb y ; grad_y likewise.
    const acc_t ks = acc_t(2) * gs2;
    r.gx_x = ks * r.sa.v * r.sa.v + acc_t(2) * L[0];
    r.gx_y = ks * r.sa.v * r.sb.v + L[2];
    r.gy_x = ks * r.sb.v * r.sa.v + L[2];
    r.gy_y = ks * r.sb.v * r.sb.v + acc_t(2) * L[1];
    if (lead && gc_rows != nullptr) gc_rows[i] = L[3] + g * dist.d[1];
  }
  LFI_D static void emit_a(const Row& r, const acc_t (&v)[2], acc_t (&o)[2]) {
    o[0] = r.gx_x * v[0] + r.gx_y * v[1];
    o[1] = r.gy_x * v[0] + r.gy_y * v[1];
  }
};

template <typename scalar_t>
struct Dist0Fwd : RowPolicy<scalar_t, scalar_t, scalar_t, 1, 0> {
  using acc_t = compute_t<scalar_t>;
  static constexpr int kSums = 1, kSums2 = 0;
  scalar_t* out = nullptr;  // one per row
  struct Row {};
  LFI_D static void sum_a(const acc_t (&v)[1], acc_t (&s)[1]) { s[0] += v[0] * v[0]; }
  LFI_D Row row(const acc_t (&s)[1], int64_t i, bool lead) const {
    if (lead) out[i] = static_cast<scalar_t>(hyp::dist0(s[0], this->c.get()));
    return {};
  }
};

template <typename scalar_t>
struct Dist0Bwd : RowPolicy<scalar_t, scalar_t, scalar_t, 1, 1> {
  using acc_t = compute_t<scalar_t>;
  using D2 = hyp::Dual<acc_t, 2>;
  static constexpr int kSums = 1, kSums2 = 0;
  const scalar_t* grad = nullptr;  // one per row
  acc_t* gc_rows = nullptr;
  struct Row {
    acc_t k;
  };
  LFI_D static void sum_a(const acc_t (&v)[1], acc_t (&s)[1]) { s[0] += v[0] * v[0]; }
  LFI_D Row row(const acc_t (&s)[1], int64_t i, bool lead) const {
    const D2 f = hyp::dist0(D2::var(s[0], 0), D2::var(this->c.get(), 1));
    const acc_t g = static_cast<acc_t>(grad[i]);
    if (lead && gc_rows != nullptr) gc_rows[i] = g * f.d[1];
    return {acc_t(2) * g * f.d[0]};
  }
  LFI_D static void emit_a(const Row& r, const acc_t (&v)[1], acc_t (&o)[1]) { o[0] = r.k * v[0]; }
};

// mobius_matvec's row op on (x, mx), both in the compute type: out = f mx, f from (|x|^2, |mx|^2),
// and 0 where mx is all zeros (geoopt's torch.where). Segment a: x; segment b: mx.
template <typename scalar_t>
struct MatvecFwd
    : RowPolicy<scalar_t, compute_t<scalar_t>, scalar_t, 1, 0, 1, 1> {
  using acc_t = compute_t<scalar_t>;
  static constexpr int kSums = 3, kSums2 = 0;  // |x|^2, |mx|^2, mx's nonzero count
  struct Row {
    acc_t f;
  };
  LFI_D static void sum_a(const acc_t (&v)[1], acc_t (&s)[3]) { s[0] += v[0] * v[0]; }
  LFI_D static void sum_b(const acc_t (&v)[1], acc_t (&s)[3]) {
    s[1] += v[0] * v[0];
    s[2] += v[0] != acc_t(0) ? acc_t(1) : acc_t(0);
  }
  LFI_D Row row(const acc_t (&s)[3], int64_t, bool) const {
    if (s[2] == acc_t(0)) return {acc_t(0)};
    return {hyp::Matvec::coef(s[0], s[1], this->c.get(), eps<scalar_t>(), this->project)};
  }
  LFI_D static void emit_b(const Row& r, const acc_t (&v)[1], acc_t (&o)[1]) { o[0] = r.f * v[0]; }
};

// Its backward: segment a: x -> the direct part of grad_x; segment b: (mx, g) -> grad_mx.
// grad_mx = f g + 2 L_m2 mx ; grad_x (direct) = 2 L_x2 x ; the caller adds grad_mx m.
template <typename scalar_t>
struct MatvecBwd : RowPolicy<scalar_t, compute_t<scalar_t>, compute_t<scalar_t>, 1,
                             1, 2, 1> {
  using acc_t = compute_t<scalar_t>;
  using D3 = hyp::Dual<acc_t, 3>;
  static constexpr int kSums = 4, kSums2 = 0;  // |x|^2, |mx|^2, <g,mx>, mx's nonzero count
  acc_t* gc_rows = nullptr;
  struct Row {
    acc_t f, k_m, k_x;
    bool zero;
  };
  LFI_D static void sum_a(const acc_t (&v)[1], acc_t (&s)[4]) { s[0] += v[0] * v[0]; }
  LFI_D static void sum_b(const acc_t (&v)[2], acc_t (&s)[4]) {
    s[1] += v[0] * v[0];
    s[2] += v[1] * v[0];
    s[3] += v[0] != acc_t(0) ? acc_t(1) : acc_t(0);
  }
  LFI_D Row row(const acc_t (&s)[4], int64_t i, bool lead) const {
    if (s[3] == acc_t(0)) {  // geoopt's torch.where(all(mx == 0), 0, ...): no gradient flows
      if (lead && gc_rows != nullptr) gc_rows[i] = acc_t(0);
      return {acc_t(0), acc_t(0), acc_t(0), true};
    }
    const D3 f = hyp::Matvec::coef(D3::var(s[0], 0), D3::var(s[1], 1), D3::var(this->c.get(), 2),
                                   eps<scalar_t>(), this->project);
    if (lead && gc_rows != nullptr) gc_rows[i] = s[2] * f.d[2];
    return {f.v, acc_t(2) * s[2] * f.d[1], acc_t(2) * s[2] * f.d[0], false};
  }
  LFI_D static void emit_a(const Row& r, const acc_t (&v)[1], acc_t (&o)[1]) {
    o[0] = r.zero ? acc_t(0) : r.k_x * v[0];
  }
  LFI_D static void emit_b(const Row& r, const acc_t (&v)[2], acc_t (&o)[1]) {
    o[0] = r.zero ? acc_t(0) : r.f * v[1] + r.k_m * v[0];
  }
};

// ---- pairwise_dist: (N, D) x (M, D) -> (N, M) from |x_i|^2, |y_j|^2 and the GEMM x y^T ---------

template <typename T>
LFI_HD T pair_dist(T x2, T y2, T xy, T c) {
  T sa, sb;
  hyp::dist_sub(x2, y2, xy, c, sa, sb);
  return hyp::dist_from_sq(hyp::combo_sq(sa, sb, x2, y2, xy), c);
}

// Thread j of block (bx, by) owns column j, rows i = by, by + gridDim.y, ...
template <typename scalar_t>
__global__ void __launch_bounds__(kBlock)
    pair_dist_fwd_kernel(const compute_t<scalar_t>* __restrict__ x2,
                         const compute_t<scalar_t>* __restrict__ y2,
                         const compute_t<scalar_t>* __restrict__ xy,
                         scalar_t* __restrict__ out, int64_t n, int64_t m,
                         Curvature<compute_t<scalar_t>> c) {
  using acc_t = compute_t<scalar_t>;
  const int64_t j = static_cast<int64_t>(blockIdx.x) * kBlock + threadIdx.x;
  if (j >= m) return;
  const acc_t cv = c.get(), y2j = y2[j];
#pragma unroll 1
  for (int64_t i = blockIdx.y; i < n; i += gridDim.y) {
    const int64_t k = i * m + j;
    out[k] = static_cast<scalar_t>(pair_dist(x2[i], y2j, xy[k], cv));
  }
}

// The backward: a block owns kPairRows rows and the columns j = by * kBlock + threadIdx.x + t *
// gridDim.y * kBlock (one each but for very wide y). Per pair it writes dL/dxy; per (row tile,
// column) the sum of dL/dy2 over the tile's rows; per (column block, row) the sum of dL/dx2 over
// the block's columns; per block the sum of dL/dc. The caller sums the partial sums with at::sum.
// The rows are a rolled loop (one pair's dual numbers live at a time, no spills in float64), each
// thread's dL/dx2 per row accumulating in its own shared-memory slot.
constexpr int kPairRows = 16;

template <typename scalar_t>
__global__ void __launch_bounds__(kBlock)
    pair_dist_bwd_kernel(const scalar_t* __restrict__ grad,
                         const compute_t<scalar_t>* __restrict__ x2,
                         const compute_t<scalar_t>* __restrict__ y2,
                         const compute_t<scalar_t>* __restrict__ xy,
                         compute_t<scalar_t>* __restrict__ gxy,
                         compute_t<scalar_t>* __restrict__ gx2_part,  // (gridDim.y, n)
                         compute_t<scalar_t>* __restrict__ gy2_part,  // (gridDim.x, m)
                         compute_t<scalar_t>* __restrict__ gc_part,   // (gridDim.x * y)
                         int64_t n, int64_t m, Curvature<compute_t<scalar_t>> c) {
  using acc_t = compute_t<scalar_t>;
  using D = hyp::Dual<acc_t, 4>;
  constexpr int kWarps = kBlock / 32;
  __shared__ acc_t gx2_slot[kPairRows][kBlock];
  __shared__ acc_t gc_warp[kWarps];
  const int t = threadIdx.x, lane = t & 31, warp = t / 32;
  const int64_t i0 = static_cast<int64_t>(blockIdx.x) * kPairRows;
  const int rows = static_cast<int>(n - i0 < kPairRows ? n - i0 : kPairRows);
  const acc_t cv = c.get();
#pragma unroll
  for (int r = 0; r < kPairRows; ++r) gx2_slot[r][t] = acc_t(0);
  acc_t gc = acc_t(0);

#pragma unroll 1
  for (int64_t j = static_cast<int64_t>(blockIdx.y) * kBlock + t; j < m;
       j += static_cast<int64_t>(gridDim.y) * kBlock) {
    const acc_t y2j = y2[j];
    acc_t col = acc_t(0);
#pragma unroll 1
    for (int r = 0; r < rows; ++r) {
      const int64_t k = (i0 + r) * m + j;
      const D f = pair_dist(D::var(x2[i0 + r], 0), D::var(y2j, 1), D::var(xy[k], 2), D::var(cv, 3));
      const acc_t g = static_cast<acc_t>(grad[k]);
      gx2_slot[r][t] += g * f.d[0];
      col += g * f.d[1];
      gxy[k] = g * f.d[2];
      gc += g * f.d[3];
    }
    gy2_part[blockIdx.x * m + j] = col;
  }

  // Block sums: warp w sums the slots of rows w, w + kWarps, ...; dL/dc by warps, then warp 0.
  acc_t v[1] = {gc};
  group_sum(v, 32, ~0u);
  if (lane == 0) gc_warp[warp] = v[0];
  __syncthreads();
  for (int r = warp; r < rows; r += kWarps) {
    acc_t s[1] = {acc_t(0)};
#pragma unroll
    for (int q = lane; q < kBlock; q += 32) s[0] += gx2_slot[r][q];
    group_sum(s, 32, ~0u);
    if (lane == 0) gx2_part[blockIdx.y * n + i0 + r] = s[0];
  }
  if (t == 0 && gc_part != nullptr) {
    acc_t total = acc_t(0);
#pragma unroll
    for (int w = 0; w < kWarps; ++w) total += gc_warp[w];
    gc_part[static_cast<int64_t>(blockIdx.x) * gridDim.y + blockIdx.y] = total;
  }
}

// ---- host side ---------------------------------------------------------------------------------

void check_vec(const Tensor& t, const char* name) {
  TORCH_CHECK(at::isFloatingType(t.scalar_type()), name, " must be a floating tensor (got ",
              t.scalar_type(), ")");
  TORCH_CHECK(t.is_cuda(), name, " must be a CUDA tensor (got ", t.device(), ")");
  TORCH_CHECK(t.dim() >= 1, name, " must have at least 1 dim (the coordinates)");
}

void check_pair(const Tensor& x, const Tensor& y, const char* xn, const char* yn) {
  check_vec(x, xn);
  check_vec(y, yn);
  TORCH_CHECK(x.scalar_type() == y.scalar_type(), xn, " and ", yn,
              " must have the same dtype (got ", x.scalar_type(), " and ", y.scalar_type(), ")");
  TORCH_CHECK(x.device() == y.device(), xn, " and ", yn, " must be on the same device (got ",
              x.device(), " and ", y.device(), ")");
}

void check_grad(const Tensor& grad, const Tensor& like, at::IntArrayRef shape) {
  TORCH_CHECK(grad.scalar_type() == like.scalar_type() && grad.device() == like.device(),
              "grad must have the inputs' dtype and device");
  TORCH_CHECK(grad.sizes() == shape, "grad must have shape ", shape, " (got ", grad.sizes(), ")");
}

// c for a launch: on the GPU, a copy in the compute dtype that the kernel reads (converted on the
// stream, never read back); on the CPU, its value.
struct CurvatureArg {
  Tensor dev;
  double value = 0;

  template <typename acc_t>
  Curvature<acc_t> get() const {
    return {dev.defined() ? dev.const_data_ptr<acc_t>() : nullptr, static_cast<acc_t>(value)};
  }
};

CurvatureArg curvature(const Tensor& c, const Tensor& x) {
  LFI_CHECK_SCALAR(c);
  TORCH_CHECK(c.is_cpu() || c.device() == x.device(), "c must be on the CPU or on ", x.device(),
              " (got ", c.device(), ")");
  if (c.is_cpu()) return {Tensor(), c.item<double>()};
  return {c.to(row_compute_type(x.scalar_type())), 0.0};
}

// The gradient of c from its per-row (or per-block) contributions, in c's dtype and device.
Tensor grad_c(const Tensor& parts, const Tensor& c, bool needs_grad_c) {
  if (!needs_grad_c) return at::zeros({}, c.options());
  return at::sum(parts, at::kDouble).to(c.options());
}

Tensor gc_buffer(int64_t n, const Tensor& x, bool needs_grad_c) {
  if (!needs_grad_c) return Tensor();
  return at::empty({n}, x.options().dtype(row_compute_type(x.scalar_type())));
}

template <typename T>
T* ptr_or_null(const Tensor& t) {
  return t.defined() ? t.mutable_data_ptr<T>() : nullptr;
}

Tensor empty_like_shape(const Tensor& like, at::IntArrayRef shape) {
  return at::empty(shape, like.options().memory_format(at::MemoryFormat::Contiguous));
}

std::vector<int64_t> rows_shape(std::vector<int64_t> shape) {
  shape.pop_back();
  return shape;
}


// ---- launching the row kernel -------------------------------------------------------------------

bool aligned(const void* p, size_t bytes) {
  return reinterpret_cast<std::uintptr_t>(p) % bytes == 0;
}

// VEC-element packs need every row of every tensor to start on a pack: aligned base pointers,
// row strides and lengths that are multiples of the pack.
template <typename P, typename Seg>
bool packable(const Seg& s, int vec) {
  if (s.d % vec != 0) return false;
  for (int k = 0; k < Seg::kIn; ++k) {
    if (!aligned(s.in[k], vec * sizeof(typename P::in_t)) || s.stride[k] % vec != 0) return false;
  }
  for (int k = 0; k < Seg::kOut; ++k) {
    if (!aligned(s.out[k], vec * sizeof(typename P::out_t))) return false;
  }
  return true;
}

// G: the smallest power of two that gives each thread at most one pack of the longest segment,
// capped at a warp; rows longer than a warp's packs take kChunks packs per thread.
template <typename P>
void launch_rows(const P& p, int64_t rows) {
  if (rows == 0) return;
  constexpr int kVec = 16 / sizeof(typename P::in_t);
  const bool vec = packable<P>(p.a, kVec) && packable<P>(p.b, kVec);
  const int v = vec ? kVec : 1;
  const int64_t packs = (std::max(p.a.d, p.b.d) + v - 1) / v;
  int group = 1;
  while (group < 32 && group < packs) group *= 2;
  const int64_t rows_per_block = kBlock / group;
  const int64_t blocks = (rows + rows_per_block - 1) / rows_per_block;
  TORCH_CHECK(blocks <= std::numeric_limits<int32_t>::max(), "too many rows: ", rows);
  // Unaligned rows take one variant: 1-element packs, kChunks per thread.
  const auto kernel = !vec             ? row_kernel<P, 1, kChunks>
                      : packs <= group ? row_kernel<P, kVec, 1>
                                       : row_kernel<P, kVec, kChunks>;
  kernel<<<static_cast<unsigned>(blocks), kBlock, 0, current_stream()>>>(p, rows, group);
  C10_CUDA_KERNEL_LAUNCH_CHECK();
}

template <typename Seg>
void set_in(Seg& s, int k, const RowView& v) {
  s.in[k] = v.t.const_data_ptr<typename Seg::in_type>();
  s.stride[k] = v.row_stride;
}

template <typename Seg>
void set_in(Seg& s, int k, const Tensor& t, int64_t stride) {
  s.in[k] = t.const_data_ptr<typename Seg::in_type>();
  s.stride[k] = stride;
}

template <typename Seg>
void set_out(Seg& s, int k, Tensor& t) {
  s.out[k] = t.mutable_data_ptr<typename Seg::out_type>();
}

template <typename P, typename scalar_t = typename P::scalar_t>
P make_policy(int64_t d, const CurvatureArg& c, bool project) {
  P p;
  p.a.d = d;
  p.c = c.get<compute_t<scalar_t>>();
  p.project = project;
  return p;
}

// ---- binary row ops: out = a x + b y, (a, b) from (|x|^2, |y|^2, <x,y>) -----------------------

template <typename Op, typename scalar_t>
void binary_fwd_launch(const RowView& xv, const RowView& yv, Tensor& out, int64_t d,
                       const CurvatureArg& c, bool project) {
  auto p = make_policy<BinaryFwd<Op, scalar_t>>(d, c, project);
  set_in(p.a, 0, xv);
  set_in(p.a, 1, yv);
  set_out(p.a, 0, out);
  launch_rows(p, out.numel() / d);
}

template <typename Op, typename scalar_t>
void binary_bwd_launch(const RowView& gv, const RowView& xv, const RowView& yv, Tensor& gx,
                       Tensor& gy, Tensor& gc_rows, int64_t d, const CurvatureArg& c,
                       bool project) {
  auto p = make_policy<BinaryBwd<Op, scalar_t>>(d, c, project);
  set_in(p.a, 0, gv);
  set_in(p.a, 1, xv);
  set_in(p.a, 2, yv);
  set_out(p.a, 0, gx);
  set_out(p.a, 1, gy);
  p.gc_rows = ptr_or_null<compute_t<scalar_t>>(gc_rows);
  launch_rows(p, gx.numel() / d);
}

template <typename Op>
Tensor binary_fwd(const Tensor& x, const Tensor& y, const Tensor& c, bool project,
                  const char* xn, const char* yn) {
  check_pair(x, y, xn, yn);
  const CurvatureArg cv = curvature(c, x);
  const c10::cuda::CUDAGuard guard(x.device());
  const auto shape = broadcast_shape(x, y);
  Tensor out = empty_like_shape(x, shape);
  if (out.numel() == 0) return out;
  const int64_t d = shape.back();
  const RowView xv = row_view(x, shape), yv = row_view(y, shape);
  LFI_DISPATCH(x.scalar_type(), "binary_fwd_cuda", [&] {
    binary_fwd_launch<Op, scalar_t>(xv, yv, out, d, cv, project);
  });
  return out;
}

template <typename Op>
std::tuple<Tensor, Tensor, Tensor> binary_bwd(const Tensor& grad, const Tensor& x,
                                              const Tensor& y, const Tensor& c, bool project,
                                              bool needs_grad_c, const char* xn, const char* yn) {
  check_pair(x, y, xn, yn);
  const CurvatureArg cv = curvature(c, x);
  const c10::cuda::CUDAGuard guard(x.device());
  const auto shape = broadcast_shape(x, y);
  check_grad(grad, x, shape);
  Tensor gx = empty_like_shape(x, shape), gy = empty_like_shape(x, shape);
  if (gx.numel() == 0) return {gx, gy, at::zeros({}, c.options())};
  const int64_t d = shape.back();
  const RowView xv = row_view(x, shape), yv = row_view(y, shape), gv = row_view(grad, shape);
  Tensor gc_rows = gc_buffer(gx.numel() / d, x, needs_grad_c);
  LFI_DISPATCH(x.scalar_type(), "binary_bwd_cuda", [&] {
    binary_bwd_launch<Op, scalar_t>(gv, xv, yv, gx, gy, gc_rows, d, cv, project);
  });
  return {gx, gy, grad_c(gc_rows, c, needs_grad_c)};
}

// ---- unary row ops: out = f x, f from (|x|^2, c, r) with r an optional per-row scalar ----------

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

template <typename Op, typename scalar_t>
void unary_fwd_launch(const RowView& xv, const RowScalar& rv, Tensor& out, int64_t d,
                      const CurvatureArg& c, bool project) {
  auto p = make_policy<UnaryFwd<Op, scalar_t>>(d, c, project);
  set_in(p.a, 0, xv);
  set_out(p.a, 0, out);
  p.r = rv.t.defined() ? rv.t.const_data_ptr<scalar_t>() : nullptr;
  p.r_stride = rv.stride;
  launch_rows(p, out.numel() / d);
}

template <typename Op, typename scalar_t>
void unary_bwd_launch(const RowView& gv, const RowView& xv, const RowScalar& rv, Tensor& gx,
                      Tensor& gr, Tensor& gc_rows, int64_t d, const CurvatureArg& c,
                      bool project) {
  auto p = make_policy<UnaryBwd<Op, scalar_t>>(d, c, project);
  set_in(p.a, 0, gv);
  set_in(p.a, 1, xv);
  set_out(p.a, 0, gx);
  p.r = rv.t.defined() ? rv.t.const_data_ptr<scalar_t>() : nullptr;
  p.r_stride = rv.stride;
  p.gr = ptr_or_null<scalar_t>(gr);
  p.gc_rows = ptr_or_null<compute_t<scalar_t>>(gc_rows);
  launch_rows(p, gx.numel() / d);
}

template <typename Op>
Tensor unary_fwd(const Tensor& x, const Tensor& c, const Tensor* r, bool project,
                 const char* xn) {
  check_vec(x, xn);
  const CurvatureArg cv = curvature(c, x);
  const c10::cuda::CUDAGuard guard(x.device());
  auto shape = x.sizes().vec();
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
  RowScalar rv;
  if (r != nullptr) rv = row_scalar(*r, shape);
  LFI_DISPATCH(x.scalar_type(), "unary_fwd_cuda", [&] {
    unary_fwd_launch<Op, scalar_t>(xv, rv, out, d, cv, project);
  });
  return out;
}

// Returns (grad_x, grad_r or undefined, grad_c); grad_r has the rows' shape (..., 1).
template <typename Op>
std::tuple<Tensor, Tensor, Tensor> unary_bwd(const Tensor& grad, const Tensor& x,
                                             const Tensor& c, const Tensor* r, bool project,
                                             bool needs_grad_c, const char* xn) {
  check_vec(x, xn);
  const CurvatureArg cv = curvature(c, x);
  const c10::cuda::CUDAGuard guard(x.device());
  auto shape = grad.sizes().vec();
  TORCH_CHECK(!shape.empty() && shape.back() == x.size(-1), "grad must be (..., ", x.size(-1),
              ") (got ", grad.sizes(), ")");
  check_grad(grad, x, shape);
  Tensor gx = empty_like_shape(x, shape);
  auto rs = shape;
  rs.back() = 1;
  Tensor gr = r != nullptr ? empty_like_shape(x, rs) : Tensor();
  if (gx.numel() == 0) {  // D = 0: r has no effect (rows without coordinates)
    if (gr.defined()) gr.zero_();
    return {gx, gr, at::zeros({}, c.options())};
  }
  const int64_t d = shape.back();
  const RowView xv = row_view(x, shape), gv = row_view(grad, shape);
  RowScalar rv;
  if (r != nullptr) {
    TORCH_CHECK(r->scalar_type() == x.scalar_type() && r->device() == x.device(), "r and ", xn,
                " must have the same dtype and device");
    rv = row_scalar(*r, shape);
  }
  Tensor gc_rows = gc_buffer(gx.numel() / d, x, needs_grad_c);
  LFI_DISPATCH(x.scalar_type(), "unary_bwd_cuda", [&] {
    unary_bwd_launch<Op, scalar_t>(gv, xv, rv, gx, gr, gc_rows, d, cv, project);
  });
  return {gx, gr, grad_c(gc_rows, c, needs_grad_c)};
}

// ---- dist and dist0: a scalar per row ----------------------------------------------------------

template <typename scalar_t>
void dist_fwd_launch(const RowView& xv, const RowView& yv, Tensor& out, int64_t d,
                     const CurvatureArg& c) {
  auto p = make_policy<DistFwd<scalar_t>>(d, c, false);
  set_in(p.a, 0, xv);
  set_in(p.a, 1, yv);
  p.out = out.mutable_data_ptr<scalar_t>();
  launch_rows(p, out.numel());
}

template <typename scalar_t>
void dist_bwd_launch(const Tensor& g, const RowView& xv, const RowView& yv, Tensor& gx,
                     Tensor& gy, Tensor& gc_rows, int64_t d, const CurvatureArg& c) {
  auto p = make_policy<DistBwd<scalar_t>>(d, c, false);
  set_in(p.a, 0, xv);
  set_in(p.a, 1, yv);
  set_out(p.a, 0, gx);
  set_out(p.a, 1, gy);
  p.grad = g.const_data_ptr<scalar_t>();
  p.gc_rows = ptr_or_null<compute_t<scalar_t>>(gc_rows);
  launch_rows(p, g.numel());
}

template <typename scalar_t>
void dist0_fwd_launch(const RowView& xv, Tensor& out, int64_t d, const CurvatureArg& c) {
  auto p = make_policy<Dist0Fwd<scalar_t>>(d, c, false);
  set_in(p.a, 0, xv);
  p.out = out.mutable_data_ptr<scalar_t>();
  launch_rows(p, out.numel());
}

template <typename scalar_t>
void dist0_bwd_launch(const Tensor& g, const RowView& xv, Tensor& gx, Tensor& gc_rows, int64_t d,
                      const CurvatureArg& c) {
  auto p = make_policy<Dist0Bwd<scalar_t>>(d, c, false);
  set_in(p.a, 0, xv);
  set_out(p.a, 0, gx);
  p.grad = g.const_data_ptr<scalar_t>();
  p.gc_rows = ptr_or_null<compute_t<scalar_t>>(gc_rows);
  launch_rows(p, g.numel());
}

// ---- pairwise_dist ------------------------------------------------------------------------------

void check_matrix_pair(const Tensor& x, const Tensor& y) {
  check_pair(x, y, "x", "y");
  TORCH_CHECK(x.dim() == 2 && y.dim() == 2 && x.size(1) == y.size(1),
              "x and y must be (N, D) and (M, D) (got x: ", x.sizes(), ", y: ", y.sizes(), ")");
}

// Row squared norms and the Gram matrix in the compute type.
std::tuple<Tensor, Tensor, Tensor> gram(const Tensor& x, const Tensor& y) {
  const auto acc = row_compute_type(x.scalar_type());
  const Tensor xa = x.to(acc), ya = y.to(acc);
  return {xa.square().sum(-1).contiguous(), ya.square().sum(-1).contiguous(),
          at::matmul(xa, ya.t()).contiguous()};
}

template <typename scalar_t>
void pair_dist_fwd_launch(const Tensor& x2, const Tensor& y2, const Tensor& xy, Tensor& out,
                          const CurvatureArg& c) {
  using acc_t = compute_t<scalar_t>;
  const int64_t n = out.size(0), m = out.size(1);
  const dim3 grid(static_cast<unsigned>((m + kBlock - 1) / kBlock),
                  static_cast<unsigned>(std::min<int64_t>(n, 65535)));
  pair_dist_fwd_kernel<scalar_t><<<grid, kBlock, 0, current_stream()>>>(
      x2.const_data_ptr<acc_t>(), y2.const_data_ptr<acc_t>(), xy.const_data_ptr<acc_t>(),
      out.mutable_data_ptr<scalar_t>(), n, m, c.get<acc_t>());
  C10_CUDA_KERNEL_LAUNCH_CHECK();
}

template <typename scalar_t>
void pair_dist_bwd_launch(const Tensor& g, const Tensor& x2, const Tensor& y2, const Tensor& xy,
                          Tensor& gxy, Tensor& gx2_part, Tensor& gy2_part, Tensor& gc_part,
                          const CurvatureArg& c) {
  using acc_t = compute_t<scalar_t>;
  const int64_t n = gxy.size(0), m = gxy.size(1);
  const dim3 grid(static_cast<unsigned>(gy2_part.size(0)), static_cast<unsigned>(gx2_part.size(0)));
  pair_dist_bwd_kernel<scalar_t><<<grid, kBlock, 0, current_stream()>>>(
      g.const_data_ptr<scalar_t>(), x2.const_data_ptr<acc_t>(), y2.const_data_ptr<acc_t>(),
      xy.const_data_ptr<acc_t>(), gxy.mutable_data_ptr<acc_t>(), gx2_part.mutable_data_ptr<acc_t>(),
      gy2_part.mutable_data_ptr<acc_t>(), ptr_or_null<acc_t>(gc_part), n, m, c.get<acc_t>());
  C10_CUDA_KERNEL_LAUNCH_CHECK();
}

// ---- mobius_matvec -----------------------------------------------------------------------------

template <typename scalar_t>
void matvec_fwd_launch(const Tensor& x2d, const Tensor& mx, Tensor& out, const CurvatureArg& c,
                       bool project) {
  auto p = make_policy<MatvecFwd<scalar_t>>(x2d.size(1), c, project);
  set_in(p.a, 0, x2d, x2d.size(1));
  p.b.d = mx.size(1);
  set_in(p.b, 0, mx, mx.size(1));
  set_out(p.b, 0, out);
  launch_rows(p, x2d.size(0));
}

template <typename scalar_t>
void matvec_bwd_launch(const Tensor& x2d, const Tensor& mx, const Tensor& g, Tensor& gxd,
                       Tensor& gmx, Tensor& gc_rows, const CurvatureArg& c, bool project) {
  auto p = make_policy<MatvecBwd<scalar_t>>(x2d.size(1), c, project);
  set_in(p.a, 0, x2d, x2d.size(1));
  set_out(p.a, 0, gxd);
  p.b.d = mx.size(1);
  set_in(p.b, 0, mx, mx.size(1));
  set_in(p.b, 1, g, g.size(1));
  set_out(p.b, 0, gmx);
  p.gc_rows = ptr_or_null<compute_t<scalar_t>>(gc_rows);
  launch_rows(p, x2d.size(0));
}

// x as (rows, in) in the compute type, contiguous.
Tensor matvec_rows(const Tensor& x) {
  const int64_t n = c10::multiply_integers(x.sizes().begin(), x.sizes().end() - 1);
  return x.reshape({n, x.size(-1)}).to(row_compute_type(x.scalar_type())).contiguous();
}

void check_matvec(const Tensor& m, const Tensor& x) {
  check_pair(x, m, "x", "m");
  TORCH_CHECK(m.dim() == 2 && m.size(1) == x.size(-1), "m must be (out, in) with in == x.shape[-1]",
              " (got m: ", m.sizes(), ", x: ", x.sizes(), ")");
}

}  // namespace

// ---- the ops ----------------------------------------------------------------------------------

Tensor mobius_add_cuda(const Tensor& x, const Tensor& y, const Tensor& c, bool project) {
  return binary_fwd<hyp::MobiusAdd>(x, y, c, project, "x", "y");
}
std::tuple<Tensor, Tensor, Tensor> mobius_add_backward_cuda(const Tensor& grad, const Tensor& x,
                                                            const Tensor& y, const Tensor& c,
                                                            bool project, bool needs_grad_c) {
  return binary_bwd<hyp::MobiusAdd>(grad, x, y, c, project, needs_grad_c, "x", "y");
}

Tensor expmap_cuda(const Tensor& x, const Tensor& u, const Tensor& c, bool project) {
  return binary_fwd<hyp::Expmap>(x, u, c, project, "x", "u");
}
std::tuple<Tensor, Tensor, Tensor> expmap_backward_cuda(const Tensor& grad, const Tensor& x,
                                                        const Tensor& u, const Tensor& c,
                                                        bool project, bool needs_grad_c) {
  return binary_bwd<hyp::Expmap>(grad, x, u, c, project, needs_grad_c, "x", "u");
}

Tensor logmap_cuda(const Tensor& x, const Tensor& y, const Tensor& c) {
  return binary_fwd<hyp::Logmap>(x, y, c, false, "x", "y");
}
std::tuple<Tensor, Tensor, Tensor> logmap_backward_cuda(const Tensor& grad, const Tensor& x,
                                                        const Tensor& y, const Tensor& c,
                                                        bool needs_grad_c) {
  return binary_bwd<hyp::Logmap>(grad, x, y, c, false, needs_grad_c, "x", "y");
}

Tensor project_cuda(const Tensor& x, const Tensor& c) {
  return unary_fwd<hyp::Project>(x, c, nullptr, true, "x");
}
std::tuple<Tensor, Tensor> project_backward_cuda(const Tensor& grad, const Tensor& x,
                                                 const Tensor& c, bool needs_grad_c) {
  auto [gx, gr, gc] = unary_bwd<hyp::Project>(grad, x, c, nullptr, true, needs_grad_c, "x");
  return {gx, gc};
}

Tensor expmap0_cuda(const Tensor& u, const Tensor& c, bool project) {
  return unary_fwd<hyp::Expmap0>(u, c, nullptr, project, "u");
}
std::tuple<Tensor, Tensor> expmap0_backward_cuda(const Tensor& grad, const Tensor& u,
                                                 const Tensor& c, bool project,
                                                 bool needs_grad_c) {
  auto [gu, gr, gc] = unary_bwd<hyp::Expmap0>(grad, u, c, nullptr, project, needs_grad_c, "u");
  return {gu, gc};
}

Tensor logmap0_cuda(const Tensor& y, const Tensor& c) {
  return unary_fwd<hyp::Logmap0>(y, c, nullptr, false, "y");
}
std::tuple<Tensor, Tensor> logmap0_backward_cuda(const Tensor& grad, const Tensor& y,
                                                 const Tensor& c, bool needs_grad_c) {
  auto [gy, gr, gc] = unary_bwd<hyp::Logmap0>(grad, y, c, nullptr, false, needs_grad_c, "y");
  return {gy, gc};
}

Tensor mobius_scalar_mul_cuda(const Tensor& r, const Tensor& x, const Tensor& c, bool project) {
  return unary_fwd<hyp::ScalarMul>(x, c, &r, project, "x");
}
std::tuple<Tensor, Tensor, Tensor> mobius_scalar_mul_backward_cuda(const Tensor& grad,
                                                                   const Tensor& r,
                                                                   const Tensor& x,
                                                                   const Tensor& c, bool project,
                                                                   bool needs_grad_c) {
  auto [gx, gr, gc] = unary_bwd<hyp::ScalarMul>(grad, x, c, &r, project, needs_grad_c, "x");
  return {gr, gx, gc};
}

Tensor dist_cuda(const Tensor& x, const Tensor& y, const Tensor& c) {
  check_pair(x, y, "x", "y");
  const CurvatureArg cv = curvature(c, x);
  const c10::cuda::CUDAGuard guard(x.device());
  const auto shape = broadcast_shape(x, y);
  Tensor out = empty_like_shape(x, rows_shape(shape));
  const int64_t d = shape.back();
  if (out.numel() == 0) return out;
  if (d == 0) return out.zero_();
  const RowView xv = row_view(x, shape), yv = row_view(y, shape);
  LFI_DISPATCH(x.scalar_type(), "dist_cuda", [&] {
    dist_fwd_launch<scalar_t>(xv, yv, out, d, cv);
  });
  return out;
}

std::tuple<Tensor, Tensor, Tensor> dist_backward_cuda(const Tensor& grad, const Tensor& x,
                                                      const Tensor& y, const Tensor& c,
                                                      bool needs_grad_c) {
  check_pair(x, y, "x", "y");
  const CurvatureArg cv = curvature(c, x);
  const c10::cuda::CUDAGuard guard(x.device());
  const auto shape = broadcast_shape(x, y);
  check_grad(grad, x, rows_shape(shape));
  Tensor gx = empty_like_shape(x, shape), gy = empty_like_shape(x, shape);
  const int64_t d = shape.back();
  if (gx.numel() == 0) return {gx, gy, at::zeros({}, c.options())};
  const RowView xv = row_view(x, shape), yv = row_view(y, shape);
  const Tensor g = grad.contiguous();
  Tensor gc_rows = gc_buffer(g.numel(), x, needs_grad_c);
  LFI_DISPATCH(x.scalar_type(), "dist_bwd_cuda", [&] {
    dist_bwd_launch<scalar_t>(g, xv, yv, gx, gy, gc_rows, d, cv);
  });
  return {gx, gy, grad_c(gc_rows, c, needs_grad_c)};
}

Tensor dist0_cuda(const Tensor& x, const Tensor& c) {
  check_vec(x, "x");
  const CurvatureArg cv = curvature(c, x);
  const c10::cuda::CUDAGuard guard(x.device());
  Tensor out = empty_like_shape(x, rows_shape(x.sizes().vec()));
  const int64_t d = x.size(-1);
  if (out.numel() == 0) return out;
  if (d == 0) return out.zero_();
  const RowView xv = row_view(x, x.sizes());
  LFI_DISPATCH(x.scalar_type(), "dist0_cuda", [&] {
    dist0_fwd_launch<scalar_t>(xv, out, d, cv);
  });
  return out;
}

std::tuple<Tensor, Tensor> dist0_backward_cuda(const Tensor& grad, const Tensor& x,
                                               const Tensor& c, bool needs_grad_c) {
  check_vec(x, "x");
  const CurvatureArg cv = curvature(c, x);
  const c10::cuda::CUDAGuard guard(x.device());
  check_grad(grad, x, rows_shape(x.sizes().vec()));
  Tensor gx = empty_like_shape(x, x.sizes());
  if (gx.numel() == 0) return {gx, at::zeros({}, c.options())};
  const RowView xv = row_view(x, x.sizes());
  const Tensor g = grad.contiguous();
  Tensor gc_rows = gc_buffer(g.numel(), x, needs_grad_c);
  LFI_DISPATCH(x.scalar_type(), "dist0_bwd_cuda", [&] {
    dist0_bwd_launch<scalar_t>(g, xv, gx, gc_rows, x.size(-1), cv);
  });
  return {gx, grad_c(gc_rows, c, needs_grad_c)};
}

Tensor pairwise_dist_cuda(const Tensor& x, const Tensor& y, const Tensor& c) {
  check_matrix_pair(x, y);
  const CurvatureArg cv = curvature(c, x);
  const c10::cuda::CUDAGuard guard(x.device());
  Tensor out = at::empty({x.size(0), y.size(0)}, x.options());
  if (out.numel() == 0) return out;
  auto [x2, y2, xy] = gram(x, y);
  LFI_DISPATCH(x.scalar_type(), "pairwise_dist_cuda", [&] {
    pair_dist_fwd_launch<scalar_t>(x2, y2, xy, out, cv);
  });
  return out;
}

std::tuple<Tensor, Tensor, Tensor> pairwise_dist_backward_cuda(const Tensor& grad, const Tensor& x,
                                                               const Tensor& y, const Tensor& c,
                                                               bool needs_grad_c) {
  check_matrix_pair(x, y);
  const CurvatureArg cv = curvature(c, x);
  const c10::cuda::CUDAGuard guard(x.device());
  const int64_t n = x.size(0), m = y.size(0);
  check_grad(grad, x, {n, m});
  if (n == 0 || m == 0 || x.size(1) == 0) {
    return {at::zeros_like(x), at::zeros_like(y), at::zeros({}, c.options())};
  }
  auto [x2, y2, xy] = gram(x, y);
  const auto acc_opts = x2.options();
  // Row tiles of kPairRows rows; column blocks enough to fill the device, each looping over the
  // columns kBlock * gridDim.y apart.
  const int64_t row_tiles = (n + kPairRows - 1) / kPairRows;
  TORCH_CHECK(row_tiles <= std::numeric_limits<int32_t>::max(),
              "pairwise_dist: x has too many rows");
  const int64_t col_blocks = std::clamp<int64_t>(
      (2048 + row_tiles - 1) / row_tiles, 1, std::min<int64_t>((m + kBlock - 1) / kBlock, 65535));
  Tensor gxy = at::empty({n, m}, acc_opts);
  Tensor gx2_part = at::empty({col_blocks, n}, acc_opts);
  Tensor gy2_part = at::empty({row_tiles, m}, acc_opts);
  Tensor gc_part = needs_grad_c ? at::empty({row_tiles * col_blocks}, acc_opts) : Tensor();
  const Tensor g = grad.contiguous();
  LFI_DISPATCH(x.scalar_type(), "pairwise_dist_bwd_cuda", [&] {
    pair_dist_bwd_launch<scalar_t>(g, x2, y2, xy, gxy, gx2_part, gy2_part, gc_part, cv);
  });
  const auto acc = x2.scalar_type();
  const Tensor xa = x.to(acc), ya = y.to(acc);
  Tensor gx = at::matmul(gxy, ya).add_(xa * (2 * gx2_part.sum(0)).unsqueeze(1));
  Tensor gy = at::matmul(gxy.t(), xa).add_(ya * (2 * gy2_part.sum(0)).unsqueeze(1));
  return {gx.to(x.scalar_type()), gy.to(x.scalar_type()), grad_c(gc_part, c, needs_grad_c)};
}

// mobius_matvec: mx = x m^T by ATen's GEMM (in the compute type), then the row op on (x, mx).
Tensor mobius_matvec_cuda(const Tensor& m, const Tensor& x, const Tensor& c, bool project) {
  check_matvec(m, x);
  const CurvatureArg cv = curvature(c, x);
  const c10::cuda::CUDAGuard guard(x.device());
  auto shape = x.sizes().vec();
  shape.back() = m.size(0);
  Tensor out = empty_like_shape(x, shape);
  if (out.numel() == 0) return out;
  const Tensor x2d = matvec_rows(x);
  const Tensor mx = at::matmul(x2d, m.to(x2d.scalar_type()).t()).contiguous();
  LFI_DISPATCH(x.scalar_type(), "mobius_matvec_cuda", [&] {
    matvec_fwd_launch<scalar_t>(x2d, mx, out, cv, project);
  });
  return out;
}

std::tuple<Tensor, Tensor, Tensor> mobius_matvec_backward_cuda(const Tensor& grad, const Tensor& m,
                                                               const Tensor& x, const Tensor& c,
                                                               bool project, bool needs_grad_c) {
  check_matvec(m, x);
  const CurvatureArg cv = curvature(c, x);
  const c10::cuda::CUDAGuard guard(x.device());
  auto shape = x.sizes().vec();
  shape.back() = m.size(0);
  check_grad(grad, x, shape);
  const Tensor x2d = matvec_rows(x);
  const int64_t n = x2d.size(0), dout = m.size(0);
  const Tensor ma = m.to(x2d.scalar_type());
  const Tensor mx = at::matmul(x2d, ma.t()).contiguous();
  const Tensor g = grad.reshape({n, dout}).to(x2d.scalar_type()).contiguous();
  // grad_mx = f g + 2 L_m2 mx ; grad_x (direct) = 2 L_x2 x ; then grad_x += grad_mx m.
  Tensor gmx = at::empty({n, dout}, mx.options()), gxd = at::empty_like(x2d);
  Tensor gc_rows = gc_buffer(n, x, needs_grad_c);
  LFI_DISPATCH(x.scalar_type(), "mobius_matvec_bwd_cuda", [&] {
    matvec_bwd_launch<scalar_t>(x2d, mx, g, gxd, gmx, gc_rows, cv, project);
  });
  Tensor gx = gxd.add_(at::matmul(gmx, ma)).to(x.scalar_type()).reshape(x.sizes());
  Tensor gm = at::matmul(gmx.t(), x2d).to(m.scalar_type());
  return {gm, gx, grad_c(gc_rows, c, needs_grad_c)};
}

TORCH_LIBRARY_IMPL(lfi_fast, CUDA, m) {
  m.impl("mobius_add", &mobius_add_cuda);
  m.impl("mobius_add_backward", &mobius_add_backward_cuda);
  m.impl("expmap", &expmap_cuda);
  m.impl("expmap_backward", &expmap_backward_cuda);
  m.impl("logmap", &logmap_cuda);
  m.impl("logmap_backward", &logmap_backward_cuda);
  m.impl("project", &project_cuda);
  m.impl("project_backward", &project_backward_cuda);
  m.impl("expmap0", &expmap0_cuda);
  m.impl("expmap0_backward", &expmap0_backward_cuda);
  m.impl("logmap0", &logmap0_cuda);
  m.impl("logmap0_backward", &logmap0_backward_cuda);
  m.impl("mobius_scalar_mul", &mobius_scalar_mul_cuda);
  m.impl("mobius_scalar_mul_backward", &mobius_scalar_mul_backward_cuda);
  m.impl("dist", &dist_cuda);
  m.impl("dist_backward", &dist_backward_cuda);
  m.impl("dist0", &dist0_cuda);
  m.impl("dist0_backward", &dist0_backward_cuda);
  m.impl("pairwise_dist", &pairwise_dist_cuda);
  m.impl("pairwise_dist_backward", &pairwise_dist_backward_cuda);
  m.impl("mobius_matvec", &mobius_matvec_cuda);
  m.impl("mobius_matvec_backward", &mobius_matvec_backward_cuda);
}

}  // namespace lfi_fast
