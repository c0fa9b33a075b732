"""Portable text generation for Baichuan2 (greedy and sampling, with or without the KV cache).

MindFormers 1.8's ``GenerationMixin.generate`` relies on Ascend-only kernels (``ArgMaxExt``,
paged attention) on its cache path, so the Baichuan2 models override ``generate`` with this loop.
The network runs in MindSpore (PyNative or graph mode); choosing the next token happens in NumPy
with Hugging Face semantics:

1. repetition penalty over the prompt and the generated ids of that row (never over padding):
   a repeated id's logit is multiplied by the penalty when negative, divided by it otherwise;
2. when sampling: temperature, then top-k, then top-p (keep the smallest set of tokens whose
   probability reaches ``top_p``, at least one), then a draw from a ``numpy`` generator seeded
   per call (``seed``, default 0), so the same call gives the same sample;
3. otherwise greedy argmax.

Prompts are right-padded with ``pad_token_id``; a row's valid length is the index of its last
non-pad token + 1. A row stops at ``eos_token_id`` or at its length limit: ``len(prompt) +
max_new_tokens`` if ``max_new_tokens`` is set, else ``max_length``; both are capped at the model's
``seq_length``. Each row therefore decodes exactly as it would alone.
"""
import copy
import functools
import logging
import time

import numpy as np
from mindspore import Tensor
from mindspore import dtype as mstype

from mindformers.generation import GenerationConfig

logger = logging.getLogger("baichuan2")

_GENERATION_KEYS = ("max_length", "max_new_tokens", "do_sample", "top_k", "top_p", "temperature",
                    "repetition_penalty", "eos_token_id", "pad_token_id", "use_past", "num_beams",
                    "return_dict_in_generate")
# Passed through by MindFormers' Trainer/pipeline to every model's generate(); not generation settings.
_PIPELINE_PASSTHROUGH = ("audio_processor", "image_processor", "is_full_config", "tokenizer", "task",
                         "model_name", "batch_size")


def apply_repetition_penalty(logits, previous_ids, penalty):
    """HF ``RepetitionPenaltyLogitsProcessor`` on one row: logits (V,) float, previous_ids (N,) int."""
    if penalty == 1.0 or len(previous_ids) == 0:
        return logits
    ids = np.unique(np.asarray(previous_ids, dtype=np.int64))
    scores = logits[ids]
    logits = logits.copy()
    logits[ids] = np.where(scores < 0, scores * penalty, scores / penalty)
    return logits


def top_k_top_p_filter(logits, top_k=0, top_p=1.0):
    """HF ``TopKLogitsWarper`` then ``TopPLogitsWarper`` on one row; removed entries become -inf."""
    logits = logits.astype(np.float64, copy=True)
    vocab = logits.shape[-1]
    if 0 < top_k < vocab:
        kth = np.partition(logits, vocab - top_k)[vocab - top_k]
        logits[logits < kth] = -np.inf
    if top_p < 1.0:
        order = np.argsort(logits, kind="stable")                  # ascending, as HF
        probs = _softmax(logits[order])
        remove = np.cumsum(probs) <= (1.0 - top_p)
        remove[-1] = False                                         # keep at least one token
        logits[order[remove]] = -np.inf
    return logits


def _softmax(logits):
    shifted = logits - np.max(logits)
    exp = np.exp(shifted)
    return exp / exp.sum()


def choose_next_token(logits, previous_ids, config, rng):
    """Pick the next id of one row from its fp32 logits (V,) under ``config``."""
    logits = apply_repetition_penalty(np.asarray(logits, dtype=np.float64), previous_ids,
                                      float(config.repetition_penalty))
    if not config.do_sample:
        return int(np.argmax(logits))
    temperature = float(config.temperature)
    if temperature <= 0:
        raise ValueError(f"temperature must be > 0 when do_sample=True, got {temperature}.")
    logits = top_k_top_p_filter(logits / temperature, int(config.top_k or 0), float(config.top_p))
    probs = _softmax(logits)
    return int(min(np.searchsorted(np.cumsum(probs), rng.random(), side="right"), len(probs) - 1))


