"""MindFormers' AdamW with each fp32 weight updated by one fused kernel (``ops.Adam``, i.e. ApplyAdam).

MindFormers' ``AdamW`` (``mindformers/core/optim/adamw.py``) writes the update of every weight as about a
dozen elementwise kernels (casts, the two moment updates, the bias corrections, sqrt, add, div, mul, sub,
assign), each one a pass over weight-sized tensors. On MindSpore's CPU backend each pass runs at memory
speed, so at the bench shape (309 M parameters) the optimizer costs seconds per step, as much as the
forward and backward together (``benchmarks/bench_tasks.py optimizer``, docs/performance.md). ``ops.Adam``
does the whole step in one pass per weight. Its kernel computes (MindSpore ``adam_cpu_kernel.cc``)::

    m += (g - m)(1 - b1);   v += (g*g - v)(1 - b2);   w -= lr * sqrt(1 - b2^t) / (1 - b1^t) * m / (sqrt(v) + e)

and MindFormers' AdamW computes, after its decoupled weight decay ``w *= 1 - lr * wd``::

    m = b1 m + (1 - b1) g;  v = b2 v + (1 - b2) g*g;      w -= lr / (1 - b1^t) * m / (sqrt(v / (1 - b2^t)) + eps)

Multiplying the second form's numerator and denominator by sqrt(1 - b2^t) gives the first with
``e = eps * sqrt(1 - b2^t)``, so ``FusedAdamW`` passes that epsilon each step and the two optimizers take the
same step in exact arithmetic (in fp32 they differ by rounding, a few ulp of the update). The weight decay
runs first, as in MindFormers: the Adam step does not read ``w``, so the order is the same.

The class subclasses MindFormers' AdamW, so the moments (``adam_m.*``, ``adam_v.*``), ``global_step``,
parameter groups and learning-rate schedules are MindFormers' own: checkpoints written by either optimizer
resume with the other. Which backend takes it is decided in ``baichuan2_device.use_fused_adam``.
"""
from mindspore import ops
from mindspore import dtype as mstype
from mindspore.ops import composite as C
from mindspore.ops import functional as F
from mindformers.core.optim.adamw import AdamW as MindFormersAdamW

_fused_adamw_step = C.MultitypeFuncGraph("fused_adamw_step")
_adam = ops.Adam()


@_fused_adamw_step.register("Tensor", "Tensor", "Tensor", "Tensor", "Tensor", "Tensor", "Tensor",
                            "Tensor", "Tensor", "Tensor", "Tensor", "Bool", "Bool")
def _update_one_weight(beta1_power, beta2_power, beta1, beta2, eps_hat, lr, weight_decay, weight, grad,
                       exp_avg, exp_avg_sq, decays, optim_filter):
    """One weight's AdamW step in place (fp32 weight, moments and gradient); returns the updated weight.

    ``decays`` and ``optim_filter`` are Python bools, so the graph keeps only the branch taken.
    """
    if optim_filter:
        if decays:
            weight = F.depend(weight, F.assign(weight, weight * (1.0 - lr * weight_decay)))
        return _adam(weight, exp_avg, exp_avg_sq, beta1_power, beta2_power, lr, beta1, beta2, eps_hat,
                    ops.cast(grad, mstype.float32))[0]
    return grad


class FusedAdamW(MindFormersAdamW):
    """MindFormers' ``AdamW`` (same arguments, states and checkpoints) whose update is ``ops.Adam``.

    Every trainable weight must be float32, since the kernel updates the weight and the fp32 moments in one
    pass (``baichuan2_device.use_fused_adam`` checks this before choosing the class).

    Inputs: ``gradients``, a tuple of tensors shaped like the weights. Output: the updated weights.
    """

    def __init__(self, params, learning_rate=1e-3, betas=(0.9, 0.999), eps=1e-8, weight_decay=0.0):
        super().__init__(params, learning_rate=learning_rate, betas=betas, eps=eps, weight_decay=weight_decay)
        not_fp32 = [p for p in self._parameters if p.dtype != mstype.float32]
        if not_fp32:
            raise TypeError(f"FusedAdamW updates float32 weights only; {not_fp32[0].name} is {not_fp32[0].dtype} "
                            "(use mindformers AdamW)")
        # MindFormers decays every weight of an ungrouped optimizer by the one weight_decay (multiplying by
        # 1 when it is 0, which skipping does exactly); grouped, the groups with weight_decay > 0.
        self.decays = (self.decay_flags if self.is_group
                       else (bool(self.exec_weight_decay),) * len(self._parameters))

    def construct(self, gradients):
        weight_decay = self.get_weight_decay()
        lr = self.get_lr()
        self.assignadd(self.global_step, self.global_step_increase_tensor)
        step = ops.cast(self.global_step, mstype.float32)
        beta1_power = ops.pow(self.beta1, step)
        beta2_power = ops.pow(self.beta2, step)
        eps_hat = self.eps * ops.sqrt(1.0 - beta2_power)
        b1, b2 = self.beta1, self.beta2
        if self.is_group_lr:
            result = self.hyper_map(F.partial(_fused_adamw_step, beta1_power, beta2_power, b1, b2, eps_hat),
                                    lr, weight_decay, self._parameters, gradients, self.exp_avg, self.exp_avg_sq,
                                    self.decays, self.optim_filter)
        elif self.is_group:
            result = self.hyper_map(F.partial(_fused_adamw_step, beta1_power, beta2_power, b1, b2, eps_hat, lr),
                                    weight_decay, self._parameters, gradients, self.exp_avg, self.exp_avg_sq,
                                    self.decays, self.optim_filter)
        else:
            result = self.hyper_map(F.partial(_fused_adamw_step, beta1_power, beta2_power, b1, b2, eps_hat, lr,
                                              weight_decay),
                                    self._parameters, gradients, self.exp_avg, self.exp_avg_sq, self.decays,
                                    self.optim_filter)
        if self.use_parallel:
            self.broadcast_params(result)
        return result
