"""Baichuan2-7B/13B networks against an independent PyTorch reference and ``transformers`` Llama.

Weights are random, written as a Hugging Face checkpoint and converted by ``convert_weight.py``, so
these tests also cover the name mapping and the ``W_pack`` split. Float32 on CPU.
"""
import math

import numpy as np
import pytest
import torch
import mindspore as ms

from reference.torch_baichuan2 import TorchBaichuan2, alibi_slopes
from model_fixtures import tiny_pair, build_network, execution_mode

from baichuan2_13b import build_alibi_slopes
from baichuan2_generation import decode_window
from baichuan2_weights import QKV, ms_to_hf_name

LOGIT_ATOL = 1e-4
MODES = {"pynative": ms.PYNATIVE_MODE, "graph": ms.GRAPH_MODE}


@pytest.fixture(scope="module", params=["7b", "13b"])
def tiny(request, tmp_path_factory):
    """(kind, hf_state_dict, hf_config, ms_ckpt, torch reference) for one architecture."""
    kind = request.param
    state_dict, hf_config, ckpt = tiny_pair(kind, str(tmp_path_factory.mktemp(kind)))
    reference = TorchBaichuan2(state_dict, hf_config, "rope" if kind == "7b" else "alibi")
    return kind, state_dict, hf_config, ckpt, reference


def _random_ids(shape, vocab, seed=0):
    return np.random.RandomState(seed).randint(3, vocab, size=shape).astype(np.int32)


def test_alibi_slopes_40_heads_closed_form():
    slopes = build_alibi_slopes(40)
    expected = [2.0 ** (-(i + 1) / 4) for i in range(32)] + [2.0 ** (-(2 * k + 1) / 8) for k in range(8)]
    np.testing.assert_allclose(slopes, expected, rtol=0, atol=1e-15)
    np.testing.assert_allclose(slopes[:4], [0.8408964, 0.7071068, 0.5946036, 0.5], atol=1e-7)
    np.testing.assert_allclose(slopes[32:], [0.9170040, 0.7711054, 0.6484197, 0.5452539,
                                             0.4585020, 0.3855527, 0.3242099, 0.2726270], atol=1e-7)
    for heads in (5, 8, 12, 32, 40):
        np.testing.assert_allclose(build_alibi_slopes(heads), alibi_slopes(heads), rtol=1e-12)


@pytest.mark.parametrize("mode", sorted(MODES))
def test_logits_match_reference(tiny, mode):
    kind, _, hf_config, ckpt, reference = tiny
    ids = _random_ids((2, 24), hf_config["vocab_size"], seed=1)
    with execution_mode(MODES[mode]):
        net = build_network(kind, hf_config, ckpt)
        logits = net(ms.Tensor(ids))[0].asnumpy()
    expected = reference.logits(ids).numpy()
    assert logits.shape == expected.shape == (2, 24, hf_config["vocab_size"])
    assert np.abs(logits - expected).max() <= LOGIT_ATOL


def test_7b_matches_transformers_llama(tmp_path):
    """Baichuan2-7B is Llama with a fused W_pack and a row-normalised head."""
    from transformers import LlamaConfig as HFLlamaConfig, LlamaForCausalLM
    state_dict, hf_config, ckpt = tiny_pair("7b", str(tmp_path), seed=3)
    h = hf_config["hidden_size"]
    llama = LlamaForCausalLM(HFLlamaConfig(
        vocab_size=hf_config["vocab_size"], hidden_size=h, intermediate_size=hf_config["intermediate_size"],
        num_hidden_layers=hf_config["num_hidden_layers"], num_attention_heads=hf_config["num_attention_heads"],
        rms_norm_eps=hf_config["rms_norm_eps"], rope_theta=10000.0, tie_word_embeddings=False,
        max_position_embeddings=4096, attention_bias=False, mlp_bias=False)).eval()
    llama_state = {}
    for name, tensor in state_dict.items():
        if "W_pack" in name:
            prefix = name.replace("W_pack.weight", "")
            q, k, v = tensor.split(h, dim=0)
            llama_state.update({prefix + "q_proj.weight": q, prefix + "k_proj.weight": k, prefix + "v_proj.weight": v})
        elif name == "lm_head.weight":
            llama_state[name] = torch.nn.functional.normalize(tensor, dim=-1)
        else:
            llama_state[name] = tensor
    missing, unexpected = llama.load_state_dict(llama_state, strict=False)
    assert not unexpected and all("rotary" in m for m in missing)
    ids = _random_ids((2, 20), hf_config["vocab_size"], seed=4)
    with torch.no_grad():
        expected = llama(torch.tensor(ids, dtype=torch.long)).logits.numpy()
    net = build_network("7b", hf_config, ckpt)
    logits = net(ms.Tensor(ids))[0].asnumpy()
    assert np.abs(logits - expected).max() <= LOGIT_ATOL


