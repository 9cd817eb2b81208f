"""Where a random op's (seed, offset) come from: a torch.Generator, or the global one.

Every backend takes an explicit (seed, offset) pair and draws the stream of
lfi_fast/reference/random.py from it; this module turns the user's `generator` argument into that
pair and advances the generator, so that repeated calls draw fresh numbers and
torch.manual_seed(s) reproduces a whole program.

- A CUDA generator (Philox, like ours) is read without a host sync: its seed, and its offset,
  which is advanced by the counters the call uses (rounded up to 4, as PyTorch requires).
- A CPU generator (Mersenne Twister) has no offset: one 63-bit seed is drawn from it per call
  and the offset is 0. The draw advances it, so the next call gets another stream.
- generator=None: the default generator of the tensor's device, the same way.
"""
from __future__ import annotations

import torch


def next_seed_offset(
    generator: torch.Generator | None, device: torch.device, counters: int
) -> tuple[int, int]:
    """(seed, offset) for a call on `device` that uses `counters` Philox counters (4 numbers
    each); advances the generator past them."""
    if generator is not None and not isinstance(generator, torch.Generator):
        raise TypeError(f"generator must be a torch.Generator or None (got {type(generator).__name__})")
    device = torch.device(device)
    if generator is None:
        if device.type == "cuda":
            index = device.index if device.index is not None else torch.cuda.current_device()
            generator = torch.cuda.default_generators[index]
        else:
            generator = torch.default_generator
    if generator.device.type == "cuda":
        seed = generator.initial_seed() & (2**63 - 1)
        offset = generator.get_offset()
        generator.set_offset(offset + max(4, (counters + 3) // 4 * 4))
        return seed, offset
    seed = int(torch.randint(0, 2**63 - 1, (), generator=generator, dtype=torch.int64))
    return seed, 0
