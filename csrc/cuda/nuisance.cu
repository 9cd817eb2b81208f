// CUDA kernels of the nuisance family; the semantics are those of cpu/nuisance.cpp and
// lfi_fast/reference/nuisance.py.
//
// sample_linear: the shared part hs = mu_s · W_s^T + b is one cuBLAS GEMM over the B inputs. One
// block then owns a tile of rows (samples): its threads draw the tile's noise from the Philox
// stream (one counter, four normals, per thread) into shared memory, apply the posterior's
// mu_n + sd * eps, and compute every (row, h) of the tile as hs[b, h] + sum_j z[row, j] W_n^T[j, h]
// (W_n^T read coalesced along h; Dn is small), applying the activation before the store. The
// noise never reaches global memory. The backward runs the same tile kernel on the regenerated
// noise to produce grad * act'(pre) without storing pre, and leaves the rest to GEMMs and sums.
// Half types compute in float32.
#include "cuda_common.cuh"
#include "../nuisance_math.h"
#include "../ops.h"

#include <ATen/ATen.h>
#include <ATen/Dispatch.h>
#include <ATen/OpMathType.h>
#include <ATen/cuda/CUDAContext.h>
#include <c10/cuda/CUDAGuard.h>
#include <torch/library.h>

#include <algorithm>
#include <cstdint>