@pytest.mark.parametrize("mode", sorted(MODES))
def test_loss_matches_reference_cross_entropy(tiny, mode):
    """The official rule: with labels, the labels alone decide which targets count (id 0 is pad and also
    ``<unk>``, a real token: a labelled target after an input 0, or of id 0, counts); without labels
    (continued pre-training), targets after a pad input do not."""
    kind, _, hf_config, ckpt, reference = tiny
    rng = np.random.RandomState(5)
    ids = _random_ids((3, 17), hf_config["vocab_size"], seed=5)      # seq_length 16 + 1
    ids[0, 12:] = 0                                                  # right padding
    ids[2, 15:] = 0
    labels = ids.copy()
    labels[rng.rand(*labels.shape) < 0.3] = -100                      # ignored labels
    labels[1, :6] = -100
    labels[ids == 0] = -100                                           # padding: label -100, as the data has
    ids[2, 4:6] = 0                                                   # two real <unk> tokens, labelled
    labels[2, 4:7] = ids[2, 4:7]
    with execution_mode(MODES[mode]):
        net = build_network(kind, hf_config, ckpt, seq_length=16, batch_size=3)
        net.set_train(True)
        loss = float(net(ms.Tensor(ids), ms.Tensor(labels.astype(np.int32))).asnumpy().reshape(-1)[0])
        ids_only = float(net(ms.Tensor(ids)).asnumpy().reshape(-1)[0])
    expected = float(reference.loss(ids, labels))
    assert math.isclose(loss, expected, rel_tol=2e-5, abs_tol=1e-5), (loss, expected)
    expected = float(reference.loss(ids))
    assert math.isclose(ids_only, expected, rel_tol=2e-5, abs_tol=1e-5), (ids_only, expected)


class _LossGrads(ms.nn.Cell):
    """Gradients of the network's training loss with respect to every trainable weight."""

    def __init__(self, net):
        super().__init__(auto_prefix=False)          # keep the weights' own names
        self.net = net
        self.weights = ms.ParameterTuple(net.trainable_params())
        self.grad = ms.ops.GradOperation(get_by_list=True)

    def construct(self, ids, labels):
        return self.grad(self.net, self.weights)(ids, labels)


def _relative_error(actual, expected):
    """Largest absolute difference, relative to the largest expected magnitude."""
    return np.abs(actual - expected).max() / np.abs(expected).max()


@pytest.mark.parametrize("mode", sorted(MODES))
def test_training_gradients_match_reference_autograd(tiny, mode):
    """Every weight's gradient of the training loss (through NormHead's row norms, clamp included) equals
    PyTorch autograd through the reference, which normalises the head with ``F.normalize``."""
    kind, state_dict, hf_config, ckpt, _ = tiny
    rng = np.random.RandomState(6)
    ids = _random_ids((2, 13), hf_config["vocab_size"], seed=6)
    ids[1, 10:] = 0                                                  # right padding
    labels = ids.copy()
    labels[rng.rand(*labels.shape) < 0.3] = -100
    labels[ids == 0] = -100
    ids[0, 4] = labels[0, 4] = 0                                     # a real, labelled <unk>
    labels[0, 5] = ids[0, 5]
    state = {k: v.clone() for k, v in state_dict.items()}
    state["lm_head.weight"][5] = 1e-14                               # norm ~1e-13: clamped at 1e-12
    reference = TorchBaichuan2(state, hf_config, "rope" if kind == "7b" else "alibi")
    for tensor in reference.w.values():
        tensor.requires_grad_(True)
    reference.loss(ids, labels).backward()
    with execution_mode(MODES[mode]):
        net = build_network(kind, hf_config, ckpt, seq_length=12, batch_size=2)
        head = net.lm_head.weight.asnumpy()
        head[5] = 1e-14
        net.lm_head.weight.set_data(ms.Tensor(head))
        net.set_train(True)
        grads = _LossGrads(net)(ms.Tensor(ids), ms.Tensor(labels.astype(np.int32)))
    h = hf_config["hidden_size"]
    worst = {}
    for param, grad in zip(net.trainable_params(), grads):
        name = ms_to_hf_name(param.name)
        expected = reference.w[name].grad.numpy()
        if name.endswith("W_pack.weight"):
            part = QKV.index(param.name.split(".", 3)[3])
            expected = expected[part * h:(part + 1) * h]
        grad = grad.asnumpy()
        if name == "lm_head.weight":     # the clamped row's gradient is ~1e12 larger: compare it on its own
            worst["lm_head.weight, clamped row"] = _relative_error(grad[5], expected[5])
            grad, expected = np.delete(grad, 5, axis=0), np.delete(expected, 5, axis=0)
        worst[param.name] = _relative_error(grad, expected)
        if name == "model.embed_tokens.weight":   # padding_idx=0: row 0 is looked up but never trained
            assert not grad[0].any() and not expected[0].any()
    assert len(worst) == len(reference.w) + 2 * hf_config["num_hidden_layers"] + 1   # W_pack -> wq, wk, wv
    assert max(worst.values()) <= 1e-4, sorted(worst.items(), key=lambda kv: -kv[1])[:3]


