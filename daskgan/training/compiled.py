"""``train.compile``: networks whose forward runs through ``torch.compile``, with an eager way back.

torch.compile's autograd does not support double backward, which R1 (gradient of D with respect to its input) and
path-length regularisation (gradient of G with respect to w) need. So a compiled network keeps its eager forward:
the steps switch to it, with ``eager(module)``, for the passes that carry those regularisers. Weights are shared,
and state dicts and checkpoints are the same as without compiling.
"""

from __future__ import annotations

from contextlib import contextmanager
from typing import Iterator

import torch
from torch import nn

_EAGER = "_daskgan_eager_forward"


def compile_forward(module: nn.Module) -> nn.Module:
    """Route ``module``'s forward through torch.compile (in place); ``eager(module)`` bypasses it. A module whose
    forward does host-side work between its networks (StyleGAN2's G draws its style mixing on the CPU) names the
    methods to compile instead in ``compiled_parts``, so no graph breaks there."""
    switch = {"eager": False}
    for name in getattr(module, "compiled_parts", ("forward",)):
        setattr(module, name, _switchable(getattr(module, name), switch))
    setattr(module, _EAGER, switch)
    return module


def _switchable(eager_method, switch: dict[str, bool]):
    compiled_method = torch.compile(eager_method)

    def method(*args, **kwargs):
        return (eager_method if switch["eager"] else compiled_method)(*args, **kwargs)

    return method


@contextmanager
def eager(module: nn.Module, when: bool = True) -> Iterator[None]:
    """Run ``module`` (a compiled one, or a DDP wrapper of it) eagerly inside the block, when ``when``."""
    switch = getattr(getattr(module, "module", module), _EAGER, None)
    if switch is None or not when:
        yield
        return
    switch["eager"] = True
    try:
        yield
    finally:
        switch["eager"] = False
