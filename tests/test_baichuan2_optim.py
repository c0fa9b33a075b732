"""``baichuan2_optim.FusedAdamW``: MindFormers' AdamW step, one ``ops.Adam`` kernel per weight.

The specification is the AdamW update MindFormers writes (``mindformers/core/optim/adamw.py``): decoupled
weight decay ``w *= 1 - lr*wd``, then ``w -= lr/(1-b1^t) * m / (sqrt(v/(1-b2^t)) + eps)``. It is computed here
in float64 NumPy and compared with both the fused optimizer and MindFormers' own.
"""
import numpy as np
import pytest

import mindspore as ms
from mindspore import Parameter, Tensor
from mindformers.core.optim.adamw import AdamW as MindFormersAdamW

from baichuan2_optim import FusedAdamW
from baichuan2_trainer_setup import FP32StateAdamWeightDecay
from model_fixtures import execution_mode

U = np.finfo(np.float32).eps / 2          # unit roundoff of fp32
BETAS, EPS = (0.9, 0.98), 1e-8
LRS = [3e-2, 2e-2, 1e-2, 5e-3]             # a dynamic schedule, one value per step
SHAPES = {"w_decayed": (5, 7), "w_other": (3, 4), "norm": (7,)}
DECAY = 0.1


def _weights(seed=0):
    rng = np.random.RandomState(seed)
    return {name: rng.randn(*shape).astype(np.float32) for name, shape in SHAPES.items()}


def _grads(steps, seed=1):
    rng = np.random.RandomState(seed)
    return [{name: (rng.randn(*shape) * 10.0 ** rng.uniform(-3, 0)).astype(np.float32)
             for name, shape in SHAPES.items()} for _ in range(steps)]


def _reference(weights, grads, decays):
    """Float64 AdamW as MindFormers writes it; returns weights, m, v after all steps."""
    w = {k: v.astype(np.float64) for k, v in weights.items()}
    m = {k: np.zeros_like(v) for k, v in w.items()}
    v = {k: np.zeros_like(x) for k, x in w.items()}
    b1, b2 = BETAS
    for t, (lr, g) in enumerate(zip(LRS, grads), start=1):
        for k in w:
            gk = g[k].astype(np.float64)
            w[k] = w[k] * (1 - lr * decays[k])
            m[k] = b1 * m[k] + (1 - b1) * gk
            v[k] = b2 * v[k] + (1 - b2) * gk * gk
            w[k] = w[k] - lr / (1 - b1 ** t) * m[k] / (np.sqrt(v[k] / (1 - b2 ** t)) + EPS)
    return w, m, v


def _run(cls, weights, grads, mode):
    params = {k: Parameter(Tensor(v.copy()), name=k) for k, v in weights.items()}
    groups = [{"params": [params["w_decayed"]], "weight_decay": DECAY},
              {"params": [params["w_other"], params["norm"]], "weight_decay": 0.0}]
    with execution_mode(mode):
        optimizer = cls(groups, learning_rate=LRS, betas=BETAS, eps=EPS)
        order = [p.name for p in optimizer.parameters]
        for g in grads:
            optimizer(tuple(Tensor(g[name]) for name in order))
    moments = {p.name.split(".", 1)[1]: p.asnumpy() for p in optimizer.exp_avg}
    squares = {p.name.split(".", 1)[1]: p.asnumpy() for p in optimizer.exp_avg_sq}
    return optimizer, {k: p.asnumpy() for k, p in params.items()}, moments, squares


def _adam_ratio_bound(step):
    """Upper bound of |m_hat| / sqrt(v_hat) after ``step`` AdamW steps, any gradients (Cauchy-Schwarz)."""
    b1, b2 = BETAS
    ratio = b1 ** 2 / b2
    return ((1 - b1) / (1 - b1 ** step) * np.sqrt((1 - b2 ** step) / (1 - b2))
            * np.sqrt((1 - ratio ** step) / (1 - ratio)))