def _prompts(vocab):
    rng = np.random.RandomState(7)
    return [list(rng.randint(3, vocab, size=n)) for n in (9, 4, 13)]


@pytest.mark.parametrize("mode", sorted(MODES))
def test_greedy_with_kv_cache_matches_without_and_reference(tiny, mode):
    kind, _, hf_config, ckpt, reference = tiny
    prompts = _prompts(hf_config["vocab_size"])
    new_tokens = 8
    expected = [reference.greedy(p, new_tokens, eos_token_id=-1) for p in prompts]
    with execution_mode(MODES[mode]):
        cached = build_network(kind, hf_config, ckpt, use_past=True, batch_size=2, seq_length=32)
        uncached = build_network(kind, hf_config, ckpt, use_past=False, seq_length=32)
        kwargs = dict(max_new_tokens=new_tokens, do_sample=False, eos_token_id=-1)
        alone = [cached.generate([p], **kwargs)[0] for p in prompts]
        batched = cached.generate(prompts, **kwargs)              # 3 rows through a cache of batch 2
        padded = np.zeros((2, 16), dtype=np.int32)                  # right-padded 2-D input
        for i, p in enumerate(prompts[:2]):
            padded[i, :len(p)] = p
        padded_out = cached.generate(padded, **kwargs)
        no_cache = uncached.generate(prompts, **kwargs)
    assert alone == expected
    assert batched == expected
    assert padded_out == expected[:2]
    assert no_cache == expected


def test_decode_windows():
    """A decode step reads the first multiple of max(128, seq_length // 8) slots that holds every row."""
    assert [decode_window(n, 384) for n in (1, 128, 129, 256, 257, 384)] == [128, 128, 256, 256, 384, 384]
    assert [decode_window(n, 4096) for n in (1, 512, 513, 4000)] == [512, 512, 1024, 4096]
    assert decode_window(20, 32) == 32                     # never more slots than the cache has
    assert len({decode_window(n, 4096) for n in range(1, 4097)}) == 8


