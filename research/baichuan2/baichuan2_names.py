"""Names of Baichuan2 parameters and checkpoint entries, and the FFN width: the one list of each.

Pure Python (no mindspore / mindformers / torch), so the up-front checks, the converters, the
layout tools and the tests all read the same lists before anything heavy is imported.

* HF <-> MindSpore parameter names (MindFormers r1.0 ``research/baichuan/convert_weight.py``): HF ``model.layers.i.self_attn.W_pack.weight``
  is split into MindSpore ``model.layers.i.attention.{wq,wk,wv}.weight``; everything else maps 1:1.
* Checkpoint entries that are not network weights: training state (optimizer moments, step
  counters, loss scale) and runtime buffers (KV cache, the normalised-head buffer).
* LoRA (mindpet) parameter names and the old ``tk_delta`` spelling MindFormers' loader renames.
* The Linear cells of the network (what LoRA can wrap) and the FFN width MindFormers derives.
"""
import re

# ----- HF <-> MindSpore ----------------------------------------------------------------------
W_PACK = "self_attn.W_pack.weight"
QKV = ("attention.wq.weight", "attention.wk.weight", "attention.wv.weight")

#: HF name -> MindSpore name for the tensors outside the decoder layers.
GLOBAL_NAMES = {
    "model.embed_tokens.weight": "model.tok_embeddings.embedding_weight",
    "model.norm.weight": "model.norm_out.weight",
    "lm_head.weight": "lm_head.weight",
}
#: Per-layer suffix (after ``model.layers.i.``), HF -> MindSpore, W_pack excluded.
LAYER_NAMES = {
    "self_attn.o_proj.weight": "attention.wo.weight",
    "mlp.gate_proj.weight": "feed_forward.w1.weight",
    "mlp.down_proj.weight": "feed_forward.w2.weight",
    "mlp.up_proj.weight": "feed_forward.w3.weight",
    "input_layernorm.weight": "attention_norm.weight",
    "post_attention_layernorm.weight": "ffn_norm.weight",
}
EMBEDDING = "model.tok_embeddings.embedding_weight"
NORM_OUT = "model.norm_out.weight"
LM_HEAD = "lm_head.weight"
_MS_GLOBAL = {v: k for k, v in GLOBAL_NAMES.items()}
_MS_LAYER = {v: k for k, v in LAYER_NAMES.items()}
LAYER_RE = re.compile(r"^model\.layers\.(\d+)\.(.+)$")

#: HF tensors that are derived buffers, not weights: skipped (with a note) if present.
HF_IGNORED_SUFFIXES = (".rotary_emb.inv_freq",)

# ----- MindSpore checkpoint entries that are not network weights -----------------------------
#: Per-parameter optimizer state: ``<prefix><parameter name>``.
OPTIMIZER_STATE_PREFIXES = ("adam_m.", "adam_v.", "moment1.", "moment2.", "accu_grads.", "accu_grad.")
#: Optimizer / training-loop state found in MindFormers training checkpoints.
TRAIN_STATE_PREFIXES = OPTIMIZER_STATE_PREFIXES + (
    "global_step", "learning_rate", "beta1_power", "beta2_power", "scale_sense", "loss_scale", "epoch_num",
    "step_num", "current_iterator_step", "last_overflow_iterator_step", "global_batch_size")
#: Entries every checkpoint saved by MindFormers' CheckpointMonitor during training has.
RESUME_KEYS = ("step_num", "global_step")
#: Substrings of runtime-only parameters (KV cache, the normalised lm_head buffer ``lm_head.inv_norm``
#: of baichuan2_layers.NormHead): never converted, never expected in a checkpoint.
RUNTIME_BUFFERS = ("key_past", "value_past", "kvcache", "normalized", "inv_norm")

# ----- LoRA ----------------------------------------------------------------------------------
LORA_A = "mindpet_delta_lora_a"
LORA_B = "mindpet_delta_lora_b"
#: Substrings of LoRA parameters (mindpet; ``tk_delta`` is the old spelling).
LORA_MARKERS = ("mindpet_delta", "tk_delta")
#: Cells of the Baichuan2 network that are MindFormers ``Linear`` layers, i.e. what LoRA can wrap.
LINEAR_CELLS = ("wq", "wk", "wv", "wo", "w1", "w2", "w3")
#: ``target_modules`` of MindFormers' LoraAdapter when the YAML gives none.
DEFAULT_LORA_TARGETS = r".*dense*|.*linear*"


