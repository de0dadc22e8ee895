"""Shared fixtures: the real MNIST from the local mirror, tiny models, a repo copy for DVC."""
from __future__ import annotations

import os
import shutil
import subprocess
from pathlib import Path

import numpy as np
import pytest
import torch

from harness.services import REPO
from pipeline import data

LOCAL_MIRROR = Path(os.environ.get("MNIST_MIRROR") or REPO.parent / "shared" / "mnist")
# onnxruntime-web's npm tarball, as the registry publishes it (see its README for the integrity)
WEB_MIRROR = Path(os.environ.get("ONNXRUNTIME_WEB_MIRROR") or REPO.parent / "shared" / "onnxruntime-web")


@pytest.fixture(scope="session")
def mirror() -> Path:
    if not (LOCAL_MIRROR / "t10k-labels-idx1-ubyte.gz").is_file():
        pytest.fail(f"no MNIST mirror at {LOCAL_MIRROR}: set MNIST_MIRROR to a folder of the four .gz files")
    return LOCAL_MIRROR


@pytest.fixture(scope="session")
def raw_dir(mirror, tmp_path_factory) -> Path:
    """The four verified IDX files, downloaded once per test session from the local mirror."""
    dest = tmp_path_factory.mktemp("raw")
    data.download(dest, (str(mirror),), data.DownloadConfig())
    return dest


@pytest.fixture(scope="session")
def test_split(raw_dir) -> tuple[np.ndarray, np.ndarray]:
    return data.load_split(raw_dir, "test")


@pytest.fixture(autouse=True)
def _torch_threads():
    torch.set_num_threads(os.cpu_count() or 1)


@pytest.fixture(autouse=True)
def _the_fast_tier_starts_no_process(request, monkeypatch):
    """A test not marked ``integration`` is in the fast tier (``pytest -m "not integration"``,
    the edit loop): it may start no program. This keeps the marker honest: a test that starts
    one fails here, with what to do, instead of slowing the loop down unnoticed."""
    if request.node.get_closest_marker("integration") is not None:
        return

    def refuse(*args, **kwargs):
        raise AssertionError(f"{request.node.nodeid} starts a process ({args[0] if args else kwargs}): "
                             "mark it @pytest.mark.integration")
    monkeypatch.setattr(subprocess.Popen, "__init__", refuse)


def copy_repo(dest: Path) -> Path:
    """A fresh git repository holding this checkout's files (committed or not, minus ignored)."""
    files = subprocess.run(["git", "ls-files", "-z", "--cached", "--others", "--exclude-standard"],
                           cwd=REPO, capture_output=True, check=True).stdout.decode().split("\0")
    for name in filter(None, files):
        src = REPO / name
        if src.is_file():
            (dest / name).parent.mkdir(parents=True, exist_ok=True)
            shutil.copy2(src, dest / name)
    for args in (["init", "-q"], ["config", "user.name", "test"], ["config", "user.email", "test@localhost"],
                 ["add", "-A"],
                 ["-c", "user.name=test", "-c", "user.email=test@localhost", "commit", "-qm", "copy"]):
        subprocess.run(["git", *args], cwd=dest, check=True, capture_output=True)
    return dest


SMALL = {  # params for whole-pipeline tests: a tiny net, one epoch on a subset, a short benchmark
    "train": {"epochs": 1, "subset": 2000, "batch_size": 50},
    "model": {"channels": [8, 16], "fc_units": 64},
    "export": {"parity_images": 200},
    "benchmark": {"batch_sizes": [1, 16], "warmup": 1, "min_runs": 3, "min_seconds": 0.0},
    "quantize": {"calibration_images": 64},
}


def small_repo(dest: Path) -> Path:
    """copy_repo with the SMALL params committed."""
    import yaml
    root = copy_repo(dest)
    params = yaml.safe_load((root / "params.yaml").read_text())
    for section, values in SMALL.items():
        params[section].update(values)
    (root / "params.yaml").write_text(yaml.safe_dump(params, sort_keys=False))
    subprocess.run(["git", "-c", "user.name=test", "-c", "user.email=test@localhost", "commit", "-qam",
                    "small params"], cwd=root, check=True)
    return root


