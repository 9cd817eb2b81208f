"""The machine's memory bandwidth: a copy (x.clone()) measured in the same run as the other cases.

On the CPU it is the roofline that every row's GB/s is compared with (record.fill_roofline); on a
GPU it shows how near a plain copy comes to the device's peak. `lfi-fast bench` always runs it,
whichever families are chosen.
"""
from __future__ import annotations

import torch

from conftest import nbytes, rotating


def test_copy_bandwidth(measure, device, quick):
    """x.clone() of 2^18 x 64 float32 (2^20 x 64 on a GPU): reads and writes 67 MB (268 MB)."""
    n, d = (1 << 12, 16) if quick else ((1 << 20 if device.type == "cuda" else 1 << 18), 64)
    x = torch.randn(n, d, device=device)

    def build():
        return x.clone().clone  # each copy of the input, cloned on every call

    measure(rotating(build, device, 2 * nbytes(x)), op="copy", provider="torch-eager:copy",
            anchor="torch-eager:copy", mode="forward", shape=x.shape, dtype=x.dtype,
            bytes_read=nbytes(x), bytes_written=nbytes(x))
