import pytest
import torch

from daskgan.errors import CheckpointUnreadable, StorageUnavailable
from daskgan.run import checkpoint, storage
from daskgan.run.checkpoint import CheckpointMismatch


@pytest.fixture
def run_url(tmp_path):
    return tmp_path.as_uri() + "/run"


def state(iteration):
    return {"iteration": iteration, "G": {"w": torch.full((2,), float(iteration))}, "model": {"family": "dcgan"}}


def test_keeps_the_newest_k_and_points_at_the_last(run_url):
    for iteration in (10, 20, 30, 40):
        checkpoint.save(run_url, state(iteration), iteration, keep=2)
    assert [i for i, _ in checkpoint.list_checkpoints(run_url)] == [30, 40]
    loaded = checkpoint.load(checkpoint.latest(run_url))
    assert loaded["iteration"] == 40 and torch.equal(loaded["G"]["w"], torch.full((2,), 40.0))


def test_failed_write_leaves_the_pointer_on_the_previous_checkpoint(run_url, monkeypatch):
    checkpoint.save(run_url, state(10), 10, keep=3)
    real_write = storage.write_bytes

    def crash_on_checkpoint(url, data, options=None):
        if url.endswith(".pt"):
            raise ConnectionError("network gone mid-upload")
        real_write(url, data, options)

    monkeypatch.setattr(storage, "write_bytes", crash_on_checkpoint)
    with pytest.raises(ConnectionError):
        checkpoint.save(run_url, state(20), 20, keep=3)
    assert checkpoint.latest(run_url).endswith("000000010.pt")


def test_latest_falls_back_to_the_index_when_the_pointer_is_stale(run_url):
    checkpoint.save(run_url, state(10), 10, keep=3)
    checkpoint.save(run_url, state(20), 20, keep=3)
    storage.remove(checkpoint.latest(run_url))
    assert checkpoint.latest(run_url).endswith("000000010.pt")


def test_empty_run_has_no_checkpoint(run_url):
    assert checkpoint.latest(run_url) is None


def test_mismatch_names_every_differing_field():
    with pytest.raises(CheckpointMismatch, match=r"resolution: checkpoint has 64, job has 32; z_dim"):
        checkpoint.check_compatible({"model": {"resolution": 64, "z_dim": 100}}, {"resolution": 32, "z_dim": 64}, "x")
    checkpoint.check_compatible({"model": {"z_dim": 1}}, {"z_dim": 1}, "x")


def test_keeps_the_newest_and_the_best_by_metric_with_an_index(tmp_path):
    run = tmp_path.as_uri() + "/run"
    fids = {10: 50.0, 20: 30.0, 30: 45.0, 40: 35.0, 50: 60.0, 60: None, 70: 55.0}
    for iteration, fid in fids.items():
        checkpoint.save(run, {"iteration": iteration}, iteration, keep=2, score=fid, keep_best=2)
    assert [i for i, _ in checkpoint.list_checkpoints(run)] == [20, 40, 60, 70]
    index = checkpoint.index(run)
    assert [(b["iteration"], b["fid"]) for b in index["best"]] == [(20, 30.0), (40, 35.0)]
    assert [entry["iteration"] for entry in index["latest"]] == [60, 70]
    assert checkpoint.load(index["best"][0]["url"])["iteration"] == 20, "any listed checkpoint loads"
    assert checkpoint.latest(run).endswith("000000070.pt")


def test_resuming_from_an_early_checkpoint_keeps_the_new_branch(run_url):
    """Checkpoints 500 (best), 1500, 2000, 2500; the run resumes from 500 and saves 600."""
    for iteration, fid in ((500, 1.0), (1500, 3.0), (2000, None), (2500, None)):
        checkpoint.save(run_url, state(iteration), iteration, keep=3, score=fid, keep_best=1)
    assert [i for i, _ in checkpoint.list_checkpoints(run_url)] == [500, 1500, 2000, 2500]

    checkpoint.rewind(run_url, 500)  # what the training loop does when it resumes from 500
    assert checkpoint.latest(run_url).endswith("000000500.pt"), "a restart now goes back to 500, not to 2500"
    assert [i for i, _ in checkpoint.list_checkpoints(run_url)] == [500]
    assert checkpoint.index(run_url)["scores"] == {"500": 1.0}

    written = checkpoint.save(run_url, state(600), 600, keep=3, keep_best=1)
    assert storage.exists(written), "the checkpoint just written is kept"
    assert checkpoint.latest(run_url) == written
    assert [i for i, _ in checkpoint.list_checkpoints(run_url)] == [500, 600]


