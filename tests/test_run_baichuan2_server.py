"""The real OpenAI-compatible server (``run_baichuan2_server.py``) in a subprocess, driven over HTTP.

One server per module (tiny random 7B-shaped model, seq_length 64, 4 rows, an API key) on
127.0.0.1. Greedy texts are compared with the predict CLI (``run_baichuan2.py --run_mode predict``)
on the same weights, run once beside the server start-up. The server's YAML leaves the sampling
keys out, so its defaults are Baichuan2-Chat's (checked in its request log line); greedy requests
say ``temperature: 0`` and keep the default repetition penalty 1.05 (the predict YAML's too).
"""
import ast
import http.client
import json
import os
import signal
import socket
import threading
import time
import urllib.request
from concurrent.futures import ThreadPoolExecutor

import pytest

from run_helpers import run_baichuan2, write_config
from server_fixtures import launch_server, http_json, SERVER_SCRIPT, TOKENIZER

openai = pytest.importorskip("openai")

SEQ = 64
NEW = 24
KEY = "test-key-123"
PROMPTS = ["白日依山尽，", "《静夜思》作者是谁？请详细地说一说。", "你好", "床前明月光，疑是地上霜。举头望明月，"]
SAMPLING_KEYS = ("do_sample", "top_k", "top_p", "temperature", "repetition_penalty", "max_new_tokens")
_OPENER = urllib.request.build_opener(urllib.request.ProxyHandler({}))


def _yaml(path, drop_sampling, **model_config):
    def edit(cfg):
        mc = cfg["model"]["model_config"]
        mc["max_decode_length"] = SEQ
        for key in SAMPLING_KEYS if drop_sampling else ():
            mc.pop(key, None)
        mc.update(model_config)
    return write_config(path, "7b", seq_length=SEQ, edit=edit)


def _predict(config, ckpt, cwd):
    res = run_baichuan2(["--config", config, "--run_mode", "predict", "--load_checkpoint", ckpt,
                         "--predict_data", *PROMPTS, "--max_new_tokens", str(NEW)], cwd=cwd, timeout=600)
    assert res.returncode == 0, res.tail()
    line = [l for l in res.stdout.splitlines() if l.startswith("[{'text_generation_text'")][-1]
    return [t for item in ast.literal_eval(line) for t in item["text_generation_text"]]


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
    """(server, openai client, predict texts per prompt, tokenizer, tmp dir)."""
    from model_fixtures import tiny_pair
    from baichuan2_tokenizer import Baichuan2Tokenizer
    tmp = tmp_path_factory.mktemp("server")
    _, _, ckpt = tiny_pair("7b", str(tmp), seed=21)
    server_yaml = _yaml(tmp / "server.yaml", drop_sampling=True)
    predict_yaml = _yaml(tmp / "predict.yaml", drop_sampling=False, do_sample=False, repetition_penalty=1.05,
                         batch_size=1)
    os.makedirs(tmp / "predict", exist_ok=True)
    with ThreadPoolExecutor(1) as pool:
        predicted = pool.submit(_predict, predict_yaml, ckpt, tmp / "predict")
        server = launch_server(["--config", server_yaml, "--load_checkpoint", ckpt, "--max_batch_size", "4",
                                "--max_queue", "1", "--api_key", KEY], cwd=tmp)
        try:
            server.wait_ready(timeout=400)
            texts = predicted.result()
        except BaseException:
            server.stop()
            raise
    client = openai.OpenAI(base_url=server.url + "/v1", api_key=KEY, max_retries=0, timeout=120)
    assert all(t.startswith(p) for t, p in zip(texts, PROMPTS))
    yield server, client, [t[len(p):] for t, p in zip(texts, PROMPTS)], Baichuan2Tokenizer(vocab_file=TOKENIZER), tmp
    server.stop()


def _stream_text(stream):
    """(text, finish_reason, usage, number of content chunks) of a completions/chat stream."""
    text, finish, usage, chunks = [], None, None, 0
    for chunk in stream:
        if chunk.usage is not None:
            usage = chunk.usage
        for choice in chunk.choices:
            piece = choice.delta.content if hasattr(choice, "delta") else choice.text
            if piece:
                text.append(piece)
                chunks += 1
            finish = choice.finish_reason or finish
    return "".join(text), finish, usage, chunks


