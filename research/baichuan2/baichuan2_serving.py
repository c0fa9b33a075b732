"""Continuous batching for Baichuan2 on the portable KV cache (the serving engine; no HTTP here).

One network built with ``use_past=True, batch_size=B`` serves up to ``B`` requests at once; each
running request owns one cache row:

* a new request is prefilled alone into a free row (batch-1 prefill with ``cache_rows=[row]``),
  which leaves the other rows' caches untouched, and joins the next decode step;
* a decode step feeds every row its last token (free rows: token 0 at length 1, output ignored)
  over the cache window ``decode_window(longest row, seq_length)``;
* a finished or cancelled request frees its row at once; waiting requests sit in a FIFO queue
  bounded by ``max_queue`` (``QueueFullError`` beyond it).

Every row picks its next token with ``choose_next_token`` under its own parameters and its own
``numpy`` generator (``default_rng(seed)``), so a request's output does not depend on its batch
mates: greedy output equals ``generate()`` run alone. Text comes from the tokenizer's
``StreamDecoder`` (multi-byte characters whole); stop strings end a request and are cut from the
text, and text that could still be the start of a stop string is held back until it is not.

The engine runs in its own thread (MindSpore calls block); each request's ``sink(RequestOutput)``
is called from that thread, so an asyncio caller hands events over with ``call_soon_threadsafe``.
That thread is the only one that runs a network while the engine runs: MindSpore's PyNative executor
is not safe to drive from two threads at once (a batch-1 reference network run from a test's thread
beside the engine gave wrong tokens about once in 40 runs under load).
"""
import collections
import dataclasses
import itertools
import json
import logging
import threading
import time
from typing import Callable, Dict, List, Optional, Sequence

import numpy as np
from mindspore import Tensor
from mindspore import dtype as mstype

from baichuan2_generation import _bucket, choose_next_token, decode_window
from baichuan2_memory import prefill_widths as all_prefill_widths

logger = logging.getLogger("baichuan2.serving")

__all__ = ["SamplingParams", "RequestOutput", "RequestHandle", "QueueFullError", "EngineStoppedError",
           "Baichuan2ServingEngine", "chat_generation_defaults", "HF_CHAT_GENERATION_CONFIG"]

# Baichuan2-Chat's generation_config.json (Hugging Face) sampling values and answer length.
HF_CHAT_GENERATION_CONFIG = {"do_sample": True, "top_k": 5, "top_p": 0.85, "temperature": 0.3,
                             "repetition_penalty": 1.05, "max_new_tokens": 2048}
USER_TOKEN_ID = 195


def chat_generation_defaults(model_config=None, generation_config_path=None):
    """Sampling defaults of a chat request: ``{do_sample, top_k, top_p, temperature, repetition_penalty,
    max_new_tokens}``.

    Baichuan2-Chat's ``generation_config.json`` values, overridden by the keys a Hugging Face
    ``generation_config.json`` file at ``generation_config_path`` sets or, without a file, by the keys
    the YAML's ``model_config`` (a mapping) sets. Used by the server and the chat CLI alike.
    """
    defaults = dict(HF_CHAT_GENERATION_CONFIG)
    if generation_config_path:
        with open(generation_config_path, encoding="utf-8") as handle:
            source = json.load(handle)
        if not isinstance(source, dict):
            raise ValueError(f"generation config {generation_config_path} is not a JSON object")
    else:
        source = model_config or {}
    for key in defaults:
        value = source.get(key) if hasattr(source, "get") else None
        if value is not None:
            defaults[key] = type(HF_CHAT_GENERATION_CONFIG[key])(value)
    return defaults


@dataclasses.dataclass
class SamplingParams:
    """How one request generates (HF semantics; see ``baichuan2_generation``).

    ``max_new_tokens`` is capped by the model length; ``seed`` None draws a fresh seed; ``stop``
    strings end the answer (not included); ``stop_token_ids`` end it too (not included in the text).
    """
    max_new_tokens: int = 16
    do_sample: bool = False
    top_k: int = 0
    top_p: float = 1.0
    temperature: float = 1.0
    repetition_penalty: float = 1.0
    seed: Optional[int] = None
    stop: Sequence[str] = ()
    stop_token_ids: Sequence[int] = (2, USER_TOKEN_ID)


@dataclasses.dataclass
class RequestOutput:
    """One event of a request: new text (``text``, may be empty) and new ids; the last has ``finished``.

    ``finish_reason``: ``"stop"`` (stop token or string), ``"length"``, ``"cancelled"`` (by the
    client) or ``"abort"`` (engine shut down).
    """
    request_id: str
    text: str
    token_ids: List[int]
    finished: bool = False
    finish_reason: Optional[str] = None
    prompt_tokens: int = 0
    completion_tokens: int = 0


