import pytest
import yaml

from daskgan.config import ConfigError, JobConfig, load_job

MINIMAL = {"name": "t", "data": {"url": "memory://d"}, "output": {"run_url": "memory://r"}}


def with_changes(**sections):
    job = {k: dict(v) if isinstance(v, dict) else v for k, v in MINIMAL.items()}
    for section, values in sections.items():
        if isinstance(values, dict):
            job.setdefault(section, {}).update(values)
        else:
            job[section] = values
    return job


def test_defaults_follow_dcgan_paper():
    job = JobConfig.from_dict(MINIMAL)
    assert (job.train.lr_g, job.train.beta1, job.model.z_dim, job.train.loss) == (2e-4, 0.5, 100, "bce")


@pytest.mark.parametrize("sections, key", [
    ({"train": {"lr_gg": 1.0}}, "train.lr_gg: unknown key"),
    ({"train": {"lr_g": "fast"}}, "train.lr_g: expected a number"),
    ({"data": {"resolution": 48}}, "data.resolution: must be a power of two"),
    ({"data": {"batch_size": True}}, "data.batch_size: expected an integer"),
    ({"model": {"family": "vae"}}, "model.family: must be one of"),
    ({"output": {"resume": "sometimes"}}, "output.resume:"),
    ({"sandbox": {"s3_server": "yes"}}, "sandbox.s3_server: expected true or false"),
    ({"sandbox": {"dataset": {"images": 0}}}, "sandbox.dataset.images: must be >= 1"),
    ({"sandbox": {"dataset": {"resolution": 4}}}, "sandbox.dataset.resolution: must be >= 8"),
    ({"sandbox": {"copy_results_to": "s3://b/copy"}}, "sandbox.copy_results_to: must be a local folder"),
    ({"workers": 8}, "workers: unknown key"),
    ({"metrics": {"every": 10, "kinds": ["kid"]}, "output": {"best_metric": "fid"}},
     "output.best_metric: 'fid' is not among metrics.kinds"),
    ({"output": {"best_metric": "lpips"}}, "output.best_metric: must be one of"),
    ({"name": "a/b"}, "name: must be a non-empty name"),
    ({"recovery": {"workers": 0}}, "recovery.workers: must be >= 1"),
    ({"recovery": {"workers": 1, "min_workers": 2}}, "recovery.workers: must be >= 1 and >= recovery.min_workers"),
    ({"recovery": {"workers": 2, "max_workers": 2}}, "recovery.workers: reserves the run's size: give it or"),
    ({"recovery": {"priority": 1}}, "recovery.priority: orders the queue of runs that reserve workers"),
])
def test_bad_values_name_the_key(sections, key):
    with pytest.raises(ConfigError, match=key.replace(".", r"\.")):
        JobConfig.from_dict(with_changes(**sections))


@pytest.mark.parametrize("family, sections, message", [
    ("biggan", {"model": {"conditional": True}}, "model.conditional: does not apply to biggan, which is always"),
    ("biggan", {"data": {"resolution": 16}}, "data.resolution: biggan is built for [32, 64, 128, 256] pixels"),
    ("biggan", {"data": {"resolution": 32}, "model": {"z_dim": 3}}, "model.z_dim: must be at least the number"),
    ("dcgan", {"train": {"pl_weight": 2.0}}, "train.pl_weight: is not supported for dcgan"),
    ("biggan", {"data": {"resolution": 32}, "model": {"d_architecture": "orig"}},
     "model.d_architecture: is not supported for biggan"),
    ("dcgan", {"train": {"precision": "bf16"}}, "train.precision: is not supported for dcgan"),
])
def test_a_setting_its_family_lacks_is_refused_naming_the_key(family, sections, message):
    model = {"family": family, **sections.pop("model", {})}
    with pytest.raises(ConfigError, match=message.replace("[", r"\[").replace("]", r"\]")):
        JobConfig.from_dict(with_changes(model=model, **sections))


def test_settings_of_a_family_are_accepted_for_it():
    job = JobConfig.from_dict(with_changes(model={"family": "stylegan2", "conditional": True,
                                                  "d_architecture": "orig"},
                                           train={"pl_weight": 2.0, "precision": "bf16", "freeze_d": 1}))
    assert (job.model.conditional, job.train.pl_weight, job.train.freeze_d) == (True, 2.0, 1)


