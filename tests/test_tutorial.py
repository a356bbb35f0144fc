"""dask-pytorch-ddp's tutorial code runs with only its import line changed (``from daskgan import dispatch, results,
data``): the user's own model and loop, ``S3ImageFolder`` in a DataLoader with worker processes, results sent
with ``submit_result`` and written by ``process_results`` into an ``s3://`` prefix."""

from __future__ import annotations

import json

import numpy as np
import pytest
import s3fs
import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch.nn.parallel import DistributedDataParallel as DDP
from torch.utils.data import DataLoader, DistributedSampler

from daskgan import data, dispatch, results


def to_tensor(image):
    return torch.from_numpy(np.array(image)).permute(2, 0, 1).float() / 255


def train(bucket: str, prefix: str, handler: results.DaskResultsHandler, fail_at_step: int | None = None,
          loader_workers: int = 2) -> int:
    """The tutorial's shape: a classifier trained with DDP, a result every other step and one at the end."""
    dataset = data.S3ImageFolder(bucket, prefix, transform=to_tensor)
    sampler = DistributedSampler(dataset)
    loader = DataLoader(dataset, batch_size=8, sampler=sampler, num_workers=loader_workers)
    model = DDP(torch.nn.Sequential(torch.nn.Flatten(), torch.nn.Linear(3 * 16 * 16, len(dataset.classes))))
    optimizer = torch.optim.SGD(model.parameters(), lr=0.01)
    rank, step = dist.get_rank(), 0
    for epoch in range(2):
        sampler.set_epoch(epoch)
        for images, labels in loader:
            loss = F.cross_entropy(model(images), labels)
            optimizer.zero_grad()
            loss.backward()
            optimizer.step()
            step += 1
            if step % 2 == 0:
                handler.submit_result(f"rank{rank}/loss-{step}.json", json.dumps({"loss": loss.item()}))
            if step == fail_at_step and rank == 1:
                raise ValueError(f"rank 1 gave up at step {step}")
    handler.submit_result(f"rank{rank}/done.txt", b"finished")
    return step


@pytest.fixture
def dataset(shapes_in_bucket):
    bucket_url, _ = shapes_in_bucket(32)  # 32 images, 4 classes; 16 per rank per epoch: 2 batches of 8
    return bucket_url, bucket_url.removeprefix("s3://")


def written(prefix: str) -> dict[str, bytes]:
    fs = s3fs.S3FileSystem(skip_instance_cache=True)
    root = prefix.removeprefix("s3://")
    return {path[len(root) + 1:]: fs.cat_file(path) for path in fs.find(root)}


@pytest.mark.slow
def test_tutorial_loop_sends_every_result_to_an_s3_prefix(dask_client, dataset):
    bucket_url, bucket = dataset
    handler = results.DaskResultsHandler()
    futures = dispatch.run(dask_client, train, bucket, "data", handler)
    handler.process_results(f"{bucket_url}/results", futures, raise_errors=True)
    assert [f.result() for f in futures] == [4, 4]
    files = written(f"{bucket_url}/results")
    expected = {f"rank{r}/{name}" for r in (0, 1) for name in ("loss-2.json", "loss-4.json", "done.txt")}
    assert set(files) == expected
    assert files["rank1/done.txt"] == b"finished" and json.loads(files["rank0/loss-4.json"])["loss"] > 0


@pytest.mark.slow
def test_a_failing_rank_raises_or_is_logged_as_asked(dask_client, dataset, caplog):
    bucket_url, bucket = dataset
    handler = results.DaskResultsHandler()
    # the loader in this process (its worker processes are the first test's): what fails here is a rank
    futures = dispatch.run(dask_client, train, bucket, "data", handler, fail_at_step=2, loader_workers=0)
    with pytest.raises(ValueError, match="rank 1 gave up at step 2"):
        handler.process_results(f"{bucket_url}/raised", futures, raise_errors=True)
    assert "rank1/loss-2.json" in written(f"{bucket_url}/raised"), "results sent before the failure are kept"
    wait_until_free(futures)

    handler = results.DaskResultsHandler()
    futures = dispatch.run(dask_client, train, bucket, "data", handler, fail_at_step=2, loader_workers=0)
    handler.process_results(f"{bucket_url}/logged", futures, raise_errors=False)
    assert {"rank0/loss-2.json", "rank1/loss-2.json"} <= set(written(f"{bucket_url}/logged"))
    assert "rank 1 gave up at step 2" in caplog.text
    assert all(f.status == "error" for f in futures)


def wait_until_free(futures, seconds: float = 60) -> None:
    """Wait until no rank of ``futures`` still occupies its worker (cancelled tasks run to their end)."""
    import time

    client = futures[0].client
    deadline = time.monotonic() + seconds
    while any(client.processing().values()) and time.monotonic() < deadline:
        time.sleep(0.5)


def test_s3_image_folder_is_a_map_style_dataset_of_images_and_labels(shapes_in_bucket):
    bucket_url, options = shapes_in_bucket(8)
    folder = data.S3ImageFolder(bucket_url.removeprefix("s3://"), "data", target_transform=lambda c: c * 10,
                                storage_options=options)
    assert len(folder) == 8 and folder.classes == ["circle", "ring", "square", "triangle"]
    image, label = folder[1]
    assert image.size == (16, 16) and image.mode == "RGB"
    assert label == 10 * folder.class_to_idx[folder.all_files[1].split("/")[-2]]
    batch = folder.__getitems__([0, 1, 2])
    assert [b[1] for b in batch] == [folder[i][1] for i in (0, 1, 2)]