class QueueFullError(RuntimeError):
    """The waiting queue holds ``max_queue`` requests already."""


class EngineStoppedError(RuntimeError):
    """The engine is shutting down and takes no more requests."""


class _StopText:
    """Incremental text of one answer with stop strings cut out and possible stop prefixes held back."""

    def __init__(self, tokenizer, stop):
        self.decoder = tokenizer.stream_decoder(skip_special_tokens=True)
        self.vocab_size = len(tokenizer)
        self.stop = [s for s in stop if s]
        self.text = ""          # everything decoded so far
        self.sent = 0           # characters of ``text`` already handed out

    def put(self, token_id):
        """Add an id; returns (new safe text, stopped)."""
        if token_id >= self.vocab_size:      # a model vocabulary larger than the tokenizer's (random-weight
            return self._advance(self.decoder.end() + "\ufffd", final=False)   # benchmarks): U+FFFD
        return self._advance(self.decoder.put(token_id), final=False)

    def end(self):
        """No more ids: flush; returns (remaining text, stopped)."""
        return self._advance(self.decoder.end(), final=True)

    def _advance(self, piece, final):
        if not piece and not final:
            return "", False
        start = max(0, len(self.text) - max((len(s) for s in self.stop), default=0))
        self.text += piece
        hits = [i for i in (self.text.find(s, start) for s in self.stop) if i >= 0]
        if hits:
            self.text = self.text[:min(hits)]
            return self._take(len(self.text)), True
        hold = 0 if final else self._held_back()
        return self._take(len(self.text) - hold), False

    def _held_back(self):
        """Length of the longest suffix of ``text`` that starts some stop string."""
        longest = 0
        for stop in self.stop:
            for size in range(min(len(stop) - 1, len(self.text)), longest, -1):
                if self.text.endswith(stop[:size]):
                    longest = size
                    break
        return longest

    def _take(self, upto):
        upto = max(upto, self.sent)
        out, self.sent = self.text[self.sent:upto], upto
        return out


class RequestHandle:
    """A submitted request: ``cancel()`` it, or ``result()`` to wait for it (only without a sink)."""

    def __init__(self, request_id, prompt_ids, params, sink, tokenizer, seq_length):
        self.request_id = request_id
        self.prompt_ids = list(prompt_ids)
        self.params = params
        self.limit = min(len(self.prompt_ids) + int(params.max_new_tokens), seq_length)
        self.generated: List[int] = []
        self.text = _StopText(tokenizer, params.stop)
        seed = params.seed if params.seed is not None else int(np.random.SeedSequence().entropy % (2 ** 63))
        self.rng = np.random.default_rng(seed)
        self.stop_ids = {int(t) for t in params.stop_token_ids}
        self.row: Optional[int] = None
        self.cancelled = False
        self.finish_reason: Optional[str] = None
        self.submitted = time.monotonic()
        self.first_token_at: Optional[float] = None
        self.finished_at: Optional[float] = None
        self._sink = sink
        self._done = threading.Event()
        self._chunks: List[str] = []

    def cancel(self):
        """Ask the engine to drop this request; its row is freed before the next decode step."""
        self.cancelled = True

    @property
    def done(self):
        return self._done.is_set()

    def wait(self, timeout=None):
        """Block until finished; True if it finished within ``timeout``."""
        return self._done.wait(timeout)

    def result(self, timeout=None):
        """``(text, generated ids, finish_reason)`` once finished (TimeoutError otherwise)."""
        if not self._done.wait(timeout):
            raise TimeoutError(f"request {self.request_id} not finished after {timeout} s")
        return "".join(self._chunks), list(self.generated), self.finish_reason

    def _emit(self, text, token_ids, finish_reason=None):
        finished = finish_reason is not None
        if finished:
            self.finish_reason = finish_reason
        self._chunks.append(text)
        event = RequestOutput(self.request_id, text, list(token_ids), finished, finish_reason,
                              len(self.prompt_ids), len(self.generated))
        try:
            if self._sink is not None:
                self._sink(event)
        finally:
            if finished:
                self._done.set()