def canonical_lora_name(name):
    """``name`` with the old LoRA spelling ``tk_delta`` as ``mindpet_delta`` (as MindFormers' loader renames it)."""
    return name.replace("tk_delta", "mindpet_delta")


def is_train_state(name):
    """Optimizer moments, step counters, loss scale: checkpoint entries of training, not of the network."""
    return name.startswith(TRAIN_STATE_PREFIXES)


def is_runtime_buffer(name):
    """KV cache and other buffers the network computes; never loaded from a checkpoint."""
    return any(marker in name for marker in RUNTIME_BUFFERS)


def is_lora_name(name):
    """A LoRA parameter (either spelling), including its optimizer moments."""
    return any(marker in name for marker in LORA_MARKERS)


def classify_ms_name(name):
    """Kind of a MindSpore name: "weight", "runtime" (KV cache, normalised head buffer),
    "train_state" (optimizer, step counters) or "lora"."""
    if is_lora_name(name):
        return "lora"
    if is_runtime_buffer(name):
        return "runtime"
    if is_train_state(name):
        return "train_state"
    return "weight"


def hf_to_ms_names(name):
    """List of MindSpore names for one HF tensor (three, in q,k,v order, for ``W_pack``)."""
    if name in GLOBAL_NAMES:
        return [GLOBAL_NAMES[name]]
    m = LAYER_RE.match(name)
    if m:
        prefix, suffix = f"model.layers.{m.group(1)}.", m.group(2)
        if suffix == W_PACK:
            return [prefix + s for s in QKV]
        if suffix in LAYER_NAMES:
            return [prefix + LAYER_NAMES[suffix]]
    raise ValueError(f"not a Baichuan2 HF weight name: {name}")


def hf_to_ms_name(name):
    """MindSpore name of the HF tensor ``name``.

    ``W_pack`` has three MindSpore counterparts: use :func:`hf_to_ms_names` (or
    ``baichuan2_weights.split_w_pack``) for it. Raises ``ValueError`` for a name that is not a Baichuan2 weight.
    """
    names = hf_to_ms_names(name)
    if len(names) != 1:
        raise ValueError(f"{name} maps to {len(names)} MindSpore tensors {names}; "
                         "use hf_to_ms_names()/split_w_pack()")
    return names[0]


def ms_to_hf_name(name):
    """HF name of the MindSpore tensor ``name`` (``wq``/``wk``/``wv`` all give the W_pack name)."""
    if name in _MS_GLOBAL:
        return _MS_GLOBAL[name]
    m = LAYER_RE.match(name)
    if m:
        prefix, suffix = f"model.layers.{m.group(1)}.", m.group(2)
        if suffix in QKV:
            return prefix + W_PACK
        if suffix in _MS_LAYER:
            return prefix + _MS_LAYER[suffix]
    raise ValueError(f"not a Baichuan2 MindSpore weight name: {name}")


# ----- sizes ---------------------------------------------------------------------------------
def config_value(config, key, default=None):
    """``config[key]`` for dicts and MindFormerConfig, ``config.key`` for other objects; ``default`` if unset."""
    if config is None:
        return default
    if isinstance(config, dict):
        value = config.get(key, default)
    else:
        value = getattr(config, key, default)
    return default if value is None else value


def ffn_width(model_config):
    """FFN width as MindFormers' LlamaFeedForward derives it (MindFormers r1.0 ``mindformers/models/llama/llama_layer.py``), or None without hidden_size.

    ``intermediate_size`` if set; else ``2/3 * 4 * hidden`` (with ``ffn_dim_multiplier``:
    ``2/3 * (multiplier + 0.01) * 4 * hidden``) rounded up to ``multiple_of`` (default 256).
    ``model_config`` is a dict, a YAML config or a ``MindFormerConfig``.
    """
    explicit = config_value(model_config, "intermediate_size")
    if explicit:
        return int(explicit)
    hidden = config_value(model_config, "hidden_size")
    if not hidden:
        return None
    width = int(2 * 4 * hidden / 3)
    multiplier = config_value(model_config, "ffn_dim_multiplier")
    if multiplier:
        width = int(2 * int((multiplier + 0.01) * 4 * hidden) / 3)
    multiple = config_value(model_config, "multiple_of") or 256
    return multiple * ((width + multiple - 1) // multiple)