def test_a_save_never_deletes_what_it_just_wrote(run_url):
    for iteration in (1500, 2000, 2500):
        checkpoint.save(run_url, state(iteration), iteration, keep=3)
    written = checkpoint.save(run_url, state(600), 600, keep=3)  # older than every listed one
    assert storage.exists(written) and checkpoint.latest(run_url) == written


def test_a_resumed_optimizer_keeps_its_moments_under_the_jobs_learning_rate():
    import torch

    from daskgan.training.state import load_optimizer

    weight = torch.nn.Parameter(torch.ones(3))
    old = torch.optim.Adam([weight], lr=1e-3, betas=(0.5, 0.9))
    weight.grad = torch.ones(3)
    old.step()
    saved = old.state_dict()
    new = torch.optim.Adam([weight], lr=2e-4, betas=(0.0, 0.99))
    load_optimizer(new, saved)
    assert new.param_groups[0]["lr"] == 2e-4 and new.param_groups[0]["betas"] == (0.0, 0.99)
    assert torch.equal(new.state[weight]["exp_avg"], old.state[weight]["exp_avg"]), "moments restored"


def truncate(url: str, storage_options: dict | None = None) -> None:
    """Leave the first half of a checkpoint, as a save cut short by a full disk or a kill did before."""
    data = storage.read_bytes(url, storage_options)
    storage.write_bytes(url, data[:len(data) // 2], storage_options)


@pytest.fixture(params=["local", "s3"])
def any_run(request, tmp_path):
    """A run directory (URL, storage_options) in a local folder and in the loopback S3."""
    if request.param == "local":
        return tmp_path.as_uri() + "/run", {}
    bucket, options = request.getfixturevalue("s3_bucket")
    return f"{bucket}/run", options


def test_a_truncated_newest_checkpoint_is_passed_over_for_the_previous(any_run, caplog):
    run_url, options = any_run
    for iteration in (10, 20):
        checkpoint.save(run_url, state(iteration), iteration, keep=3, storage_options=options)
    truncate(checkpoint.latest(run_url, options), options)
    url, passed_over = checkpoint.newest_readable(run_url, options)
    assert url.endswith("000000010.pt") and checkpoint.load(url, options)["iteration"] == 10
    assert len(passed_over) == 1 and "000000020.pt" in passed_over[0] and "central directory" in passed_over[0]
    assert "000000020.pt" in caplog.text, "the log says which checkpoint was passed over"


def test_a_run_whose_every_checkpoint_is_unreadable_is_refused_not_restarted(run_url):
    checkpoint.save(run_url, state(10), 10, keep=3)
    truncate(checkpoint.latest(run_url))
    with pytest.raises(CheckpointUnreadable, match=r"none of the checkpoints of .*/run can be read"):
        checkpoint.latest(run_url)


def test_a_checkpoint_is_not_resumable_before_its_pointer_names_it(any_run, monkeypatch):
    """The first save wrote its object, then storage failed before the index and the pointer: nothing to resume."""
    run_url, options = any_run

    def storage_gone(*args, **kwargs):
        raise StorageUnavailable("index.json: still failing after 8 tries in 300s")

    monkeypatch.setattr(checkpoint, "_write_index", storage_gone)
    with pytest.raises(StorageUnavailable):
        checkpoint.save(run_url, state(10), 10, keep=3, storage_options=options)
    assert [i for i, _ in checkpoint.list_checkpoints(run_url, options)] == [10], "the object itself is there"
    assert checkpoint.latest(run_url, options) is None


def test_init_from_a_run_directory_or_its_pointer_loads_its_newest_checkpoint(any_run):
    from daskgan.pretrained import load_weights

    run_url, options = any_run
    for iteration in (10, 20):
        checkpoint.save(run_url, state(iteration), iteration, keep=3, storage_options=options)
    for source in (run_url, run_url + "/", f"{run_url}/checkpoints", f"{run_url}/checkpoints/latest.json",
                   f"{run_url}/checkpoints/index.json"):
        assert load_weights(source, options)["iteration"] == 20, source
    assert checkpoint.resolve(f"{run_url}/checkpoints/000000010.pt", options).endswith("000000010.pt")


def test_a_run_directory_without_a_finished_checkpoint_is_refused(run_url):
    from daskgan.errors import NotFound

    storage.write_json(f"{run_url}/state.json", {"state": "running"})
    with pytest.raises(NotFound, match="no daskgan checkpoint"):
        checkpoint.resolve(run_url)
    with pytest.raises(NotFound, match="no finished checkpoint"):
        checkpoint.resolve(f"{run_url}/checkpoints/latest.json")