def test_name_defaults_to_the_file_and_best_metric_to_the_first_kind(tmp_path):
    path = tmp_path / "shapes-64.yaml"
    path.write_text("data: {url: 'memory://d'}\noutput: {run_url: 'memory://r'}\nmetrics: {every: 5, kinds: [kid]}\n")
    job = load_job(path)
    assert job.name == "shapes-64" and job.ranking_metric == "kid"


def test_missing_required_key():
    with pytest.raises(ConfigError, match=r"data\.url: required key is missing"):
        JobConfig.from_dict({"name": "t", "data": {}, "output": {"run_url": "memory://r"}})


def test_bad_yaml_names_file_and_line(tmp_path):
    path = tmp_path / "job.yaml"
    path.write_text("name: t\ndata: [unclosed\n")
    with pytest.raises(ConfigError, match=r"job\.yaml: not valid YAML \(line \d+"):
        load_job(path)


@pytest.mark.parametrize("options, key", [
    ({"secret": "s3cr3t"}, "data.storage_options.secret"),
    ({"client_kwargs": {"aws_secret_access_key": "abc"}}, "data.storage_options.client_kwargs.aws_secret_access_key"),
    ({"key": "AKIA${X}"}, "data.storage_options.key"),
    ({"connection_string": "DefaultEndpointsProtocol=https;AccountName=a;AccountKey=c2VjcmV0"},
     "data.storage_options.connection_string"),
    ({"credential": "sv=2022-11-02&sig=c2VjcmV0"}, "data.storage_options.credential"),
    ({"client_kwargs": {"headers": {"Authorization": "Bearer c2VjcmV0"}}},
     "data.storage_options.client_kwargs.headers.Authorization"),
    ({"headers": {"X-Api-Key": "c2VjcmV0"}}, "data.storage_options.headers.X-Api-Key"),
    ({"token": {"type": "service_account", "private_key": "-----BEGIN PRIVATE KEY-----c2VjcmV0"}},
     "data.storage_options.token.type"),  # gcsfs takes a service account's key file as a dict: it was saved whole
])
def test_plain_credentials_in_a_job_are_refused(options, key):
    with pytest.raises(ConfigError, match=key.replace(".", r"\.") + ": a plain credential"):
        JobConfig.from_dict(with_changes(data={"storage_options": options}))


@pytest.mark.parametrize("sections, key", [
    ({"data": {"storage_options": {"endpoint_url": "http://minio:s3cr3t@127.0.0.1:9000"}}},
     "data.storage_options.endpoint_url"),
    ({"output": {"storage_options": {"client_kwargs": {"endpoint_url": "https://u:s3cr3t@h"}}}},
     "output.storage_options.client_kwargs.endpoint_url"),
    ({"data": {"url": "https://u:s3cr3t@example.org/images"}}, "data.url"),
])
def test_urls_holding_a_password_are_refused_wherever_they_are(sections, key):
    with pytest.raises(ConfigError, match=key.replace(".", r"\.") + ": a URL with a password"):
        JobConfig.from_dict(with_changes(**sections))


@pytest.mark.parametrize("sections, key, query", [
    ({"data": {"url": "https://b.s3.amazonaws.com/d.zip?X-Amz-Algorithm=AWS4-HMAC-SHA256&X-Amz-Credential=AKIA"
                      "%2F20261204&X-Amz-Signature=c2VjcmV0"}}, "data.url", "X-Amz-Credential"),
    ({"train": {"init_from": "https://a.blob.core.windows.net/c/ffhq.pkl?sv=2022-11-02&sig=c2VjcmV0"}},
     "train.init_from", "sig"),
    ({"data": {"storage_options": {"endpoint_url": "https://h/?access_token=c2VjcmV0"}}},
     "data.storage_options.endpoint_url", "access_token"),
])
def test_urls_holding_a_signed_query_are_refused_wherever_they_are(sections, key, query):
    """A presigned URL or a SAS is a credential in its query: it was written into config.yaml."""
    with pytest.raises(ConfigError, match=key.replace(".", r"\.") + f": a URL with the query parameter {query} "):
        JobConfig.from_dict(with_changes(**sections))


