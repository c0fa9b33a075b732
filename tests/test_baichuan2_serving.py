"""The continuous-batching engine in-process, on tiny random-weight 7B/13B networks with a KV cache.

Reference: the same weights in a batch-1 network, ``generate()`` alone. The engine's network has
4 rows; requests run alone, four at once with different prompt lengths, admitted while others are
mid-way, queued behind a full batch, cancelled; sampling is per row with its own seed.
Most tests run in PyNative (no compile per shape); one runs the server's GRAPH mode.
"""
import threading

import mindspore as ms
import pytest

from baichuan2_serving import (Baichuan2ServingEngine, SamplingParams, QueueFullError, chat_generation_defaults,
                               HF_CHAT_GENERATION_CONFIG)
from model_fixtures import tiny_pair, build_network, execution_mode

SEQ = 128
BATCH = 4
TIMEOUT = 300
PROMPTS = ["你好", "白日依山尽，下一句是？请详细解释这首诗的意境。", "hello world, this is a longer prompt of text",
           "《静夜思》作者是？"]


@pytest.fixture(scope="module")
def tokenizer():
    from run_helpers import TOKENIZER
    from baichuan2_tokenizer import Baichuan2Tokenizer
    return Baichuan2Tokenizer(vocab_file=TOKENIZER)


@pytest.fixture(scope="module", params=["7b", "13b"])
def nets(request, tmp_path_factory):
    """(kind, engine network with 4 rows, batch-1 reference network) in PyNative."""
    kind = request.param
    _, hf_config, ckpt = tiny_pair(kind, str(tmp_path_factory.mktemp(f"serving_{kind}")), seed=5)
    with execution_mode(ms.PYNATIVE_MODE):
        yield (kind, build_network(kind, hf_config, ckpt, use_past=True, batch_size=BATCH, seq_length=SEQ),
               build_network(kind, hf_config, ckpt, use_past=True, batch_size=1, seq_length=SEQ), hf_config, ckpt)


def greedy(max_new_tokens, **extra):
    return SamplingParams(max_new_tokens=max_new_tokens, do_sample=False, stop_token_ids=(), **extra)


def alone(reference, ids, max_new_tokens):
    out = reference.generate([ids], max_new_tokens=max_new_tokens, do_sample=False, eos_token_id=[-1])[0]
    return out[len(ids):]


class StepGate:
    """Engine step hook: with ``step`` set, holds the engine thread after that decode step until
    ``resume()`` / ``advance_to()``, so a test acts at an exact point of the decoding (no sleeps)."""

    def __init__(self, engine):
        self.engine = engine
        self.step = None
        self.reached = threading.Event()
        self.resumed = threading.Event()
        engine._step_hooks.append(self)              # pylint: disable=protected-access

    def advance_to(self, steps):
        """Release the held engine and hold it again after decode step ``steps``; True once there."""
        released, self.resumed = self.resumed, threading.Event()
        self.step = steps
        self.reached.clear()
        released.set()
        return self.reached.wait(TIMEOUT)

    def resume(self):
        self.step = None
        self.resumed.set()

    def __call__(self, engine):
        if self.step is not None and engine.steps >= self.step:
            self.reached.set()
            self.resumed.wait(TIMEOUT)


def make_engine(net, tokenizer, max_queue=8):
    return Baichuan2ServingEngine(net, tokenizer, max_queue=max_queue).start()


