"""The page's inference time in Chromium beside onnxruntime in Python on one thread, in one run.

    python -m benchmarks.web_inference [--site models/web] [--model models/model.onnx ...]
                                       [--calls 300] [--rounds 10] [--screenshots docs] [--out FILE]

Serves the web stage's site (dvc repro web builds models/web) with Python's own static file
server on 127.0.0.1, opens it in headless Chromium (Debian's, as the tests drive it), and lets the
page's own browser runtime (serving/static/runtimes.js: onnxruntime-web, WebAssembly, one thread)
classify pictures of real test digits: the figure is its ``inferenceMs``, the session.run the page
times and shows, beside its pre-processing time. onnxruntime in Python, on one intra-op thread as
the page has one, runs the same model on the inputs pipeline/digits.py makes of the same pictures.
The two alternate in ``--rounds`` rounds of calls/rounds calls each, so a busy machine weighs on
both alike; the figures are medians over all calls, the ratio the median of the per-round ratios.
Each ``--model`` (default: model.onnx and model.int8.onnx beside the site's folder, where they are)
is measured in a copy of the site that serves it. Chromium coarsens performance.now() to 0.1 ms
on a page without cross-origin isolation, which a plain static host has: fine for figures of
milliseconds, said beside them.

With ``--screenshots DIR`` it also writes the page, a digit drawn on it, at desktop and phone
width (web-desktop.png, web-phone.png: 64 colours, to keep them small).
"""
from __future__ import annotations

import argparse
import base64
import io
import json
import shutil
import statistics
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import numpy as np
from PIL import Image

from harness.services import REPO, StaticServer
from pipeline import data, digits, runtime
from pipeline.machine import hardware, state

TIMED = """
const [pictures, calls, done] = arguments;
(async () => {
  const {loadBrowserRuntime, decodeImage} = await import("./runtimes.js");
  window.benchRuntime ??= await loadBrowserRuntime();  // the page's runtime, loaded once per page
  const decoded = [];
  for (const b64 of pictures) {
    const bytes = Uint8Array.from(atob(b64), c => c.charCodeAt(0));
    decoded.push(await decodeImage(new Blob([bytes], {type: "image/png"})));
  }
  const inference = [], preprocessing = [];
  for (let i = 0; i < calls; i++) {
    const answer = await window.benchRuntime.classify(decoded[i % decoded.length]);
    inference.push(answer.inferenceMs);
    preprocessing.push(answer.preprocessingMs);
  }
  done({inference, preprocessing});
})().catch(e => done({error: String(e.stack || e)}));
"""


def chromium(width: int, height: int, profile: Path):
    """Headless Debian Chromium on a fresh profile (no cache from an earlier run), as the tests start it."""
    from selenium import webdriver
    from selenium.webdriver.chrome.service import Service

    options = webdriver.ChromeOptions()
    options.binary_location = "/usr/bin/chromium"
    for flag in ("--headless=new", "--no-sandbox", "--disable-gpu", "--disable-dev-shm-usage", "--no-first-run",
                 "--disable-background-networking", "--disable-component-update", "--hide-scrollbars",
                 f"--window-size={width},{height}", f"--user-data-dir={profile}"):
        options.add_argument(flag)
    driver = webdriver.Chrome(service=Service("/usr/bin/chromedriver"), options=options)
    driver.set_script_timeout(600)
    return driver


def pictures(raw: Path, count: int) -> list[bytes]:
    """Real test digits as a drawing on the page's pad would be: 280x280, dark on light, PNG."""
    images, _ = data.load_split(raw, "test")
    made = []
    for image in images[:count]:
        out = io.BytesIO()
        Image.fromarray(255 - image).resize((280, 280), Image.Resampling.BILINEAR).save(out, "PNG")
        made.append(out.getvalue())
    return made


