"""The playground page in headless Chromium (Debian's chromium + chromedriver, driven by selenium):
load it, send a prompt, watch the canvas animate (>= 2 different frames), get the final text."""
import os
import shutil
import tempfile
import time
from pathlib import Path

import pytest
from server_harness import KEY, running_server

from blockdiff.random_model import create_random_model

CHROMIUM, DRIVER = "/usr/bin/chromium", "/usr/bin/chromedriver"
FLAGS = ["--headless", "--no-sandbox", "--disable-gpu", "--disable-dev-shm-usage", "--disable-background-networking",
         "--disable-component-update", "--disable-sync", "--no-first-run", "--window-size=1400,900"]
SCREENSHOT = Path(os.environ.get("BLOCKDIFF_SCREENSHOT_DIR", tempfile.gettempdir())) / "playground.png"

# Records every distinct canvas state the page shows, from inside the page, so fast frames are not missed.
OBSERVE = """
window.__frames = [];
const canvas = document.getElementById('canvas');
new MutationObserver(() => {
  const key = canvas.dataset.canvas + ':' + canvas.dataset.step + ':' + canvas.textContent;
  if (window.__frames[window.__frames.length - 1] !== key) window.__frames.push(key);
}).observe(canvas, {subtree: true, childList: true, characterData: true, attributes: true});
"""

pytestmark = pytest.mark.skipif(
    not (os.path.exists(CHROMIUM) and os.path.exists(DRIVER)),
    reason="needs Debian's chromium and chromium-driver: apt-get install -y chromium chromium-driver")


@pytest.fixture(scope="module")
def browser():
    webdriver = pytest.importorskip("selenium.webdriver", reason="needs selenium (pip install selenium)")
    from selenium.webdriver.chrome.service import Service

    profile = tempfile.mkdtemp(prefix="blockdiff-chromium-")
    options = webdriver.ChromeOptions()
    options.binary_location = CHROMIUM
    for flag in FLAGS + [f"--user-data-dir={profile}"]:
        options.add_argument(flag)
    driver = webdriver.Chrome(service=Service(DRIVER), options=options)
    driver.set_script_timeout(30)
    yield driver
    driver.quit()
    shutil.rmtree(profile, ignore_errors=True)


def set_value(driver, element_id: str, value) -> None:
    driver.execute_script("document.getElementById(arguments[0]).value = arguments[1]", element_id, str(value))


def test_playground_streams_and_animates(tmp_path, browser):
    from selenium.webdriver.common.by import By
    from selenium.webdriver.support.ui import WebDriverWait

    model_dir = create_random_model(tmp_path / "m", seed=5)
    with running_server(model_dir, max_num_seqs=2, api_key=KEY) as server:
        browser.get(server.url + "/")
        set_value(browser, "api-key", KEY)                   # the API needs the key; the page itself does not
        browser.execute_script("loadModel()")
        WebDriverWait(browser, 20).until(lambda d: "tiny" in d.find_element(By.ID, "model").text)
        for knob, value in (("steps", 12), ("entropy", 0.3), ("max-tokens", 48), ("fps", 60)):
            set_value(browser, knob, value)
        browser.find_element(By.ID, "fixed-steps").click()   # 3 canvases x 12 steps: plenty of frames
        browser.execute_script(OBSERVE)
        browser.find_element(By.ID, "prompt").send_keys("Tell me a story")
        browser.find_element(By.ID, "send").click()
        WebDriverWait(browser, 60).until(lambda d: d.find_element(By.ID, "status").text.startswith(("done", "error")))

        assert browser.find_element(By.ID, "status").text in ("done (length)", "done (stop)")
        frames = browser.execute_script("return window.__frames")
        assert len(set(frames)) >= 2, frames
        positions = browser.find_elements(By.CSS_SELECTOR, "#canvas .pos")
        assert len(positions) == 16 and all(p.get_attribute("style") for p in positions)   # shaded by max probability
        answer = browser.find_elements(By.CSS_SELECTOR, ".msg.assistant")[-1].text
        committed = browser.find_element(By.ID, "committed").text
        assert answer and answer == committed
        assert "tok/s" in browser.find_element(By.ID, "timings").text
        assert not browser.find_elements(By.CSS_SELECTOR, ".msg.error")
        time.sleep(0.2)
        assert browser.save_screenshot(str(SCREENSHOT))


def test_playground_shows_and_sends_the_checkpoint_defaults(tmp_path, browser):
    """The knob fields show the checkpoint's generation_config.json values; a request sent without
    editing them runs with those values (the frame counter shows the step limit)."""
    import json

    from selenium.webdriver.common.by import By
    from selenium.webdriver.support.ui import WebDriverWait

    model_dir = create_random_model(tmp_path / "m", seed=6)
    (model_dir / "generation_config.json").write_text(json.dumps({"max_denoising_steps": 5, "temperature": 0.7}))
    with running_server(model_dir, max_num_seqs=2, api_key=None) as server:
        browser.get(server.url + "/")
        WebDriverWait(browser, 20).until(lambda d: d.find_element(By.ID, "steps").get_attribute("value") == "5")
        assert browser.find_element(By.ID, "temperature").get_attribute("value") == "0.7"
        set_value(browser, "max-tokens", 16)
        browser.find_element(By.ID, "prompt").send_keys("Hello")
        browser.find_element(By.ID, "send").click()
        WebDriverWait(browser, 60).until(lambda d: d.find_element(By.ID, "status").text.startswith(("done", "error")))
        assert browser.find_element(By.ID, "frame-info").text.endswith("/ 5")
