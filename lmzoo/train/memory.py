"""Process memory settings for training on the CPU."""

from __future__ import annotations

import ctypes
import platform

M_MMAP_THRESHOLD = -3  # glibc's mallopt parameter (malloc.h)


def unmap_large_blocks(threshold: int = 1 << 20) -> bool:
    """Have glibc give every block of `threshold` bytes or more its own mapping, which free()
    returns to the OS at once. Returns False where the C library is not glibc.

    Why: glibc's threshold starts at 128 KiB but rises to the size of each large block freed
    (up to 32 MiB), so after loading a model every activation lives in the heap. There the
    tensors a step frees (temporaries in forward, saved activations in backward) leave holes
    that the small tensors kept for backward split, and the heap grows past them: a LoRA step
    of SmolLM2-135M on 4x256 tokens peaked 600 MB above the memory it held, by an amount that
    changed from run to run (transformers+peft: 800 MB). With large blocks unmapped on free,
    the peak is what the step holds. The step ran no slower (page faults are cheap next to
    the matmuls that fill the pages). glibc still serves a large block from a free chunk of
    its heap that fits, so this works best before training starts (the Trainer calls it)."""
    if platform.libc_ver()[0] != "glibc":
        return False
    return bool(ctypes.CDLL(None).mallopt(M_MMAP_THRESHOLD, threshold))