def test_greedy_stream_and_non_stream_equal_the_predict_cli_with_exact_usage(setup):
    server, client, expected, tokenizer, _ = setup
    prompt = PROMPTS[1]
    full = client.completions.create(model="baichuan2-7b", prompt=prompt, max_tokens=NEW, temperature=0)
    assert full.choices[0].text == expected[1] and full.choices[0].finish_reason == "length"
    assert (full.usage.prompt_tokens, full.usage.completion_tokens) == (len(tokenizer.encode(prompt)), NEW)
    text, finish, usage, _ = _stream_text(client.completions.create(
        model="baichuan2-7b", prompt=prompt, max_tokens=NEW, temperature=0, stream=True,
        stream_options={"include_usage": True}))
    assert (text, finish) == (expected[1], "length") and usage.completion_tokens == NEW

    # chat: the prompt is build_chat_input's (user id, text, assistant id), the same greedy answer as the CLI's
    messages = [{"role": "system", "content": "简短回答。"}, {"role": "user", "content": "你好"}]
    chat = client.chat.completions.create(model="baichuan2-7b", messages=messages, max_tokens=NEW, temperature=0)
    prompt_ids = tokenizer.encode("简短回答。") + [195] + tokenizer.encode("你好") + [196]
    assert chat.usage.prompt_tokens == len(prompt_ids) and chat.usage.completion_tokens == NEW
    assert chat.choices[0].message.role == "assistant"
    stream = client.chat.completions.create(model="baichuan2-7b", messages=messages, max_tokens=NEW, temperature=0,
                                            stream=True, stream_options={"include_usage": True})
    chunks = list(stream)
    assert chunks[0].choices[0].delta.role == "assistant"
    assert all(c.object == "chat.completion.chunk" for c in chunks)
    text, finish, usage, _ = _stream_text(chunks)
    assert text == chat.choices[0].message.content and finish == "length" == chat.choices[0].finish_reason
    assert usage.total_tokens == len(prompt_ids) + NEW


def _log_lines(server, text, timeout=60):
    """The server's output lines holding ``text``, waiting (bounded) for its reader thread to see one."""
    deadline = time.monotonic() + timeout
    while True:
        found = [line for line in list(server.lines) if text in line]
        if found or time.monotonic() > deadline:
            return found
        time.sleep(0.05)


def test_default_sampling_is_baichuan2_chat(setup):
    server, client, _, _, _ = setup
    reply = client.chat.completions.create(model="baichuan2-7b", messages=[{"role": "user", "content": "你好"}],
                                           max_tokens=3, seed=1)
    logged = _log_lines(server, f"request {reply.id}:")
    assert len(logged) == 1, server.tail()
    assert ("do_sample=True top_k=5 top_p=0.85 temperature=0.3 repetition_penalty=1.05 max_new_tokens=3 seed=1"
            in logged[0])
    again = client.chat.completions.create(model="baichuan2-7b", messages=[{"role": "user", "content": "你好"}],
                                           max_tokens=3, seed=1)
    assert again.choices[0].message.content == reply.choices[0].message.content
    # the default answer length: min(generation max_new_tokens 2048, seq_length // 2)
    default = client.chat.completions.create(model="baichuan2-7b", messages=[{"role": "user", "content": "你好"}],
                                             temperature=0)
    assert default.usage.completion_tokens == SEQ // 2 or default.choices[0].finish_reason == "stop"


