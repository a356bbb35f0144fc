"""``make gpu-check`` without a GPU: its CPU dry run (``benchmarks/gpu_check.py --cpu-dry-run``) runs each kind of
step's code with tiny sizes and reports every step of the GPU checklist with a status, the CUDA ones skipped for
want of a GPU once their code passed; a failing step is reported with its error and the next one still runs."""

import importlib
import json
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).parent.parent
STEPS = ["environment", "devices", "train-fp32", "train-bf16", "train-fp16", "resume", "speed-eager-fp32",
         "speed-eager-bf16", "nvlabs-fp32", "nvlabs-mixed", "loader-step", "cuda-tests", "speed-compile-fp32",
         "speed-compile-bf16", "peak-memory"]
NO_GPU = "no CUDA device (torch.cuda.is_available() is False)"
DRY_RUN_PASSED = f"{NO_GPU}; its CPU dry run (tiny sizes) passed"

pytestmark = pytest.mark.slow


def gpu_check(report: Path, *options: str) -> tuple[subprocess.CompletedProcess, dict[str, dict]]:
    """The command as ``make gpu-check-dry-run`` runs it; its exit and the report's steps by name."""
    done = subprocess.run([sys.executable, "benchmarks/gpu_check.py", str(report), "--cpu-dry-run", *options],
                          cwd=ROOT, capture_output=True, text=True, timeout=280)
    steps = json.loads((report / "report.json").read_text())["steps"]
    assert [step["name"] for step in steps] == STEPS, "every step of the checklist, in the order they run"
    return done, {step["name"]: step for step in steps}


def test_the_dry_run_runs_each_kind_of_step_on_the_cpu_and_reports_every_step(tmp_path):
    one_of_each = ["devices", "train-bf16", "resume", "speed-compile-bf16", "nvlabs-mixed", "loader-step", "cuda-tests"]
    done, steps = gpu_check(tmp_path / "report", "--only", ",".join(one_of_each), "--nvlabs", str(tmp_path / "none"))

    assert done.returncode == 0, done.stdout + done.stderr
    assert steps["environment"]["status"] == "ok" and steps["environment"]["figures"]["cuda"] is False
    for name in ("devices", "train-bf16", "resume", "speed-compile-bf16", "loader-step"):
        assert (steps[name]["status"], steps[name]["reason"]) == ("skipped", DRY_RUN_PASSED), steps[name]
    assert steps["nvlabs-mixed"]["status"] == "skipped" and "not present" in steps["nvlabs-mixed"]["reason"]
    assert steps["cuda-tests"]["status"] == "ok" and steps["cuda-tests"]["figures"]["cuda_markers"] == []
    assert steps["peak-memory"]["status"] == "skipped"
    for name in set(STEPS) - {*one_of_each, "environment", "peak-memory"}:
        assert steps[name]["reason"] == "not among --only"

    assert {rank["backend"] for rank in steps["devices"]["figures"]["ranks"]} == {"gloo"}
    trained = steps["train-bf16"]["figures"]
    assert trained["iterations"] == 4 and {"reals.png", "000000004.png"} <= set(trained["grids"])
    resumed = steps["resume"]["figures"]
    assert resumed["resumed_from"].endswith("000000002.pt") and resumed["resumed_differs"] == {}
    assert resumed["losses_equal"] and resumed["cuda_rng_saved"] == [False]
    speed = steps["speed-compile-bf16"]["figures"]
    assert speed["s_per_kimg"] > 0 and speed["graph_breaks"] == 0 and speed["batch"] == 2
    assert any(line.startswith("| 2 channels |") for line in steps["loader-step"]["figures"]["table"])
    report = (tmp_path / "report" / "report.md").read_text()
    assert "## Step time (s/kimg) and peak GPU memory (GiB), paper256" in report
    assert all(f"| {name} |" in report for name in STEPS)


def test_a_failing_step_is_reported_with_its_error_and_the_next_step_runs(tmp_path):
    checkout = tmp_path / "stylegan2-ada-pytorch"  # stands in for NVlabs' train.py: fp32 passes, mixed fails
    checkout.mkdir()
    (checkout / "train.py").write_text(
        "import sys\nopen('argv.txt', 'a').write(' '.join(sys.argv[1:]) + '\\n')\n"
        "if '--fp32' not in sys.argv:\n    print('RuntimeError: no fp16 here')\n    sys.exit(3)\n")
    done, steps = gpu_check(tmp_path / "report", "--only", "nvlabs-fp32,nvlabs-mixed,cuda-tests",
                            "--nvlabs", str(checkout))

    assert done.returncode == 1, "a failed step fails the command"
    assert (steps["nvlabs-fp32"]["status"], steps["nvlabs-fp32"]["reason"]) == ("skipped", DRY_RUN_PASSED)
    failed = steps["nvlabs-mixed"]
    assert failed["status"] == "failed" and failed["reason"] == "CheckFailed: train.py exited with 3"
    assert "RuntimeError: no fp16 here" in failed["tail"]
    assert steps["cuda-tests"]["status"] == "ok", "the step after a failure runs"
    fp32, mixed = (checkout / "argv.txt").read_text().splitlines()
    for options in (fp32, mixed):
        assert "--cfg paper256 --batch 2 --kimg 1" in options and "--metrics none" in options
        assert options.endswith("--dry-run")
    assert "--fp32 1" in fp32 and "--fp32" not in mixed


