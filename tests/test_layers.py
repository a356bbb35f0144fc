"""Synchronised BatchNorm over 2 gloo ranks equals BatchNorm on the whole batch in one process."""

import pytest
import torch
from torch import nn

from daskgan import dispatch
from daskgan.models.layers import SyncBatchNorm2d, sync_batchnorm


def normalise_and_backprop(batchnorm, x, upstream):
    x = x.clone().requires_grad_()
    out = batchnorm(x)
    (out * upstream).sum().backward()
    return out.detach(), x.grad, batchnorm.weight.grad, batchnorm.running_mean.clone(), batchnorm.running_var.clone()


def rank_half(x, upstream):
    import torch.distributed as dist

    half = slice(dist.get_rank() * len(x) // 2, (dist.get_rank() + 1) * len(x) // 2)
    torch.manual_seed(0)
    return normalise_and_backprop(sync_batchnorm(nn.Sequential(nn.BatchNorm2d(4)))[0], x[half], upstream[half])


@pytest.mark.slow
def test_sync_batchnorm_over_two_ranks_equals_one_process_on_the_whole_batch(dask_client):
    generator = torch.Generator().manual_seed(3)
    x = torch.randn(8, 4, 3, 3, generator=generator) * 2 + 1
    upstream = torch.randn(8, 4, 3, 3, generator=generator)
    out, x_grad, w_grad, running_mean, running_var = normalise_and_backprop(nn.BatchNorm2d(4), x, upstream)

    ranks = dispatch.results(dispatch.run(dask_client, rank_half, x, upstream), timeout=120)
    assert torch.allclose(torch.cat([r[0] for r in ranks]), out, atol=1e-5)
    assert torch.allclose(torch.cat([r[1] for r in ranks]), x_grad, atol=1e-5), "gradients cross the ranks"
    assert torch.allclose(ranks[0][2] + ranks[1][2], w_grad, atol=1e-5), "DDP would sum (average) these"
    for rank in ranks:
        assert torch.allclose(rank[3], running_mean, atol=1e-6) and torch.allclose(rank[4], running_var, atol=1e-5)


def test_sync_batchnorm_replaces_every_batchnorm_keeping_its_state():
    model = nn.Sequential(nn.Conv2d(3, 4, 1), nn.Sequential(nn.BatchNorm2d(4, momentum=0.3)))
    model[1][0].running_mean.fill_(2.0)
    converted = sync_batchnorm(model)
    layer = converted[1][0]
    assert isinstance(layer, SyncBatchNorm2d) and layer.momentum == 0.3 and layer.running_mean[0] == 2.0
    layer.eval()
    x = torch.randn(2, 4, 2, 2)
    assert torch.allclose(layer(x), nn.functional.batch_norm(x, layer.running_mean, layer.running_var,
                                                             layer.weight, layer.bias), atol=1e-6)
