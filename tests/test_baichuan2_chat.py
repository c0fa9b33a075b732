"""Chat: Hugging Face ``build_chat_input`` rules, the session logic, and the real CLI in a pseudo-terminal.

The CLI tests run ``research/baichuan2/run_baichuan2_chat.py`` on a tiny random 7B-shaped model that
went through the HF -> MindSpore converter, with a full checkpoint, a base + LoRA folder and a
``rank_x/`` folder, and compare what it prints with ``generate()`` run here on the same weights.
"""
import os
import pty
import re
import select
import signal
import subprocess
import sys
import time

import numpy as np
import pytest

import baichuan2_chat as chat
from baichuan2_chat import build_chat_input, ChatSession, chat_loop, input_budget, default_max_new_tokens

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
PLUGIN = os.path.join(ROOT, "research", "baichuan2")
CHAT = os.path.join(PLUGIN, "run_baichuan2_chat.py")
TINY_YAML = os.path.join(PLUGIN, "run_baichuan2_7b_cpu_tiny.yaml")
VOCAB = os.path.join(PLUGIN, "assets", "tokenizer.model")
USER, ASSISTANT, EOS = 195, 196, 2


class WordTokenizer:
    """Each space-separated word is one id (10 + its integer value): lengths are easy to control."""
    user_token_id, assistant_token_id, eos_token_id = USER, ASSISTANT, EOS

    def encode(self, text, add_special_tokens=False):  # pylint: disable=unused-argument
        return [10 + int(w) for w in text.split()]


def words(n, start=0):
    return " ".join(str(start + i) for i in range(n))


def ids(n, start=0):
    return [10 + start + i for i in range(n)]


def msg(role, content):
    return {"role": role, "content": content}


# ---------------------------------------------------------------- build_chat_input (HF rules)

def test_single_turn_is_the_documented_template():
    tok = WordTokenizer()
    assert build_chat_input(tok, [msg("user", words(3))], 100) == [USER] + ids(3) + [ASSISTANT]


def test_rounds_no_eos_after_answers_and_assistant_last():
    tok = WordTokenizer()
    messages = [msg("user", words(2)), msg("assistant", words(3, 50)), msg("user", words(1, 80))]
    expected = [USER] + ids(2) + [ASSISTANT] + ids(3, 50) + [USER] + ids(1, 80) + [ASSISTANT]
    assert build_chat_input(tok, messages, 100) == expected
    assert EOS not in expected
    # Last message from the assistant: no assistant token appended (continue that answer).
    assert build_chat_input(tok, messages[:2], 100) == [USER] + ids(2) + [ASSISTANT] + ids(3, 50)


def _three_rounds():
    # Round tokens: R1 = 1+3+1+4 = 9, R2 = 1+2+1+3 = 7, R3 = 1+1 = 2 (+ the final assistant token).
    messages = [msg("user", words(3, 0)), msg("assistant", words(4, 100)),
                msg("user", words(2, 200)), msg("assistant", words(3, 300)),
                msg("user", words(1, 400))]
    r1 = [USER] + ids(3, 0) + [ASSISTANT] + ids(4, 100)
    r2 = [USER] + ids(2, 200) + [ASSISTANT] + ids(3, 300)
    r3 = [USER] + ids(1, 400)
    return messages, r1, r2, r3


@pytest.mark.parametrize("budget, expected", [
    (100, "r1 r2 r3 A"),      # everything fits
    (18, "r1 r2 r3 A"),       # 9 + 7 + 2 = 18 = budget: fits exactly (the appended token then cut on the left)
    (17, "r2 r3 A"),          # R1 would make 18 > 17: dropped, oldest first
    (10, "r2 r3 A"),          # 9 <= 10 and 9 < 10: still looking, R1 does not fit
    (9, "r2 r3 A"),           # 9 == 9: history full; + assistant token = 10 -> left-truncated to 9
    (8, "r3 A"),              # R2 would make 9 > 8
    (2, "r3 A"),              # the newest round is always kept, then cut on the left
    (1, "r3 A"),
])
def test_history_budget_newest_first_with_left_truncation(budget, expected):
    messages, r1, r2, r3 = _three_rounds()
    parts = {"r1": r1, "r2": r2, "r3": r3, "A": [ASSISTANT]}
    full = [t for name in expected.split() for t in parts[name]]
    assert build_chat_input(WordTokenizer(), messages, budget) == full[-budget:]