def test_a_url_credential_outside_storage_options_points_at_storage_options():
    """``${ENV_VAR}`` is resolved only in storage_options: a data.url written so was read as a local path."""
    with pytest.raises(ConfigError, match=r"^job: data\.url: .* the credential in storage_options as \$\{ENV_VAR\}$"):
        JobConfig.from_dict(with_changes(data={"url": "https://u:s3cr3t@example.org/images"}))
    JobConfig.from_dict(with_changes(data={"url": "https://example.org/images?prefix=cats&max-keys=10"}))


def test_auth_headers_and_urls_by_reference_are_accepted_and_redacted_when_saved():
    options = {"endpoint_url": "${ENDPOINT}", "connection_string": "${AZURE}", "anon": False,
               "client_kwargs": {"headers": {"Authorization": "${AUTH}", "Accept": "image/png"}}}
    job = JobConfig.from_dict(with_changes(data={"storage_options": options,
                                                 "url": "https://user@example.org/images"}))
    assert job.to_dict()["data"]["storage_options"] == {
        "endpoint_url": "${ENDPOINT}", "connection_string": "***", "anon": False,
        "client_kwargs": {"headers": {"Authorization": "***", "Accept": "image/png"}}}


def test_credential_references_are_accepted_and_redacted_when_saved():
    job = JobConfig.from_dict(with_changes(data={"storage_options": {"key": "${K}", "secret": "${S}",
                                                                     "endpoint_url": "http://x"}}))
    saved = job.to_dict()
    assert saved["data"]["storage_options"] == {"key": "***", "secret": "***", "endpoint_url": "http://x"}
    assert job.data.storage_options["secret"] == "${S}"


def test_example_jobs_load():
    from pathlib import Path

    jobs = sorted(Path(__file__).parent.parent.joinpath("jobs").glob("*.yaml"))
    assert jobs, "no example jobs"
    for path in jobs:
        for workers in (1, 2, 8):
            config = load_job(path, workers=workers)
            if config.preset:
                assert config.workers == workers


def job_file(tmp_path, **sections):
    path = tmp_path / "job.yaml"
    path.write_text(yaml.safe_dump(with_changes(**sections)))
    return path


def test_overrides_set_dotted_keys_as_yaml_values_over_the_file(tmp_path):
    path = job_file(tmp_path, train={"iterations": 50}, metrics={"kinds": ["fid", "kid"]})
    job = load_job(path, overrides=["train.iterations=3", "data.batch_size=8", "train.lr_g=1e-3", "model.g_channels=16",
                                    "metrics.kinds=[kid]", "augment.mode=ada", "sandbox.dataset.images=10",
                                    "name=other", "train.iterations=4"])
    assert (job.train.iterations, job.data.batch_size, job.train.lr_g, job.model.g_channels) == (4, 8, 1e-3, 16)
    assert (job.metrics.kinds, job.augment.mode, job.sandbox.dataset.images, job.name) == (["kid"], "ada", 10, "other")
    assert load_job(path).train.iterations == 50, "the file itself is left as it is"


@pytest.mark.parametrize("override, message", [
    ("train.iteratons=3", "job.yaml: train.iteratons: unknown key (expected one of: iterations,"),
    ("train.lr_g=fast", "job.yaml: train.lr_g: expected a number, got 'fast'"),
    ("data.url.bucket=b", "job.yaml: data.url.bucket: data.url is 'memory://d', not a mapping of settings"),
    ("train=3", "job.yaml: train: expected a mapping, got int"),
    ("train.iterations", "job.yaml: train.iterations: an override is KEY=VALUE with a dotted key"),
    ("train..lr_g=1", "job.yaml: train..lr_g=1: an override is KEY=VALUE"),
    ("metrics.kinds=[fid", "job.yaml: metrics.kinds: the value '[fid' is not valid YAML"),
])
def test_bad_overrides_are_one_line_naming_the_key(tmp_path, override, message):
    with pytest.raises(ConfigError) as error:
        load_job(job_file(tmp_path), overrides=[override])
    assert str(error.value).startswith(f"{tmp_path}/{message}") and "\n" not in str(error.value)


