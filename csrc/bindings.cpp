// Every op schema of lfi_fast, in one place, and the _C Python module (build_info()).
// The kernels register their implementations next to their code (cpu/*.cpp, cuda/*.cu); fake
// (meta) kernels and autograd are registered from Python (lfi_fast/ops/).
#include <torch/extension.h>

#include "ops.h"

#ifdef _OPENMP
#include <omp.h>
#endif
#ifdef LFI_FAST_WITH_CUDA
#include <cuda_runtime_api.h>  // CUDART_VERSION
#endif

#include <string>

#ifndef LFI_FAST_CUDA_ARCHS
#define LFI_FAST_CUDA_ARCHS ""
#endif

TORCH_LIBRARY(lfi_fast, m) {
  // ---- hyperbolic (Poincaré ball of curvature -c; c is a 0-dim tensor) ----
  // <op>_backward(grad, <op's tensor args>, c, <op's flags>, bool needs_grad_c) returns the
  // gradients of the op's tensor arguments in order, then of c.
  m.def("mobius_add(Tensor x, Tensor y, Tensor c, bool project) -> Tensor");
  m.def("mobius_add_backward(Tensor grad, Tensor x, Tensor y, Tensor c, bool project, bool needs_grad_c) -> (Tensor, Tensor, Tensor)");
  m.def("mobius_scalar_mul(Tensor r, Tensor x, Tensor c, bool project) -> Tensor");
  m.def("mobius_scalar_mul_backward(Tensor grad, Tensor r, Tensor x, Tensor c, bool project, bool needs_grad_c) -> (Tensor, Tensor, Tensor)");
  m.def("mobius_matvec(Tensor m, Tensor x, Tensor c, bool project) -> Tensor");
  m.def("mobius_matvec_backward(Tensor grad, Tensor m, Tensor x, Tensor c, bool project, bool needs_grad_c) -> (Tensor, Tensor, Tensor)");
  m.def("expmap(Tensor x, Tensor u, Tensor c, bool project) -> Tensor");
  m.def("expmap_backward(Tensor grad, Tensor x, Tensor u, Tensor c, bool project, bool needs_grad_c) -> (Tensor, Tensor, Tensor)");
  m.def("logmap(Tensor x, Tensor y, Tensor c) -> Tensor");
  m.def("logmap_backward(Tensor grad, Tensor x, Tensor y, Tensor c, bool needs_grad_c) -> (Tensor, Tensor, Tensor)");
  m.def("expmap0(Tensor u, Tensor c, bool project) -> Tensor");
  m.def("expmap0_backward(Tensor grad, Tensor u, Tensor c, bool project, bool needs_grad_c) -> (Tensor, Tensor)");
  m.def("logmap0(Tensor y, Tensor c) -> Tensor");
  m.def("logmap0_backward(Tensor grad, Tensor y, Tensor c, bool needs_grad_c) -> (Tensor, Tensor)");
  m.def("project(Tensor x, Tensor c) -> Tensor");
  m.def("project_backward(Tensor grad, Tensor x, Tensor c, bool needs_grad_c) -> (Tensor, Tensor)");
  m.def("dist(Tensor x, Tensor y, Tensor c) -> Tensor");
  m.def("dist_backward(Tensor grad, Tensor x, Tensor y, Tensor c, bool needs_grad_c) -> (Tensor, Tensor, Tensor)");
  m.def("dist0(Tensor x, Tensor c) -> Tensor");
  m.def("dist0_backward(Tensor grad, Tensor x, Tensor c, bool needs_grad_c) -> (Tensor, Tensor)");
  m.def("pairwise_dist(Tensor x, Tensor y, Tensor c) -> Tensor");
  m.def("pairwise_dist_backward(Tensor grad, Tensor x, Tensor y, Tensor c, bool needs_grad_c) -> (Tensor, Tensor, Tensor)");
  // ---- vq (nearest-codebook search; x (N, D), codebook (K, D); metric l2 | cosine | poincare) ----
  // vq_nearest -> (indices int64 (N, k), distances (N, k)) sorted; vq_quantize -> (q, loss) with
  // loss = beta mean|x - sg(q)|^2 + mean|sg(x) - q|^2; vq_ema_update -> (counts, sums, codebook).
  m.def("vq_nearest(Tensor x, Tensor codebook, str metric, Tensor c, int k) -> (Tensor, Tensor)");
  m.def("vq_quantize(Tensor x, Tensor codebook, Tensor indices, float beta) -> (Tensor, Tensor)");
  m.def("vq_quantize_backward(Tensor grad_q, Tensor grad_loss, Tensor x, Tensor codebook, Tensor indices, float beta) -> (Tensor, Tensor)");
  m.def("vq_ema_update(Tensor x, Tensor indices, Tensor counts, Tensor sums, float decay, float eps) -> (Tensor, Tensor, Tensor)");
}

namespace {

std::string compiler() {
#if defined(__clang__)
  return std::string("clang ") + __clang_version__;
#elif defined(__GNUC__)
  return "gcc " + std::to_string(__GNUC__) + "." + std::to_string(__GNUC_MINOR__) + "." +
         std::to_string(__GNUC_PATCHLEVEL__);
#else
  return "unknown";
#endif
}

pybind11::dict build_info() {
  pybind11::dict d;
#ifdef LFI_FAST_WITH_CUDA
  d["cuda"] = true;
  d["cuda_version"] = std::to_string(CUDART_VERSION / 1000) + "." +
                      std::to_string((CUDART_VERSION % 1000) / 10);
#else
  d["cuda"] = false;
  d["cuda_version"] = pybind11::none();
#endif
  d["cuda_archs"] = std::string(LFI_FAST_CUDA_ARCHS);
#ifdef _OPENMP
  d["openmp"] = true;
  d["openmp_threads"] = omp_get_max_threads();
#else
  d["openmp"] = false;
  d["openmp_threads"] = 1;
#endif
  d["compiler"] = compiler();
  d["cplusplus"] = static_cast<long>(__cplusplus);
  d["torch_version"] = std::to_string(TORCH_VERSION_MAJOR) + "." + std::to_string(TORCH_VERSION_MINOR) +
                       "." + std::to_string(TORCH_VERSION_PATCH);
  return d;
}

}  // namespace

PYBIND11_MODULE(TORCH_EXTENSION_NAME, m) {
  m.doc() = "lfi_fast compiled kernels: the ops register themselves under torch.ops.lfi_fast";
  m.def("build_info", &build_info,
        "How this extension was built: CUDA or not, CUDA archs, OpenMP threads, compiler.");
}