@pytest.fixture
def workdir(tmp_path, raw_dir):
    """A folder to run the train stage in: tiny params, the real data, its own spool."""
    import yaml
    params = yaml.safe_load((REPO / "params.yaml").read_text())
    params["model"].update(channels=[4, 8], fc_units=32)
    params["train"].update(subset=3000, batch_size=100, checkpoint_every=0, epochs=3)
    (tmp_path / "params.yaml").write_text(yaml.safe_dump(params))
    (tmp_path / "raw").symlink_to(raw_dir)
    return tmp_path


@pytest.fixture(scope="session")
def served_model(raw_dir, tmp_path_factory) -> Path:
    """A small network trained for a few seconds on 12,000 real digits, exported to ONNX.

    Good enough to read clear digits (about 96% on the test set), which the service,
    browser and predict tests need; the full network would cost minutes.
    """
    from pipeline import export, train
    from pipeline.model import ModelConfig

    cfg = train.TrainConfig(epochs=1, batch_size=64, lr=3e-3, seed=0, subset=12000, device="cpu")
    run = train.set_up(ModelConfig(channels=(16, 32), fc_units=128), cfg, raw_dir)  # as the train stage does
    model = run.model
    opt, sched = train.make_optimizer(model, cfg, train.steps_per_epoch(len(run.x), cfg.batch_size))
    train.train_epoch(model, opt, sched, run.x, run.y, cfg, 0)
    path = tmp_path_factory.mktemp("served") / "model.onnx"
    export.export_onnx(model.eval(), path, export.ExportConfig())
    return path


@pytest.fixture(scope="module")
def small_onnx(tmp_path_factory):
    """An untrained small network exported to ONNX: (the torch model, the .onnx path)."""
    from pipeline import export
    from pipeline.model import ModelConfig, Net

    torch.manual_seed(0)
    model = Net(ModelConfig(channels=(8, 16), fc_units=64)).eval()
    path = tmp_path_factory.mktemp("b") / "m.onnx"
    export.export_onnx(model, path, export.ExportConfig())
    return model, path


@pytest.fixture(scope="session")
def web_mirror() -> Path:
    from pipeline.web import WebConfig
    if not (WEB_MIRROR / WebConfig().tarball).is_file():
        pytest.fail(f"no {WebConfig().tarball} at {WEB_MIRROR}: set ONNXRUNTIME_WEB_MIRROR to a folder holding it")
    return WEB_MIRROR


@pytest.fixture(scope="session")
def web_site(served_model, web_mirror, tmp_path_factory) -> Path:
    """The web stage's static site, built once: the page (serving/static), served_model, onnxruntime-web."""
    from pipeline import runtime, web

    cfg = web.WebConfig()
    tarball, _ = web.fetch_runtime(cfg, (str(web_mirror),))
    site = tmp_path_factory.mktemp("web") / "site"
    web.write_site(site, REPO / "serving" / "static", served_model, tarball,
                   web.manifest(cfg, "mnist-cnn-onnx", served_model, runtime.sha256(served_model)))
    return site


CHROMIUM, CHROMEDRIVER = Path("/usr/bin/chromium"), Path("/usr/bin/chromedriver")


@pytest.fixture(scope="session")
def browser(tmp_path_factory):
    """Headless Debian Chromium driven by Selenium (scripts/test.sh installs both).

    Skipped with a reason on a machine without them, but never in CI (CI=true), where the
    browser tests must run.
    """
    if not (CHROMIUM.exists() and CHROMEDRIVER.exists()):
        message = f"needs {CHROMIUM} and {CHROMEDRIVER}: apt-get install chromium chromium-driver"
        if os.environ.get("CI"):
            pytest.fail(message)
        pytest.skip(message)
    from selenium import webdriver
    from selenium.webdriver.chrome.service import Service

    options = webdriver.ChromeOptions()
    options.binary_location = str(CHROMIUM)
    for flag in ("--headless=new", "--no-sandbox", "--disable-gpu", "--disable-dev-shm-usage", "--no-first-run",
                 "--disable-background-networking", "--disable-component-update", "--disable-sync",
                 "--disable-quic", "--window-size=1200,900",
                 f"--user-data-dir={tmp_path_factory.mktemp('chromium-profile')}"):
        options.add_argument(flag)
    driver = webdriver.Chrome(service=Service(str(CHROMEDRIVER)), options=options)
    driver.set_page_load_timeout(30)
    yield driver
    driver.quit()
