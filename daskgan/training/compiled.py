"""``train.compile``: networks whose forward runs through ``torch.compile``, with an eager way back.

torch.compile's autograd does not support double backward, which R1 (gradient of D with respect to its input) and
path-length regularisation (gradient of G with respect to w) need. So a compiled network keeps its eager forward:
the steps switch to it, with ``eager(module)``, for the passes that carry those regularisers. Weights are shared,
and state dicts and checkpoints are the same as without compiling.
"""

from __future__ import annotations

import types
from contextlib import contextmanager
from typing import Iterator

import torch
from torch import nn

_EAGER = "_daskgan_eager_forward"


def compile_forward(module: nn.Module) -> nn.Module:
    """Route ``module``'s forward through torch.compile (in place); ``eager(module)`` bypasses it."""
    eager_forward = types.MethodType(type(module).forward, module)
    compiled_forward = torch.compile(eager_forward)
    switch = {"eager": False}

    def forward(*args, **kwargs):
        return (eager_forward if switch["eager"] else compiled_forward)(*args, **kwargs)

    module.forward = forward
    setattr(module, _EAGER, switch)
    return module


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
