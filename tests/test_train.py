import os
import subprocess
import sys

import numpy as np
import pytest
import torch
import yaml

from harness.services import REPO
from pipeline import data, train
from pipeline.errors import PipelineError
from pipeline.model import ModelConfig, Net

SMALL = ModelConfig(channels=(8, 16), fc_units=64)


def fit(x_np, y_np, cfg: train.TrainConfig, model_cfg=SMALL):
    train.seed_everything(cfg.seed, 2)
    dev = torch.device("cpu")
    x, y = train.to_tensors(x_np, y_np, dev)
    model = train.prepare(Net(model_cfg), dev)
    opt, sched = train.make_optimizer(model, cfg, train.steps_per_epoch(len(x), cfg.batch_size))
    history = [train.train_epoch(model, opt, sched, x, y, cfg, e) for e in range(cfg.epochs)]
    return model, history


@pytest.fixture(scope="module")
def small_train(raw_dir):
    from pipeline import data
    x, y = data.load_split(raw_dir, "train")
    return x[:1024], y[:1024]


@pytest.mark.integration
def test_same_seed_gives_bit_identical_weights_on_cpu(small_train):
    cfg = train.TrainConfig(epochs=2, batch_size=64, seed=7)
    a, _ = fit(*small_train, cfg)
    b, _ = fit(*small_train, cfg)
    for (name, pa), pb in zip(a.state_dict().items(), b.state_dict().values()):
        assert torch.equal(pa, pb), name
    c, _ = fit(*small_train, train.TrainConfig(epochs=2, batch_size=64, seed=8))
    assert not torch.equal(a.fc1.weight, c.fc1.weight)


@pytest.mark.integration
def test_training_learns(small_train, test_split):
    cfg = train.TrainConfig(epochs=3, batch_size=64, lr=3e-3)
    model, history = fit(*small_train, cfg)
    assert history[-1]["loss"] < history[0]["loss"]
    xt, yt = train.to_tensors(test_split[0][:2000], test_split[1][:2000], torch.device("cpu"))
    assert train.evaluate(model, xt, yt)["test_acc"] > 0.6  # chance is 0.1; 1,024 images, tiny net
    assert {"loss", "train_acc", "images_per_s", "seconds"} <= set(history[0])


def test_epoch_order_is_a_seeded_permutation():
    a = train.epoch_order(100, 0, 1, torch.device("cpu"))
    assert sorted(a.tolist()) == list(range(100))
    assert torch.equal(a, train.epoch_order(100, 0, 1, torch.device("cpu")))
    assert not torch.equal(a, train.epoch_order(100, 0, 2, torch.device("cpu")))


def test_to_tensors_scales_to_unit_range():
    x, y = train.to_tensors(np.array([[[0, 255]]], dtype=np.uint8).repeat(28, 1).repeat(14, 2),
                            np.array([3], dtype=np.uint8), torch.device("cpu"))
    assert x.shape == (1, 1, 28, 28) and x.min() == 0 and x.max() == 1 and y.dtype == torch.int64


def test_cuda_request_without_cuda_is_a_clear_error():
    if torch.cuda.is_available():
        pytest.skip("this machine has CUDA")
    with pytest.raises(PipelineError, match="train.device='cuda' but PyTorch sees no CUDA device.*set train.device"):
        train.resolve_device("cuda")  # a PipelineError: the commands print it alone, without a traceback
    assert train.resolve_device("auto").type == "cpu"


@pytest.mark.integration
def test_the_train_stage_asked_for_cuda_without_cuda_says_what_to_do_in_one_line(workdir):
    """Before, the CLI took the RuntimeError for a bug and printed its traceback first."""
    if torch.cuda.is_available():
        pytest.skip("this machine has CUDA")
    params = yaml.safe_load((workdir / "params.yaml").read_text())
    params["train"]["device"] = "cuda"
    (workdir / "params.yaml").write_text(yaml.safe_dump(params))
    result = subprocess.run([sys.executable, "-m", "stages.train", "--data", "raw", "--model", "model.pt",
                             "--metrics", "train.json", "--plots", "train.csv", "--run-id", "run_id",
                             "--checkpoint", "train.ckpt"], cwd=workdir, capture_output=True, text=True, timeout=120,
                            env={**os.environ, "PYTHONPATH": str(REPO), "MLFLOW_TRACKING_URI":
                                 f"sqlite:///{workdir / 'mlflow.db'}", "MLFLOW_SPOOL_DIR": str(workdir / "spool")})
    lines = result.stderr.strip().splitlines()
    assert result.returncode == 1 and len(lines) == 1, result.stderr
    assert lines[0].startswith("stages.train: error: train.device='cuda' but PyTorch sees no CUDA device")
    assert "set train.device to auto" in lines[0]
    assert not (workdir / "model.pt").exists()


@pytest.mark.integration
@pytest.mark.gpu
def test_trains_on_cuda(small_train):
    if not torch.cuda.is_available():
        pytest.skip("needs a CUDA device")
    dev = torch.device("cuda")
    cfg = train.TrainConfig(epochs=1, batch_size=64)
    x, y = train.to_tensors(*small_train, dev)
    model = train.prepare(Net(SMALL), dev)
    opt, sched = train.make_optimizer(model, cfg, train.steps_per_epoch(len(x), cfg.batch_size))
    assert train.train_epoch(model, opt, sched, x, y, cfg, 0)["loss"] > 0
    assert "peak_gpu_mb" in train.peak_memory(dev)


FAULTS = """
import resource, sys, torch, torch.nn.functional as F
from pipeline import data, train
if sys.argv[1] == "keep":
    assert train.keep_freed_memory()
torch.set_num_threads(1)
x, w = torch.rand(256, 1, 28, 28), torch.rand(32, 1, 5, 5)
for _ in range(2):
    F.conv2d(x, w, padding=2)
before = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
for _ in range(5):
    F.conv2d(x, w, padding=2)  # conv1's 25.7 MB output at batch 256, freed at once
print((resource.getrusage(resource.RUSAGE_SELF).ru_minflt - before) / 5)
"""


@pytest.mark.integration
@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="glibc's allocator")
def test_freed_activations_are_not_page_faulted_in_again():
    def faults(mode: str) -> float:
        out = subprocess.run([sys.executable, "-c", FAULTS, mode], capture_output=True, text=True, check=True)
        return float(out.stdout)
    pages = 256 * 32 * 28 * 28 * 4 / 4096  # 6,272 pages per output
    assert faults("default") > 0.5 * pages  # glibc hands the block back and faults it in again
    assert faults("keep") < 0.02 * pages


@pytest.mark.integration
def test_speed_after_a_resume_counts_the_same_span_as_its_time(raw_dir):
    """A resumed epoch counted only the images after the resume but divided by seconds that
    included the time before the kill (271 vs 287 images/s uninterrupted)."""
    x_np, y_np = data.load_split(raw_dir, "train")
    cfg = train.TrainConfig(epochs=1, batch_size=64, seed=0)
    x, y = train.to_tensors(x_np[:640], y_np[:640], torch.device("cpu"))
    model = Net(ModelConfig(channels=(4, 8), fc_units=16))
    opt, sched = train.make_optimizer(model, cfg, train.steps_per_epoch(len(x), cfg.batch_size))
    totals = train.new_totals(torch.device("cpu"))
    totals["seconds"] = 2.0  # the first 5 steps took 2 s before the kill
    row = train.train_epoch(model, opt, sched, x, y, cfg, 0, start_step=5, totals=totals)
    assert row["seconds"] > 2.0
    assert row["images_per_s"] == pytest.approx(len(x) / row["seconds"])  # all 640 images, all the seconds
