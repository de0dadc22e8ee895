"""The page in headless Chromium: the model run by onnxruntime-web, checked against the pipeline.

The site is the web stage's (conftest.web_site), served by Python's own static file server
(not our service), except where our service serving it is the point. The page's pre-processing
(serving/static/digits.js) must give the 28x28 input pipeline/digits.py gives for the same
picture, to INPUT_ATOL, and onnxruntime-web's logits must be onnxruntime's in Python on that
input, to LOGIT_ATOL; the same checks must fail when one step of the page's pre-processing is
changed.
"""
from __future__ import annotations

import base64
import io
import shutil
import subprocess
import sys
import urllib.request

import numpy as np
import pytest
from PIL import Image, ImageOps
from selenium.webdriver.common.action_chains import ActionChains
from selenium.webdriver.common.actions import interaction
from selenium.webdriver.common.actions.pointer_input import PointerInput
from selenium.webdriver.common.by import By
from selenium.webdriver.support.ui import WebDriverWait

from harness.services import REPO, SpawnedServer, StaticServer
from pipeline import digits, runtime

pytestmark = pytest.mark.integration

INPUT_ATOL = 1e-6  # measured: at most 6e-8 (one float32 rounding) on every picture below
LOGIT_ATOL = 1e-4  # onnxruntime's kernels in WebAssembly vs natively: measured 2.4e-6 (FP32), 0 (INT8)

pytestmark = pytest.mark.integration  # starts processes or servers, trains or exports


@pytest.fixture(scope="module")
def static_site(web_site):
    with StaticServer(web_site) as server:
        yield server


@pytest.fixture(scope="module")
def session(served_model):
    return runtime.open_session(runtime.load_checked(served_model), "cpu", threads=1)


def png(image: np.ndarray | Image.Image, size: tuple[int, int] | None = None,
        resample=Image.Resampling.NEAREST) -> bytes:
    picture = Image.fromarray(image) if isinstance(image, np.ndarray) else image
    out = io.BytesIO()
    (picture.resize(size, resample) if size else picture).save(out, "PNG")
    return out.getvalue()


@pytest.fixture(scope="module")
def pictures(test_split) -> list[tuple[str, bytes, str, bytes]]:
    """(what, the file's bytes, its MIME type, the same picture upright as a PNG for pipeline/digits.py)."""
    images, _ = test_split
    made = []
    for i in range(8):
        made.append((f"test digit {i}, 28x28", png(images[i]), "image/png", png(images[i])))
        dark_on_light = png(255 - images[i], (140, 140))
        made.append((f"test digit {i}, 140x140, dark on light", dark_on_light, "image/png", dark_on_light))
    large = png(255 - images[8], (1500, 1100), Image.Resampling.BILINEAR)  # shrunk first, as Pillow's thumbnail does
    made.append(("1500x1100 (shrunk to 1024 first)", large, "image/png", large))
    ink = Image.fromarray(images[9]).resize((200, 150), Image.Resampling.BILINEAR)
    transparent = png(Image.merge("LA", (Image.new("L", ink.size, 0), ink)))  # black ink, the rest transparent
    made.append(("transparent background", transparent, "image/png", transparent))
    upright = Image.fromarray(255 - images[10]).resize((140, 140), Image.Resampling.BILINEAR)
    exif = Image.Exif()
    exif[0x0112] = 6  # orientation: turn 90 degrees clockwise to show it
    jpeg = io.BytesIO()
    upright.transpose(Image.Transpose.ROTATE_90).save(jpeg, "JPEG", quality=95, exif=exif)
    shown_upright = png(ImageOps.exif_transpose(Image.open(io.BytesIO(jpeg.getvalue()))))
    made.append(("JPEG turned by its EXIF orientation", jpeg.getvalue(), "image/jpeg", shown_upright))
    return made


# ---------------------------------------------------------------------------- driving the page

def open_page(driver, url: str, timeout: float = 30) -> str:
    """Load the page; returns the runtime it chose once ready: "browser", "service" or "none"."""
    driver.get(url + "/")
    ready = """const r = document.getElementById("runtimes").dataset.ready;
               return r && document.getElementById("pad").dataset.state === "idle" ? r : null;"""
    return WebDriverWait(driver, timeout).until(lambda d: d.execute_script(ready))


