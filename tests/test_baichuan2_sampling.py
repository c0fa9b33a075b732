"""Sampling controls of ``generate()`` against Hugging Face semantics, measured as distributions.

The expected probabilities are computed here from the rules (HF ``RepetitionPenaltyLogitsProcessor``,
then temperature, top-k, top-p warpers), not with the code under test; empirical frequencies come from
many draws, either from ``choose_next_token`` or from one ``generate()`` call over many identical rows
(every row draws from the same per-call random generator, so the rows are independent samples).
"""
import numpy as np
import pytest

import baichuan2_generation as gen
from baichuan2_generation import apply_repetition_penalty, choose_next_token
from mindformers.generation import GenerationConfig
from model_fixtures import tiny_pair, build_network
from reference.torch_baichuan2 import TorchBaichuan2


def hf_probs(logits, previous=(), penalty=1.0, temperature=1.0, top_k=0, top_p=1.0):
    """Next-token distribution under the HF rules, float64."""
    logits = np.asarray(logits, dtype=np.float64).copy()
    for i in set(previous):
        logits[i] = logits[i] / penalty if logits[i] > 0 else logits[i] * penalty
    logits = logits / temperature
    keep = np.ones(len(logits), dtype=bool)
    if top_k:
        keep &= logits >= np.sort(logits)[-top_k]
    probs = np.where(keep, np.exp(logits - logits[keep].max()), 0.0)
    probs /= probs.sum()
    if top_p < 1.0:
        order = np.argsort(-probs, kind="stable")
        before = np.concatenate([[0.0], np.cumsum(probs[order])[:-1]])   # mass of the better tokens
        drop = order[before >= top_p]
        probs[drop] = 0.0
        probs /= probs.sum()
    return probs


def config(**kwargs):
    base = dict(do_sample=True, temperature=1.0, top_k=0, top_p=1.0, repetition_penalty=1.0)
    base.update(kwargs)
    return GenerationConfig(**base)


def draw(logits, cfg, n, previous=(), seed=0):
    rng = np.random.default_rng(seed)
    counts = np.bincount([choose_next_token(logits, list(previous), cfg, rng) for _ in range(n)],
                         minlength=len(logits))
    return counts / n


def assert_close_to(freq, probs, n):
    """Within 5 standard errors everywhere; filtered tokens never drawn."""
    sigma = np.sqrt(probs * (1 - probs) / n) + 1e-12
    assert np.all(np.abs(freq - probs) <= 5 * sigma + 1e-3), (freq, probs)
    assert np.all(freq[probs == 0] == 0)


LOGITS = np.array([2.0, 1.6, 1.1, 0.7, 0.2, -0.4, -1.0, -2.5])


@pytest.mark.parametrize("controls", [
    dict(),
    dict(temperature=0.6),
    dict(temperature=1.8),
    dict(top_k=3),
    dict(top_p=0.7),
    dict(top_k=5, top_p=0.9, temperature=1.3),
    dict(repetition_penalty=1.5, previous=(0, 6)),
    dict(repetition_penalty=1.3, previous=(1, 5, 5), temperature=0.8, top_k=4, top_p=0.95),
])
def test_sampling_follows_the_hf_distribution(controls):
    controls = dict(controls)
    previous = controls.pop("previous", ())
    n = 12000
    freq = draw(LOGITS, config(**controls), n, previous)
    probs = hf_probs(LOGITS, previous, penalty=controls.get("repetition_penalty", 1.0),
                     temperature=controls.get("temperature", 1.0), top_k=controls.get("top_k", 0),
                     top_p=controls.get("top_p", 1.0))
    assert_close_to(freq, probs, n)


def test_temperature_towards_zero_approaches_greedy():
    greedy = int(np.argmax(LOGITS))
    shares = [draw(LOGITS, config(temperature=t), 4000)[greedy] for t in (2.0, 1.0, 0.5, 0.2, 0.05)]
    assert all(a < b for a, b in zip(shares, shares[1:])), shares
    assert shares[-1] == 1.0
    assert draw(LOGITS, config(temperature=0.01), 500, seed=3)[greedy] == 1.0


def test_top_k_1_is_greedy():
    rng = np.random.RandomState(0)
    for trial in range(200):
        logits = rng.randn(4000) * 3
        cfg = config(top_k=1, temperature=float(rng.uniform(0.3, 3.0)))
        assert choose_next_token(logits, [], cfg, np.random.default_rng(trial)) == int(np.argmax(logits))


def test_repetition_penalty_is_the_hf_rule():
    previous = [0, 5, 5, 7]
    out = apply_repetition_penalty(LOGITS, previous, 1.25)
    expected = LOGITS.copy()
    expected[0] /= 1.25                      # positive: divided
    expected[5] *= 1.25                      # negative: multiplied (counted once however often it occurs)
    expected[7] *= 1.25
    np.testing.assert_allclose(out, expected, rtol=0, atol=1e-12)
    before, after = hf_probs(LOGITS), hf_probs(LOGITS, previous, 1.25)
    repeated, fresh = [0, 5, 7], [1, 2, 3, 4, 6]
    assert after[repeated].sum() < before[repeated].sum()          # repeated ids lose probability mass ...
    for i in repeated:                                               # ... against every other id
        assert np.all(after[i] / after[fresh] < before[i] / before[fresh])
    assert np.all(after[fresh] > before[fresh])
    np.testing.assert_array_equal(apply_repetition_penalty(LOGITS, previous, 1.0), LOGITS)


