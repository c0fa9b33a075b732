"""OpenAI-compatible HTTP server for a Baichuan2 Chat model, with continuous batching and streaming.

From ``research/baichuan2`` (``--device_target CPU`` on a machine without Ascend)::

    python run_baichuan2_server.py --config run_baichuan2_7b.yaml --load_checkpoint /path/to/Baichuan2-7B-Chat.ckpt \\
        --vocab_file /path/to/tokenizer.model --device_target CPU --port 8000 --max_batch_size 4

Then ``curl http://127.0.0.1:8000/v1/chat/completions -d '{"messages": [{"role": "user", "content": "你好"}]}'``,
the ``openai`` client with ``base_url="http://127.0.0.1:8000/v1"``, or the chat page at ``http://127.0.0.1:8000/``.
See ``docs/serving.md``. The server loads the model once, compiles the prefill widths and the first
decode window, prints ``ready: http://HOST:PORT (model NAME, batch B)`` and serves until SIGINT/SIGTERM
(running streams then get a final chunk; exit status 0).
"""
import argparse
import logging
import os
import signal
import socket
import sys
import threading

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

from baichuan2_cli import add_model_arguments, fail  # noqa: E402  (standard library only: MindSpore not loaded yet)

PROG = "run_baichuan2_server.py"
_SIGNALS = {signal.SIGINT, signal.SIGTERM}


def build_parser():
    """The chat CLI's model flags plus the server's own."""
    parser = argparse.ArgumentParser(prog=PROG, description=__doc__.split("\n")[0])
    add_model_arguments(parser, default_config="baichuan2/run_baichuan2_7b.yaml")
    parser.add_argument("--host", default="127.0.0.1", help="Address to listen on (default 127.0.0.1).")
    parser.add_argument("--port", default=8000, type=int, help="Port (default 8000; 0 picks a free one).")
    parser.add_argument("--max_batch_size", default=4, type=int, help="Requests decoded together (cache rows).")
    parser.add_argument("--max_queue", default=64, type=int,
                        help="Requests waiting for a row before the server answers 503 (default 64).")
    parser.add_argument("--served_model_name", default=None,
                        help="Model id of the API (default: from the YAML, e.g. baichuan2-7b).")
    parser.add_argument("--api_key", default=None,
                        help="Require 'Authorization: Bearer <key>' on /v1/* (default: no key).")
    parser.add_argument("--generation_config", default=None,
                        help="Hugging Face generation_config.json with the sampling defaults "
                             "(default: the YAML's model_config values, else Baichuan2-Chat's).")
    parser.add_argument("--warmup", default="full", choices=("full", "minimal"),
                        help="Compile before 'ready': full = every prefill width (16, 32, ... seq_length) and the "
                             "first decode window; minimal = the smallest prefill width and the first window.")
    parser.add_argument("--max_body_bytes", default=1 << 20, type=int, help="Largest request body (default 1 MiB).")
    return parser


def served_model_name(config, yaml_path):
    """``baichuan2-7b`` / ``baichuan2-13b`` (with ``-lora``) from the trainer's model_name, else the YAML name."""
    name = (config.trainer or {}).get("model_name") if hasattr(config, "trainer") else None
    if not name:
        name = os.path.splitext(os.path.basename(yaml_path))[0].replace("run_", "")
    return str(name).replace("_", "-")


def _fail(message):
    return fail(PROG, message)


def _check_args(args):
    if args.max_batch_size < 1:
        raise ValueError(f"--max_batch_size must be >= 1, got {args.max_batch_size}")
    if args.max_queue < 0:
        raise ValueError(f"--max_queue must be >= 0, got {args.max_queue}")
    if not os.path.isfile(args.config):
        raise FileNotFoundError(f"config not found: {args.config}")
    if args.load_checkpoint and not os.path.exists(args.load_checkpoint):
        raise FileNotFoundError(f"load_checkpoint not found: {args.load_checkpoint} "
                                "(a .ckpt file or a folder of .ckpt files or rank_x/ folders)")
    if args.generation_config and not os.path.isfile(args.generation_config):
        raise FileNotFoundError(f"generation config not found: {args.generation_config}")


def _listen(host, port):
    """A bound, listening socket (before anything is loaded: a port in use fails at once)."""
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    sock = socket.socket(family, socket.SOCK_STREAM)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    try:
        sock.bind((host, port))
    except OSError as error:
        sock.close()
        raise OSError(f"cannot listen on {host}:{port}: {error.strerror or error}") from None
    sock.listen(128)
    sock.set_inheritable(True)
    return sock