def shown(driver, timeout: float = 15) -> tuple[int, list[float], str]:
    """Wait for the page's answer: (digit shown, probabilities in the bar chart, runtime that answered)."""
    read = """const pad = document.getElementById("pad"), answer = document.getElementById("answer");
              if (pad.dataset.state !== "idle" || !answer.dataset.digit) return null;
              return [answer.dataset.digit, [...document.querySelectorAll("#bars .bar")]
                                               .map(b => b.dataset.probability),
                      document.getElementById("runtime").dataset.runtime];"""
    digit, bars, by = WebDriverWait(driver, timeout).until(lambda d: d.execute_script(read))
    return int(digit), [float(p) for p in bars], by


def status(driver) -> str:
    return driver.find_element(By.ID, "status").text


def draw(driver, image: np.ndarray, pointer: str = "mouse") -> None:
    """Trace the digit with the mouse or a finger: one stroke along each run of ink in every other row
    of its 28 (the pen is two MNIST pixels wide)."""
    canvas = driver.find_element(By.ID, "pad")
    scale = canvas.size["width"] / 28  # CSS pixels per MNIST pixel
    device = PointerInput(interaction.POINTER_TOUCH if pointer == "touch" else interaction.POINTER_MOUSE, pointer)
    actions = ActionChains(driver, duration=0, devices=[device])
    for r, row in list(enumerate(image > 128))[::2]:
        runs = np.flatnonzero(np.diff(np.r_[0, row.astype(int), 0]))  # start, end, start, end, ...
        for start, end in zip(runs[::2], runs[1::2]):
            y = (r + 0.5) * scale - canvas.size["height"] / 2
            x0, x1 = ((c + 0.5) * scale - canvas.size["width"] / 2 for c in (start, end - 1))
            actions.move_to_element_with_offset(canvas, int(x0), int(y)).click_and_hold()
            actions.move_to_element_with_offset(canvas, int(x1), int(y)).release()
    actions.perform()


def pad_png(driver) -> bytes:
    url = driver.execute_script('return document.getElementById("pad").toDataURL("image/png")')
    return base64.b64decode(url.split(",", 1)[1])


IN_PAGE = """
const [pictures, done] = arguments;
(async () => {
  const {loadBrowserRuntime, decodeImage} = await import("./runtimes.js");
  const browser = await loadBrowserRuntime();
  const answers = [];
  for (const [b64, type] of pictures) {
    const bytes = Uint8Array.from(atob(b64), c => c.charCodeAt(0));
    try {
      const answer = await browser.classify(await decodeImage(new Blob([bytes], {type})));
      answers.push({input: Array.from(answer.input), logits: answer.logits});
    } catch (e) {
      answers.push({refused: e.message});
    }
  }
  done(answers);
})().catch(e => done({error: String(e.stack || e)}));
"""


def in_page(driver, files: list[tuple[bytes, str]]) -> list[tuple[np.ndarray, np.ndarray] | str]:
    """The page's own functions on each (bytes, MIME type): decodeImage, the pre-processing and
    onnxruntime-web, as the page runs them on an opened file: (input 28x28, logits), or why it refused."""
    driver.set_script_timeout(60)
    answers = driver.execute_async_script(IN_PAGE, [[base64.b64encode(b).decode(), t] for b, t in files])
    assert "error" not in answers, answers
    return [a["refused"] if "refused" in a else
            (np.array(a["input"], np.float32).reshape(28, 28), np.array(a["logits"], np.float32)) for a in answers]


def mismatches(page: list[tuple[np.ndarray, np.ndarray] | str], references: list[bytes], names: list[str],
               session) -> list[str]:
    """What differs between the page's (input, logits) and the pipeline's on each reference picture."""
    found = []
    for answer, blob, name in zip(page, references, names):
        if isinstance(answer, str):
            found.append(f"{name}: the page refused it ({answer}); the pipeline did not")
            continue
        x, logits = answer
        expected = digits.image_to_input(blob)
        if (d := float(np.abs(x - expected[0, 0]).max())) > INPUT_ATOL:
            found.append(f"{name}: the 28x28 inputs differ by up to {d:.3g}")
        if (d := float(np.abs(logits - session.run(x[None, None])[0]).max())) > LOGIT_ATOL:
            found.append(f"{name}: the logits differ by up to {d:.3g} on the same input")
    return found


