"""Masked token cross-entropy with a hand-written backward that holds few tokens x vocab buffers.

With Baichuan2's 125696-token vocabulary the loss is the largest memory item of a training step:
every (tokens, vocab) fp32 buffer is ``T * 125696 * 4`` bytes (0.5 GB per 1024 tokens).
MindFormers' ``CrossEntropyLoss`` builds a one-hot label matrix and keeps ``log_softmax`` and the
one-hot for its custom backward, and its forward materialises ``logits - max``, ``exp``,
``log_softmax`` and their product with the one-hot: on the CPU runtime those all stay allocated.

``MaskedCrossEntropy`` computes the same function,

    loss = sum_t w_t * (logsumexp(logits_t) - logits_t[label_t]) / (sum_t w_t + 1e-8)

(MindFormers' rule, including its 1e-8). The forward is one ``log_softmax`` and a gather of the
label column; the backward keeps only the logits and recomputes the softmax:
``d logits_t = (softmax(logits_t) - onehot(label_t)) * w_t * dout / (sum w + 1e-8)``, written as one
scaled softmax and a scatter of ``-scale`` into the label column. No one-hot matrix exists in
either pass.

It is used when the vocabulary is not split over devices (``model_parallel == 1``: CPU, data
parallel, pipeline stages). Where the NormHead kernels run (CPU, fp32), the model fuses this loss with
the head instead (``baichuan2_norm_head.FusedNormHeadCrossEntropy``: the same function, reduced by the
same ``masked_mean`` / ``masked_mean_scale``). A vocabulary split over ``model_parallel`` devices needs
MindFormers' sharded reductions, so ``build_loss`` keeps ``CrossEntropyLoss`` there.
"""
from mindspore import nn, ops
from mindformers.core.loss import CrossEntropyLoss

_EPS = 1e-8    # MindFormers CrossEntropyLoss's denominator guard


def masked_mean(values, weight):
    """``sum(weight * values) / (sum(weight) + 1e-8)`` for values, weight (N,) fp32 -> fp32 scalar."""
    return (values * weight).sum() / (weight.sum() + _EPS)


def masked_mean_scale(weight, dout):
    """d masked_mean / d values_t times ``dout``: ``weight_t * dout / (sum(weight) + 1e-8)``, (N,) fp32."""
    return weight * (dout / (weight.sum() + _EPS))


class MaskedCrossEntropy(nn.Cell):
    """Mean cross-entropy over the tokens whose weight is set.

    Inputs:
        logits: (N, V) float32.
        labels: (N,) int32; any value where ``weight`` is 0 (e.g. -100) is ignored.
        weight: (N,) float32, 1 for a target that counts, 0 otherwise.
    Returns:
        fp32 scalar: ``sum(weight * nll) / (sum(weight) + 1e-8)``.
    """

    @staticmethod
    def _safe_labels(labels, vocab_size):
        """Labels clipped into [0, V) so the gather/scatter is defined; their weight is 0 anyway."""
        return ops.maximum(ops.minimum(labels, vocab_size - 1), 0).reshape(-1, 1)

    def construct(self, logits, labels, weight):
        log_probs = ops.log_softmax(logits, axis=-1)                                             # (N, V)
        nll = -ops.gather_elements(log_probs, 1, self._safe_labels(labels, logits.shape[-1])).reshape(-1)
        return masked_mean(nll, weight)

    def bprop(self, logits, labels, weight, out, dout):
        """d logits only; labels and weight get zeros (they carry no gradient)."""
        scale = masked_mean_scale(weight, dout).reshape(-1, 1)                                    # (N, 1)
        # scale repeated first: a (N, V) * (N, 1) Mul would keep N x V index tables on CPU (baichuan2_layers).
        grad = ops.softmax(logits, axis=-1) * ops.tile(scale, (1, logits.shape[-1]))             # (N, V)
        grad = ops.tensor_scatter_elements(grad, self._safe_labels(labels, logits.shape[-1]), -scale,
                                           axis=1, reduction="add")
        return grad, ops.zeros_like(labels), ops.zeros_like(weight)


def build_loss(parallel_config):
    """The training loss for this layout: ``MaskedCrossEntropy`` unless the vocabulary is model-parallel.

    Both take ``(logits (N, V) fp32, labels (N,) int32, input_mask (N,) fp32)`` and return the same
    fp32 scalar.
    """
    if parallel_config.model_parallel > 1:
        return CrossEntropyLoss(parallel_config=parallel_config)
    return MaskedCrossEntropy()