def test_newest_round_longer_than_the_budget_is_cut_on_the_left():
    tok = WordTokenizer()
    messages = [msg("user", words(2)), msg("assistant", words(2, 20)), msg("user", words(30, 100))]
    out = build_chat_input(tok, messages, 10)
    assert out == (ids(30, 100) + [ASSISTANT])[-10:]


def test_system_message_counts_against_the_budget():
    tok = WordTokenizer()
    messages, r1, r2, r3 = _three_rounds()
    with_system = [msg("system", words(5, 900))] + messages
    # 5 system tokens leave 12 for the history: R3 + R2 = 9 fit, R1 does not.
    assert build_chat_input(tok, with_system, 17) == ids(5, 900) + r2 + r3 + [ASSISTANT]
    with pytest.raises(ValueError, match="system"):
        build_chat_input(tok, messages[:1] + [msg("system", "1")], 17)


def test_budget_and_default_answer_length():
    assert default_max_new_tokens(512) == 256
    assert default_max_new_tokens(4096) == 2048                # Hugging Face: 2048 of model_max_length 4096
    assert input_budget(512, 256) == 256
    assert input_budget(128, 127) == 1
    for bad in (512, 600):
        with pytest.raises(ValueError, match="--max_new_tokens"):
            input_budget(512, bad)
    with pytest.raises(ValueError, match="max_input_tokens"):
        build_chat_input(WordTokenizer(), [msg("user", "1")], 0)


# ---------------------------------------------------------------- session logic (fake generate)

@pytest.fixture(scope="module")
def tokenizer():
    from baichuan2_tokenizer import Baichuan2Tokenizer
    return Baichuan2Tokenizer(vocab_file=VOCAB)


class FakeModel:
    """``generate`` that answers with fixed ids (+ eos), streams them, and records its prompts."""

    def __init__(self, answers, interrupt_after=None):
        self.answers = list(answers)
        self.prompts = []
        self.interrupt_after = interrupt_after

    def generate(self, input_ids, streamer=None, **kwargs):
        prompt = list(input_ids[0])
        self.prompts.append(prompt)
        answer = self.answers[(len(self.prompts) - 1) % len(self.answers)]
        if streamer is not None:
            streamer.put(np.array(prompt))
        for step, token in enumerate(answer):
            if self.interrupt_after is not None and step == self.interrupt_after:
                raise KeyboardInterrupt
            if streamer is not None:
                streamer.put(token)
        if streamer is not None:
            streamer.end()
        return [prompt + list(answer)]


def test_session_keeps_history_without_eos_and_streams_the_same_text(tokenizer):
    first_text, second_text = "你好！我是 Baichuan 2 的小模型。", "Sure,  two  spaces 😀"
    answers = [tokenizer.encode(first_text) + [EOS], tokenizer.encode(second_text) + [EOS]]
    model = FakeModel(answers)
    session = ChatSession(model.generate, tokenizer, max_input_tokens=200, stream=True)
    pieces = []
    assert session.ask("你好", on_text=pieces.append) == first_text
    assert "".join(pieces) == first_text and len(pieces) > 3          # token by token, exact text
    assert session.messages[-1] == {"role": "assistant", "content": first_text}
    assert "</s>" not in session.messages[-1]["content"]
    assert session.ask("再来") == second_text
    turn1 = [USER] + tokenizer.encode("你好") + [ASSISTANT] + tokenizer.encode(first_text)
    assert model.prompts[1] == turn1 + [USER] + tokenizer.encode("再来") + [ASSISTANT]
    session.clear()
    session.toggle_stream()
    pieces = []
    assert session.ask("你好", on_text=pieces.append) == first_text and pieces == []
    assert model.prompts[2] == model.prompts[0]


