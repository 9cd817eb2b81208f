"""Check a non-editable install: lfi_fast imported from TARGET (not the source tree) has its
compiled ops and its Triton kernels, and they compute what the reference does."""
import sys
from pathlib import Path

import torch

target = Path(sys.argv[1]).resolve()
import lfi_fast  # noqa: E402
from lfi_fast import hyperbolic as hyp  # noqa: E402
from lfi_fast.reference import hyperbolic as ref  # noqa: E402

where = Path(lfi_fast.__file__).resolve()
assert target in where.parents, f"lfi_fast imported from {where}, not from {target}"
assert "cpp" in lfi_fast.available_backends(), lfi_fast.info()["backends"]
import lfi_fast._kernels.hyperbolic as tk  # noqa: E402

assert target in Path(tk.__file__).resolve().parents, tk.__file__
x = torch.randn(64, 8, dtype=torch.float64) * 0.1
y = torch.randn(64, 8, dtype=torch.float64) * 0.1
want = ref.mobius_add(x, y, 1.0)
for b in lfi_fast.available_backends():
    with lfi_fast.use_backend(b):
        got = hyp.mobius_add(x, y, 1.0)
    err = (got - want).abs().max().item()
    assert err < 1e-12, (b, err)
    print(f"  {b}: max abs error {err:.1e}")
print(f"check-install: OK ({where.parent}, backends {lfi_fast.available_backends()})")
