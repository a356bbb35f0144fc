"""``train.compile`` (issue #29 item 5): torch.compile traces each family's networks whole, with no graph break
from a host read; StyleGAN2's G compiles its mapping and synthesis and draws its style mixing on the CPU between
them. Graph breaks are decided by torch's tracer (dynamo) before any backend compiles, so the test traces with
the ``eager`` backend and needs no C++ compiler."""

from __future__ import annotations

import functools

import pytest
import torch
from test_host_syncs import FAMILIES
from torch._dynamo.utils import counters

from daskgan.config import JobConfig
from daskgan.models import build_models
from daskgan.training.compiled import compile_forward

CLASSES = 4


@pytest.mark.parametrize("family", list(FAMILIES))
def test_each_familys_compiled_networks_trace_without_a_graph_break(family, monkeypatch):
    monkeypatch.setattr(torch, "compile", functools.partial(torch.compile, backend="eager"))
    model, _, _, resolution = FAMILIES[family]
    config = JobConfig.from_dict({"data": {"url": "memory://d", "resolution": resolution}, "model": model,
                                  "output": {"run_url": "memory://r"}}).model
    conditional = family == "biggan" or config.conditional
    torch.manual_seed(0)
    G, D = (compile_forward(net) for net in build_models(config, resolution, CLASSES if conditional else 0))
    torch._dynamo.reset()
    counters.clear()
    for _ in range(4):  # StyleGAN2's G mixes styles in 9 batches of 10 (its default), at a cutoff of its draw
        labels = torch.randint(0, CLASSES, (4,)) if conditional else None
        D(G(torch.randn(4, config.z_dim), labels), labels).sum().backward()
    assert counters["stats"]["unique_graphs"] >= 2, "G and D ran compiled"
    assert not counters["graph_break"], f"graph breaks: {dict(counters['graph_break'])}"
