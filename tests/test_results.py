import json

import pytest
import torch

from daskgan.run import storage
from daskgan.run.images import image_grid
from daskgan.run.records import RunWriter, load, trim_records


def write_part(run_url, iterations):
    lines = "".join(json.dumps({"iteration": i, "loss_G": float(i)}) + "\n" for i in iterations)
    storage.write_bytes(f"{run_url}/records/{iterations[0]:09d}-{iterations[-1]:09d}.jsonl", lines.encode())


def test_trim_drops_records_after_the_checkpoint(tmp_path):
    run_url = tmp_path.as_uri()
    write_part(run_url, [1, 2, 3])
    write_part(run_url, [4, 5, 6])
    write_part(run_url, [7, 8])
    trim_records(run_url, 5)
    assert load(run_url)["iteration"].tolist() == [1, 2, 3, 4, 5]
    trim_records(run_url, 0)
    assert load(run_url).empty


@pytest.mark.parametrize("killed_in", ["write_bytes", "remove"])
def test_trim_cut_short_loses_no_record_and_the_next_trim_finishes_it(tmp_path, monkeypatch, killed_in):
    """Trimming writes the kept part first and deletes the old one after: a kill between them leaves every
    record (once), and the next start trims again."""
    run_url = tmp_path.as_uri()
    write_part(run_url, [1, 2, 3])
    write_part(run_url, [4, 5, 6])

    def killed(*args, **kwargs):
        raise KeyboardInterrupt

    with monkeypatch.context() as patched:
        patched.setattr(storage, killed_in, killed)
        with pytest.raises(KeyboardInterrupt):
            trim_records(run_url, 5)
    assert load(run_url)["iteration"].tolist() == [1, 2, 3, 4, 5, 6]
    trim_records(run_url, 5)
    assert load(run_url)["iteration"].tolist() == [1, 2, 3, 4, 5]


def test_image_grid_tiles_and_maps_to_bytes():
    images = torch.stack([torch.full((3, 4, 4), v) for v in (-1.0, 0.0, 1.0, 1.0, -1.0)])
    grid = image_grid(images, padding=1)
    assert grid.dtype == torch.uint8 and grid.shape == (3, 2 * 5 + 1, 3 * 5 + 1)
    assert grid[0, 1, 1] == 0 and grid[0, 1, 6] == 128 and grid[0, 1, 11] == 255
    assert grid[0, 6:10, 11:15].eq(0).all(), "the unused sixth cell stays black"


def test_writer_flushes_in_parts_and_writes_summary(tmp_path):
    run_url = tmp_path.as_uri() + "/run"
    writer = RunWriter(run_url, None, start_iteration=0, flush_every=3)
    for i in range(1, 8):
        writer.record({"iteration": i, "loss_G": 1.0 / i})
    assert storage.list_names(f"{run_url}/records") == ["000000001-000000003.jsonl", "000000004-000000006.jsonl"]
    table = writer.close()
    assert table["iteration"].tolist() == list(range(1, 8))
    assert storage.exists(f"{run_url}/records.parquet")
    assert any(n.startswith("events.out.tfevents") for n in storage.list_names(f"{run_url}/tb"))


def test_tensorboard_names_the_extractor_beside_the_metrics(tmp_path):
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    run_url = tmp_path.as_uri() + "/run"
    writer = RunWriter(run_url, None, start_iteration=0, flush_every=3)
    writer.record({"iteration": 1, "loss_G": 1.0})
    writer.record({"iteration": 2, "loss_G": 1.0, "fid": 30.0, "metrics_extractor": "inception-v3"})
    writer.close()
    events = EventAccumulator(str(tmp_path / "run" / "tb"), size_guidance={"tensors": 0})
    events.Reload()
    named = [(e.step, e.tensor_proto.string_val[0].decode()) for e in events.Tensors("metrics/extractor/text_summary")]
    assert named == [(2, "inception-v3")]


def test_summary_has_a_panel_per_series_the_records_hold():
    import io

    import pandas as pd
    from PIL import Image

    from daskgan.run.summary import summary_png

    iterations = list(range(1, 201))
    losses = pd.DataFrame({"iteration": iterations, "loss_G": [1.0 + i % 7 for i in iterations],
                           "loss_D_real": [0.5] * 200, "loss_D_fake": [0.6] * 200})
    with_ada = losses.assign(ada_p=[i / 400 for i in iterations])
    evaluated = with_ada.assign(fid=[50.0 / i if i % 50 == 0 else None for i in iterations])
    heights = [Image.open(io.BytesIO(summary_png(table))).size[1] for table in (losses, with_ada, evaluated)]
    assert heights[0] < heights[1] < heights[2], "ADA and FID each add a panel"


def test_status_of_a_folder_that_is_not_a_run_is_one_clear_error(tmp_path):
    from daskgan.tools.cli import main

    assert main(["status", str(tmp_path)]) == 2


def test_status_of_a_run_without_records_is_not_started(tmp_path):
    from daskgan.cluster.status import run_status

    (tmp_path / "config.yaml").write_text("train: {iterations: 10}\n")
    status = run_status(str(tmp_path))
    assert (status["state"], status["iteration"], status["checkpoint"]) == ("not started", 0, None)
