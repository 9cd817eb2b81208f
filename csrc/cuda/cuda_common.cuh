// What every CUDA kernel file of lfi_fast shares: the device-function qualifier, the dispatch over
// the four floating dtypes, and the current stream.
#pragma once

#include <ATen/Dispatch.h>
#include <ATen/cuda/CUDAContext.h>

#define LFI_D __device__ __forceinline__
// Every op takes the four floating dtypes; the lambdas only call templated launchers (a #pragma
// cannot appear inside them).
#define LFI_DISPATCH(type, name, ...) \
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, type, name, __VA_ARGS__)

namespace lfi_fast {

inline cudaStream_t current_stream() { return at::cuda::getCurrentCUDAStream(); }

}  // namespace lfi_fast
