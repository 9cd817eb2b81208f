// Declarations of every C++ entry point of lfi_fast, one block per op family.
//
// The schemas live in bindings.cpp; each backend file (cpu/<family>.cpp, cuda/<family>.cu)
// defines the functions declared here and registers them with TORCH_LIBRARY_IMPL.
// Conventions shared by every op:
//   * c is a 0-dim floating tensor: on the CPU for CPU inputs; on the CPU (read on the host) or
//     on the same CUDA device (read by the kernel, never synchronised) for CUDA inputs.
//   * x and y broadcast like torch (and geoopt); the reduced dimension is the last one, and the
//     Python layer moves `dim` there. Outputs are contiguous in the broadcast shape.
//   * Backward ops return gradients in the broadcast shape; the Python autograd wrapper sums them
//     down to the input shapes.
#pragma once

#include <ATen/core/Tensor.h>

#include <tuple>

namespace lfi_fast {

// ---- hyperbolic: Poincaré ball of curvature -c ------------------------------------------------
// Forward ops return the result; <op>_backward returns the gradients of the tensor inputs, in
// the order of the forward's arguments (broadcast shapes), then of c. Row-wise ops with a scalar
// result (dist, dist0) return the rows' shape (..., ) ; pairwise_dist (N, D) x (M, D) -> (N, M).
at::Tensor mobius_add_cpu(const at::Tensor& x, const at::Tensor& y, const at::Tensor& c, bool project);
std::tuple<at::Tensor, at::Tensor, at::Tensor> mobius_add_backward_cpu(const at::Tensor& grad, const at::Tensor& x, const at::Tensor& y, const at::Tensor& c, bool project, bool needs_grad_c);
at::Tensor expmap_cpu(const at::Tensor& x, const at::Tensor& u, const at::Tensor& c, bool project);
std::tuple<at::Tensor, at::Tensor, at::Tensor> expmap_backward_cpu(const at::Tensor& grad, const at::Tensor& x, const at::Tensor& u, const at::Tensor& c, bool project, bool needs_grad_c);
at::Tensor logmap_cpu(const at::Tensor& x, const at::Tensor& y, const at::Tensor& c);
std::tuple<at::Tensor, at::Tensor, at::Tensor> logmap_backward_cpu(const at::Tensor& grad, const at::Tensor& x, const at::Tensor& y, const at::Tensor& c, bool needs_grad_c);
at::Tensor project_cpu(const at::Tensor& x, const at::Tensor& c);
std::tuple<at::Tensor, at::Tensor> project_backward_cpu(const at::Tensor& grad, const at::Tensor& x, const at::Tensor& c, bool needs_grad_c);
at::Tensor expmap0_cpu(const at::Tensor& u, const at::Tensor& c, bool project);
std::tuple<at::Tensor, at::Tensor> expmap0_backward_cpu(const at::Tensor& grad, const at::Tensor& u, const at::Tensor& c, bool project, bool needs_grad_c);
at::Tensor logmap0_cpu(const at::Tensor& y, const at::Tensor& c);
std::tuple<at::Tensor, at::Tensor> logmap0_backward_cpu(const at::Tensor& grad, const at::Tensor& y, const at::Tensor& c, bool needs_grad_c);
at::Tensor mobius_scalar_mul_cpu(const at::Tensor& r, const at::Tensor& x, const at::Tensor& c, bool project);
std::tuple<at::Tensor, at::Tensor, at::Tensor> mobius_scalar_mul_backward_cpu(const at::Tensor& grad, const at::Tensor& r, const at::Tensor& x, const at::Tensor& c, bool project, bool needs_grad_c);
at::Tensor mobius_matvec_cpu(const at::Tensor& m, const at::Tensor& x, const at::Tensor& c, bool project);
std::tuple<at::Tensor, at::Tensor, at::Tensor> mobius_matvec_backward_cpu(const at::Tensor& grad, const at::Tensor& m, const at::Tensor& x, const at::Tensor& c, bool project, bool needs_grad_c);
at::Tensor dist_cpu(const at::Tensor& x, const at::Tensor& y, const at::Tensor& c);
std::tuple<at::Tensor, at::Tensor, at::Tensor> dist_backward_cpu(const at::Tensor& grad, const at::Tensor& x, const at::Tensor& y, const at::Tensor& c, bool needs_grad_c);
at::Tensor dist0_cpu(const at::Tensor& x, const at::Tensor& c);
std::tuple<at::Tensor, at::Tensor> dist0_backward_cpu(const at::Tensor& grad, const at::Tensor& x, const at::Tensor& c, bool needs_grad_c);
at::Tensor pairwise_dist_cpu(const at::Tensor& x, const at::Tensor& y, const at::Tensor& c);
std::tuple<at::Tensor, at::Tensor, at::Tensor> pairwise_dist_backward_cpu(const at::Tensor& grad, const at::Tensor& x, const at::Tensor& y, const at::Tensor& c, bool needs_grad_c);

#ifdef LFI_FAST_WITH_CUDA
at::Tensor mobius_add_cuda(const at::Tensor& x, const at::Tensor& y, const at::Tensor& c, bool project);
std::tuple<at::Tensor, at::Tensor, at::Tensor> mobius_add_backward_cuda(const at::Tensor& grad, const at::Tensor& x, const at::Tensor& y, const at::Tensor& c, bool project, bool needs_grad_c);
at::Tensor expmap_cuda(const at::Tensor& x, const at::Tensor& u, const at::Tensor& c, bool project);
std::tuple<at::Tensor, at::Tensor, at::Tensor> expmap_backward_cuda(const at::Tensor& grad, const at::Tensor& x, const at::Tensor& u, const at::Tensor& c, bool project, bool needs_grad_c);
at::Tensor logmap_cuda(const at::Tensor& x, const at::Tensor& y, const at::Tensor& c);
std::tuple<at::Tensor, at::Tensor, at::Tensor> logmap_backward_cuda(const at::Tensor& grad, const at::Tensor& x, const at::Tensor& y, const at::Tensor& c, bool needs_grad_c);
at::Tensor project_cuda(const at::Tensor& x, const at::Tensor& c);
std::tuple<at::Tensor, at::Tensor> project_backward_cuda(const at::Tensor& grad, const at::Tensor& x, const at::Tensor& c, bool needs_grad_c);
at::Tensor expmap0_cuda(const at::Tensor& u, const at::Tensor& c, bool project);
std::tuple<at::Tensor, at::Tensor> expmap0_backward_cuda(const at::Tensor& grad, const at::Tensor& u, const at::Tensor& c, bool project, bool needs_grad_c);
at::Tensor logmap0_cuda(const at::Tensor& y, const at::Tensor& c);
std::tuple<at::Tensor, at::Tensor> logmap0_backward_cuda(const at::Tensor& grad, const at::Tensor& y, const at::Tensor& c, bool needs_grad_c);
at::Tensor mobius_scalar_mul_cuda(const at::Tensor& r, const at::Tensor& x, const at::Tensor& c, bool project);
std::tuple<at::Tensor, at::Tensor, at::Tensor> mobius_scalar_mul_backward_cuda(const at::Tensor& grad, const at::Tensor& r, const at::Tensor& x, const at::Tensor& c, bool project, bool needs_grad_c);
at::Tensor mobius_matvec_cuda(const at::Tensor& m, const at::Tensor& x, const at::Tensor& c, bool project);
std::tuple<at::Tensor, at::Tensor, at::Tensor> mobius_matvec_backward_cuda(const at::Tensor& grad, const at::Tensor& m, const at::Tensor& x, const at::Tensor& c, bool project, bool needs_grad_c);
at::Tensor dist_cuda(const at::Tensor& x, const at::Tensor& y, const at::Tensor& c);
std::tuple<at::Tensor, at::Tensor, at::Tensor> dist_backward_cuda(const at::Tensor& grad, const at::Tensor& x, const at::Tensor& y, const at::Tensor& c, bool needs_grad_c);
at::Tensor dist0_cuda(const at::Tensor& x, const at::Tensor& c);
std::tuple<at::Tensor, at::Tensor> dist0_backward_cuda(const at::Tensor& grad, const at::Tensor& x, const at::Tensor& c, bool needs_grad_c);
at::Tensor pairwise_dist_cuda(const at::Tensor& x, const at::Tensor& y, const at::Tensor& c);
std::tuple<at::Tensor, at::Tensor, at::Tensor> pairwise_dist_backward_cuda(const at::Tensor& grad, const at::Tensor& x, const at::Tensor& y, const at::Tensor& c, bool needs_grad_c);
#endif

// ---- vq: nearest-codebook search, straight-through quantiser, EMA codebook update ---------------
// x (N, D), codebook (K, D), metric "l2" | "cosine" | "poincare", c a 0-dim curvature tensor.
// vq_nearest returns (indices int64 (N, k), distances (N, k) in x's dtype), sorted by distance.
// vq_quantize returns (q = codebook[indices], loss); vq_quantize_backward (grad_x, grad_codebook).
// vq_ema_update returns new (counts, sums, codebook); deterministic on every backend.
#define LFI_VQ_DECLARE(dev)                                                                        \
  std::tuple<at::Tensor, at::Tensor> vq_nearest_##dev(const at::Tensor& x, const at::Tensor& codebook, \
                                                      c10::string_view metric, const at::Tensor& c, \
                                                      int64_t k);                                 \
  std::tuple<at::Tensor, at::Tensor> vq_quantize_##dev(const at::Tensor& x, const at::Tensor& codebook, \
                                                       const at::Tensor& indices, double beta);  \
  std::tuple<at::Tensor, at::Tensor> vq_quantize_backward_##dev(                                 \
      const at::Tensor& grad_q, const at::Tensor& grad_loss, const at::Tensor& x,                \
      const at::Tensor& codebook, const at::Tensor& indices, double beta);                      \
  std::tuple<at::Tensor, at::Tensor, at::Tensor> vq_ema_update_##dev(                            \
      const at::Tensor& x, const at::Tensor& indices, const at::Tensor& counts,                  \
      const at::Tensor& sums, double decay, double eps);
LFI_VQ_DECLARE(cpu)
#ifdef LFI_FAST_WITH_CUDA
LFI_VQ_DECLARE(cuda)
#endif
#undef LFI_VQ_DECLARE

}  // namespace lfi_fast