def _tolerances(weights, grads):
    """Per-element bounds of an fp32 AdamW against the float64 formula, from the arithmetic.

    * m and v: each step rounds a product and a sum (and g*g for v), <= 3u relative to the terms, and the
      steps add up: |m error| <= 3 t u max|g|, |v error| <= 4 t u max g^2.
    * the step m_hat / (sqrt(v_hat) + eps): the moments' relative errors reach it halved for v, plus the
      bias corrections, the sqrt, the add and the division: <= (3 t + 8) u relative, times the ratio bound.
    * the weight: the decay multiply and the subtraction round at |w| (2u each step), so after k steps
      sum_t lr_t * bound_t * (3t + 8) u + 2 k u max|w| (the weights stay O(1) here).
    """
    k = len(grads)
    gmax = max(float(np.abs(g[n]).max()) for g in grads for n in g)
    wmax = max(float(np.abs(w).max()) for w in weights.values()) + sum(LRS) * _adam_ratio_bound(k)
    w_tol = sum(lr * _adam_ratio_bound(t) * (3 * t + 8) * U for t, lr in enumerate(LRS, start=1))
    w_tol += 2 * k * U * wmax
    return w_tol, 3 * k * U * gmax, 4 * k * U * gmax ** 2


@pytest.mark.parametrize("mode", [ms.PYNATIVE_MODE, ms.GRAPH_MODE])
@pytest.mark.parametrize("cls", [FusedAdamW, MindFormersAdamW], ids=["fused", "mindformers"])
def test_fused_adamw_takes_mindformers_adamw_step(cls, mode):
    """Four steps with a dynamic learning rate, one decayed group and one not: both optimizers give the
    float64 formula's weights and moments within the fp32 rounding bound (``_tolerances``)."""
    weights, grads = _weights(), _grads(len(LRS))
    decays = {"w_decayed": DECAY, "w_other": 0.0, "norm": 0.0}
    expected_w, expected_m, expected_v = _reference(weights, grads, decays)
    optimizer, got_w, got_m, got_v = _run(cls, weights, grads, mode)
    w_tol, m_tol, v_tol = _tolerances(weights, grads)
    for name in SHAPES:
        np.testing.assert_allclose(got_w[name], expected_w[name], rtol=0, atol=w_tol, err_msg=name)
        np.testing.assert_allclose(got_m[name], expected_m[name], rtol=0, atol=m_tol, err_msg=name)
        np.testing.assert_allclose(got_v[name], expected_v[name], rtol=0, atol=v_tol, err_msg=name)
    assert int(optimizer.global_step.asnumpy()[0]) == len(LRS)
    # The weights moved by far more than the tolerance (the comparison has something to see).
    assert min(np.abs(got_w[n] - weights[n]).max() for n in SHAPES) > 1e3 * w_tol


def test_fused_adamw_keeps_mindformers_state_names():
    """Same moment and step names as MindFormers' AdamW, so a checkpoint of one resumes with the other."""
    weights = _weights()

    def names(cls):
        params = [Parameter(Tensor(v), name=k) for k, v in weights.items()]
        optimizer = cls(params, learning_rate=1e-3)
        return sorted(p.name for p in optimizer.exp_avg + optimizer.exp_avg_sq + (optimizer.global_step,))
    assert names(FusedAdamW) == names(MindFormersAdamW)


def test_yaml_optimizer_is_fused_on_cpu_for_fp32_weights_only():
    """``FP32StateAdamWeightDecay`` (the original YAMLs' optimizer) is the fused one on CPU with fp32 weights;
    with fp16 weights (the Atlas 800 YAMLs' param_init_type) it stays MindFormers' AdamW."""
    fp32 = [Parameter(Tensor(np.ones((2, 2), np.float32)), name="a")]
    fp16 = [Parameter(Tensor(np.ones((2, 2), np.float16)), name="b")]
    assert type(FP32StateAdamWeightDecay(fp32, learning_rate=1e-3)) is FusedAdamW
    assert type(FP32StateAdamWeightDecay([{"params": fp32, "weight_decay": 0.1}])) is FusedAdamW
    assert type(FP32StateAdamWeightDecay(fp16, learning_rate=1e-3)) is MindFormersAdamW
    with pytest.raises(TypeError, match="float32 weights only; b is Float16"):
        FusedAdamW(fp16)
