"""Tiny Hugging Face Baichuan2 checkpoints for tests (no real weights needed).

Three functions, independent of the plugin code (so they can check it):

- :func:`tiny_hf_config` -- a ``config.json`` dict shaped like the released Baichuan2 ones.
- :func:`random_hf_state_dict` -- a seeded random HF state dict for such a config.
- :func:`write_hf_checkpoint` -- write config + weights as HF does (bin or safetensors,
  optionally sharded with an index json).

Example::

    cfg = tiny_hf_config("13b")
    sd = random_hf_state_dict(cfg)
    hf_dir = write_hf_checkpoint(tmp_path / "hf", sd, cfg, fmt="safetensors", num_shards=2)
"""
import json
from pathlib import Path

import torch

_TINY = {
    "7b": {"vocab_size": 4000, "hidden_size": 64, "intermediate_size": 176,
           "num_hidden_layers": 2, "num_attention_heads": 4},
    "13b": {"vocab_size": 4000, "hidden_size": 80, "intermediate_size": 216,
            "num_hidden_layers": 2, "num_attention_heads": 5},
}


def tiny_hf_config(kind="7b", **overrides):
    """A Baichuan2 ``config.json`` dict with tiny sizes.

    ``kind`` "7b" (RoPE: has ``max_position_embeddings`` 4096) or "13b" (ALiBi: has not).
    Defaults: vocab 4000, 2 layers; 7b hidden 64 / FFN 176 / 4 heads, 13b hidden 80 / FFN 216 /
    5 heads (head_dim 16). ``overrides`` replace fields; an override of ``None`` removes the field.
    """
    if kind not in _TINY:
        raise ValueError(f"kind must be '7b' or '13b', got {kind!r}")
    config = {
        "architectures": ["BaichuanForCausalLM"],
        "model_type": "baichuan",
        **_TINY[kind],
        "hidden_act": "silu",
        "rms_norm_eps": 1e-6,
        "initializer_range": 0.02,
        "bos_token_id": 1,
        "eos_token_id": 2,
        "pad_token_id": 0,
        "tie_word_embeddings": False,
        "use_cache": True,
        "z_loss_weight": 0,
        "model_max_length": 4096,
    }
    if kind == "7b":
        config["max_position_embeddings"] = 4096
    for key, value in overrides.items():
        if value is None:
            config.pop(key, None)
        else:
            config[key] = value
    return config


def random_hf_state_dict(config, seed=0, dtype=torch.float32):
    """Seeded random HF Baichuan2 state dict for ``config`` (ordered as HF's ``state_dict()``).

    Shapes (V vocab, h hidden, I intermediate): ``model.embed_tokens.weight`` [V,h];
    per layer i ``model.layers.i.self_attn.W_pack.weight`` [3h,h], ``...o_proj.weight`` [h,h],
    ``...mlp.gate_proj.weight``/``up_proj`` [I,h], ``...mlp.down_proj.weight`` [h,I],
    ``...input_layernorm.weight``/``post_attention_layernorm`` [h]; ``model.norm.weight`` [h];
    ``lm_head.weight`` [V,h] (raw, not normalised). Matrices ~ N(0, 0.02^2); norm weights
    ~ 1 + N(0, 0.1^2) (not all ones, so a swapped norm is caught). All tensors are ``dtype``.
    """
    gen = torch.Generator().manual_seed(seed)
    v, h, inter = config["vocab_size"], config["hidden_size"], config["intermediate_size"]

    def mat(*shape):
        return (torch.randn(*shape, generator=gen) * 0.02).to(dtype)

    def norm():
        return (1.0 + 0.1 * torch.randn(h, generator=gen)).to(dtype)

    state = {"model.embed_tokens.weight": mat(v, h)}
    for i in range(config["num_hidden_layers"]):
        p = f"model.layers.{i}."
        state[p + "self_attn.W_pack.weight"] = mat(3 * h, h)
        state[p + "self_attn.o_proj.weight"] = mat(h, h)
        state[p + "mlp.gate_proj.weight"] = mat(inter, h)
        state[p + "mlp.down_proj.weight"] = mat(h, inter)
        state[p + "mlp.up_proj.weight"] = mat(inter, h)
        state[p + "input_layernorm.weight"] = norm()
        state[p + "post_attention_layernorm.weight"] = norm()
    state["model.norm.weight"] = norm()
    state["lm_head.weight"] = mat(v, h)
    return state


def write_hf_checkpoint(directory, state_dict, config, fmt="bin", num_shards=1):
    """Write ``config.json`` and ``state_dict`` into ``directory`` as HF does; return the directory.

    ``fmt`` "bin" (``torch.save``) or "safetensors". One shard: ``pytorch_model.bin`` /
    ``model.safetensors``. ``num_shards`` > 1: contiguous groups of tensors (in dict order) in
    ``pytorch_model-0000k-of-0000n.bin`` / ``model-0000k-of-0000n.safetensors`` plus
    ``pytorch_model.bin.index.json`` / ``model.safetensors.index.json`` with ``metadata.total_size``
    and ``weight_map``. Tensors are written as given (any names, shapes, dtypes).
    """
    if fmt not in ("bin", "safetensors"):
        raise ValueError(f"fmt must be 'bin' or 'safetensors', got {fmt!r}")
    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    (directory / "config.json").write_text(json.dumps(config, indent=2) + "\n", encoding="utf-8")
    names = list(state_dict)
    num_shards = max(1, min(int(num_shards), len(names)))
    stem, ext = ("pytorch_model", "bin") if fmt == "bin" else ("model", "safetensors")
    if num_shards == 1:
        _save({n: state_dict[n] for n in names}, directory / f"{stem}.{ext}", fmt)
        return directory
    bounds = [len(names) * k // num_shards for k in range(num_shards + 1)]
    weight_map, total = {}, 0
    for k in range(num_shards):
        group = names[bounds[k]:bounds[k + 1]]
        file = f"{stem}-{k + 1:05d}-of-{num_shards:05d}.{ext}"
        _save({n: state_dict[n] for n in group}, directory / file, fmt)
        for n in group:
            weight_map[n] = file
            total += state_dict[n].numel() * state_dict[n].element_size()
    index = {"metadata": {"total_size": total}, "weight_map": weight_map}
    (directory / f"{stem}.{ext}.index.json").write_text(json.dumps(index, indent=2) + "\n",
                                                        encoding="utf-8")
    return directory


def _save(tensors, path, fmt):
    if fmt == "bin":
        torch.save(tensors, path)
    else:
        from safetensors.torch import save_file
        save_file({k: v.contiguous() for k, v in tensors.items()}, str(path),
                  metadata={"format": "pt"})