KIMG_JOB = with_changes(data={"batch_size": 5}, train={"accumulate": 2, "d_steps": 2, "kimg": 1},
                        output={"grid_kimg": 0.2, "checkpoint_kimg": 0.41}, metrics={"every_kimg": 0.2})


def test_kimg_lengths_become_the_iterations_in_which_d_sees_that_many_reals():
    job = JobConfig.from_dict(KIMG_JOB, workers=2)
    assert job.images_per_iteration(2) == 5 * 2 * 2 * 2, "batch x workers x accumulate x d_steps, the records' kimg"
    assert (job.train.iterations, job.output.grid_every, job.output.checkpoint_every, job.metrics.every) == \
        (25, 5, 11, 5), "0.41 kimg is 10.25 iterations of 40 reals: the 11th reaches it"
    assert JobConfig.from_dict(KIMG_JOB, workers=4).train.iterations == 13, "twice the workers, half the iterations"
    assert JobConfig.from_dict(with_changes(train={"kimg": 0.07}, data={"batch_size": 5}), workers=2) \
        .train.iterations == 7, "70 images of 10 an iteration, float noise (7.000000000000001) adding none"
    preset = JobConfig.from_dict(with_changes(preset="paper256", train={"kimg": 0.128}), workers=2)
    assert preset.train.iterations == 2, "the job's kimg over the preset's iterations (its global batch 64)"


def test_reserved_workers_are_the_runs_size_whatever_the_clusters():
    """``recovery.workers`` (``train --workers``): the run trains on that many, reserved, on a cluster of any size;
    kimg lengths convert for them."""
    job = JobConfig.from_dict(with_changes(recovery={"workers": 1}, train={"kimg": 0.07}, data={"batch_size": 5}),
                              workers=4)
    assert (job.recovery.run_size(4), job.recovery.run_size(1), job.workers) == (1, 1, 1)
    assert job.train.iterations == 14, "70 images of 5 an iteration on the one reserved worker"


@pytest.mark.parametrize("sections, workers, message", [
    ({"train": {"kimg": 1, "iterations": 10}}, 2, "train.kimg: give it or train.iterations, not both"),
    ({"output": {"grid_kimg": 1, "grid_every": 10}}, 2, "output.grid_kimg: give it or output.grid_every, not both"),
    ({"output": {"checkpoint_kimg": 1, "checkpoint_every": 9}}, 2, "output.checkpoint_kimg: give it or output"),
    ({"metrics": {"every_kimg": 1, "every": 10}}, 2, "metrics.every_kimg: give it or metrics.every, not both"),
    ({"train": {"kimg": 0}}, 2, "train.kimg: must be > 0"),
    ({"train": {"kimg": "long"}}, 2, "train.kimg: expected a number, got 'long'"),
    ({"metrics": {"every_kimg": 1}}, None, "metrics.every_kimg: converts to iterations with the global batch"),
])
def test_bad_kimg_lengths_are_one_line(sections, workers, message):
    with pytest.raises(ConfigError, match=message.replace(".", r"\.")):
        JobConfig.from_dict(with_changes(**sections), workers=workers)


def test_an_override_switches_a_length_to_the_other_form_but_both_on_the_command_line_are_refused(tmp_path):
    path = job_file(tmp_path, train={"iterations": 50}, output={"grid_kimg": 0.1})
    job = load_job(path, workers=2, overrides=["train.kimg=0.64", "output.grid_every=3"])
    assert (job.train.iterations, job.train.kimg, job.output.grid_every, job.output.grid_kimg) == (5, 0.64, 3, None)
    with pytest.raises(ConfigError, match=r"job\.yaml: train\.kimg: give it or train\.iterations, not both"):
        load_job(path, workers=2, overrides=["train.kimg=0.64", "train.iterations=4"])


def test_a_job_written_out_loads_again():
    """JobConfig.to_dict writes every key, the kimg forms not used as null: loading that refused 'both given'."""
    job = JobConfig.from_dict(with_changes(train={"iterations": 12}))
    data = {key: value for key, value in job.to_dict(redact_secrets=False).items() if key != "workers"}
    assert JobConfig.from_dict(data) == job
