"""The server's chat page (``assets/chat_page.html``, served at ``GET /``) in a real headless Chromium.

One real ``run_baichuan2_server.py`` process (tiny random 7B through the real converter, API key on,
``--max_batch_size 2``) serves the module. The page is opened with ``?do_sample=false&max_tokens=N``
(query parameters the page passes into every request body), so its streamed answers are greedy and
can be compared with the non-streamed API answer for the same conversation.

Needs Debian's ``chromium`` and ``chromium-driver`` (``scripts/setup.sh`` installs them as root); the
test fails, it does not skip, when they are missing.
"""
import os
import shutil
import tempfile
import time

import pytest

from server_fixtures import http_json, launch_server, tiny_server_model

CHROMIUM, CHROMEDRIVER = "/usr/bin/chromium", "/usr/bin/chromedriver"
KEY = "test-key-123"
MAX_TOKENS = 24                  # the answers compared with the API
LONG_TOKENS = 100                # the answer that is stopped (prompt + answer stay in the first decode window)
GREEDY = {"do_sample": False}
WAIT = 60                        # bound of every wait for an answer (s)

# Records every text the newest assistant bubble shows (MutationObserver), to see the answer grow.
OBSERVE = """
window.__seen = [];
new MutationObserver(() => {
  const all = document.querySelectorAll('#messages .message.assistant .content');
  const text = all.length ? all[all.length - 1].textContent : null;
  if (text && text !== window.__seen[window.__seen.length - 1]) window.__seen.push(text);
}).observe(document.getElementById('messages'), {subtree: true, childList: true, characterData: true});
"""


def _webdriver_modules():
    missing = [path for path in (CHROMIUM, CHROMEDRIVER) if not os.access(path, os.X_OK)]
    if missing:
        pytest.fail(f"{' and '.join(missing)} not found: the chat page test needs Debian's chromium and "
                    "chromium-driver; run `bash scripts/setup.sh` as root (it installs them with apt-get)",
                    pytrace=False)
    from selenium import webdriver  # pylint: disable=import-outside-toplevel
    return webdriver


@pytest.fixture(scope="module")
def server(tmp_path_factory):
    _webdriver_modules()              # no browser: fail before the minute the server takes to start
    tmp = tmp_path_factory.mktemp("chat_page")
    config, ckpt = tiny_server_model(tmp, "7b", seq_length=256)
    proc = launch_server(["--config", config, "--load_checkpoint", ckpt, "--max_batch_size", "2",
                          "--api_key", KEY, "--warmup", "minimal"], cwd=tmp)
    try:
        yield proc.wait_ready(timeout=240)
    finally:
        proc.stop(timeout=5)          # it is done within a second; MindSpore's exit can take 10 s more


@pytest.fixture(scope="module")
def browser():
    webdriver = _webdriver_modules()
    from selenium.webdriver.chrome.service import Service  # pylint: disable=import-outside-toplevel
    profile = tempfile.mkdtemp(prefix="chat-page-chromium-")
    options = webdriver.ChromeOptions()
    options.binary_location = CHROMIUM
    for arg in ("--headless=new", "--no-sandbox", "--disable-gpu", "--disable-dev-shm-usage", "--disable-quic",
                "--no-first-run", "--disable-background-networking", "--disable-component-update",
                "--disable-sync", f"--user-data-dir={profile}", "--window-size=1000,760", "--lang=en-US"):
        options.add_argument(arg)
    driver = webdriver.Chrome(service=Service(CHROMEDRIVER), options=options)
    driver.set_page_load_timeout(30)
    driver.set_script_timeout(30)
    try:
        yield driver
    finally:
        driver.quit()
        shutil.rmtree(profile, ignore_errors=True)


# ----- page helpers ----------------------------------------------------------------------------
def wait(driver, condition, timeout=WAIT, message=""):
    from selenium.webdriver.support.ui import WebDriverWait  # pylint: disable=import-outside-toplevel
    return WebDriverWait(driver, timeout, poll_frequency=0.02).until(lambda d: condition(d), message)


