"""Multi-turn chat for Baichuan2: the prompt format and the session logic, without any terminal I/O.

``build_chat_input`` follows Hugging Face Baichuan2's ``build_chat_input`` (``generation_utils.py``):

1. an optional ``system`` message (index 0 only) is encoded first;
2. the other messages are cut into rounds, each starting at a ``user`` message; a message is
   ``[user_token_id] + encode(text)`` for the user and ``[assistant_token_id] + encode(text)`` for
   anyone else (no eos after an answer);
3. rounds are taken newest first and prepended while they fit in ``max_input_tokens - len(system)``;
   the newest round is always kept, and the walk stops once the history is full;
4. ``assistant_token_id`` is appended unless the last message is the assistant's, and only the last
   ``max_input_tokens`` ids are kept (left truncation).

The budget is ``max_input_tokens = seq_length - max_new_tokens``: the prompt plus the longest answer
fit in the model. (The MindFormers r1.0 chat script took ``max_decode_length - max_new_tokens``,
which is 512 - 512 = 0 with its defaults, so it silently forgot every previous turn.)

:class:`ChatSession` keeps the history and answers one message at a time; :func:`chat_loop` is the
command loop (``exit``/``quit``/EOF, ``clear``, ``stream``, Ctrl-C) with the reading and writing
passed in, so both can be tested without a terminal.
"""
import contextlib
import signal
import threading
import time
import _thread
from typing import Callable, Dict, List, Optional

__all__ = ["build_chat_input", "input_budget", "default_max_new_tokens", "ChatSession", "CallbackStreamer",
           "chat_loop", "CtrlC", "COMMANDS"]

COMMANDS = {
    "exit": "exit", "quit": "exit",
    "clear": "clear",
    "stream": "stream",
}