def test_greedy_equal_alone_together_and_admitted_midway(nets, tokenizer):
    _, net, reference, _, _ = nets
    prompts = [tokenizer.encode(p) for p in PROMPTS]
    assert len({len(p) for p in prompts}) == 4
    news = [12, 20, 9, 16]
    expected = [alone(reference, p, n) for p, n in zip(prompts, news)]
    engine = make_engine(net, tokenizer)
    try:
        # alone
        text, ids, reason = engine.submit(prompts[1], greedy(news[1])).result(TIMEOUT)
        assert ids == expected[1] and reason == "length"
        assert text == tokenizer.decode(expected[1], skip_special_tokens=True)
        # four together
        handles = [engine.submit(p, greedy(n)) for p, n in zip(prompts, news)]
        assert [h.result(TIMEOUT)[1] for h in handles] == expected
        # admitted mid-way: 3 decode for 5 steps, then the 4th arrives
        gate = StepGate(engine)
        start = engine.steps
        gate.step = start + 5
        first = [engine.submit(p, greedy(n)) for p, n in zip(prompts[:3], news[:3])]
        assert gate.reached.wait(TIMEOUT)
        assert engine.running == 3 and all(5 <= len(h.generated) < n for h, n in zip(first, news))
        late = engine.submit(prompts[3], greedy(news[3]))
        gate.resume()
        assert late.result(TIMEOUT)[1] == expected[3]
        assert [h.result(TIMEOUT)[1] for h in first] == expected[:3]
        assert engine.running == 0
    finally:
        engine.shutdown()


def test_fifth_request_waits_and_cancel_frees_the_row(nets, tokenizer):
    _, net, reference, _, _ = nets
    prompt = tokenizer.encode(PROMPTS[0])
    # Before the engine starts: once it runs, only its thread may drive MindSpore (see baichuan2_serving). This
    # reference, run here while the engine decoded its other rows, came out wrong in about 1 run in 40 under load.
    expected_fifth = alone(reference, tokenizer.encode(PROMPTS[3]), 6)
    engine = Baichuan2ServingEngine(net, tokenizer, max_queue=BATCH)
    gate = StepGate(engine)
    engine.start()
    try:
        gate.step = 3
        handles = [engine.submit(prompt, greedy(60)) for _ in range(BATCH)]
        assert gate.reached.wait(TIMEOUT)                       # engine held after decode step 3
        engine.max_queue = 1
        fifth = engine.submit(tokenizer.encode(PROMPTS[3]), greedy(6))
        with pytest.raises(QueueFullError):
            engine.submit(prompt, greedy(4))
        assert engine.running == BATCH and not fifth.done and fifth.row is None
        handles[2].cancel()
        steps_at_cancel = engine.steps
        assert gate.advance_to(steps_at_cancel + 1)              # hold again after the next step
        # within one decode step: the row is free and the waiting request runs in it
        assert handles[2].done and handles[2].finish_reason == "cancelled"
        assert fifth.row == 2 and len(fifth.generated) == 2      # prefill token + that step's token
        assert all(not h.done for i, h in enumerate(handles) if i != 2)
        gate.resume()
        assert fifth.result(TIMEOUT)[1] == expected_fifth
        for handle in handles:
            handle.cancel()
        engine.wake()
        assert all(h.wait(TIMEOUT) for h in handles)
        assert engine.running == 0
    finally:
        engine.shutdown()


def test_seeded_sampling_is_independent_of_batch_mates(nets, tokenizer):
    _, net, _, _, _ = nets
    prompt = tokenizer.encode(PROMPTS[1])
    params = SamplingParams(max_new_tokens=12, do_sample=True, top_k=50, top_p=0.95, temperature=1.5,
                            repetition_penalty=1.05, seed=7, stop_token_ids=())
    engine = make_engine(net, tokenizer)
    try:
        solo = engine.submit(prompt, params).result(TIMEOUT)
        mates = [engine.submit(tokenizer.encode(p), SamplingParams(max_new_tokens=n, do_sample=True, seed=s,
                                                                   stop_token_ids=()))
                 for p, n, s in ((PROMPTS[0], 5, 1), (PROMPTS[2], 20, 2))]
        together = engine.submit(prompt, params).result(TIMEOUT)
        other_seed = engine.submit(prompt, SamplingParams(**{**params.__dict__, "seed": 8})).result(TIMEOUT)
        assert all(m.wait(TIMEOUT) for m in mates)
        assert together == solo
        assert other_seed[1] != solo[1]
    finally:
        engine.shutdown()