def open_page(driver, server, api_key=KEY, **params):
    query = "&".join(f"{k}={str(v).lower() if isinstance(v, bool) else v}" for k, v in params.items())
    driver.get(f"{server.url}/?{query}")
    driver.execute_script("localStorage.clear()")
    set_api_key(driver, api_key)
    wait(driver, lambda d: d.execute_script("return document.getElementById('model').options.length") > 0,
         10, "the model list was not loaded")
    driver.execute_script(OBSERVE)


def set_api_key(driver, key):
    field = driver.find_element("id", "api-key")
    field.clear()
    field.send_keys(key)
    driver.execute_script("arguments[0].dispatchEvent(new Event('change'))", field)


def type_and_send(driver, text):
    from selenium.webdriver.common.keys import Keys  # pylint: disable=import-outside-toplevel
    box = driver.find_element("id", "input")
    box.send_keys(text)
    box.send_keys(Keys.ENTER)


def bubbles(driver):
    """``[(role, text, state)]`` of the conversation shown."""
    return [tuple(item) for item in driver.execute_script("""
        return [...document.querySelectorAll('#messages .message')].map(m =>
            [m.classList.contains('user') ? 'user' : 'assistant', m.querySelector('.content').textContent,
             m.dataset.state || null]);""")]


def last_state(driver):
    shown = bubbles(driver)
    return shown[-1][2] if shown and shown[-1][0] == "assistant" else None


def wait_answer(driver, states=("done", "length")):
    wait(driver, lambda d: last_state(d) in states, WAIT,
         f"no finished answer; shown: {bubbles(driver)}, error: {driver.find_element('id', 'error').text!r}")
    return bubbles(driver)[-1][1]


def api_answer(server, messages, max_tokens=MAX_TOKENS):
    status, body = http_json(server.url + "/v1/chat/completions", {
        "messages": messages, "stream": False, "max_tokens": max_tokens, **GREEDY}, api_key=KEY)
    assert status == 200, body
    return body["choices"][0]["message"]["content"]


def enabled(driver, element_id):
    return driver.find_element("id", element_id).is_enabled()


# ----- tests -----------------------------------------------------------------------------------
def test_streams_greedy_answers_keeps_the_conversation_and_starts_new_chats(server, browser):
    from selenium.webdriver.common.action_chains import ActionChains  # pylint: disable=import-outside-toplevel
    from selenium.webdriver.common.keys import Keys  # pylint: disable=import-outside-toplevel
    open_page(browser, server, max_tokens=MAX_TOKENS, **GREEDY)
    status, models = http_json(server.url + "/v1/models", api_key=KEY)
    assert status == 200
    assert browser.find_element("id", "model").get_attribute("value") == models["data"][0]["id"]
    assert browser.execute_script("return localStorage.getItem('baichuan2-chat-api-key')") == KEY
    assert browser.find_element("id", "messages").get_attribute("aria-live") == "polite"

    # Shift+Enter is a new line, Enter sends.
    first = "你好\nhello"
    box = browser.find_element("id", "input")
    box.send_keys("你好")
    ActionChains(browser).key_down(Keys.SHIFT).send_keys(Keys.ENTER).key_up(Keys.SHIFT).perform()
    box.send_keys("hello")
    assert box.get_attribute("value") == first and bubbles(browser) == []
    box.send_keys(Keys.ENTER)
    wait(browser, lambda d: last_state(d) == "streaming", 10, "no answer bubble")
    assert not enabled(browser, "send") and enabled(browser, "stop")
    shot = os.path.join(tempfile.gettempdir(), "chat_page_streaming.png")
    wait(browser, lambda d: bubbles(d)[-1][1] or last_state(d) != "streaming", WAIT)
    browser.save_screenshot(shot)                                        # mid-answer, for a human look
    answer = wait_answer(browser)
    assert enabled(browser, "send") and not enabled(browser, "stop")
    seen = browser.execute_script("return window.__seen")
    growing = [text for text in seen if text != answer]
    assert len(growing) >= 2, f"the answer did not arrive in pieces: {seen}"
    assert all(answer.startswith(text) for text in seen), seen
    expected = api_answer(server, [{"role": "user", "content": first}])
    assert answer == expected and answer
    assert bubbles(browser) == [("user", first, None), ("assistant", answer, last_state(browser))]

    # A second turn is answered with the whole conversation.
    second = "再说一遍"
    type_and_send(browser, second)
    answer2 = wait_answer(browser)
    history = [{"role": "user", "content": first}, {"role": "assistant", "content": answer},
               {"role": "user", "content": second}]
    assert answer2 == api_answer(server, history)
    assert [role for role, _, _ in bubbles(browser)] == ["user", "assistant"] * 2

    # New chat: the conversation is gone and the same question is answered on its own.
    browser.find_element("id", "new-chat").click()
    assert bubbles(browser) == []
    type_and_send(browser, second)
    alone = wait_answer(browser)
    assert alone == api_answer(server, [{"role": "user", "content": second}])
    assert alone != answer2, "the model answers the same with and without history: the check is void"
    assert len(bubbles(browser)) == 2