def test_with_the_budget_spent_no_step_starts(tmp_path):
    done, steps = gpu_check(tmp_path / "report", "--budget-s", "0")

    assert done.returncode == 0
    assert {step["status"] for step in steps.values()} == {"skipped"}
    assert all("budget" in step["reason"] for name, step in steps.items() if name != "peak-memory")


def test_an_unknown_step_is_one_usage_line(tmp_path):
    done = subprocess.run([sys.executable, "benchmarks/gpu_check.py", str(tmp_path), "--only", "devices,speed"],
                          cwd=ROOT, capture_output=True, text=True, timeout=60)

    assert done.returncode == 2
    assert done.stderr.splitlines()[-1].startswith("gpu_check.py: error: --only: no step speed (steps: environment,")


def gpu_check_module():
    """benchmarks/gpu_check.py as a module, for the parts that read what only a GPU run writes."""
    sys.path.insert(0, str(ROOT / "benchmarks"))
    return importlib.import_module("gpu_check")


def test_nvlabs_figures_are_those_of_its_ticks_after_the_first(tmp_path):
    def tick(number: int, kimg: float, seconds: float, gib: float) -> str:  # as NVlabs' training_stats writes them
        values = {"Progress/tick": number, "Progress/kimg": kimg, "Timing/sec_per_kimg": seconds,
                  "Resources/peak_gpu_mem_gb": gib}
        return json.dumps({**{k: {"num": 1, "mean": v, "std": 0.0} for k, v in values.items()}, "timestamp": 1.0})

    run = tmp_path / "00000-data-paper256-kimg1-batch32-ada"
    run.mkdir()
    (run / "stats.jsonl").write_text(f"{tick(0, 0.032, 950.0, 5.0)}\n{tick(1, 1.024, 12.3456, 7.5)}\n")

    assert gpu_check_module()._nvlabs_stats(tmp_path) == {"s_per_kimg": 12.35, "peak_allocated_gib": 7.5,
                                                         "kimg": 1.024}


def test_a_nan_in_a_loss_or_in_a_lazy_term_where_it_runs_is_found():
    import pandas as pd

    nan, inf = float("nan"), float("inf")
    table = pd.DataFrame({"iteration": range(1, 9), "loss_G": [1, nan, 1, 1, 1, 1, 1, 1], "loss_D_real": [1] * 8,
                          "loss_D_fake": [1] * 8, "D_x": [0.5] * 8, "D_G_z": [0.5] * 8,
                          "r1_penalty": [nan, nan, nan, 0.1, nan, nan, nan, 0.2],  # every 4th: as it should be
                          "pl_penalty": [nan, nan, nan, nan, nan, nan, nan, 0.3],  # missing at iteration 4
                          "images_per_s": [1, 1, inf, 1, 1, 1, 1, 1]})

    assert gpu_check_module()._not_finite(table) == ["images_per_s", "loss_G", "pl_penalty"]


def test_the_step_time_table_gives_the_ratio_to_nvlabs_where_both_ran():
    figures = {"speed-eager-fp32": {"s_per_kimg": 30.0, "peak_allocated_gib": 12.5, "batch": 32},
               "nvlabs-fp32": {"s_per_kimg": 20.0, "peak_allocated_gib": 9.0, "custom_ops": "compiled"}}
    report = {"mode": "GPU", "seconds": 1.0, "budget_s": 450.0,
              "steps": [{"name": name, "item": 2, "title": "", "status": "ok", "seconds": 1.0, "figures": values}
                        for name, values in figures.items()]}

    lines = gpu_check_module().markdown(report)

    assert ("| fp32 | 30.0 s/kimg, 12.5 GiB | - s/kimg, - GiB | 20.0 s/kimg, 9.0 GiB | 1.50x | - |") in lines
    assert any(line.startswith("| bf16 (NVlabs: fp16 mixed) |") and line.endswith("| - | - |") for line in lines)
