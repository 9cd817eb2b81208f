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

#include <optional>
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

// ---- gumbel: Gumbel-softmax sampling with forced rows; single-variable interventions ------------
// logits (rows, K); mask/targets (rows,) or none; noise (rows, K) or none (then Philox (seed,
// offset)). The backward returns the logits' gradient (none for forced rows).
at::Tensor gumbel_softmax_cpu(const at::Tensor& logits, const std::optional<at::Tensor>& mask, const std::optional<at::Tensor>& targets, const std::optional<at::Tensor>& noise, double tau, bool hard, int64_t seed, int64_t offset);
at::Tensor gumbel_softmax_backward_cpu(const at::Tensor& grad, const at::Tensor& logits, const at::Tensor& out, const std::optional<at::Tensor>& mask, const std::optional<at::Tensor>& noise, double tau, bool hard, int64_t seed, int64_t offset);
at::Tensor single_interventions_cpu(const at::Tensor& codes, int64_t num_categories);
at::Tensor single_intervention_one_hot_cpu(const at::Tensor& codes, int64_t num_categories, at::ScalarType dtype);
#ifdef LFI_FAST_WITH_CUDA
at::Tensor gumbel_softmax_cuda(const at::Tensor& logits, const std::optional<at::Tensor>& mask, const std::optional<at::Tensor>& targets, const std::optional<at::Tensor>& noise, double tau, bool hard, int64_t seed, int64_t offset);
at::Tensor gumbel_softmax_backward_cuda(const at::Tensor& grad, const at::Tensor& logits, const at::Tensor& out, const std::optional<at::Tensor>& mask, const std::optional<at::Tensor>& noise, double tau, bool hard, int64_t seed, int64_t offset);
at::Tensor single_interventions_cuda(const at::Tensor& codes, int64_t num_categories);
at::Tensor single_intervention_one_hot_cuda(const at::Tensor& codes, int64_t num_categories, at::ScalarType dtype);
#endif

}  // namespace lfi_fast