def site_serving(site: Path, model: Path, folder: Path) -> Path:
    """A copy of ``site`` whose page runs ``model`` (the other files linked, not copied)."""
    copy = folder / model.stem
    shutil.copytree(site, copy, copy_function=lambda s, d: Path(d).symlink_to(Path(s).resolve()))
    for own in ("model.onnx", "site.json"):  # links to the site's own: replaced, never written through
        (copy / own).unlink()
    shutil.copyfile(model, copy / "model.onnx")
    manifest = json.loads((site / "site.json").read_text())
    manifest["model"].update(sha256=runtime.sha256(model), bytes=model.stat().st_size,
                             precision="int8" if "int8" in model.name else "fp32")
    (copy / "site.json").write_text(json.dumps(manifest, indent=2))
    return copy


def measure(driver, url: str, model: Path, blobs: list[bytes], calls: int, rounds: int) -> dict:
    """Both runtimes on ``model``, alternating in rounds; their per-call times in ms."""
    driver.get(url + "/")
    encoded = [base64.b64encode(b).decode() for b in blobs]
    session = runtime.open_session(runtime.load_checked(model), "cpu", threads=1)
    inputs = [digits.image_to_input(b) for b in blobs]
    for x in inputs[:5]:
        session.run(x)  # warm, as the page's first run is
    driver.execute_async_script(TIMED, encoded, 5)
    per_round = calls // rounds
    browser, pre, python, ratios = [], [], [], []
    for _ in range(rounds):
        timed = driver.execute_async_script(TIMED, encoded, per_round)
        if "error" in timed:
            sys.exit(f"web_inference: the page failed: {timed['error']}")
        ours = []
        for i in range(per_round):
            t0 = time.perf_counter()
            session.run(inputs[i % len(inputs)])
            ours.append((time.perf_counter() - t0) * 1e3)
        browser += timed["inference"]
        pre += timed["preprocessing"]
        python += ours
        ratios.append(statistics.median(timed["inference"]) / statistics.median(ours))
    return {"model": str(model), "bytes": model.stat().st_size, "calls": len(browser),
            "chromium_inference_ms_p50": statistics.median(browser),
            "chromium_inference_ms_p90": float(np.percentile(browser, 90)),
            "chromium_preprocessing_ms_p50": statistics.median(pre),
            "python_ort_1thread_ms_p50": statistics.median(python),
            "python_ort_1thread_ms_p90": float(np.percentile(python, 90)),
            "ratio_chromium_vs_python_p50": statistics.median(ratios)}


def screenshots(url: str, raw: Path, folder: Path, profiles: Path) -> list[Path]:
    """The page with a test digit drawn on it, at desktop and at phone width."""
    from selenium.webdriver.common.action_chains import ActionChains
    from selenium.webdriver.common.by import By
    from selenium.webdriver.support.ui import WebDriverWait

    images, _ = data.load_split(raw, "test")
    written = []
    for name, (width, height) in {"web-desktop.png": (900, 600), "web-phone.png": (390, 800)}.items():
        driver = chromium(width, height, profiles / name)
        try:
            driver.get(url + "/")
            WebDriverWait(driver, 30).until(lambda d: d.execute_script(
                'return document.getElementById("pad").dataset.state === "idle"'))
            pad = driver.find_element(By.ID, "pad")
            actions = ActionChains(driver, duration=0)
            scale = pad.size["width"] / 28
            for r, row in enumerate(images[0] > 128):  # the first test digit, traced row by row
                runs = np.flatnonzero(np.diff(np.r_[0, row.astype(int), 0]))
                for start, end in zip(runs[::2], runs[1::2]):
                    y = int((r + 0.5) * scale - pad.size["height"] / 2)
                    actions.move_to_element_with_offset(pad, int((start + 0.5) * scale - pad.size["width"] / 2), y)
                    actions.click_and_hold()
                    actions.move_to_element_with_offset(pad, int((end - 0.5) * scale - pad.size["width"] / 2), y)
                    actions.release()
            actions.perform()
            WebDriverWait(driver, 30).until(lambda d: d.execute_script(
                'return document.getElementById("pad").dataset.state === "idle" '
                '&& document.getElementById("answer").dataset.digit !== ""'))
            time.sleep(0.3)  # the bars' transition
            driver.set_window_size(width, driver.execute_script("return document.documentElement.scrollHeight") + 24
                                   + driver.execute_script("return window.outerHeight - window.innerHeight"))
            shot = Image.open(io.BytesIO(driver.get_screenshot_as_png()))
            folder.mkdir(parents=True, exist_ok=True)
            shot.convert("RGB").quantize(64).save(folder / name, optimize=True)
            written.append(folder / name)
        finally:
            driver.quit()
    return written