def test_interrupted_answer_leaves_the_history_unchanged(tokenizer):
    model = FakeModel([tokenizer.encode("一二三四五六") + [EOS]], interrupt_after=3)
    session = ChatSession(model.generate, tokenizer, max_input_tokens=200)
    pieces = []
    with pytest.raises(KeyboardInterrupt):
        session.ask("你好", on_text=pieces.append)
    assert session.messages == [] and pieces
    model.interrupt_after = None
    session.ask("你好")
    assert len(session.messages) == 2


def test_ctrl_c_during_an_answer_stops_it_at_the_next_step(tokenizer):
    ctrl_c = chat.CtrlC()                                   # not installed: requests are set by hand below
    produced, press_at = [], [2]

    def generate(input_ids, streamer=None, **kwargs):
        streamer.put(np.array(input_ids[0]))
        for token in tokenizer.encode("一二三四"):
            if len(produced) in press_at:
                ctrl_c._requested = True                    # what the watcher thread does on Ctrl-C
            streamer.put(token)
            produced.append(token)
        streamer.end()
        return [list(input_ids[0]) + tokenizer.encode("一二三四")]

    session = ChatSession(generate, tokenizer, max_input_tokens=100, stream=False, ctrl_c=ctrl_c)
    with pytest.raises(KeyboardInterrupt):
        session.ask("你好")
    assert len(produced) == 2 and session.messages == []
    produced.clear()
    press_at.clear()
    ctrl_c._requested = True                                # a request left over from before: not this answer's
    with ctrl_c.generating():
        ctrl_c.check()
    assert session.ask("你好") == "一二三四"


def test_chat_loop_commands(tokenizer):
    model = FakeModel([tokenizer.encode("好的") + [EOS]])
    session = ChatSession(model.generate, tokenizer, max_input_tokens=200)
    script = iter(["", "你好", "stream", "再说", "clear", KeyboardInterrupt, "Quit"])
    out = []

    def read_line(prompt):
        out.append(prompt)
        item = next(script)
        if item is KeyboardInterrupt:
            raise KeyboardInterrupt
        return item + "\n"

    assert chat_loop(session, read_line, out.append) == 0
    text = "".join(out)
    assert text.count("Baichuan 2：好的\n") == 2
    assert "[streaming off]" in text and "[history cleared]" in text
    assert session.messages == []
    assert len(model.prompts) == 2 and model.prompts[1][:len(model.prompts[0])] == model.prompts[0]
    # End of input (Ctrl-D) also leaves with 0.
    assert chat_loop(session, lambda prompt: (_ for _ in ()).throw(EOFError), out.append) == 0


# ---------------------------------------------------------------- the CLI, on a tiny converted model

MAX_NEW = 24


@pytest.fixture(scope="module")
def tiny_model(tmp_path_factory):
    """(ckpt, hf_config, state_dict, tmp dir) of a tiny random 7B-shaped model converted from HF format."""
    from model_fixtures import tiny_pair
    tmp = tmp_path_factory.mktemp("chat")
    state_dict, hf_config, ckpt = tiny_pair("7b", str(tmp), seed=11)
    return ckpt, hf_config, state_dict, tmp


@pytest.fixture(scope="module")
def reference_net(tiny_model):
    """The same weights, built here, with the tiny YAML's seq_length (128) and a KV cache."""
    from model_fixtures import build_network
    ckpt, hf_config, _, _ = tiny_model
    return build_network("7b", hf_config, ckpt, use_past=True, seq_length=128)


def expected_turn(net, tokenizer, messages):
    """(prompt ids, generated ids, answer text) of the greedy answer to ``messages``."""
    prompt = build_chat_input(tokenizer, messages, 128 - MAX_NEW)
    out = net.generate([prompt], max_new_tokens=MAX_NEW, do_sample=False, eos_token_id=EOS)[0]
    new = out[len(prompt):]
    text = tokenizer.decode(new[:-1] if new and new[-1] == EOS else new, skip_special_tokens=True)
    return prompt, new, text


