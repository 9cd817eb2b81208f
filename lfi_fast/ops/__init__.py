"""The op layer: thin wrappers over torch.ops.lfi_fast.*, their fake kernels and autograd, and
the choice of backend. Public modules (lfi_fast.hyperbolic, ...) validate, then call these."""
