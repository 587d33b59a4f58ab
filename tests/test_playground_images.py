"""The playground attaches an image: it reaches the engine as an image_url data URL, the answer streams."""
import io

import numpy as np
from PIL import Image
from server_harness import KEY, running_server
from test_playground import browser, pytestmark, set_value  # noqa: F401  (fixture and skip marker)

from blockdiff.random_model import create_random_model, tiny_vision_config


def test_playground_sends_an_attached_image(tmp_path, browser):  # noqa: F811
    from selenium.webdriver.common.by import By
    from selenium.webdriver.support.ui import WebDriverWait

    picture = tmp_path / "cat.png"
    buf = io.BytesIO()
    Image.fromarray(np.random.default_rng(0).integers(0, 256, (30, 40, 3), dtype=np.uint8)).save(buf, format="PNG")
    picture.write_bytes(buf.getvalue())
    model_dir = create_random_model(tmp_path / "m", tiny_vision_config(), seed=5)
    with running_server(model_dir, max_num_seqs=2, api_key=KEY, max_body_bytes=4 << 20) as server:
        browser.get(server.url + "/")
        set_value(browser, "api-key", KEY)
        browser.execute_script("loadModel()")
        WebDriverWait(browser, 20).until(lambda d: "tiny" in d.find_element(By.ID, "model").text)
        set_value(browser, "max-tokens", 16)
        set_value(browser, "steps", 3)
        browser.execute_script("document.getElementById('image').style.display = 'block'")   # file inputs need it
        browser.find_element(By.ID, "image").send_keys(str(picture))
        assert "has-image" in browser.find_element(By.ID, "attach").get_attribute("class")
        browser.find_element(By.ID, "prompt").send_keys("What is this?")
        browser.find_element(By.ID, "send").click()
        WebDriverWait(browser, 60).until(lambda d: d.find_element(By.ID, "status").text.startswith(("done", "error")))

        assert browser.find_element(By.ID, "status").text in ("done (length)", "done (stop)")
        assert browser.find_elements(By.CSS_SELECTOR, ".msg.user img")
        assert "has-image" not in browser.find_element(By.ID, "attach").get_attribute("class")
        slots = server.llm.scheduler.kv.tokens          # image tokens are keyed by content: the image arrived
        assert any(isinstance(key, tuple) for tokens in slots for key in tokens)
