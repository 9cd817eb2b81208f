"""Triton kernels of lfi_fast and their launchers (installed as lfi_fast._kernels).

Imported lazily by the op layer. On a machine without a GPU they run under the Triton
interpreter (TRITON_INTERPRET=1, set before the kernels are defined), which the tests use.
"""
