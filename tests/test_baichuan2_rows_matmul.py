"""The small-row decode kernel: the same product as MatMul, taken only where it is meant to be.

``baichuan2_rows_matmul`` builds a C++ kernel for decode steps (at most 8 fp32 rows) and installs it,
behind a static row-count test, as the ``matmul`` of every (out, in) linear layer of an inference network.
"""
import numpy as np
import pytest
import mindspore as ms
from mindspore import Parameter, Tensor, nn, ops

import baichuan2_rows_matmul as rows
from baichuan2_device import use_rows_matmul
from model_fixtures import tiny_pair, build_network
from run_helpers import built_kernel

EPS32 = float(np.finfo(np.float32).eps)


@pytest.fixture(scope="module")
def library():
    return built_kernel(rows)


def _error_bound(x, w):
    """Forward-error bound of an fp32 dot product of length K in any summation order:
    |fl(x.w) - x.w| <= K * eps * |x|.|w| (Higham, Accuracy and Stability, 3.1), for both the kernel and
    the float64 reference it is compared with."""
    return x.shape[-1] * EPS32 * (np.abs(x.astype(np.float64)) @ np.abs(w.astype(np.float64)).T)


class _Product(nn.Cell):
    def __init__(self, weight, op):
        super().__init__()
        self.weight = Parameter(Tensor(weight), name="weight")
        self.op = op

    def construct(self, x):
        return self.op(x, self.weight)


@pytest.mark.parametrize("rows_count", list(range(1, rows.MAX_ROWS + 1)))
def test_kernel_is_x_times_w_transposed(library, rows_count):
    # K not a multiple of the 8-wide vector, N not a multiple of any register block: every tail runs.
    rng = np.random.RandomState(rows_count)
    x = rng.randn(rows_count, 203).astype(np.float32)
    w = rng.randn(37, 203).astype(np.float32)
    got = _Product(w, rows.rows_matmul_primitive(library))(Tensor(x)).asnumpy()
    want = x.astype(np.float64) @ w.astype(np.float64).T
    assert got.shape == (rows_count, 37)
    assert np.all(np.abs(got - want) <= _error_bound(x, w))


def test_decode_matmul_takes_the_kernel_only_for_small_inference_products(library):
    rng = np.random.RandomState(0)
    w = rng.randn(50, 64).astype(np.float32)
    kernel = _Product(w, rows.rows_matmul_primitive(library))
    matmul = _Product(w, ops.MatMul(transpose_b=True))
    decode = _Product(w, rows.DecodeMatMul(library))
    decode.set_train(False)
    small = Tensor(rng.randn(4, 64).astype(np.float32))
    large = Tensor(rng.randn(rows.MAX_ROWS + 1, 64).astype(np.float32))
    # Bit-identical to the kernel at 4 rows, to MatMul above MAX_ROWS and in training.
    np.testing.assert_array_equal(decode(small).asnumpy(), kernel(small).asnumpy())
    np.testing.assert_array_equal(decode(large).asnumpy(), matmul(large).asnumpy())
    decode.set_train(True)
    np.testing.assert_array_equal(decode(small).asnumpy(), matmul(small).asnumpy())


@pytest.mark.parametrize("kind", ["7b", "13b"])
def test_cached_network_decodes_the_same_with_the_kernel(tmp_path, monkeypatch, kind):
    _, hf_config, ckpt = tiny_pair(kind, str(tmp_path))
    prompts = np.random.RandomState(1).randint(3, hf_config["vocab_size"], (4, 6)).tolist()
    outputs = {}
    for enabled in ("1", "0"):
        monkeypatch.setenv("BAICHUAN2_ROWS_MATMUL", enabled)
        net = build_network(kind, hf_config, ckpt, use_past=True, batch_size=4, seq_length=32)
        installed = sum(isinstance(cell, rows.DecodeMatMul) for _, cell in net.cells_and_names())
        # q, k, v, o, w1, w2, w3 per layer and the lm_head; none without the kernel.
        assert installed == (7 * hf_config["num_hidden_layers"] + 1 if enabled == "1" else 0)
        outputs[enabled] = net.generate(prompts, max_new_tokens=6, do_sample=False)
    # Greedy tokens of random tiny weights: logits differ in their last bits only (summation order),
    # far below the gap between the best and second-best token of these draws.
    assert outputs["1"] == outputs["0"]


def test_only_fp32_cached_networks_on_cpu_ask_for_it(monkeypatch):
    monkeypatch.delenv("BAICHUAN2_ROWS_MATMUL", raising=False)
    assert use_rows_matmul(False, ms.float32) is None          # training / no cache
    assert use_rows_matmul(True, ms.float16) is None           # half precision keeps MatMul
    assert use_rows_matmul(True, ms.float32)                   # CPU decode
    monkeypatch.setenv("BAICHUAN2_ROWS_MATMUL", "0")
    assert use_rows_matmul(True, ms.float32) is None