def valid_lengths(input_ids, pad_token_id):
    """Per-row index of the last non-pad token + 1 (right padding), as an int array (B,)."""
    lengths = []
    for row in input_ids:
        non_pad = np.nonzero(np.asarray(row) != pad_token_id)[0]
        lengths.append(int(non_pad[-1]) + 1 if len(non_pad) else 0)
    return np.array(lengths, dtype=np.int64)


def _bucket(length, limit, minimum=16):
    """Smallest power of two >= length (>= minimum), capped at limit: few graph-mode compiles."""
    size = minimum
    while size < length:
        size *= 2
    return min(size, limit)


def decode_window(length, seq_length):
    """Cache slots a decode step reads when the longest row holds ``length`` tokens.

    The smallest multiple of ``max(128, seq_length // 8)`` that is >= ``length``, capped at
    ``seq_length``: a short context attends over a short cache, and a process compiles at most
    eight decode graphs (one per window) however long it generates.
    """
    step = max(128, seq_length // 8)
    return min(-(-length // step) * step, seq_length)


@functools.lru_cache(maxsize=None)
def _positions(count):
    """``arange(count)`` as an int32 Tensor, made once per count."""
    return Tensor(np.arange(count, dtype=np.int32))


class Baichuan2GenerationMixin:
    """``generate()`` for ``Baichuan2ForCausalLM``; see the module docstring for the semantics."""

    def _generation_config(self, generation_config, kwargs):
        config = copy.deepcopy(generation_config or self.generation_config)
        kwargs = {k: v for k, v in kwargs.items() if k not in _PIPELINE_PASSTHROUGH}
        unknown = {k: v for k, v in kwargs.items() if k not in _GENERATION_KEYS and not hasattr(config, k)}
        if unknown:
            raise TypeError(f"generate() got unknown arguments: {sorted(unknown)}")
        for key, value in kwargs.items():
            if value is not None:
                setattr(config, key, value)
        if isinstance(config.eos_token_id, int):
            config.eos_token_id = [config.eos_token_id]
        if config.pad_token_id is None:
            config.pad_token_id = self.config.pad_token_id
        if not config.eos_token_id:
            config.eos_token_id = [self.config.eos_token_id]
        if getattr(config, "num_beams", 1) not in (None, 1):
            raise ValueError("num_beams > 1 (beam search) is not supported; use num_beams=1.")
        return config

    def generate(self, input_ids, generation_config=None, logits_processor=None, streamer=None, seed=None,
                 **kwargs):
        """Generate continuations.

        Args:
            input_ids: list of int, list of lists, or a 2-D array/Tensor of right-padded prompts.
            generation_config: a MindFormers ``GenerationConfig``; defaults to the model config.
            logits_processor: not supported (raises if given).
            streamer: optional MindFormers/HF style streamer: ``put(prompt_ids)`` once, then
                ``put(new_ids)`` per step, ``end()`` at the end (batch 1: ints; batch > 1: lists).
            seed: sampling seed for this call (default 0).
            **kwargs: any ``GenerationConfig`` field (``max_length``, ``max_new_tokens``,
                ``do_sample``, ``top_k``, ``top_p``, ``temperature``, ``repetition_penalty``,
                ``eos_token_id``, ``pad_token_id``, ``use_past``, ``return_dict_in_generate``).

        Returns:
            list (one per row) of int lists: the prompt followed by the generated ids, unpadded; or
            ``{"sequences": that list}`` when ``return_dict_in_generate``.
        """
        if logits_processor:
            raise ValueError("custom logits_processor is not supported by the Baichuan2 generate().")
        config = self._generation_config(generation_config, kwargs)
        if isinstance(input_ids, Tensor):
            input_ids = input_ids.asnumpy()
        nested = len(input_ids) > 0 and np.ndim(input_ids[0]) == 1
        rows = [list(map(int, r)) for r in (input_ids if nested else [input_ids])]
        lengths = valid_lengths(rows, config.pad_token_id)
        prompts = [row[:n] for row, n in zip(rows, lengths)]
        if min(lengths) == 0:
            raise ValueError("generate(): a prompt is empty (all padding).")
        seq_length = self.config.seq_length
        if config.max_new_tokens is not None:
            limits = [min(n + int(config.max_new_tokens), seq_length) for n in lengths]
        else:
            limits = [min(int(config.max_length), seq_length)] * len(rows)
        too_long = [i for i, n in enumerate(lengths) if n >= limits[i]]
        if too_long:
            i = too_long[0]
            raise ValueError(f"generate(): prompt {i} has {lengths[i]} tokens, which leaves no room under the "
                             f"length limit {limits[i]} (max_length / max_new_tokens, capped at seq_length "
                             f"{seq_length}). Shorten the prompt or raise the limit.")
        use_past = bool(self.config.use_past) and config.use_past is not False
        rng = np.random.default_rng(0 if seed is None else seed)
        if streamer is not None:
            streamer.put(np.array(prompts[0]) if len(prompts) == 1 else prompts)

        start = time.time()
        # A network built with a KV cache has a fixed batch size (the cache's), even when this call
        # does not use the cache: rows then go in chunks of that size, padded with filler rows.
        chunk = int(self.config.batch_size) if self.config.use_past else len(prompts)
        outputs = []
        for begin in range(0, len(prompts), chunk):
            outputs.extend(self._generate_chunk(prompts[begin:begin + chunk], limits[begin:begin + chunk],
                                                config, rng, use_past, streamer, chunk))
        if streamer is not None:
            streamer.end()
        new_tokens = sum(len(o) - len(p) for o, p in zip(outputs, prompts))
        elapsed = time.time() - start
        logger.info("generate: %d new tokens in %.2f s (%.2f tokens/s)", new_tokens, elapsed,
                    new_tokens / max(elapsed, 1e-9))
        if config.return_dict_in_generate:
            return {"sequences": outputs}
        return outputs

    def _forward_last_logits(self, tokens, valid_length, first_iteration):
        """Run the network; return fp32 logits (B, V) of each row's token at ``valid_length - 1``."""
        if self.is_first_iteration != first_iteration:      # walking every cell costs; only on change
            self.set_decode_phase(first_iteration)
        key_positions = None
        if not first_iteration:
            key_positions = _positions(decode_window(int(valid_length.max()), self.config.seq_length))
        logits = self(Tensor(tokens, mstype.int32), None, None, None, None, None, None,
                      Tensor(valid_length, mstype.int32), key_positions)
        return logits.asnumpy()

    def _generate_chunk(self, prompts, limits, config, rng, use_past, streamer, batch_size):
        """Generate for at most ``batch_size`` prompts; rows are padded up to the cache batch size."""
        real = len(prompts)
        prompts = prompts + [prompts[0]] * (batch_size - real)     # filler rows, results dropped
        limits = list(limits) + [limits[0]] * (batch_size - real)
        sequences = [list(p) for p in prompts]
        finished = [i >= real for i in range(batch_size)]
        eos = set(int(e) for e in config.eos_token_id)
        seq_length = self.config.seq_length
        was_training = self.training
        self.set_train(False)
        try:
            lengths = np.array([len(s) for s in sequences], dtype=np.int32)
            step_input = None
            while not all(finished):
                if use_past and step_input is not None:
                    logits = self._forward_last_logits(step_input, lengths, first_iteration=False)
                else:
                    width = _bucket(int(lengths.max()), seq_length)
                    tokens = np.full((batch_size, width), config.pad_token_id, dtype=np.int32)
                    for i, seq in enumerate(sequences):
                        tokens[i, :len(seq)] = seq
                    logits = self._forward_last_logits(tokens, lengths, first_iteration=True)
                new_ids = []
                for i in range(batch_size):
                    if finished[i]:
                        new_ids.append(config.pad_token_id)
                        continue
                    token = choose_next_token(logits[i], sequences[i], config, rng)
                    sequences[i].append(token)
                    new_ids.append(token)
                    if token in eos or len(sequences[i]) >= limits[i]:
                        finished[i] = True
                if streamer is not None:
                    streamer.put(new_ids[0] if real == 1 else [[t] for t in new_ids[:real]])
                # Finished rows keep decoding a pad token at a frozen position; their output is ignored.
                lengths = np.array([min(len(s), seq_length) for s in sequences], dtype=np.int32)
                step_input = np.array(new_ids, dtype=np.int32).reshape(batch_size, 1)
        finally:
            self.set_train(was_training)
            self.set_decode_phase(True)
        return sequences[:real]