def chat_argv(checkpoint, *extra, config=TINY_YAML):
    return [sys.executable, CHAT, "--config", config, "--use_parallel", "False", "--load_checkpoint", checkpoint,
            "--auto_trans_ckpt", "False", "--vocab_file", VOCAB, "--device_target", "CPU",
            "--max_new_tokens", str(MAX_NEW), "--show_ids", "True",
            "--do_sample", "False", "--repetition_penalty", "1.0", *extra]   # greedy, as expected_turn


def child_env():
    env = dict(os.environ, PYTHONIOENCODING="utf-8", GLOG_v="3")
    env["PYTHONPATH"] = os.pathsep.join(p for p in (PLUGIN, env.get("PYTHONPATH")) if p)
    return env


class PtySession:
    """The chat CLI on a pseudo-terminal: write lines / control characters, read until a marker."""

    def __init__(self, argv, cwd):
        self.pid, self.fd = pty.fork()
        if self.pid == 0:                                     # child: the terminal is its stdin/stdout/stderr
            try:
                os.chdir(cwd)
                os.execve(argv[0], argv, child_env())
            finally:
                os._exit(127)                                 # pylint: disable=protected-access
        self.buffer = b""

    def read_until(self, marker, timeout=120):
        """Text up to and including ``marker`` (pty newlines normalised to \\n)."""
        marker_bytes = marker.encode("utf-8")
        deadline = time.time() + timeout
        while marker_bytes not in self.buffer:
            ready, _, _ = select.select([self.fd], [], [], max(0.0, deadline - time.time()))
            if not ready:
                raise AssertionError(f"timeout waiting for {marker!r}; got {self.buffer[-800:]!r}")
            try:
                data = os.read(self.fd, 65536)
            except OSError:                                   # EIO: the child closed the terminal
                data = b""
            if not data:
                raise AssertionError(f"chat ended while waiting for {marker!r}; got {self.buffer[-800:]!r}")
            self.buffer += data
        end = self.buffer.index(marker_bytes) + len(marker_bytes)
        text, self.buffer = self.buffer[:end], self.buffer[end:]
        return text.decode("utf-8").replace("\r\n", "\n")

    def send(self, data):
        os.write(self.fd, data.encode("utf-8") if isinstance(data, str) else data)

    def turn(self, text):
        """Send a message; returns (answer text as printed, prompt ids, generated ids)."""
        self.send(text + "\n")
        self.read_until("Baichuan 2：")
        body = self.read_until("[output_ids]") + self.read_until("\n")
        answer, ids_part = body.split("\n[input_ids] ")
        input_ids = [int(t) for t in ids_part.split("\n")[0].split()]
        output_ids = [int(t) for t in body.split("[output_ids]")[1].split()]
        self.read_until("请输入：")
        return answer, input_ids, output_ids

    def wait(self, timeout=60):
        deadline = time.time() + timeout
        while time.time() < deadline:
            pid, status = os.waitpid(self.pid, os.WNOHANG)
            if pid:
                os.close(self.fd)
                return os.waitstatus_to_exitcode(status)
            try:                                              # keep draining so the child never blocks on output
                if select.select([self.fd], [], [], 0.1)[0]:
                    self.buffer += os.read(self.fd, 65536)
            except OSError:
                time.sleep(0.05)
        os.kill(self.pid, signal.SIGKILL)
        raise AssertionError("chat did not exit")


