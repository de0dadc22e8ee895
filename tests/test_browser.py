"""The drawing page in headless Chromium: real MNIST digits drawn with the mouse, or opened."""
from __future__ import annotations

import io

import numpy as np
import pytest
from PIL import Image
from selenium.webdriver.common.action_chains import ActionChains
from selenium.webdriver.common.by import By
from selenium.webdriver.support.ui import WebDriverWait

from pipeline import digits, evaluate, runtime
from tests.helpers import SpawnedServer

pytestmark = pytest.mark.integration  # starts processes or servers, trains or exports


@pytest.fixture(scope="module")
def page(served_model, browser):
    with SpawnedServer(served_model) as server:
        yield server.url, browser


@pytest.fixture(scope="module")
def clear_digits(served_model, test_split):
    """Test digits the model reads with confidence through the picture path: (image, label) pairs."""
    session = runtime.open_session(runtime.load_checked(served_model))
    picked = []
    for image, label in zip(*test_split):
        p = evaluate.softmax(session.run(digits.image_to_input(png(image))))[0]
        if p.argmax() == label and p.max() > 0.995:
            picked.append((image, int(label)))
        if len(picked) == 40:
            return picked
    raise AssertionError("the test model reads too few digits clearly")


def png(image: np.ndarray, size: int = 28) -> bytes:
    out = io.BytesIO()
    Image.fromarray(image).resize((size, size), Image.Resampling.NEAREST).save(out, "PNG")
    return out.getvalue()


def shown(driver, timeout: float = 10) -> tuple[int, list[float]]:
    """Wait for the page's answer; returns (digit shown, probabilities shown in the bar chart)."""
    read = """const pad = document.getElementById("pad"), answer = document.getElementById("answer");
              if (pad.dataset.state !== "idle" || !answer.dataset.digit) return null;
              return [answer.dataset.digit, [...document.querySelectorAll("#bars .bar")]
                                               .map(b => b.dataset.probability)];"""
    digit, bars = WebDriverWait(driver, timeout).until(lambda d: d.execute_script(read))
    return int(digit), [float(p) for p in bars]


def draw(driver, image: np.ndarray) -> None:
    """Trace the digit with the mouse: one stroke along each run of ink in each of its 28 rows."""
    canvas = driver.find_element(By.ID, "pad")
    scale = canvas.size["width"] / 28  # CSS pixels per MNIST pixel
    actions = ActionChains(driver, duration=0)
    for r, row in enumerate(image > 128):
        runs = np.flatnonzero(np.diff(np.r_[0, row.astype(int), 0]))  # start, end, start, end, ...
        for start, end in zip(runs[::2], runs[1::2]):
            y = (r + 0.5) * scale - canvas.size["height"] / 2
            x0, x1 = ((c + 0.5) * scale - canvas.size["width"] / 2 for c in (start, end - 1))
            actions.move_to_element_with_offset(canvas, int(x0), int(y)).click_and_hold()
            actions.move_to_element_with_offset(canvas, int(x1), int(y)).release()
    actions.perform()


def test_digits_drawn_with_the_mouse_are_read(page, clear_digits, tmp_path):
    url, driver = page
    tried = {}
    for image, label in clear_digits[:5]:
        driver.get(url + "/")
        draw(driver, image)
        digit, probabilities = shown(driver)
        tried[label] = digit
        assert len(probabilities) == 10 and abs(sum(probabilities) - 1) < 1e-3
        assert probabilities[digit] == max(probabilities)
    driver.save_screenshot(str(tmp_path / "drawn.png"))
    assert sum(label == digit for label, digit in tried.items()) >= 4, tried  # strokes are bolder than MNIST's


def test_an_opened_mnist_digit_is_read_and_shown_with_its_bar_chart(page, clear_digits, tmp_path):
    url, driver = page
    for image, label in clear_digits[5:8]:
        driver.get(url + "/")
        path = tmp_path / f"digit{label}.png"
        path.write_bytes(png(image, 140))
        driver.find_element(By.ID, "file").send_keys(str(path))
        digit, probabilities = shown(driver)
        assert digit == label
        assert driver.find_element(By.ID, "answer").text == str(label)
        top = driver.find_element(By.CSS_SELECTOR, f'#bars .bar[data-digit="{label}"]')
        assert "top" in top.get_attribute("class") and probabilities[label] > 0.9
    assert "version" in driver.find_element(By.ID, "version").text
    driver.find_element(By.ID, "clear").click()
    assert driver.find_element(By.ID, "answer").text == ""