@pytest.mark.parametrize("attention", ["in-place kernel", "portable"])
def test_decode_step_over_a_window_of_the_cache_matches_reference(tiny, attention, monkeypatch):
    """Decode steps that read only the first W cache slots give the full-forward logits, also while the
    longest row crosses from one window (128 slots) to the next (256), for rows of different lengths.
    Both decode attentions: CPU fp32's in-place kernel (``baichuan2_decode_attention``) and the portable
    one over a copy of the window, which other devices and dtypes take."""
    kind, _, hf_config, ckpt, reference = tiny
    if attention == "portable":
        monkeypatch.setenv("BAICHUAN2_DECODE_ATTENTION", "0")
    rng = np.random.RandomState(11)
    rows = [list(rng.randint(3, hf_config["vocab_size"], size=n)) for n in (125, 60)]
    with execution_mode(ms.GRAPH_MODE):
        net = build_network(kind, hf_config, ckpt, use_past=True, batch_size=2, seq_length=384)
        assert (net.model.layers[0].attention.decode_attention is not None) == (attention != "portable")
        tokens = np.zeros((2, 128), dtype=np.int32)
        for i, row in enumerate(rows):
            tokens[i, :len(row)] = row
        net.set_decode_phase(True)
        logits = net(ms.Tensor(tokens), batch_valid_length=ms.Tensor([125, 60], ms.int32)).asnumpy()
        net.set_decode_phase(False)
        windows = []
        for _ in range(6):                                 # row 0 grows from 126 to 131 tokens
            for row, row_logits in zip(rows, logits):
                row.append(int(np.argmax(row_logits)))
            lengths = np.array([len(r) for r in rows], dtype=np.int32)
            window = decode_window(int(lengths.max()), 384)
            windows.append(window)
            step = np.array([[r[-1]] for r in rows], dtype=np.int32)
            logits = net(ms.Tensor(step), batch_valid_length=ms.Tensor(lengths),
                         key_positions=ms.Tensor(np.arange(window, dtype=np.int32))).asnumpy()
            for row, row_logits in zip(rows, logits):
                expected = reference.logits(np.array([row], dtype=np.int32))[0, -1].numpy()
                assert np.abs(row_logits - expected).max() <= LOGIT_ATOL
        net.set_decode_phase(True)
    assert windows == [128, 128, 128, 256, 256, 256]


def test_generate_stops_at_eos_and_respects_length_limits(tiny):
    kind, _, hf_config, ckpt, reference = tiny
    prompt = _prompts(hf_config["vocab_size"])[0]
    free_run = reference.greedy(prompt, 6, eos_token_id=-1)
    eos = free_run[len(prompt) + 2]                      # pretend the third new token is eos
    stop = free_run.index(eos, len(prompt)) + 1
    net = build_network(kind, hf_config, ckpt, use_past=True, seq_length=32)
    out = net.generate([prompt], max_new_tokens=6, do_sample=False, eos_token_id=eos)[0]
    assert out == free_run[:stop]
    out = net.generate([prompt], max_length=len(prompt) + 4, do_sample=False, eos_token_id=-1)[0]
    assert out == free_run[:len(prompt) + 4]
    out = net.generate([prompt], max_new_tokens=1000, do_sample=False, eos_token_id=-1)[0]
    assert len(out) == 32                                 # capped at seq_length
    with pytest.raises(ValueError, match="leaves no room"):
        net.generate([list(range(3, 40))], max_new_tokens=2, do_sample=False)


def test_norm_head_is_normalised_at_runtime_and_does_not_drift(tiny):
    kind, state_dict, hf_config, ckpt, _ = tiny
    net = build_network(kind, hf_config, ckpt, use_past=True, seq_length=32)
    raw = net.lm_head.weight.asnumpy().copy()
    np.testing.assert_array_equal(raw, state_dict["lm_head.weight"].numpy())   # stored raw
    prompt = _prompts(hf_config["vocab_size"])[1]
    runs = [net.generate([prompt], max_new_tokens=6, do_sample=False, eos_token_id=-1)[0] for _ in range(3)]
    assert runs[0] == runs[1] == runs[2]
    np.testing.assert_array_equal(net.lm_head.weight.asnumpy(), raw)           # never rewritten
    # fp32 sum of h squares, a sqrt and a division: worst case (h/2 + 2) units of 2**-24 (h = row length).
    norm_rtol = (raw.shape[1] / 2 + 2) * 2.0 ** -24
    np.testing.assert_allclose(net.lm_head.inv_norm.asnumpy(), 1.0 / np.linalg.norm(raw, axis=-1), rtol=norm_rtol)
    # A weight loaded later is normalised at the next prompt: rescaling each row by its own factor
    # leaves the normalised head unchanged (a stale norm would not).
    factors = np.random.RandomState(9).uniform(0.2, 5.0, size=(raw.shape[0], 1)).astype(np.float32)
    net.lm_head.weight.set_data(ms.Tensor(raw * factors))
    assert net.generate([prompt], max_new_tokens=6, do_sample=False, eos_token_id=-1)[0] == runs[0]
    np.testing.assert_allclose(net.lm_head.inv_norm.asnumpy(),
                               1.0 / np.linalg.norm(raw * factors, axis=-1), rtol=norm_rtol)