def default_max_new_tokens(seq_length):
    """Default answer length: half the model's length, as Hugging Face's 2048 of 4096.

    Leaves the other half (256 ids with the 512-long YAMLs) for the conversation so far.
    """
    return max(1, int(seq_length) // 2)


def input_budget(seq_length, max_new_tokens):
    """``seq_length - max_new_tokens``, the room for the prompt; ValueError if there is none."""
    budget = int(seq_length) - int(max_new_tokens)
    if int(max_new_tokens) <= 0:
        raise ValueError(f"--max_new_tokens must be > 0, got {max_new_tokens}")
    if budget <= 0:
        raise ValueError(f"--max_new_tokens {max_new_tokens} leaves no room for the prompt: the model's "
                         f"seq_length is {seq_length} and prompt + answer must fit in it; pass a smaller "
                         f"--max_new_tokens (default {default_max_new_tokens(seq_length)}) or a larger seq_length")
    return budget


def _encode(tokenizer, text):
    return list(tokenizer.encode(text, add_special_tokens=False)) if text else []


def _split_rounds(messages):
    system, rounds, current = "", [], []
    for index, message in enumerate(messages):
        role = message["role"]
        if role == "system":
            if index != 0:
                raise ValueError("a system message is only allowed as the first message")
            system = message["content"]
            continue
        if role == "user" and current:
            rounds.append(current)
            current = []
        current.append(message)
    if current:
        rounds.append(current)
    return system, rounds


def build_chat_input(tokenizer, messages, max_input_tokens, user_token_id=None, assistant_token_id=None):
    """Token ids of the prompt for ``messages`` (list of ``{"role", "content"}``), as a list of int.

    ``user_token_id``/``assistant_token_id`` default to the tokenizer's role ids (195/196).
    """
    if max_input_tokens <= 0:
        raise ValueError(f"max_input_tokens must be > 0, got {max_input_tokens}")
    if not messages:
        raise ValueError("build_chat_input needs at least one message")
    user_id = tokenizer.user_token_id if user_token_id is None else int(user_token_id)
    assistant_id = tokenizer.assistant_token_id if assistant_token_id is None else int(assistant_token_id)
    system, rounds = _split_rounds(messages)
    system_tokens = _encode(tokenizer, system)
    max_history_tokens = max_input_tokens - len(system_tokens)

    history: List[int] = []
    for round_messages in reversed(rounds):
        round_tokens: List[int] = []
        for message in round_messages:
            round_tokens.append(user_id if message["role"] == "user" else assistant_id)
            round_tokens.extend(_encode(tokenizer, message["content"]))
        if not history or len(history) + len(round_tokens) <= max_history_tokens:
            history = round_tokens + history
            if len(history) < max_history_tokens:
                continue
        break

    input_tokens = system_tokens + history
    if messages[-1]["role"] != "assistant":
        input_tokens.append(assistant_id)
    return input_tokens[-max_input_tokens:]


class CallbackStreamer:
    """Streamer for ``generate(streamer=...)`` that hands each completed piece of answer text to ``on_text``.

    ``generate`` first puts the prompt (skipped here), then one id per step (an int, or a one-row
    list). ``check`` (if given) runs at every step and may raise ``KeyboardInterrupt`` to stop the
    answer; with ``on_text`` None nothing is decoded. Text comes from the tokenizer's ``StreamDecoder`` without special tokens, so spaces and
    multi-byte characters come out right and the concatenation equals
    ``decode(new_ids, skip_special_tokens=True)``.
    """

    def __init__(self, tokenizer, on_text: Optional[Callable[[str], None]],
                 check: Optional[Callable[[], None]] = None):
        self.on_text = on_text
        self.check = check
        self.decoder = tokenizer.stream_decoder(skip_special_tokens=True)
        self._prompt_seen = False

    def put(self, value):
        if self.check is not None:
            self.check()                                    # may raise KeyboardInterrupt (Ctrl-C)
        if self.on_text is None:
            return
        if not self._prompt_seen:
            self._prompt_seen = True
            return
        ids = value if isinstance(value, (list, tuple)) else [value]
        for index in ids:
            if isinstance(index, (list, tuple)):          # batch form [[id]]: single row here
                index = index[0]
            text = self.decoder.put(int(index))
            if text:
                self.on_text(text)

    def end(self):
        if self.on_text is None:
            return
        text = self.decoder.end()
        if text:
            self.on_text(text)


class ChatSession:
    """History and answering, independent of any terminal.

    Args:
        generate: ``generate(input_ids (list of one list), streamer=None, **generation_kwargs)`` returning
            one id list per row (prompt + answer), e.g. a Baichuan2 network's ``generate``.
        tokenizer: ``Baichuan2Tokenizer``.
        max_input_tokens: prompt budget (``seq_length - max_new_tokens``).
        generation_kwargs: passed to ``generate`` on every turn (``max_new_tokens``, ``do_sample``...).
        stream: start with streaming on.
        user_token_id / assistant_token_id: role ids (default: the tokenizer's).
        ctrl_c: a :class:`CtrlC`; its Ctrl-C requests are checked at every generation step.
    """

    def __init__(self, generate, tokenizer, max_input_tokens, generation_kwargs=None, stream=True,
                 user_token_id=None, assistant_token_id=None, ctrl_c=None):
        self.generate = generate
        self.tokenizer = tokenizer
        self.max_input_tokens = int(max_input_tokens)
        self.generation_kwargs = dict(generation_kwargs or {})
        self.stream = stream
        self.user_token_id = user_token_id
        self.assistant_token_id = assistant_token_id
        self.ctrl_c = ctrl_c
        self.messages: List[Dict[str, str]] = []
        self.last_input_ids: Optional[List[int]] = None
        self.last_output_ids: Optional[List[int]] = None
        self._eos = {int(e) for e in _as_list(self.generation_kwargs.get("eos_token_id", tokenizer.eos_token_id))}

    def clear(self):
        """Forget the conversation."""
        self.messages = []

    def toggle_stream(self):
        """Switch streaming on/off; returns the new state."""
        self.stream = not self.stream
        return self.stream

    def input_ids_for(self, messages):
        """Prompt ids for ``messages`` under this session's budget and role ids."""
        return build_chat_input(self.tokenizer, messages, self.max_input_tokens,
                                self.user_token_id, self.assistant_token_id)

    def ask(self, text, on_text: Optional[Callable[[str], None]] = None):
        """Answer ``text`` given the history; returns the answer text.

        With streaming on and ``on_text`` given, the answer is also handed to ``on_text`` piece by
        piece while it is generated. The stored answer is decoded without special tokens (no eos).
        If generation is interrupted (Ctrl-C) or fails, the history is left as it was and the
        exception propagates.
        """
        with self.ctrl_c.generating() if self.ctrl_c is not None else contextlib.nullcontext():
            messages = self.messages + [{"role": "user", "content": text}]
            input_ids = self.input_ids_for(messages)
            self.last_input_ids, self.last_output_ids = input_ids, None
            on_text = on_text if self.stream else None
            check = self.ctrl_c.check if self.ctrl_c is not None else None
            streamer = CallbackStreamer(self.tokenizer, on_text, check) if (on_text or check) else None
            output = self.generate([input_ids], streamer=streamer, **self.generation_kwargs)
        if isinstance(output, dict):
            output = output["sequences"]
        new_ids = [int(i) for i in output[0][len(input_ids):]]
        self.last_output_ids = new_ids
        answer_ids = new_ids[:-1] if new_ids and new_ids[-1] in self._eos else new_ids
        answer = self.tokenizer.decode(answer_ids, skip_special_tokens=True)
        self.messages = messages + [{"role": "assistant", "content": answer}]
        return answer


def _as_list(value):
    if value is None:
        return []
    return list(value) if isinstance(value, (list, tuple)) else [value]


def chat_loop(session: ChatSession, read_line: Callable[[str], str], write: Callable[[str], None],
              prompt="请输入：", answer_prefix="Baichuan 2：", show_ids=False):
    """Run the interactive loop until ``exit``/``quit`` or end of input; returns 0.

    ``read_line(prompt)`` returns a line, raises ``EOFError`` at end of input (Ctrl-D) and
    ``KeyboardInterrupt`` on Ctrl-C (which just shows a fresh prompt). ``write(text)`` prints text
    as is (no newline added). Ctrl-C while answering stops the answer; the turn is dropped and the
    session goes on.
    """
    while True:
        answering = False
        try:
            try:
                line = read_line(prompt)
            except EOFError:
                write("\n")
                return 0
            text = line.strip()
            if not text:
                continue
            command = COMMANDS.get(text.lower())
            if command == "exit":
                return 0
            if command == "clear":
                session.clear()
                write("[history cleared]\n")
                continue
            if command == "stream":
                write(f"[streaming {'on' if session.toggle_stream() else 'off'}]\n")
                continue
            answering = True
            write(answer_prefix)
            answer = session.ask(line.rstrip("\r\n"), on_text=write)
            if not session.stream:
                write(answer)
            write("\n")
            if show_ids:
                write(f"[input_ids] {' '.join(map(str, session.last_input_ids))}\n")
                write(f"[output_ids] {' '.join(map(str, session.last_output_ids))}\n")
        except KeyboardInterrupt:
            write("\n[interrupted]\n" if answering else "\n")


class CtrlC:
    """Ctrl-C that stops an answer or clears the prompt, even though MindSpore runs the model.

    MindSpore installs its own C-level SIGINT handler whenever it runs a graph, and that handler
    terminates the process (SIGTERM), so a plain ``except KeyboardInterrupt`` never sees Ctrl-C.
    ``CtrlC.install()`` must run before MindSpore is imported: it blocks SIGINT in the main thread,
    so every thread created afterwards (MindSpore's and the math libraries' included) inherits the
    block and MindSpore's handler is never called. A watcher thread takes SIGINT with ``sigwait``:

    * while an answer is generated (``generating()``), it only records the request, and
      ``check()`` (called by the streamer at every step) raises ``KeyboardInterrupt`` there. An
      exception raised asynchronously inside MindSpore's own Python code (its graph parser has a
      bare ``except:``) could be swallowed, so the interruption happens at a point of our own;
    * otherwise it raises ``KeyboardInterrupt`` in the main thread (``_thread.interrupt_main``);
      while the main thread waits in ``input()`` (``waiting_for_input()``) it is also woken with
      SIGUSR1, repeatedly until ``input()`` has returned, so the prompt reacts at once.

    Where signals cannot be masked (not POSIX, not the main thread) nothing is changed.
    """

    _WAKE = getattr(signal, "SIGUSR1", None)

    def __init__(self):
        self.installed = False
        self._at_prompt = False
        self._prompt_count = 0
        self._generating = False
        self._requested = False
        self._main_id = None

    @classmethod
    def install(cls):
        """Set up the routing (once, from the main thread); returns the instance."""
        self = cls()
        if (not hasattr(signal, "pthread_sigmask") or self._WAKE is None
                or threading.current_thread() is not threading.main_thread()):
            return self
        signal.pthread_sigmask(signal.SIG_BLOCK, {signal.SIGINT})
        signal.signal(self._WAKE, lambda signum, frame: None)   # only there to interrupt a blocking read
        self._main_id = threading.main_thread().ident
        threading.Thread(target=self._watch, name="ctrl-c-watcher", daemon=True).start()
        self.installed = True
        return self

    def _watch(self):
        while True:
            signal.sigwait({signal.SIGINT})
            if self._generating:
                self._requested = True
                continue
            _thread.interrupt_main()
            # A wake-up that lands just before input() blocks in read() is lost: repeat it until that
            # input() has returned (the main thread then raises the KeyboardInterrupt).
            prompt = self._prompt_count
            while self._at_prompt and self._prompt_count == prompt:
                signal.pthread_kill(self._main_id, self._WAKE)
                time.sleep(0.05)

    def check(self):
        """Raise ``KeyboardInterrupt`` if Ctrl-C was pressed during the current answer.

        Also takes a SIGINT that is still pending because the watcher thread has not run yet (a
        loaded machine), so the answer stops at the next step in any case.
        """
        if self._requested:
            self._requested = False
            raise KeyboardInterrupt
        if self.installed and signal.SIGINT in signal.sigpending():
            if signal.sigtimedwait({signal.SIGINT}, 0) is not None:
                raise KeyboardInterrupt

    @contextlib.contextmanager
    def generating(self):
        """Mark an answer in progress: Ctrl-C is then delivered through ``check()``."""
        self._requested = False
        self._generating = True
        try:
            yield
        finally:
            self._generating = False
            self._requested = False

    @contextlib.contextmanager
    def waiting_for_input(self):
        """Mark the main thread as blocked in ``input()`` for the duration of the block."""
        self._prompt_count += 1
        self._at_prompt = True
        try:
            yield
        finally:
            self._at_prompt = False