def test_chat_cli_in_a_terminal(tiny_model, reference_net, tokenizer):
    ckpt, _, _, tmp = tiny_model
    session = PtySession(chat_argv(ckpt), cwd=str(tmp))
    banner = session.read_until("请输入：")
    assert f"up to {MAX_NEW} new tokens, {128 - MAX_NEW} for the conversation" in banner

    # Turn 1, streamed: what a direct generate() on the same prompt gives.
    u1, u2 = "你好，请介绍一下你自己", "再说一遍"
    prompt1, new1, text1 = expected_turn(reference_net, tokenizer, [msg("user", u1)])
    answer1, in1, out1 = session.turn(u1)
    assert in1 == prompt1 == [USER] + tokenizer.encode(u1) + [ASSISTANT]
    assert out1 == new1 and answer1 == text1

    # Turn 2: the prompt holds turn 1 (user ids, assistant role, the stored answer, no eos).
    messages = [msg("user", u1), msg("assistant", text1), msg("user", u2)]
    prompt2, new2, text2 = expected_turn(reference_net, tokenizer, messages)
    answer2, in2, out2 = session.turn(u2)
    first_turn = [USER] + tokenizer.encode(u1) + [ASSISTANT] + tokenizer.encode(text1)
    assert in2 == prompt2 and in2[:len(first_turn)] == first_turn
    assert in2[len(first_turn):] == [USER] + tokenizer.encode(u2) + [ASSISTANT]
    assert EOS not in in2
    assert out2 == new2 and answer2 == text2

    # clear: the next prompt is a first turn again.
    session.send("clear\n")
    assert "[history cleared]" in session.read_until("请输入：")
    answer, in3, _ = session.turn(u1)
    assert in3 == prompt1 and answer == answer1

    # stream off: the same answer, printed at once.
    session.send("clear\n")
    session.read_until("请输入：")
    session.send("stream\n")
    assert "[streaming off]" in session.read_until("请输入：")
    answer, in4, _ = session.turn(u1)
    assert in4 == prompt1 and answer == answer1
    session.send("stream\n")
    assert "[streaming on]" in session.read_until("请输入：")

    # Ctrl-C at the prompt: a fresh prompt, same session.
    session.send(b"\x03")
    session.read_until("请输入：")
    # Ctrl-C during an answer: the answer stops, the turn is dropped, the session goes on.
    session.send("讲一个很长的故事\n")
    session.read_until("Baichuan 2：")
    session.send(b"\x03")
    assert "[interrupted]" in session.read_until("请输入：")
    messages = [msg("user", u1), msg("assistant", text1), msg("user", u2)]   # history after `clear` + turn 4
    _, in5, _ = session.turn(u2)
    assert in5 == build_chat_input(tokenizer, messages, 128 - MAX_NEW)

    session.send("exit\n")
    assert session.wait() == 0


def _merged_lora(state, lora, pet):
    """Complete MindSpore weights with W + (alpha / r) B A folded in."""
    merged = dict(state)
    scale = pet["lora_alpha"] / pet["lora_rank"]
    for name in state:
        a = lora.get(name.replace(".weight", ".mindpet_delta_lora_a"))
        if a is not None:
            b = lora[name.replace(".weight", ".mindpet_delta_lora_b")]
            merged[name] = state[name] + scale * (b @ a)
    return merged


def _run_piped(argv, cwd, text):
    """The chat CLI with stdin from a pipe (ends with EOF, i.e. Ctrl-D); returns (exit code, answers)."""
    proc = subprocess.run(argv, input=text, capture_output=True, text=True, cwd=cwd, env=child_env(),
                          timeout=300, check=False)
    answers = re.findall(r"Baichuan 2：(.*?)\n\[input_ids\]", proc.stdout, flags=re.S)
    return proc.returncode, answers, proc.stderr