namespace lfi_fast {
namespace {

using at::Tensor;
namespace nu = nuisance;
using nu::compute_type;
using nu::per_input;
using nu::Prepared;
using nu::prepare;
using nu::shared_part;

constexpr int kBlock = 256;



// The noise source of a tile's rows: the stream (eps == nullptr) or an explicit eps (rows, dn);
// then z_n = eps or mu_n + sd * eps (posterior).
template <typename T>
struct NoiseArgs {
  uint64_t seed, offset;
  int64_t dn, dn4, d, ds, n, rows;
  const T* eps;
  bool posterior;
  const T* mu;  // (B, D)
  const T* sd;  // (B, dn)
};

// Fill z[i * dn + j] for rows r0 .. r0 + tile - 1 (shared memory), by the whole block.
template <typename T>
__device__ void fill_tile(const NoiseArgs<T>& a, int64_t r0, int tile, T* z) {
  if (a.eps == nullptr) {
    const int per_row = static_cast<int>(a.dn4 / 4);
    for (int t = threadIdx.x; t < tile * per_row; t += blockDim.x) {
      const int i = t / per_row, k = t % per_row;
      const int64_t r = r0 + i;
      if (r >= a.rows) continue;
      float v[4];
      nu::normals4(a.seed, a.offset + static_cast<uint64_t>(r) * per_row + k, v);
      for (int l = 0; l < 4; ++l) {
        const int64_t j = 4 * k + l;
        if (j < a.dn) z[i * a.dn + j] = static_cast<T>(v[l]);
      }
    }
  } else {
    for (int t = threadIdx.x; t < tile * a.dn; t += blockDim.x) {
      const int64_t r = r0 + t / a.dn;
      if (r < a.rows) z[t] = a.eps[r * a.dn + t % a.dn];
    }
  }
  __syncthreads();
  if (a.posterior) {
    for (int t = threadIdx.x; t < tile * a.dn; t += blockDim.x) {
      const int64_t r = r0 + t / a.dn, j = t % a.dn;
      if (r < a.rows) {
        const int64_t b = r / a.n;
        z[t] = a.mu[b * a.d + a.ds + j] + a.sd[b * a.dn + j] * z[t];
      }
    }
    __syncthreads();
  }
}

// out[r, h] = act(hs[b, h] + z[r] · wnT[:, h]) (grad == nullptr), or
// gpre[r, h] = grad[r, h] * act'(pre) (the backward).
template <typename scalar_t, typename T>
__global__ void linear_tile_kernel(NoiseArgs<T> a, int tile, const T* __restrict__ hs,
                                   const T* __restrict__ wnT, int64_t h, int act, T slope,
                                   scalar_t* __restrict__ out, const T* __restrict__ grad,
                                   T* __restrict__ gpre) {
  extern __shared__ unsigned char smem_raw[];
  T* z = reinterpret_cast<T*>(smem_raw);
  const int64_t r0 = static_cast<int64_t>(blockIdx.x) * tile;
  fill_tile(a, r0, tile, z);
  for (int64_t idx = threadIdx.x; idx < static_cast<int64_t>(tile) * h; idx += blockDim.x) {
    const int i = static_cast<int>(idx / h);
    const int64_t col = idx % h, r = r0 + i;
    if (r >= a.rows) break;
    T acc = hs[(r / a.n) * h + col];
    const T* zr = z + i * a.dn;
    for (int64_t j = 0; j < a.dn; ++j) acc += zr[j] * wnT[j * h + col];
    if (grad == nullptr) {
      out[r * h + col] = static_cast<scalar_t>(nu::activate<T>(acc, act, slope));
    } else {
      gpre[r * h + col] = grad[r * h + col] * nu::activate_grad<T>(acc, act, slope);
    }
  }
}

// z = [mu_s, z_n] (sample), or eps (rows, dn) alone (the backward's regeneration: out_d == dn,
// out_ds == 0, no posterior transform).
template <typename scalar_t, typename T>
__global__ void sample_tile_kernel(NoiseArgs<T> a, int tile, int64_t out_d, int64_t out_ds,
                                   scalar_t* __restrict__ out) {
  extern __shared__ unsigned char smem_raw[];
  T* z = reinterpret_cast<T*>(smem_raw);
  const int64_t r0 = static_cast<int64_t>(blockIdx.x) * tile;
  fill_tile(a, r0, tile, z);
  for (int64_t idx = threadIdx.x; idx < static_cast<int64_t>(tile) * out_d; idx += blockDim.x) {
    const int i = static_cast<int>(idx / out_d);
    const int64_t j = idx % out_d, r = r0 + i;
    if (r >= a.rows) break;
    const T v = j < out_ds ? a.mu[(r / a.n) * a.d + j] : z[i * a.dn + (j - out_ds)];
    out[r * out_d + j] = static_cast<scalar_t>(v);
  }
}


template <typename T>
NoiseArgs<T> noise_args(const Prepared& p, const Tensor& eps, int64_t d, int64_t ds, int64_t n,
                        bool posterior, int64_t seed, int64_t offset) {
  const int64_t dn = d - ds;
  return NoiseArgs<T>{static_cast<uint64_t>(seed), static_cast<uint64_t>(offset), dn,
                      nu::padded_width(dn), d, ds, n, p.mu.size(0) * n,
                      eps.defined() ? eps.data_ptr<T>() : nullptr, posterior, p.mu.data_ptr<T>(),
                      posterior ? p.sd.data_ptr<T>() : nullptr};
}

// Rows per block: 16, fewer when the tile's noise would not fit in 32 KiB of shared memory.
int tile_rows(int64_t dn, size_t elem) {
  const int64_t fit = std::max<int64_t>(1, (32 * 1024) / std::max<int64_t>(1, dn * elem));
  return static_cast<int>(std::min<int64_t>(16, fit));
}

void check_cuda(const Tensor& mu, int64_t ds) {
  TORCH_CHECK(mu.is_cuda(), "mu must be a CUDA tensor (got ", mu.device(), ")");
  // one row's noise must fit in the block's shared memory (48 KiB without opting in)
  TORCH_CHECK((mu.size(1) - ds) * 8 <= 48 * 1024, "D - supervised_dims must be at most 6144 on CUDA (got ",
              mu.size(1) - ds, ")");
}

// eps (rows, dn) in the compute dtype, regenerated from the stream (or the explicit noise).
Tensor regenerate_eps(const Prepared& p, int64_t d, int64_t ds, int64_t n, int64_t seed,
                      int64_t offset) {
  if (p.noise.defined()) return p.noise;
  const int64_t rows = p.mu.size(0) * n, dn = d - ds;
  Tensor eps = at::empty({rows, dn}, p.mu.options());
  if (rows == 0) return eps;
  AT_DISPATCH_FLOATING_TYPES(p.mu.scalar_type(), "nuisance_eps_cuda", [&] {
    const auto a = noise_args<scalar_t>(p, Tensor(), d, ds, n, false, seed, offset);
    const int tile = tile_rows(dn, sizeof(scalar_t));
    const int64_t blocks = (rows + tile - 1) / tile;
    sample_tile_kernel<scalar_t, scalar_t><<<static_cast<unsigned>(blocks), kBlock,
                                             tile * dn * sizeof(scalar_t), current_stream()>>>(
        a, tile, dn, 0, eps.data_ptr<scalar_t>());
    C10_CUDA_KERNEL_LAUNCH_CHECK();
  });
  return eps;
}



}  // namespace

Tensor nuisance_sample_cuda(const Tensor& mu, const Tensor& logvar, int64_t ds, int64_t n,
                            bool posterior, int64_t seed, int64_t offset,
                            const c10::optional<Tensor>& noise) {
  nu::check_latent(mu, logvar, ds, n, seed, offset, noise);
  check_cuda(mu, ds);
  const c10::cuda::CUDAGuard guard(mu.device());
  const int64_t b = mu.size(0), d = mu.size(1), dn = d - ds, rows = b * n;
  Tensor out = at::empty({rows, d}, mu.options());
  if (rows == 0) return out;
  const Prepared p = prepare(mu, logvar, ds, posterior, noise);
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, mu.scalar_type(), "nuisance_sample_cuda", [&] {
    using T = at::opmath_type<scalar_t>;
    const auto a = noise_args<T>(p, p.noise, d, ds, n, posterior, seed, offset);
    const int tile = tile_rows(dn, sizeof(T));
    const int64_t blocks = (rows + tile - 1) / tile;
    sample_tile_kernel<scalar_t, T><<<static_cast<unsigned>(blocks), kBlock, tile * dn * sizeof(T),
                                      current_stream()>>>(a, tile, d, ds, out.data_ptr<scalar_t>());
    C10_CUDA_KERNEL_LAUNCH_CHECK();
  });
  return out;
}

