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

// ---- hyperbolic: Poincaré ball of curvature -c --------------------------------------------------
at::Tensor mobius_add_cpu(const at::Tensor& x, const at::Tensor& y, const at::Tensor& c,
                          bool project);
std::tuple<at::Tensor, at::Tensor, at::Tensor> mobius_add_backward_cpu(
    const at::Tensor& grad, const at::Tensor& x, const at::Tensor& y, const at::Tensor& c,
    bool project, bool needs_grad_c);

#ifdef LFI_FAST_WITH_CUDA
at::Tensor mobius_add_cuda(const at::Tensor& x, const at::Tensor& y, const at::Tensor& c,
                           bool project);
std::tuple<at::Tensor, at::Tensor, at::Tensor> mobius_add_backward_cuda(
    const at::Tensor& grad, const at::Tensor& x, const at::Tensor& y, const at::Tensor& c,
    bool project, bool needs_grad_c);
#endif

}  // namespace lfi_fast