def test_concurrent_streams_admitted_midway_queue_and_cancel(setup):
    server, client, expected, _, _ = setup
    results, started = {}, {i: threading.Event() for i in range(6)}

    def consume(index, prompt, max_tokens, close_after=None):
        stream = client.completions.create(model="baichuan2-7b", prompt=prompt, max_tokens=max_tokens, temperature=0,
                                           stream=True)
        text, finish, count = [], None, 0
        for chunk in stream:
            choice = chunk.choices[0]
            text.append(choice.text)
            count += bool(choice.text)
            finish = choice.finish_reason or finish
            if count >= 3:
                started[index].set()
            if close_after is not None and count >= close_after:
                stream.close()                      # the client goes away mid-stream
                finish = "closed"
                break
        started[index].set()
        results[index] = ("".join(text), finish)

    threads = [threading.Thread(target=consume, args=(i, PROMPTS[i], NEW)) for i in range(3)]
    for thread in threads:
        thread.start()
    assert all(started[i].wait(120) for i in range(3))
    # the 4th arrives while the other three are mid-way through their answers
    assert http_json(server.url + "/health")[1]["running"] == 3
    threads.append(threading.Thread(target=consume, args=(3, PROMPTS[3], NEW)))
    threads[-1].start()
    for thread in threads:
        thread.join(180)
    assert [results[i] for i in range(4)] == [(expected[i], "length") for i in range(4)]

    # four long streams fill the rows; a 5th waits, a 6th finds the queue (max_queue 1) full: 503
    long_tokens = SEQ - 20
    started.update({i: threading.Event() for i in range(6)})
    threads = [threading.Thread(target=consume, args=(i, PROMPTS[2], long_tokens, 4 if i == 0 else None))
               for i in range(4)]
    for thread in threads:
        thread.start()
    assert all(started[i].wait(120) for i in range(1, 4))
    fifth = threading.Thread(target=consume, args=(4, PROMPTS[1], NEW))
    fifth.start()
    for thread in threads + [fifth]:
        thread.join(240)
    assert results[0][1] == "closed"                      # cancelled: its row went to the 5th
    assert all(results[i][1] == "length" for i in range(1, 4))
    assert results[4] == (expected[1], "length")
    health = http_json(server.url + "/health")[1]
    assert (health["running"], health["waiting"]) == (0, 0)


def test_queue_full_is_503(setup):
    server, _, _, _, _ = setup
    # fill: 4 rows and the one queue place with non-streamed requests, then one more is refused
    bodies = [{"prompt": PROMPTS[2], "max_tokens": SEQ - 20, "temperature": 0}] * 5
    with ThreadPoolExecutor(6) as pool:
        futures = [pool.submit(http_json, server.url + "/v1/completions", b, KEY) for b in bodies]
        # wait until the server holds them all (rows full, one waiting), bounded
        for _ in range(600):
            health = http_json(server.url + "/health")[1]
            if health["running"] == 4 and health["waiting"] == 1:
                break
            if all(f.done() for f in futures):
                pytest.skip("the machine finished the requests before the queue could be observed full")
        status, body = http_json(server.url + "/v1/completions", bodies[0], KEY)
        assert status == 503 and body["error"]["code"] == "queue_full", body
        assert all(f.result()[0] == 200 for f in futures)


def test_stop_strings(setup):
    _, client, expected, _, _ = setup
    text = expected[3]
    stop = text[5:7]
    result = client.completions.create(model="baichuan2-7b", prompt=PROMPTS[3], max_tokens=NEW, temperature=0,
                                       stop=["never-there", stop])
    assert result.choices[0].finish_reason == "stop"
    assert result.choices[0].text == text[:text.index(stop)]
    streamed, finish, _, _ = _stream_text(client.completions.create(
        model="baichuan2-7b", prompt=PROMPTS[3], max_tokens=NEW, temperature=0, stop=stop, stream=True))
    assert (streamed, finish) == (text[:text.index(stop)], "stop")


def _raw(url, data, headers=None):
    request = urllib.request.Request(url, data=data, method="POST", headers=headers or {})
    try:
        with _OPENER.open(request, timeout=60) as response:
            return response.status, json.loads(response.read())
    except urllib.error.HTTPError as error:
        return error.code, json.loads(error.read())