std::tuple<Tensor, Tensor> nuisance_sample_backward_cuda(const Tensor& grad, const Tensor& mu,
                                                         const Tensor& logvar, int64_t ds, int64_t n,
                                                         bool posterior, int64_t seed, int64_t offset,
                                                         const c10::optional<Tensor>& noise) {
  nu::check_latent(mu, logvar, ds, n, seed, offset, noise);
  check_cuda(mu, ds);
  const c10::cuda::CUDAGuard guard(mu.device());
  const int64_t d = mu.size(1);
  return nu::sample_backward(grad, mu, logvar, ds, n, posterior, noise, [&](const Prepared& q) {
    return regenerate_eps(q, d, ds, n, seed, offset);
  });
}

Tensor nuisance_sample_linear_cuda(const Tensor& mu, const Tensor& logvar, int64_t ds, int64_t n,
                                   const Tensor& weight, const c10::optional<Tensor>& bias,
                                   c10::string_view activation, double negative_slope,
                                   bool posterior, int64_t seed, int64_t offset,
                                   const c10::optional<Tensor>& noise) {
  nu::check_latent(mu, logvar, ds, n, seed, offset, noise);
  nu::check_layer(mu, weight, bias);
  check_cuda(mu, ds);
  const c10::cuda::CUDAGuard guard(mu.device());
  const int act = nu::parse_activation(std::string(activation));
  const int64_t b = mu.size(0), d = mu.size(1), dn = d - ds, rows = b * n, h = weight.size(0);
  Tensor out = at::empty({rows, h}, mu.options());
  if (rows == 0 || h == 0) return out;
  const Prepared p = prepare(mu, logvar, ds, posterior, noise);
  const auto [hs, wnT] = shared_part(p.mu, weight, bias, ds);
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, mu.scalar_type(), "nuisance_sample_linear_cuda", [&] {
    using T = at::opmath_type<scalar_t>;
    const auto a = noise_args<T>(p, p.noise, d, ds, n, posterior, seed, offset);
    const int tile = tile_rows(dn, sizeof(T));
    const int64_t blocks = (rows + tile - 1) / tile;
    linear_tile_kernel<scalar_t, T><<<static_cast<unsigned>(blocks), kBlock, tile * dn * sizeof(T),
                                      current_stream()>>>(
        a, tile, hs.data_ptr<T>(), wnT.data_ptr<T>(), h, act, static_cast<T>(negative_slope),
        out.data_ptr<scalar_t>(), nullptr, nullptr);
    C10_CUDA_KERNEL_LAUNCH_CHECK();
  });
  return out;
}