# ---------------------------------------------------------------------------- the checks

def test_the_page_makes_the_pipelines_input_and_logits_from_real_digits_and_pictures(
        static_site, browser, pictures, session):
    open_page(browser, static_site.url)
    names, files, types, upright = zip(*pictures)
    assert mismatches(in_page(browser, list(zip(files, types))), list(upright), list(names), session) == []


def test_an_int8_site_gives_onnxruntimes_int8_logits(web_site, served_model, browser, pictures, raw_dir, tmp_path):
    """web.model: int8 — the static INT8 (QDQ) model, run by onnxruntime-web as by onnxruntime."""
    from pipeline import contract, data, quantize

    train_x, _ = data.load_split(raw_dir, "train")
    int8 = tmp_path / "model.int8.onnx"
    quantize.quantize_int8(served_model, int8, contract.to_input(train_x[:64]))
    site = shutil.copytree(web_site, tmp_path / "site")
    shutil.copyfile(int8, site / "model.onnx")
    names, files, types, upright = zip(*pictures[:6])
    with StaticServer(site) as server:
        open_page(browser, server.url)
        page = in_page(browser, list(zip(files, types)))
    session = runtime.open_session(runtime.load_checked(int8), "cpu", threads=1)
    assert mismatches(page, list(upright), list(names), session) == []


MUTATIONS = {  # one step of the page's pre-processing changed: the parity check must see each
    "centre of mass at the frame's middle (13.5)": ("export const CENTRE = 14;", "export const CENTRE = 13.5;"),
    "scaled into 19x19, not 20x20": ("export const SIDE = 28, BOX = 20;", "export const SIDE = 28, BOX = 19;"),
    "a light background not inverted": ("const light = median > 0.5;", "const light = false;"),
}


@pytest.mark.parametrize("change", MUTATIONS)
def test_the_parity_check_fails_when_a_step_of_the_pages_pre_processing_is_changed(
        change, web_site, browser, pictures, session, tmp_path):
    site = shutil.copytree(web_site, tmp_path / "site")
    before, after = MUTATIONS[change]
    script = (site / "digits.js").read_text()
    assert script.count(before) == 1, f"digits.js no longer has {before!r}: update MUTATIONS"
    (site / "digits.js").write_text(script.replace(before, after))
    names, files, types, upright = zip(*pictures)
    with StaticServer(site) as server:  # another origin: nothing of the real digits.js is cached there
        open_page(browser, server.url)
        found = mismatches(in_page(browser, list(zip(files, types))), list(upright), list(names), session)
    assert found and all("28x28 inputs differ" in line or "the page refused it" in line for line in found), found


PAINT = """
const [pictures, done] = arguments;
(async () => {
  const pad = document.getElementById("pad"), ctx = pad.getContext("2d");
  const idle = () => new Promise(resolve => {
    const check = () => (pad.dataset.state === "idle" ? resolve() : setTimeout(check, 1));
    check();
  });
  const seen = [];
  for (const b64 of pictures) {
    const digit = new Image();
    digit.src = "data:image/png;base64," + b64;
    await digit.decode();
    ctx.drawImage(digit, 0, 0, pad.width, pad.height);  // the digit, ten times its size, over the whole pad
    pad.dispatchEvent(new PointerEvent("pointerup"));  // a stroke ends: the page answers
    await idle();
    seen.push({digit: document.getElementById("answer").dataset.digit,
               runtime: document.getElementById("runtime").dataset.runtime, pad: pad.toDataURL("image/png")});
  }
  done(seen);
})().catch(e => done({error: String(e.stack || e)}));
"""


COUNT_WORKERS = """window.workersStarted = 0;
const PageWorker = window.Worker;
window.Worker = class extends PageWorker { constructor(...args) { super(...args); window.workersStarted++; } };"""