def _setup_logging():
    logger = logging.getLogger("baichuan2.serving")
    handler = logging.StreamHandler(sys.stderr)
    handler.setFormatter(logging.Formatter("%(asctime)s %(levelname)s %(message)s"))
    logger.handlers[:] = [handler]
    logger.setLevel(logging.INFO)
    logger.propagate = False
    return logger


def main(argv=None):
    """Serve until SIGINT/SIGTERM; returns the exit status (0, or 2 for a start-up error)."""
    # MindSpore installs a C-level SIGINT handler that ends the process whenever it runs a graph.
    # Block both signals before it loads (every later thread inherits the mask) and take them with
    # sigwait in a thread of our own, which turns them into a graceful shutdown.
    args = build_parser().parse_args(argv)
    signal.pthread_sigmask(signal.SIG_BLOCK, _SIGNALS)
    logger = _setup_logging()
    stopper = _Stopper(logger)
    threading.Thread(target=stopper.watch, name="signal-watcher", daemon=True).start()
    try:
        _check_args(args)
        sock = _listen(args.host, args.port)
    except (ValueError, OSError) as error:
        return _fail(error)
    try:
        return _serve(args, sock, logger, stopper)
    finally:
        sock.close()


class _Stopper:
    """Takes SIGINT/SIGTERM with ``sigwait``: before the server runs, ends the process (status 130);
    afterwards, aborts the running requests (their streams get a final chunk) and stops uvicorn."""

    def __init__(self, logger):
        self.logger = logger
        self.engine = None
        self.server = None
        self._lock = threading.Lock()

    def serve(self, engine, server):
        with self._lock:
            self.engine, self.server = engine, server

    def watch(self):
        signum = signal.sigwait(_SIGNALS)
        name = signal.Signals(signum).name
        with self._lock:
            if self.server is None:
                print(f"{PROG}: interrupted by {name} during start-up", file=sys.stderr, flush=True)
                os._exit(130)                       # pylint: disable=protected-access
            self.logger.info("%s: shutting down (running requests end with finish_reason 'abort')", name)
            self.engine.shutdown()                  # in-flight streams get their final chunk and [DONE]
            self.server.should_exit = True


def _serve(args, sock, logger, stopper):
    # pylint: disable=import-outside-toplevel
    from baichuan2_inference import prepare_config, build_tokenizer, build_inference_network
    try:
        config = prepare_config(args, batch_size=args.max_batch_size, use_past=True)
        model_config = config.model.model_config
        seq_length = int(model_config.seq_length)
        tokenizer = build_tokenizer(config)
        from baichuan2_serving import Baichuan2ServingEngine, chat_generation_defaults
        defaults = chat_generation_defaults(model_config, args.generation_config)
        name = args.served_model_name or served_model_name(config, args.config)
    except (ValueError, FileNotFoundError, OSError) as error:
        return _fail(error)
    import uvicorn
    from baichuan2_openai_api import ApiSettings, create_app

    network = build_inference_network(config, batch_size=args.max_batch_size, use_past=True)
    engine = Baichuan2ServingEngine(network, tokenizer, max_queue=args.max_queue)
    seconds = engine.warmup(prefill_widths=[min(16, seq_length)] if args.warmup == "minimal" else None)
    logger.info("warm-up (%s) compiled in %.1f s; defaults %s", args.warmup, seconds, defaults)
    engine.start()

    host, port = sock.getsockname()[:2]
    eos = model_config.eos_token_id
    settings = ApiSettings(
        model_name=name, seq_length=seq_length, defaults=defaults,
        eos_token_ids=tuple(eos) if isinstance(eos, (list, tuple)) else (int(eos if eos is not None else 2),),
        user_token_id=tokenizer.user_token_id, assistant_token_id=tokenizer.assistant_token_id,
        api_key=args.api_key, max_body_bytes=args.max_body_bytes,
        on_startup=lambda: print(f"ready: http://{host}:{port} (model {name}, batch {args.max_batch_size})",
                                 flush=True))
    server = uvicorn.Server(uvicorn.Config(create_app(engine, tokenizer, settings), log_level="warning",
                                           access_log=False, timeout_graceful_shutdown=30, lifespan="on"))

    stopper.serve(engine, server)
    server.run(sockets=[sock])
    engine.shutdown()
    logger.info("stopped")
    return 0


if __name__ == "__main__":
    sys.exit(main())