class Baichuan2ServingEngine:
    """Continuous batching over one Baichuan2 network with a KV cache (see the module docstring).

    Args:
        network: ``Baichuan2ForCausalLM`` built with ``use_past=True``; its ``batch_size`` is the
            number of rows decoded together.
        tokenizer: ``Baichuan2Tokenizer`` (text streaming, stop strings).
        max_queue: waiting requests beyond the running ones before ``submit`` raises ``QueueFullError``.
    """

    def __init__(self, network, tokenizer, max_queue=64):
        config = network.config
        if not config.use_past:
            raise ValueError("the serving engine needs a network built with use_past=True (a KV cache)")
        self.network = network
        self.tokenizer = tokenizer
        self.batch_size = int(config.batch_size)
        self.seq_length = int(config.seq_length)
        self.pad_token_id = int(config.pad_token_id or 0)
        self.max_queue = int(max_queue)
        self.rows: List[Optional[RequestHandle]] = [None] * self.batch_size
        self.steps = 0                      # decode steps run (tests use it to tell "mid-way")
        self._queue: collections.deque = collections.deque()
        self._lock = threading.Condition()
        self._stopping = False
        self._ids = itertools.count()
        self._thread: Optional[threading.Thread] = None
        self._step_hooks: List[Callable[["Baichuan2ServingEngine"], None]] = []
        self.error: Optional[BaseException] = None
        network.set_train(False)

    # ----- public API ------------------------------------------------------------------------
    def start(self):
        """Run the scheduling loop in a daemon thread; returns self."""
        self._thread = threading.Thread(target=self._loop, name="baichuan2-engine", daemon=True)
        self._thread.start()
        return self

    def submit(self, prompt_ids, params: SamplingParams, sink: Optional[Callable[[RequestOutput], None]] = None,
               request_id=None) -> RequestHandle:
        """Queue a request (prompt ids, list of int); ``sink(RequestOutput)`` gets its events (engine thread).

        Raises ``ValueError`` for an empty or too long prompt, ``QueueFullError``, ``EngineStoppedError``.
        """
        prompt_ids = [int(i) for i in prompt_ids]
        if not prompt_ids:
            raise ValueError("the prompt is empty")
        if len(prompt_ids) >= self.seq_length:
            raise ValueError(f"the prompt has {len(prompt_ids)} tokens; the model holds {self.seq_length} "
                             "(prompt + new tokens)")
        if int(params.max_new_tokens) <= 0:
            raise ValueError(f"max_new_tokens must be > 0, got {params.max_new_tokens}")
        if params.do_sample and float(params.temperature) <= 0:
            raise ValueError("temperature must be > 0 when sampling")
        handle = RequestHandle(request_id or f"req-{next(self._ids)}", prompt_ids, params, sink,
                               self.tokenizer, self.seq_length)
        with self._lock:
            if self._stopping:
                raise EngineStoppedError("the server is shutting down")
            # Queued requests that free rows will take at the next admission do not count as waiting.
            waiting = len(self._queue) - self.rows.count(None)
            if waiting >= self.max_queue:
                raise QueueFullError(f"{waiting} requests are waiting already (max_queue {self.max_queue})")
            self._queue.append(handle)
            self._lock.notify_all()
        return handle

    def wake(self):
        """Make the loop look at cancellations now (e.g. after ``handle.cancel()``)."""
        with self._lock:
            self._lock.notify_all()

    def shutdown(self, timeout=30.0):
        """Stop: running and waiting requests end with ``finish_reason="abort"``; joins the thread."""
        with self._lock:
            self._stopping = True
            self._lock.notify_all()
        if self._thread is not None and self._thread is not threading.current_thread():
            self._thread.join(timeout)

    @property
    def running(self):
        """Number of rows in use."""
        return sum(r is not None for r in self.rows)

    @property
    def waiting(self):
        """Number of queued requests."""
        with self._lock:
            return len(self._queue)

    def warmup(self, prefill_widths=None, decode_windows=None):
        """Compile (graph mode) the prefill widths and decode windows before serving; returns seconds.

        Defaults: every prefill bucket (16, 32, ... up to seq_length) and the first decode window;
        other shapes compile on first use.
        Only valid before ``start()``: it writes into free cache rows, which later prefills overwrite.
        """
        begin = time.monotonic()
        if prefill_widths is None:
            prefill_widths = all_prefill_widths(self.seq_length)
        if decode_windows is None:
            decode_windows = [decode_window(1, self.seq_length)]
        for width in prefill_widths:
            tokens = np.full((1, width), self.pad_token_id, dtype=np.int32)
            tokens[0, 0] = 1
            self._prefill(tokens, 1, 0)
        for window in decode_windows:
            self._decode(np.zeros((self.batch_size, 1), np.int32), np.ones(self.batch_size, np.int32), window)
        return time.monotonic() - begin

    # ----- network calls ---------------------------------------------------------------------
    def _phase(self, prefill):
        if self.network.is_first_iteration != prefill:     # walks every cell: only on a change
            self.network.set_decode_phase(prefill)

    def _prefill(self, tokens, length, row):
        """Logits (V,) of the last prompt token; writes the prompt into cache row ``row``."""
        self._phase(True)
        logits = self.network(Tensor(tokens, mstype.int32), None, None, None, None, None, None,
                              Tensor(np.array([length], np.int32)), None, Tensor(np.array([row], np.int32)))
        return logits.asnumpy()[0]

    def _decode(self, tokens, lengths, window):
        """Logits (B, V) of one decode step of every row over the first ``window`` cache slots."""
        self._phase(False)
        logits = self.network(Tensor(tokens, mstype.int32), None, None, None, None, None, None,
                              Tensor(lengths, mstype.int32), Tensor(np.arange(window, dtype=np.int32)))
        return logits.asnumpy()

    # ----- scheduling ------------------------------------------------------------------------
    def _loop(self):
        try:
            while True:
                with self._lock:
                    while not self._stopping and not self._queue and not any(self.rows):
                        self._lock.wait()
                    if self._stopping:
                        break
                self._drop_cancelled()
                self._admit()
                if any(self.rows):
                    self._step()
                    for hook in list(self._step_hooks):
                        hook(self)
        except BaseException as error:       # pylint: disable=broad-except
            logger.exception("engine stopped by an error")
            self.error = error
        finally:
            with self._lock:
                self._stopping = True
                waiting, self._queue = list(self._queue), collections.deque()
            for handle in [r for r in self.rows if r is not None] + waiting:
                self._finish(handle, "abort")

    def _drop_cancelled(self):
        with self._lock:
            cancelled = [h for h in self._queue if h.cancelled]
            for handle in cancelled:
                self._queue.remove(handle)
        for handle in cancelled + [r for r in self.rows if r is not None and r.cancelled]:
            self._finish(handle, "cancelled")

    def _admit(self):
        """Prefill waiting requests into free rows, oldest first."""
        while None in self.rows:
            with self._lock:
                if not self._queue:
                    return
                handle = self._queue.popleft()
            row = self.rows.index(None)
            handle.row = row
            self.rows[row] = handle
            prompt = handle.prompt_ids
            tokens = np.full((1, _bucket(len(prompt), self.seq_length)), self.pad_token_id, dtype=np.int32)
            tokens[0, :len(prompt)] = prompt
            logits = self._prefill(tokens, len(prompt), row)
            self._accept(handle, logits)

    def _step(self):
        tokens = np.zeros((self.batch_size, 1), np.int32)
        lengths = np.ones(self.batch_size, np.int32)
        for row, handle in enumerate(self.rows):
            if handle is not None:
                tokens[row, 0] = handle.generated[-1]
                lengths[row] = len(handle.prompt_ids) + len(handle.generated)
        logits = self._decode(tokens, lengths, decode_window(int(lengths.max()), self.seq_length))
        self.steps += 1
        for row, handle in enumerate(self.rows):
            if handle is not None:
                self._accept(handle, logits[row])

    def _accept(self, handle, logits):
        """Choose the next id of ``handle`` from its logits (V,), hand out text, finish if done."""
        token = choose_next_token(logits, handle.prompt_ids + handle.generated, handle.params, handle.rng)
        handle.generated.append(token)
        if handle.first_token_at is None:
            handle.first_token_at = time.monotonic()
        if token in handle.stop_ids:
            self._finish(handle, "stop", token)
            return
        text, stopped = handle.text.put(token)
        if stopped:
            self._finish(handle, "stop", token, text, flush=False)
        elif len(handle.prompt_ids) + len(handle.generated) >= handle.limit:
            self._finish(handle, "length", token, text)
        else:
            handle._emit(text, [token])                     # pylint: disable=protected-access

    def _finish(self, handle, reason, token=None, text="", flush=True):
        """Free the row, flush the held-back text (not after a stop string), send the final event, log."""
        if handle.finish_reason is not None:
            return
        if handle.row is not None and self.rows[handle.row] is handle:
            self.rows[handle.row] = None
        if flush:
            rest, _ = handle.text.end()
            text += rest
        handle.finished_at = time.monotonic()
        _log_request(handle, reason)         # before the final event: the log line precedes the response
        handle._emit(text, [] if token is None else [token], reason)   # pylint: disable=protected-access


def _log_request(handle, reason):
    elapsed = (handle.finished_at or time.monotonic()) - handle.submitted
    ttft = (handle.first_token_at - handle.submitted) if handle.first_token_at else float("nan")
    decode_time = (handle.finished_at or time.monotonic()) - (handle.first_token_at or handle.submitted)
    rate = (len(handle.generated) - 1) / decode_time if len(handle.generated) > 1 and decode_time > 0 else 0.0
    params = handle.params
    logger.info("request %s: prompt %d tokens, completion %d tokens, ttft %.3f s, %.1f tokens/s, %.2f s, "
                "finish %s, params do_sample=%s top_k=%s top_p=%s temperature=%s repetition_penalty=%s "
                "max_new_tokens=%s seed=%s", handle.request_id, len(handle.prompt_ids), len(handle.generated),
                ttft, rate, elapsed, reason, params.do_sample, params.top_k, params.top_p,
                params.temperature, params.repetition_penalty, params.max_new_tokens, params.seed)