def test_on_a_static_host_the_page_reads_100_real_test_digits_drawn_on_its_canvas_without_our_service(
        web_site, browser, test_split, session):
    images, labels = test_split
    counting = browser.execute_cdp_cmd("Page.addScriptToEvaluateOnNewDocument", {"source": COUNT_WORKERS})
    try:
        with StaticServer(web_site) as host:  # its own, so its log holds this test's requests only
            assert open_page(browser, host.url) == "browser"
            first = len(host.requests)
            browser.set_script_timeout(120)
            seen = browser.execute_async_script(PAINT, [base64.b64encode(png(255 - im)).decode()
                                                        for im in images[:100]])
            # A plain static host: no cross-origin isolation, so no SharedArrayBuffer; one thread, no worker.
            assert browser.execute_script("return [self.crossOriginIsolated, window.workersStarted]") == [False, 0]
    finally:
        browser.execute_cdp_cmd("Page.removeScriptToEvaluateOnNewDocument", {"identifier": counting["identifier"]})
    assert "error" not in seen, seen
    assert {s["runtime"] for s in seen} == {"browser"}
    page = np.array([int(s["digit"]) for s in seen])
    pipeline = np.array([session.run(digits.image_to_input(base64.b64decode(s["pad"].split(",", 1)[1]))).argmax()
                         for s in seen])
    assert (page == pipeline).all(), np.flatnonzero(page != pipeline)  # the same answer for the same picture
    wrong = np.flatnonzero(page != labels[:100])
    assert len(wrong) <= 5, [(i, labels[i], page[i]) for i in wrong]  # at least 95 of 100 right
    # Nothing but the site's own files was asked for (our service is not running, and not asked).
    site_files = {"/", *("/" + f.relative_to(web_site).as_posix() for f in web_site.rglob("*") if f.is_file())}
    assert {(method, status) for method, _, status in host.requests} <= {("GET", 200), ("GET", 304)}
    assert host.paths() <= site_files, host.paths() - site_files
    assert len(host.requests) == first  # painting and answering 100 digits asked the host for nothing


def test_digits_drawn_with_the_mouse_or_a_finger_are_read_as_the_pipeline_reads_the_pad(
        static_site, browser, test_split, session):
    images, labels = test_split
    open_page(browser, static_site.url)
    drawn, pads = {}, []
    for image, label, pointer in [*((images[i], labels[i], "mouse") for i in range(11, 14)),
                                  (images[14], labels[14], "touch")]:
        browser.find_element(By.ID, "clear").click()
        draw(browser, image, pointer)
        digit, probabilities, by = shown(browser)
        assert by == "browser" and len(probabilities) == 10 and abs(sum(probabilities) - 1) < 1e-3
        assert probabilities[digit] == max(probabilities)
        pads.append(pad_png(browser))
        assert digit == session.run(digits.image_to_input(pads[-1])).argmax(), pointer
        drawn[int(label)] = digit
    assert sum(label == digit for label, digit in drawn.items()) >= 3, drawn  # strokes are bolder than MNIST's
    names = [f"pad {i}" for i in range(len(pads))]
    assert mismatches(in_page(browser, [(p, "image/png") for p in pads]), pads, names, session) == []


def test_an_opened_or_pasted_digit_is_read_and_shown_with_its_bar_chart_and_its_runtime(
        static_site, browser, test_split, tmp_path):
    images, labels = test_split
    open_page(browser, static_site.url)
    for i in (17, 18):
        path = tmp_path / f"digit{i}.png"
        path.write_bytes(png(images[i], (140, 140)))
        browser.find_element(By.ID, "file").send_keys(str(path))
        digit, probabilities, by = shown(browser)
        assert (digit, by) == (labels[i], "browser")
        assert browser.find_element(By.ID, "answer").text == str(labels[i])
        top = browser.find_element(By.CSS_SELECTOR, f'#bars .bar[data-digit="{labels[i]}"]')
        assert "top" in top.get_attribute("class") and probabilities[labels[i]] == max(probabilities)
        said = browser.find_element(By.ID, "runtime").text
        assert said.startswith("Answered by this browser: onnxruntime-web 1.30.0") and " ms" in said, said
        browser.find_element(By.ID, "file").clear()
    assert "mnist-cnn-onnx version" in browser.find_element(By.ID, "version").text
    browser.find_element(By.ID, "clear").click()
    pasted = base64.b64encode(png(images[19], (140, 140))).decode()
    browser.execute_script("""const bytes = Uint8Array.from(atob(arguments[0]), c => c.charCodeAt(0));
        const clipboard = new DataTransfer();
        clipboard.items.add(new File([bytes], "pasted.png", {type: "image/png"}));
        document.dispatchEvent(new ClipboardEvent("paste", {clipboardData: clipboard}));""", pasted)
    WebDriverWait(browser, 10).until(lambda d: d.find_element(By.ID, "answer").text == str(labels[19]))
    assert shown(browser)[::2] == (labels[19], "browser")
    browser.find_element(By.ID, "clear").click()
    assert browser.find_element(By.ID, "answer").text == ""