def test_auth_and_bad_input_get_openai_errors(setup):
    server, _, _, _, _ = setup
    chat = server.url + "/v1/chat/completions"
    user = [{"role": "user", "content": "你好"}]
    assert http_json(chat, {"messages": user})[0] == 401
    status, body = http_json(chat, {"messages": user}, api_key="wrong")
    assert status == 401 and body["error"]["type"] == "authentication_error"
    assert http_json(server.url + "/v1/models")[0] == 401
    status, models = http_json(server.url + "/v1/models", api_key=KEY)
    assert status == 200 and [m["id"] for m in models["data"]] == ["baichuan2-7b"]
    auth = {"Authorization": f"Bearer {KEY}", "Content-Type": "application/json"}
    cases = [
        (b"{not json", 400, None),
        (b"[1, 2]", 400, None),
        (json.dumps({}).encode(), 400, "messages"),
        (json.dumps({"messages": []}).encode(), 400, "messages"),
        (json.dumps({"messages": [{"role": "robot", "content": "x"}]}).encode(), 400, "messages[0].role"),
        (json.dumps({"messages": [{"role": "user", "content": 5}]}).encode(), 400, "messages[0].content"),
        (json.dumps({"messages": user, "max_tokens": 0}).encode(), 400, "max_tokens"),
        (json.dumps({"messages": user, "max_tokens": 10 ** 6}).encode(), 400, "max_tokens"),
        (json.dumps({"messages": user, "max_completion_tokens": -1}).encode(), 400, "max_completion_tokens"),
        (json.dumps({"messages": user, "n": 2}).encode(), 400, "n"),
        (json.dumps({"messages": user, "temperature": "hot"}).encode(), 400, "temperature"),
        (json.dumps({"messages": user, "stop": [1]}).encode(), 400, "stop"),
        (json.dumps({"messages": user, "model": "gpt-4"}).encode(), 404, "model"),
    ]
    for data, status, param in cases:
        got, body = _raw(chat, data, auth)
        assert got == status, (data[:60], got, body)
        assert set(body) == {"error"} and set(body["error"]) == {"message", "type", "param", "code"}, body
        assert body["error"]["param"] == param and body["error"]["message"], body
    # a body over 1 MiB: refused from its Content-Length, before the server reads it
    conn = http.client.HTTPConnection("127.0.0.1", int(server.url.rsplit(":", 1)[1]), timeout=60)
    conn.putrequest("POST", "/v1/chat/completions")
    for name, value in {**auth, "Content-Length": str(2 << 20)}.items():
        conn.putheader(name, value)
    conn.endheaders()
    response = conn.getresponse()
    body = json.loads(response.read())
    conn.close()
    assert response.status == 413 and set(body["error"]) == {"message", "type", "param", "code"}, body
    status, body = _raw(server.url + "/v1/completions", json.dumps({"prompt": "x" * 500, "max_tokens": 60}).encode(),
                        auth)
    assert status == 400 and "64" in body["error"]["message"]
    status, body = http_json(server.url + "/v1/nowhere", api_key=KEY)
    assert status == 404 and "error" in body
    assert "Traceback" not in server.output()
    assert http_json(server.url + "/health")[1]["status"] == "ok"       # still serving
    with _OPENER.open(server.url + "/", timeout=30) as page:
        assert page.status == 200 and "<html" in page.read().decode("utf-8").lower()


def test_start_up_errors_are_one_line(tmp_path):
    import subprocess
    import sys
    env = dict(os.environ, GLOG_v="3")
    yaml_path = _yaml(tmp_path / "s.yaml", drop_sampling=False)
    base = [sys.executable, SERVER_SCRIPT, "--config", yaml_path, "--vocab_file", TOKENIZER, "--device_target", "CPU"]
    proc = subprocess.run(base + ["--load_checkpoint", str(tmp_path / "missing.ckpt"), "--port", "0"],
                          capture_output=True, text=True, env=env, timeout=120, check=False)
    lines = [l for l in proc.stderr.splitlines() if "error" in l]
    assert proc.returncode != 0 and lines == [f"run_baichuan2_server.py: error: load_checkpoint not found: "
                                              f"{tmp_path / 'missing.ckpt'} (a .ckpt file or a folder of .ckpt "
                                              "files or rank_x/ folders)"], proc.stderr
    with socket.socket() as busy:
        busy.bind(("127.0.0.1", 0))
        busy.listen(1)
        port = busy.getsockname()[1]
        proc = subprocess.run(base + ["--port", str(port)], capture_output=True, text=True, env=env, timeout=120,
                              check=False)
    assert proc.returncode != 0
    assert proc.stderr.strip().startswith(f"run_baichuan2_server.py: error: cannot listen on 127.0.0.1:{port}")
    assert len(proc.stderr.strip().splitlines()) == 1, proc.stderr


def test_sigterm_ends_streams_with_a_final_chunk_and_exits_0(setup):
    """Last test of the module: it stops the shared server."""
    server, client, _, _, _ = setup
    stream = client.completions.create(model="baichuan2-7b", prompt=PROMPTS[2], max_tokens=SEQ - 20,
                                       temperature=0, stream=True)
    chunks = iter(stream)
    first = next(chunks)
    assert first.choices[0].finish_reason is None
    server.proc.send_signal(signal.SIGTERM)
    rest = list(chunks)                                     # ends: the final chunk, then [DONE]
    assert rest and rest[-1].choices[0].finish_reason == "abort"
    assert server.proc.wait(60) == 0
    assert _log_lines(server, "SIGTERM: shutting down", timeout=10)