# ------------------------------------------------------------------ through the network

@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    state_dict, hf_config, ckpt = tiny_pair("7b", str(tmp_path_factory.mktemp("sampling")), seed=5)
    return hf_config, ckpt, TorchBaichuan2(state_dict, hf_config, "rope")


@pytest.fixture(scope="module")
def cached(tiny):
    hf_config, ckpt, _ = tiny
    return build_network("7b", hf_config, ckpt, use_past=True, batch_size=2, seq_length=48)


PROMPT = [195, 812, 97, 2301, 45, 1777, 610, 196]


@pytest.mark.parametrize("controls", [
    dict(temperature=1.0, top_k=0, top_p=1.0),
    dict(temperature=0.7, top_k=6, top_p=1.0, repetition_penalty=1.3),
    dict(temperature=1.2, top_k=0, top_p=0.6, repetition_penalty=0.8),
])
def test_generate_samples_the_reference_distribution(tiny, controls):
    """One call, many identical rows: the first new token's frequencies match the reference model's."""
    hf_config, ckpt, reference = tiny
    rows = 3000
    net = build_network("7b", hf_config, ckpt, use_past=False, seq_length=16)
    out = net.generate([PROMPT] * rows, max_new_tokens=1, do_sample=True, seed=11, **controls)
    first = np.array([row[len(PROMPT)] for row in out])
    logits = reference.logits([PROMPT])[0, -1].numpy()
    probs = hf_probs(logits, PROMPT, penalty=controls.get("repetition_penalty", 1.0),
                     temperature=controls["temperature"], top_k=controls["top_k"], top_p=controls["top_p"])
    freq = np.bincount(first, minlength=len(probs)) / rows
    assert_close_to(freq, probs, rows)
    assert probs.max() < 0.9                                   # really a distribution, not a near-greedy case


def test_seed_reproduces_and_cache_does_not_change_samples(tiny, cached):
    hf_config, ckpt, _ = tiny
    kwargs = dict(max_new_tokens=8, do_sample=True, temperature=1.5, top_k=50, top_p=0.95, eos_token_id=-1)
    first = cached.generate([PROMPT], seed=7, **kwargs)
    assert cached.generate([PROMPT], seed=7, **kwargs) == first
    assert cached.generate([PROMPT], **kwargs) == cached.generate([PROMPT], seed=0, **kwargs)   # default seed 0
    assert len({tuple(cached.generate([PROMPT], seed=s, **kwargs)[0]) for s in range(1, 4)}) > 1
    uncached = build_network("7b", hf_config, ckpt, use_past=False, seq_length=48)
    assert uncached.generate([PROMPT], seed=7, **kwargs) == first
    assert cached.generate([PROMPT], seed=7, use_past=False, **kwargs) == first


def test_top_k_1_sampling_equals_greedy_generate(cached):
    greedy = cached.generate([PROMPT], max_new_tokens=10, do_sample=False, eos_token_id=-1)
    for seed in range(3):
        assert cached.generate([PROMPT], max_new_tokens=10, do_sample=True, top_k=1, temperature=2.0,
                               seed=seed, eos_token_id=-1) == greedy


def test_repetition_penalty_sees_prompt_and_answer_never_padding(cached, monkeypatch):
    prompts = [PROMPT, PROMPT[:3], [195, 3000, 196]]                    # right-padded with 0 in the batch
    seen = []
    original = gen.choose_next_token

    def spy(logits, previous_ids, cfg, rng):
        seen.append(list(previous_ids))
        return original(logits, previous_ids, cfg, rng)

    monkeypatch.setattr(gen, "choose_next_token", spy)
    out = cached.generate(prompts, max_new_tokens=6, do_sample=False, repetition_penalty=1.2, eos_token_id=-1)
    assert all(0 not in ids for ids in seen)
    assert {tuple(ids) for ids in seen} >= {tuple(row[:len(p) + k]) for row, p in zip(out, prompts) for k in range(6)}
    monkeypatch.undo()
    alone = [cached.generate([p], max_new_tokens=6, do_sample=False, repetition_penalty=1.2, eos_token_id=-1)[0]
             for p in prompts]
    assert out == alone


def test_strong_repetition_penalty_stops_repeats(cached):
    free = cached.generate([PROMPT], max_new_tokens=20, do_sample=False, eos_token_id=-1)[0]
    assert len(set(free)) < len(free)                                   # the random model loops
    penalised = cached.generate([PROMPT], max_new_tokens=20, do_sample=False, repetition_penalty=50.0,
                                eos_token_id=-1)[0]
    assert len(set(penalised)) == len(penalised)


def test_temperature_and_top_p_order_in_generate(tiny):
    """Temperature is applied before top-p (HF warper order): a sharp temperature shrinks the nucleus."""
    _, _, reference = tiny
    logits = reference.logits([PROMPT])[0, -1].numpy()
    hot, cold = hf_probs(logits, temperature=2.0, top_p=0.5), hf_probs(logits, temperature=0.5, top_p=0.5)
    assert (cold > 0).sum() < (hot > 0).sum()
    hf_config, ckpt, _ = tiny
    net = build_network("7b", hf_config, ckpt, use_past=False, seq_length=16)
    out = net.generate([PROMPT] * 400, max_new_tokens=1, do_sample=True, temperature=0.5, top_p=0.5, seed=2)
    drawn = {row[len(PROMPT)] for row in out}
    assert drawn <= set(np.nonzero(cold)[0])