def test_errors_a_user_can_cause_are_said_on_the_page(static_site, web_site, browser, tmp_path):
    open_page(browser, static_site.url)
    text = tmp_path / "notes.txt"
    text.write_text("not a picture")
    browser.find_element(By.ID, "file").send_keys(str(text))
    WebDriverWait(browser, 10).until(lambda d: "not an image" in status(d))
    assert '"notes.txt"' in status(browser) and browser.find_element(By.ID, "answer").text == ""

    # A browser without WebAssembly (the global removed before the page's scripts run).
    script = browser.execute_cdp_cmd("Page.addScriptToEvaluateOnNewDocument",
                                     {"source": "delete globalThis.WebAssembly;"})
    try:
        assert open_page(browser, static_site.url) == "none"
        assert "This browser has no WebAssembly" in status(browser)
    finally:
        browser.execute_cdp_cmd("Page.removeScriptToEvaluateOnNewDocument", {"identifier": script["identifier"]})

    # A model that does not load: the site's model.onnx cut short.
    site = shutil.copytree(web_site, tmp_path / "site")
    model = (site / "model.onnx").read_bytes()
    (site / "model.onnx").write_bytes(model[: len(model) // 2])
    with StaticServer(site) as server:
        assert open_page(browser, server.url) == "none"
        said = status(browser)
    assert "The model could not be loaded in this browser (model.onnx)" in said, said
    assert "Our service is not reachable from this page (v2/health/ready: HTTP 404)" in said, said


def test_our_service_serves_the_site_and_answers_when_asked(served_model, web_site, browser, test_split, tmp_path):
    images, labels = test_split
    path = tmp_path / "digit.png"
    path.write_bytes(png(images[19], (140, 140)))
    with SpawnedServer(served_model, "--site", str(web_site)) as server:
        with urllib.request.urlopen(server.url + "/ort/ort-wasm-simd-threaded.wasm") as r:
            assert r.headers["Content-Type"] == "application/wasm"
            assert r.read() == (web_site / "ort/ort-wasm-simd-threaded.wasm").read_bytes()
        assert open_page(browser, server.url) == "browser"
        browser.find_element(By.ID, "file").send_keys(str(path))
        assert shown(browser)[::2] == (labels[19], "browser")
        browser.find_element(By.CSS_SELECTOR, 'input[value="service"]').click()  # the same picture, asked of it
        WebDriverWait(browser, 10).until(
            lambda d: d.find_element(By.ID, "runtime").get_attribute("data-runtime") == "service")
        assert shown(browser)[::2] == (labels[19], "service")
        assert browser.find_element(By.ID, "runtime").text.startswith("Answered by our service (POST /digit)")
        assert "mnist-cnn-onnx version" in browser.find_element(By.ID, "version").text


def test_our_service_without_a_site_answers_the_page_itself(served_model, browser, test_split, tmp_path):
    """python -m commands.serve with no --site: the page, without onnxruntime-web, asks the service."""
    images, labels = test_split
    path = tmp_path / "digit.png"
    path.write_bytes(png(images[20], (140, 140)))
    with SpawnedServer(served_model) as server:
        assert open_page(browser, server.url) == "service"
        assert "onnxruntime-web is not on this host (site.json: HTTP 404). Answers come from our service." \
            in status(browser)
        browser.find_element(By.ID, "file").send_keys(str(path))
        assert shown(browser)[::2] == (labels[20], "service")


def test_our_service_refuses_a_site_folder_without_a_page_in_one_line(tmp_path):
    started = subprocess.run([sys.executable, "-m", "commands.serve", "--model", str(tmp_path / "model.onnx"),
                              "--port", "0", "--site", str(tmp_path)], cwd=REPO, capture_output=True, text=True,
                             timeout=60)
    assert started.returncode == 1
    assert started.stderr.strip() == (f"commands.serve: error: --site {tmp_path}: no index.html there; "
                                      "build the site with: dvc repro web")
