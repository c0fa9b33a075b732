"""The training loss: ``MaskedCrossEntropy`` is the masked token cross-entropy of Hugging Face
Baichuan2 (``CrossEntropyLoss(ignore_index=-100)``, mean over counted targets) and of MindFormers'
``CrossEntropyLoss``, value and gradient, with no one-hot matrix."""
import copy

import numpy as np
import pytest
import torch

import mindspore as ms
from mindspore import Tensor
from mindformers.core.loss import CrossEntropyLoss
from mindformers.modules.transformer.op_parallel_config import default_dpmp_config

from baichuan2_loss import MaskedCrossEntropy, build_loss

# fp32 softmax over V classes: each probability carries ~1 ulp (6e-8 relative) of rounding from exp and
# the sum, the loss ~log(V) * 6e-8 plus the sum's V * 6e-8 relative: 1e-5 relative covers V up to ~1e4
# with two orders of margin; gradients are probabilities (absolute error ~ p * 1e-6).
RTOL, GRAD_ATOL = 1e-5, 1e-7


def _case(n=48, vocab=997, ignored=(0, 5, 17), seed=0):
    rng = np.random.RandomState(seed)
    logits = (rng.randn(n, vocab) * 4).astype(np.float32)
    labels = rng.randint(0, vocab, n).astype(np.int32)
    labels[list(ignored)] = -100
    return logits, labels, (labels != -100).astype(np.float32)


def _ms_value_and_grad(loss, logits, labels, weight):
    ms.set_context(mode=ms.GRAPH_MODE, device_target="CPU")
    value, grad = ms.value_and_grad(loss, grad_position=0)(Tensor(logits), Tensor(labels), Tensor(weight))
    return float(value.asnumpy()), grad.asnumpy()


def _torch_value_and_grad(logits, labels):
    x = torch.tensor(logits, requires_grad=True)
    loss = torch.nn.functional.cross_entropy(x, torch.tensor(labels, dtype=torch.long), ignore_index=-100)
    loss.backward()
    return float(loss), x.grad.numpy()


def test_matches_torch_cross_entropy_with_ignore_index():
    logits, labels, weight = _case()
    value, grad = _ms_value_and_grad(MaskedCrossEntropy(), logits, labels, weight)
    ref_value, ref_grad = _torch_value_and_grad(logits, labels)
    np.testing.assert_allclose(value, ref_value, rtol=RTOL)
    np.testing.assert_allclose(grad, ref_grad, rtol=RTOL, atol=GRAD_ATOL)
    assert not grad[[0, 5, 17]].any(), "an ignored target must get no gradient"


def test_matches_mindformers_cross_entropy():
    logits, labels, weight = _case(seed=1)
    value, grad = _ms_value_and_grad(MaskedCrossEntropy(), logits, labels, weight)
    mf_value, mf_grad = _ms_value_and_grad(CrossEntropyLoss(parallel_config=default_dpmp_config),
                                           logits, labels, weight)
    np.testing.assert_allclose(value, mf_value, rtol=RTOL)
    np.testing.assert_allclose(grad, mf_grad, rtol=RTOL, atol=GRAD_ATOL)


def test_weight_not_label_decides_what_counts():
    """A valid label id whose weight is 0 is ignored as -100 is (the packed rows' boundary rule)."""
    logits, labels, weight = _case(seed=2, ignored=())
    weight[[3, 4]] = 0.0
    value, grad = _ms_value_and_grad(MaskedCrossEntropy(), logits, labels, weight)
    torch_labels = labels.copy()
    torch_labels[[3, 4]] = -100
    ref_value, ref_grad = _torch_value_and_grad(logits, torch_labels)
    np.testing.assert_allclose(value, ref_value, rtol=RTOL)
    np.testing.assert_allclose(grad, ref_grad, rtol=RTOL, atol=GRAD_ATOL)


def test_all_ignored_gives_zero_loss_and_gradient():
    logits, labels, weight = _case(n=8, ignored=tuple(range(8)))
    value, grad = _ms_value_and_grad(MaskedCrossEntropy(), logits, labels, weight)
    assert value == 0.0 and not grad.any()


@pytest.mark.parametrize("model_parallel, expected", [(1, MaskedCrossEntropy), (2, CrossEntropyLoss)])
def test_build_loss_keeps_mindformers_loss_for_a_split_vocabulary(model_parallel, expected):
    layout = copy.deepcopy(default_dpmp_config)
    layout.model_parallel = model_parallel
    assert isinstance(build_loss(layout), expected)
