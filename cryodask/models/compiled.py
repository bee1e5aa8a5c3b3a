"""``--compile``: ``torch.compile`` of the networks that do the work (SAM2's image encoder,
DINOv2), once per process.

The module is wrapped in place of itself, so its parameters, config and attributes stay reachable
and the cached model is the compiled one. Compiling costs seconds to minutes at the first call of
each input shape; slice batches keep one shape per view, so a long run pays it a few times and
then runs the fused kernels. The outputs equal eager's within float rounding (tests/test_compile.py
states the tolerance).
"""

from __future__ import annotations


def compiled(module):
    """``torch.compile(module)``; the wrapper forwards attribute access to ``module``."""
    import torch

    return torch.compile(module)
