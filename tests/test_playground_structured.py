"""The playground sends a JSON schema as response_format and shows the validated answer pretty-printed;
a schema that is not JSON, or one the server refuses, is an error message on the page."""
import json

import jsonschema
from server_harness import KEY, running_server
from test_playground import browser, pytestmark, set_value  # noqa: F401  (fixture and skip marker)

from blockdiff.random_model import create_random_model

SCHEMA = {"type": "object", "properties": {"n": {"type": "integer", "minimum": 0, "maximum": 99},
                                           "ok": {"type": "boolean"}},
          "required": ["n", "ok"], "additionalProperties": False}


def ask(browser, prompt: str):
    from selenium.webdriver.common.by import By
    from selenium.webdriver.support.ui import WebDriverWait

    browser.find_element(By.ID, "prompt").send_keys(prompt)
    browser.find_element(By.ID, "send").click()
    WebDriverWait(browser, 60).until(lambda d: d.find_element(By.ID, "status").text.startswith(("done", "error")))
    return browser.find_element(By.ID, "status").text


def test_playground_json_schema(tmp_path, browser):  # noqa: F811
    from selenium.webdriver.common.by import By
    from selenium.webdriver.support.ui import WebDriverWait

    with running_server(create_random_model(tmp_path / "m", seed=5), max_num_seqs=2, api_key=KEY) as server:
        browser.get(server.url + "/")
        set_value(browser, "api-key", KEY)
        browser.execute_script("loadModel()")
        WebDriverWait(browser, 20).until(lambda d: "tiny" in d.find_element(By.ID, "model").text)
        set_value(browser, "steps", 4)
        set_value(browser, "json-schema", json.dumps(SCHEMA))
        assert ask(browser, "Give me a number") == "done (stop)"
        shown = browser.find_element(By.ID, "json-result").text
        jsonschema.validate(json.loads(shown), SCHEMA)
        assert "\n  " in shown                                      # pretty-printed
        assert browser.find_element(By.ID, "json-result-status").text == "valid: matches the schema"

        set_value(browser, "json-schema", '{"type": "object", "not": {}}')       # the server refuses it: a 400
        assert ask(browser, "again") == "error"
        assert "not" in browser.find_elements(By.CSS_SELECTOR, ".msg.error")[-1].text
        set_value(browser, "json-schema", "{oops")
        assert ask(browser, "again") == "error"
        assert "not valid JSON" in browser.find_elements(By.CSS_SELECTOR, ".msg.error")[-1].text