def main() -> None:
    p = argparse.ArgumentParser(prog="python -m benchmarks.web_inference", description=__doc__.split("\n\n")[0])
    p.add_argument("--site", type=Path, default=REPO / "models/web", help="the web stage's site")
    p.add_argument("--model", type=Path, action="append", help="a model to measure (repeatable)")
    p.add_argument("--data", type=Path, default=REPO / "data/raw", help="the four IDX files (dvc repro makes them)")
    p.add_argument("--calls", type=int, default=300, help="timed calls per runtime and model")
    p.add_argument("--rounds", type=int, default=10, help="rounds the calls are split into, alternating runtimes")
    p.add_argument("--pictures", type=int, default=20, help="distinct test digits, used in turn")
    p.add_argument("--screenshots", type=Path, help="write web-desktop.png and web-phone.png here")
    p.add_argument("--out", type=Path, help="write the results as JSON here")
    args = p.parse_args()
    if not (args.site / "site.json").is_file():
        sys.exit(f"web_inference: no site at {args.site}: build it with `dvc repro web`")
    models = args.model or [m for m in (args.site.parent / "model.onnx", args.site.parent / "model.int8.onnx")
                            if m.is_file()]
    blobs = pictures(args.data, args.pictures)
    profiles = Path(tempfile.mkdtemp(prefix="web-inference-"))
    driver = chromium(1000, 800, profiles / "measuring")
    runs: list[dict] = []
    results: dict[str, Any] = {"machine": {**hardware(with_gpu=False),
                                           "chromium": driver.capabilities.get("browserVersion", "?")},
                               "state_before": state(), "runs": runs}
    try:
        with tempfile.TemporaryDirectory() as tmp:
            for model in models:
                with StaticServer(site_serving(args.site, model, Path(tmp))) as host:
                    runs.append(measure(driver, host.url, model, blobs, args.calls, args.rounds))
    finally:
        driver.quit()
    results["state_after"] = state()
    if args.screenshots:
        with StaticServer(args.site) as host:
            results["screenshots"] = [str(s) for s in screenshots(host.url, args.data, args.screenshots, profiles)]
    shutil.rmtree(profiles, ignore_errors=True)
    m = results["machine"]
    print(f"machine: {m['cpu']} ({m['cores']} cores; {m['cpu_features']}), Chromium {m['chromium']}, "
          f"onnxruntime {m.get('onnxruntime')}, load {results['state_before']['loadavg_1m']:.2f}")
    print("model              Chromium (onnxruntime-web, 1 thread)   Python onnxruntime, 1 thread   ratio")
    for r in runs:
        print(f"{Path(r['model']).name:18} {r['chromium_inference_ms_p50']:6.2f} ms "
              f"(p90 {r['chromium_inference_ms_p90']:.2f}; pre-processing {r['chromium_preprocessing_ms_p50']:.2f})   "
              f"{r['python_ort_1thread_ms_p50']:6.2f} ms (p90 {r['python_ort_1thread_ms_p90']:.2f})         "
              f"{r['ratio_chromium_vs_python_p50']:.2f}x")
    if args.out:
        args.out.write_text(json.dumps(results, indent=2))


if __name__ == "__main__":
    main()