def test_stop_strings_stop_tokens_and_length(nets, tokenizer):
    _, net, reference, _, _ = nets
    prompt = tokenizer.encode(PROMPTS[2])
    expected = alone(reference, prompt, 16)
    full_text = tokenizer.decode(expected, skip_special_tokens=True)
    engine = make_engine(net, tokenizer)
    try:
        # a stop token: finishes at its first occurrence, kept in the ids, not in the text
        stop_id = expected[5]
        first = expected.index(stop_id)
        text, ids, reason = engine.submit(prompt, SamplingParams(max_new_tokens=16, stop_token_ids=(stop_id,))
                                          ).result(TIMEOUT)
        assert (ids, reason) == (expected[:first + 1], "stop")
        assert text == tokenizer.decode(expected[:first], skip_special_tokens=True)
        # a stop string from the middle of the text: cut there, not included
        cut = len(full_text) // 2
        stop = full_text[cut:cut + 3]
        chunks = []
        handle = engine.submit(prompt, greedy(16, stop=["never-there", stop]), sink=chunks.append)
        text, ids, reason = handle.result(TIMEOUT)
        assert reason == "stop" and text == full_text[:full_text.index(stop)]
        assert "".join(c.text for c in chunks) == text and chunks[-1].finished
        assert ids == expected[:len(ids)] and len(ids) < 16
        # length, with streamed pieces adding up to the decoded text
        chunks = []
        text, ids, reason = engine.submit(prompt, greedy(16), sink=chunks.append).result(TIMEOUT)
        assert (ids, reason, text) == (expected, "length", full_text)
        assert [c.finished for c in chunks] == [False] * 15 + [True]
        assert chunks[-1].completion_tokens == 16 and chunks[-1].prompt_tokens == len(prompt)
    finally:
        engine.shutdown()


def test_stop_text_holds_back_a_possible_stop_prefix(tokenizer):
    from baichuan2_serving import _StopText
    ids = tokenizer.encode("abc XYZ def")
    tracker = _StopText(tokenizer, ["XYZ"])
    out = []
    for token in ids:
        piece, stopped = tracker.put(token)
        out.append(piece)
        if stopped:
            break
    assert stopped and "".join(out) == "abc "
    tracker = _StopText(tokenizer, ["XQ"])
    pieces = [tracker.put(t)[0] for t in tokenizer.encode("abcX")]
    assert "".join(pieces) == "abc"                               # "X" may start "XQ": held back
    assert tracker.end() == ("X", False)


def test_chat_defaults_are_baichuan2_chat_unless_configured(tmp_path):
    assert chat_generation_defaults() == {"do_sample": True, "top_k": 5, "top_p": 0.85, "temperature": 0.3,
                                          "repetition_penalty": 1.05, "max_new_tokens": 2048}
    assert chat_generation_defaults({"top_k": 3, "do_sample": False, "seq_length": 512}) == {
        **HF_CHAT_GENERATION_CONFIG, "top_k": 3, "do_sample": False}
    path = tmp_path / "generation_config.json"
    path.write_text('{"temperature": 0.7, "max_new_tokens": 100, "user_token_id": 195}', encoding="utf-8")
    assert chat_generation_defaults({"top_k": 3}, str(path)) == {**HF_CHAT_GENERATION_CONFIG, "temperature": 0.7,
                                                                "max_new_tokens": 100}


def test_graph_mode_engine_matches_generate(nets, tokenizer):
    """The server's mode: warm-up compiles, then mid-way admission gives each request's greedy ids."""
    kind, _, _, hf_config, ckpt = nets
    with execution_mode(ms.GRAPH_MODE):
        net = build_network(kind, hf_config, ckpt, use_past=True, batch_size=BATCH, seq_length=SEQ)
        reference = build_network(kind, hf_config, ckpt, use_past=True, batch_size=1, seq_length=SEQ)
        prompts = [tokenizer.encode(p) for p in PROMPTS[:2]]
        expected = [alone(reference, p, 10) for p in prompts]
        engine = Baichuan2ServingEngine(net, tokenizer)
        assert engine.warmup() > 0
        gate = StepGate(engine)
        engine.start()
        try:
            gate.step = 3
            first = engine.submit(prompts[0], greedy(10))
            assert gate.reached.wait(TIMEOUT)
            second = engine.submit(prompts[1], greedy(10))
            gate.resume()
            assert [first.result(TIMEOUT)[1], second.result(TIMEOUT)[1]] == expected
        finally:
            engine.shutdown()
