"""Run the real OpenAI-compatible server (``run_baichuan2_server.py``) in a subprocess for tests.

Typical use::

    config, ckpt = tiny_server_model(tmp)                        # random tiny 7B + yaml
    with start_server(["--config", config, "--load_checkpoint", ckpt, "--max_batch_size", "2"],
                      cwd=tmp) as server:
        status, body = http_json(server.url + "/v1/chat/completions", {"messages": [...]})

``start_server`` picks a free port, adds ``--vocab_file/--device_target CPU/--host/--port`` unless
given, and returns once the server printed its ``ready: http://...`` line (or raises with the end of
its output). Everything here is independent of pytest.
"""
import json
import os
import socket
import subprocess
import sys
import threading
import time
import urllib.error
import urllib.request

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
PLUGIN = os.path.join(ROOT, "research", "baichuan2")
SERVER_SCRIPT = os.path.join(PLUGIN, "run_baichuan2_server.py")
TOKENIZER = os.path.join(PLUGIN, "assets", "tokenizer.model")
READY = "ready: http://"
_OPENER = urllib.request.build_opener(urllib.request.ProxyHandler({}))   # 127.0.0.1 never through a proxy


def free_port(host="127.0.0.1"):
    with socket.socket() as sock:
        sock.bind((host, 0))
        return sock.getsockname()[1]


class ServerProcess:
    """A started server: ``url`` (``http://host:port``, from its ``ready:`` line), ``output()`` (everything it
    printed, stdout and stderr), ``stop()`` (SIGTERM, then SIGKILL after ``timeout``)."""

    def __init__(self, proc, url):
        self.proc = proc
        self.url = url
        self.lines = []
        self.ready = threading.Event()
        self._reader = threading.Thread(target=self._read, daemon=True)
        self._reader.start()

    def _read(self):
        for line in self.proc.stdout:
            self.lines.append(line.rstrip("\n"))
            if line.startswith(READY) and not self.ready.is_set():
                self.url = line.split()[1].rstrip("/")          # "ready: http://HOST:PORT (model ...)"
                self.ready.set()

    def output(self):
        return "\n".join(self.lines)

    def tail(self, lines=40):
        """The end of the output without MindSpore's [WARNING] lines, for assertion messages."""
        kept = [line for line in self.lines if not line.startswith("[WARNING]")]
        return "\n".join(kept[-lines:])

    def alive(self):
        return self.proc.poll() is None

    def wait_ready(self, timeout=300):
        deadline = time.monotonic() + timeout
        while not self.ready.wait(0.2):
            if not self.alive():
                self._reader.join(5)
                raise RuntimeError(f"server exited with code {self.proc.returncode} before it was ready:\n"
                                   f"{self.tail()}")
            if time.monotonic() > deadline:
                self.stop()
                raise RuntimeError(f"server not ready after {timeout} s:\n{self.tail()}")
        return self

    def stop(self, timeout=15):
        if self.alive():
            self.proc.terminate()
            try:
                self.proc.wait(timeout)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait(timeout)
        self._reader.join(5)

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.stop()


def launch_server(args, cwd=None, host="127.0.0.1", port=None, script=SERVER_SCRIPT, env=None):
    """Start the server without waiting (call ``wait_ready()`` on the result)."""
    args = [os.fspath(a) for a in args]
    port = port or free_port(host)
    defaults = {"--vocab_file": TOKENIZER, "--device_target": "CPU", "--host": host, "--port": str(port)}
    for flag, value in defaults.items():
        if flag not in args:
            args += [flag, value]
    full_env = dict(os.environ, GLOG_v="3", PYTHONUNBUFFERED="1", PYTHONIOENCODING="utf-8")
    full_env.update(env or {})
    proc = subprocess.Popen([sys.executable, script, *args], cwd=os.fspath(cwd) if cwd else None, env=full_env,
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, encoding="utf-8",
                            errors="replace")
    return ServerProcess(proc, f"http://{args[args.index('--host') + 1]}:{args[args.index('--port') + 1]}")


def start_server(args, cwd=None, timeout=300, **kwargs):
    """Start the server and wait for its ``ready:`` line; see the module docstring."""
    return launch_server(args, cwd=cwd, **kwargs).wait_ready(timeout)


def tiny_server_model(tmp_dir, kind="7b", seq_length=256, seed=0):
    """``(yaml_path, ckpt_path)``: a random tiny ``kind`` model (through the real HF converter) and a yaml
    derived from the tiny CPU yaml with ``seq_length`` (decode length = seq_length, greedy defaults)."""
    from model_fixtures import tiny_pair  # pylint: disable=import-outside-toplevel
    from run_helpers import write_config  # pylint: disable=import-outside-toplevel
    tmp_dir = os.fspath(tmp_dir)
    _, _, ckpt = tiny_pair(kind, tmp_dir, seed=seed)

    def edit(cfg):
        cfg["model"]["model_config"]["max_decode_length"] = seq_length

    config = write_config(os.path.join(tmp_dir, f"server_{kind}.yaml"), kind, seq_length=seq_length, edit=edit)
    return config, ckpt


def http_json(url, body=None, api_key=None, method=None, timeout=120):
    """``(status, parsed JSON body)`` of a request (POST with a JSON body when ``body`` is given)."""
    data = None if body is None else json.dumps(body).encode("utf-8")
    request = urllib.request.Request(url, data=data, method=method or ("POST" if data else "GET"))
    request.add_header("Content-Type", "application/json")
    if api_key:
        request.add_header("Authorization", f"Bearer {api_key}")
    try:
        with _OPENER.open(request, timeout=timeout) as response:
            return response.status, json.loads(response.read().decode("utf-8"))
    except urllib.error.HTTPError as err:
        raw = err.read().decode("utf-8")
        try:
            return err.code, json.loads(raw)
        except ValueError:
            return err.code, {"raw": raw}