std::tuple<Tensor, Tensor, Tensor, Tensor> nuisance_sample_linear_backward_cuda(
    const Tensor& grad, const Tensor& mu, const Tensor& logvar, int64_t ds, int64_t n,
    const Tensor& weight, const c10::optional<Tensor>& bias, c10::string_view activation,
    double negative_slope, bool posterior, int64_t seed, int64_t offset,
    const c10::optional<Tensor>& noise) {
  nu::check_latent(mu, logvar, ds, n, seed, offset, noise);
  nu::check_layer(mu, weight, bias);
  check_cuda(mu, ds);
  const c10::cuda::CUDAGuard guard(mu.device());
  const int act = nu::parse_activation(std::string(activation));
  const int64_t b = mu.size(0), d = mu.size(1), dn = d - ds, rows = b * n, h = weight.size(0);
  nu::check_linear_grad(grad, rows, h);
  const auto acc = compute_type(mu.scalar_type());
  const Prepared p = prepare(mu, logvar, ds, posterior, noise);
  const Tensor eps = regenerate_eps(p, d, ds, n, seed, offset);
  const Tensor zn = nu::latent_nuisance(eps, p, n, ds, posterior);
  const auto [hs, wnT] = shared_part(p.mu, weight, bias, ds);
  const Tensor g = grad.to(acc).contiguous();
  Tensor gpre = act == nu::kNone ? g : at::empty({rows, h}, g.options());
  if (act != nu::kNone && rows > 0 && h > 0) {
    AT_DISPATCH_FLOATING_TYPES(acc, "nuisance_sample_linear_bwd_cuda", [&] {
      using T = scalar_t;
      // the tile kernel on eps with the posterior transform: pre-activations of the forward
      const auto a = noise_args<T>(p, eps, d, ds, n, posterior, seed, offset);
      const int tile = tile_rows(dn, sizeof(T));
      const int64_t blocks = (rows + tile - 1) / tile;
      linear_tile_kernel<T, T><<<static_cast<unsigned>(blocks), kBlock, tile * dn * sizeof(T),
                                 current_stream()>>>(
          a, tile, hs.data_ptr<T>(), wnT.data_ptr<T>(), h, act, static_cast<T>(negative_slope),
          nullptr, g.data_ptr<T>(), gpre.data_ptr<T>());
      C10_CUDA_KERNEL_LAUNCH_CHECK();
    });
  }
  return nu::linear_backward_from_gpre(gpre, eps, zn, p, weight, n, ds, posterior, mu.scalar_type());
}

TORCH_LIBRARY_IMPL(lfi_fast, CUDA, m) {
  m.impl("nuisance_sample", &nuisance_sample_cuda);
  m.impl("nuisance_sample_backward", &nuisance_sample_backward_cuda);
  m.impl("nuisance_sample_linear", &nuisance_sample_linear_cuda);
  m.impl("nuisance_sample_linear_backward", &nuisance_sample_linear_backward_cuda);
}

}  // namespace lfi_fast