def test_stop_keeps_the_partial_answer_and_the_server_keeps_serving(server, browser):
    open_page(browser, server, max_tokens=LONG_TOKENS, **GREEDY)
    system = "你是一个会讲故事的助手。"
    browser.find_element("css selector", "#system-box summary").click()
    browser.find_element("id", "system").send_keys(system)
    question = "讲一个很长的故事"
    type_and_send(browser, question)
    wait(browser, lambda d: bubbles(d)[-1][1] != "" or last_state(d) != "streaming", WAIT, "the answer did not start")
    browser.find_element("id", "stop").click()
    wait(browser, lambda d: last_state(d) == "stopped", 10, f"not stopped: {bubbles(browser)}")
    partial = bubbles(browser)[-1][1]
    history = [{"role": "system", "content": system}, {"role": "user", "content": question}]
    full = api_answer(server, history, LONG_TOKENS)
    assert partial and full.startswith(partial) and len(partial) < len(full), (partial, full)
    assert "Stopped" in browser.find_elements("css selector", ".message.assistant")[-1].text
    assert enabled(browser, "send") and not enabled(browser, "stop")
    assert browser.find_element("id", "error").text == ""
    time.sleep(0.5)                                                    # no late text after Stop
    assert bubbles(browser)[-1][1] == partial

    # The server still answers, and the stopped partial answer is part of the conversation. The page reads
    # its query parameters at every request: a shorter answer now.
    browser.execute_script(f"history.replaceState(null, '', '?do_sample=false&max_tokens={MAX_TOKENS}')")
    type_and_send(browser, "继续")
    answer = wait_answer(browser)
    history += [{"role": "assistant", "content": partial}, {"role": "user", "content": "继续"}]
    assert answer == api_answer(server, history)
    assert http_json(server.url + "/health")[0] == 200


def test_api_errors_are_shown(server, browser):
    # Wrong API key: 401 with the server's message; the question goes back into the input box.
    open_page(browser, server, api_key="wrong-key", max_tokens=MAX_TOKENS, **GREEDY)
    status, body = http_json(server.url + "/v1/chat/completions",
                             {"messages": [{"role": "user", "content": "hi"}]}, api_key="wrong-key")
    assert status == 401
    type_and_send(browser, "hi")
    error = browser.find_element("id", "error")
    wait(browser, lambda d: error.text.startswith("HTTP 401"), 10, "no 401 error shown")
    assert body["error"]["message"] in error.text and error.is_displayed()
    assert bubbles(browser) == [] and browser.find_element("id", "input").get_attribute("value") == "hi"
    assert enabled(browser, "send")

    # Over-long max_tokens: 400 with the server's message.
    open_page(browser, server, max_tokens=100000, **GREEDY)
    status, body = http_json(server.url + "/v1/chat/completions",
                             {"messages": [{"role": "user", "content": "hi"}], "max_tokens": 100000}, api_key=KEY)
    assert status == 400
    type_and_send(browser, "hi")
    error = browser.find_element("id", "error")
    wait(browser, lambda d: error.text.startswith("HTTP 400"), 10, "no 400 error shown")
    assert body["error"]["message"] in error.text

    # Network error: the server is not reachable from the page any more (another origin would be CORS).
    browser.execute_script("window.fetch = () => Promise.reject(new TypeError('Failed to fetch'))")
    type_and_send(browser, "")                                         # input still holds "hi"
    wait(browser, lambda d: error.text.startswith("Network error"), 10, "no network error shown")