def test_chat_loads_lora_and_rank_folders(tiny_model, reference_net, tokenizer):
    import mindspore as ms
    from model_fixtures import build_network
    ckpt, hf_config, _, tmp = tiny_model
    base = {name: value.asnumpy() for name, value in ms.load_checkpoint(ckpt).items()}
    question = "你好，请介绍一下你自己"
    _, _, expected_base = expected_turn(reference_net, tokenizer, [msg("user", question)])

    # A rank_x folder (as written by a data-parallel run: every rank holds the whole model).
    for rank in (0, 1):
        os.makedirs(tmp / "dist" / f"rank_{rank}", exist_ok=True)
        ms.save_checkpoint([{"name": n, "data": ms.Tensor(v)} for n, v in base.items()],
                           str(tmp / "dist" / f"rank_{rank}" / f"baichuan2_rank_{rank}-1_2.ckpt"))
    code, answers, err = _run_piped(chat_argv(str(tmp / "dist")), str(tmp), question + "\n")
    assert code == 0, err[-2000:]
    assert answers == [expected_base]

    # base + LoRA side by side, with a LoRA yaml; compared with the LoRA folded into the weights.
    pet = {"lora_rank": 2, "lora_alpha": 16}
    rng = np.random.RandomState(3)
    lora = {}
    for layer in range(hf_config["num_hidden_layers"]):
        for proj in ("wq", "wk", "wv"):
            prefix = f"model.layers.{layer}.attention.{proj}.mindpet_delta_lora_"
            h = hf_config["hidden_size"]
            lora[prefix + "a"] = rng.normal(0, 0.3, (pet["lora_rank"], h)).astype(np.float32)
            lora[prefix + "b"] = rng.normal(0, 0.3, (h, pet["lora_rank"])).astype(np.float32)
    folder = tmp / "base_lora"
    os.makedirs(folder, exist_ok=True)
    ms.save_checkpoint([{"name": n, "data": ms.Tensor(v)} for n, v in base.items()], str(folder / "base.ckpt"))
    ms.save_checkpoint([{"name": n, "data": ms.Tensor(v)} for n, v in lora.items()], str(folder / "lora.ckpt"))
    merged_ckpt = str(tmp / "merged.ckpt")
    ms.save_checkpoint([{"name": n, "data": ms.Tensor(v)} for n, v in _merged_lora(base, lora, pet).items()],
                       merged_ckpt)
    with open(TINY_YAML, encoding="utf-8") as handle:
        yaml_text = handle.read()
    lora_yaml = tmp / "lora.yaml"
    lora_yaml.write_text(yaml_text.replace(
        "model_name: 'baichuan2_7b'", "model_name: 'baichuan2_7b_lora'").replace(
        "    do_sample: False\n",
        "    do_sample: False\n    pet_config:\n      pet_type: lora\n      lora_rank: 2\n      lora_alpha: 16\n"
        "      lora_dropout: 0.1\n      target_modules: '.*wq|.*wk|.*wv'\n"), encoding="utf-8")
    merged_net = build_network("7b", hf_config, merged_ckpt, use_past=True, seq_length=128)
    _, _, expected_lora = expected_turn(merged_net, tokenizer, [msg("user", question)])
    assert expected_lora != expected_base
    code, answers, err = _run_piped(chat_argv(str(folder), config=str(lora_yaml)), str(tmp), question + "\n")
    assert code == 0, err[-2000:]
    assert answers == [expected_lora]


def test_chat_cli_reports_setup_errors(tmp_path):
    proc = subprocess.run(chat_argv(str(tmp_path / "missing.ckpt")), capture_output=True, text=True,
                          cwd=str(tmp_path), env=child_env(), timeout=120, check=False)
    assert proc.returncode == 2 and "load_checkpoint not found" in proc.stderr
    argv = chat_argv("")
    argv[argv.index("--max_new_tokens") + 1] = "128"                     # = seq_length of the tiny yaml
    proc = subprocess.run(argv, capture_output=True, text=True, cwd=str(tmp_path), env=child_env(),
                          timeout=120, check=False)
    assert proc.returncode == 2 and "--max_new_tokens 128 leaves no room" in proc.stderr


def test_split_rank_folder_loads_as_the_complete_checkpoint(tiny_model, reference_net, tokenizer):
    """A rank_x/ folder split for model parallel by baichuan2_ckpt_layout (with layout.json) is merged back."""
    layout = pytest.importorskip("baichuan2_ckpt_layout")
    from types import SimpleNamespace
    from baichuan2_inference import load_weights
    from model_fixtures import NETWORKS, ms_config_from_hf
    ckpt, hf_config, _, tmp = tiny_model
    split = str(tmp / "split_mp2")
    layout.transform(ckpt, split, dp=1, mp=2, pp=1)
    assert sorted(os.listdir(split)) == ["layout.json", "rank_0", "rank_1"]
    net = NETWORKS["7b"](ms_config_from_hf(hf_config, use_past=True, seq_length=128))
    load_weights(SimpleNamespace(load_checkpoint=split, auto_trans_ckpt=False), net)
    prompt = build_chat_input(tokenizer, [msg("user", "你好")], 128 - MAX_NEW)
    kwargs = dict(max_new_tokens=8, do_sample=False)
    assert net.generate([prompt], **kwargs) == reference_net.generate([prompt], **kwargs)