def test_ascend_fast_paths_fall_back_on_cpu(tiny):
    """fused_rms_norm / use_flash_attention stay selectable; on CPU the portable path gives the same logits."""
    kind, _, hf_config, ckpt, reference = tiny
    ids = _random_ids((1, 10), hf_config["vocab_size"], seed=8)
    net = build_network(kind, hf_config, ckpt, fused_rms_norm=True, use_flash_attention=True)
    assert not net.model.layers[0].attention.use_flash_attention
    assert net.model.layers[0].attention_norm.self_define          # portable RMSNorm, not the RmsNorm kernel
    logits = net(ms.Tensor(ids))[0].asnumpy()
    assert np.abs(logits - reference.logits(ids).numpy()).max() <= LOGIT_ATOL


@pytest.mark.parametrize("mode", [ms.PYNATIVE_MODE, ms.GRAPH_MODE])
def test_expand_as_repeats_like_numpy_broadcasting(mode):
    """``_expand_as`` (the Tile the layers use instead of broadcasting inside Mul/Add/Select, see
    ``baichuan2_layers``) gives exactly NumPy's broadcast, for every operand shape the model uses:
    fewer leading dims, size-1 dims in the middle or at the end, bool masks. Copies, so bit-exact."""
    from baichuan2_layers import _expand_as  # pylint: disable=import-outside-toplevel

    class Expand(ms.nn.Cell):
        def construct(self, x, like):
            return _expand_as(x, like)

    rng = np.random.RandomState(0)
    like = np.zeros((2, 3, 4, 5), np.float32)
    cases = [rng.rand(5).astype(np.float32), rng.rand(2, 1, 4, 5) > 0.5, rng.rand(1, 3, 4, 5).astype(np.float32),
             rng.rand(2, 3, 4, 1).astype(np.float32), rng.rand(4, 1).astype(np.float32)]
    with execution_mode(mode):
        for x in cases:
            out = Expand()(ms.Tensor(x), ms.Tensor(like)).asnumpy()
            assert out.dtype == x.dtype and np.array_equal(out, np.broadcast_to(x, like.shape))
        same = rng.rand(2, 3, 4, 5).astype(np.float32)          # already the shape: returned as it is
        assert np.array_equal(Expand()(ms.Tensor(same), ms.Tensor(like)).asnumpy(), same)


@pytest.mark.parametrize("mode", [ms.PYNATIVE_MODE, ms.GRAPH_MODE])
def test_last_axis_softmax_and_its_backward_are_the_softmax_formulas(mode):
    """``LastAxisSoftmax`` (the attention's softmax, whose backward repeats the row sums with Tile) gives
    softmax(x) and the vector-Jacobian product ``s * (g - sum(g * s))`` of the published formula, computed
    here in float64 NumPy.

    Tolerance from the arithmetic: the fp32 softmax has a relative error of a few eps (exp, a sum of T terms,
    a division); the backward adds a dot product of T terms of size <= 1 and a subtraction, so each element
    is off by at most about (T + 8) eps times max |g - sum(g * s)| <= 2."""
    from baichuan2_layers import LastAxisSoftmax  # pylint: disable=import-outside-toplevel
    rng = np.random.RandomState(0)
    x = (rng.randn(2, 3, 5, 7) * 3).astype(np.float32)
    g = rng.uniform(-1, 1, x.shape).astype(np.float32)
    s = np.exp(x.astype(np.float64) - x.max(-1, keepdims=True))
    s /= s.sum(-1, keepdims=True)
    expected_dx = s * (g - (g * s).sum(-1, keepdims=True))
    atol = (x.shape[-1] + 8) * np.finfo(np.float32).eps * 2

    class Weighted(ms.nn.Cell):      # sum(softmax(x) * g): its gradient in x is the product with g
        def __init__(self):
            super().__init__()
            self.softmax = LastAxisSoftmax()

        def construct(self, t, weights):
            return (self.softmax(t) * weights).sum()

    with execution_mode(mode):
        out = LastAxisSoftmax()(ms.Tensor(x)).asnumpy()
        weighted = ms.grad(Weighted(), grad_position=0)(ms.Tensor(x), ms.Tensor(g)).asnumpy()
    np.testing.assert_allclose(out, s, rtol=0, atol=atol)
    np.testing.assert_allclose(weighted, expected_dx, rtol=0, atol=atol)
