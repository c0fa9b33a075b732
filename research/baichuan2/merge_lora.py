"""Merge LoRA weights into the base weights of a Baichuan2 MindSpore checkpoint.

MindFormers' LoRA (mindpet ``LoRADense``, applied by MindFormers r1.0 ``mindformers/pet/tuners/lora_adapter.py``) adds ``(alpha / rank) * B @ A`` to a
``Linear`` weight W of shape [out, in], with ``A = <cell>.mindpet_delta_lora_a`` [rank, in] and
``B = <cell>.mindpet_delta_lora_b`` [out, rank]. This tool folds every such pair into its base
weight::

    W' = W + (lora_alpha / lora_rank) * B @ A

and writes a plain checkpoint (network weights only: no LoRA, optimizer or step entries) that the
network without ``pet_config`` loads, e.g. for inference or ``convert_weight.py --reverse``::

    python research/baichuan2/merge_lora.py --base_ckpt base.ckpt \\
        --lora_ckpt output/checkpoint_trainable/rank_0/xxx-trainable_params-1_100.ckpt \\
        --output merged.ckpt --config research/baichuan2/run_baichuan2_7b_lora_910b.yaml

``--lora_ckpt`` alone may be a checkpoint that holds both (the full checkpoint of a LoRA
fine-tune), and either argument may be a folder of ``.ckpt`` files ("base + lora in one folder").
``alpha`` comes from ``--lora_alpha`` or from ``model.model_config.pet_config`` of ``--config``;
the rank is read from the tensors (``--lora_rank``/``lora_rank`` of the yaml are checked against
them). Bad input ends with one line on stderr and exit status 2; an existing output is never
replaced without ``--overwrite``.
"""
import argparse
import os
import sys

import numpy as np

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

from baichuan2_checkpoints import checkpoint_files, checkpoint_format  # noqa: E402
from baichuan2_cli import UserInputError, run_main  # noqa: E402
from baichuan2_config import read_yaml_mapping  # noqa: E402
from baichuan2_names import LORA_A, LORA_B, canonical_lora_name, classify_ms_name, is_train_state  # noqa: E402

PROG = "merge_lora.py"


class MergeError(UserInputError):
    """Bad input for the merge; the message is one line meant for the user."""


def is_network_weight(name):
    """A base network weight (not LoRA, optimizer/step state or a runtime buffer)."""
    return classify_ms_name(name) == "weight"


def is_lora_parameter(name):
    """A LoRA weight (not its optimizer moments such as ``adam_m.<...>.mindpet_delta_lora_a``)."""
    return name.endswith(("." + LORA_A, "." + LORA_B)) and not is_train_state(name)


def lora_pairs(names):
    """``{base weight name: (A name, B name)}`` for every LoRA pair among ``names``.

    Optimizer moments of LoRA parameters are ignored. Raises MergeError if an A has no B (or the
    reverse).
    """
    names = {name for name in names if is_lora_parameter(name)}
    pairs = {}
    for name in sorted(names):
        for suffix, other_suffix in ((LORA_A, LORA_B), (LORA_B, LORA_A)):
            if name.endswith("." + suffix):
                prefix = name[: -len(suffix)]
                if prefix + other_suffix not in names:
                    raise MergeError(f"LoRA parameter {name} has no {prefix + other_suffix}")
                pairs[prefix + "weight"] = (prefix + LORA_A, prefix + LORA_B)
    return pairs


def merge_lora_weights(params, lora_alpha, lora_rank=None):
    """Fold LoRA pairs into the base weights: ``W' = W + (lora_alpha / rank) * B @ A``.

    Args:
        params: ``{name: array}`` (numpy arrays, or anything ``np.asarray`` takes) holding the base
            weights and the ``*.mindpet_delta_lora_a/_b`` pairs; optimizer, step and runtime
            entries may be present and are dropped.
        lora_alpha: LoRA alpha of the fine-tune (``pet_config.lora_alpha``).
        lora_rank: optional; if given it must equal the rank of every pair (A is [rank, in]).
    Returns:
        ``{name: np.ndarray}`` of network weights only (no LoRA entries), each merged weight in
        the dtype of its base weight; the sum is computed in float64.
    """
    params = {canonical_lora_name(k): v for k, v in params.items()}
    if lora_alpha is None:
        raise MergeError("lora_alpha is needed (pass --lora_alpha or --config with model.model_config.pet_config)")
    pairs = lora_pairs(params)
    if not pairs:
        raise MergeError("no LoRA parameters (*.mindpet_delta_lora_a/_b) found; nothing to merge")
    out = {name: np.asarray(value) for name, value in params.items() if is_network_weight(name)}
    for weight_name, (a_name, b_name) in pairs.items():
        if weight_name not in out:
            raise MergeError(f"base weight {weight_name} (for {a_name}) is missing; pass the base checkpoint "
                             "with --base_ckpt")
        weight = out[weight_name]
        lora_a = np.asarray(params[a_name], dtype=np.float64)
        lora_b = np.asarray(params[b_name], dtype=np.float64)
        rank = lora_a.shape[0]
        if lora_a.ndim != 2 or lora_b.ndim != 2 or weight.ndim != 2 or lora_b.shape[1] != rank \
                or lora_a.shape[1] != weight.shape[1] or lora_b.shape[0] != weight.shape[0]:
            raise MergeError(f"shapes do not fit W' = W + s*B@A at {weight_name}: W {weight.shape}, "
                             f"A {lora_a.shape}, B {lora_b.shape} (expected A [r, {weight.shape[-1]}], "
                             f"B [{weight.shape[0]}, r])")
        if lora_rank is not None and int(lora_rank) != rank:
            raise MergeError(f"lora_rank is {lora_rank} but {a_name} has rank {rank} (shape {lora_a.shape})")
        merged = weight.astype(np.float64) + (float(lora_alpha) / rank) * (lora_b @ lora_a)
        out[weight_name] = merged.astype(weight.dtype)
    return out


def read_checkpoints(files, bf16_names=None):
    """``{name: np.ndarray}`` merged over ``files`` (later files win on duplicate names).

    bfloat16 tensors (numpy has no such type) are read as float32 and their names added to the
    set ``bf16_names`` if one is given, so that :func:`write_checkpoint` can restore the dtype.
    """
    import mindspore as ms  # pylint: disable=import-outside-toplevel
    params = {}
    for file in files:
        try:
            loaded = ms.load_checkpoint(file, format=checkpoint_format(file))
        except Exception as error:  # pylint: disable=broad-except
            lines = str(error).strip().splitlines()
            raise MergeError(f"cannot read checkpoint {file}: {lines[0] if lines else type(error).__name__}") from None
        for name, value in loaded.items():
            name = canonical_lora_name(name)
            if value.dtype == ms.bfloat16:
                value = value.astype(ms.float32)
                if bf16_names is not None:
                    bf16_names.add(name)
            params[name] = value.asnumpy()
    return params


def write_checkpoint(params, path, bf16_names=()):
    """Write ``{name: array}`` as a MindSpore checkpoint (via a temporary file, then rename).

    Names in ``bf16_names`` are stored as bfloat16.
    """
    import mindspore as ms  # pylint: disable=import-outside-toplevel
    tmp = os.path.join(os.path.dirname(path), f".{os.path.basename(path)}.tmp-{os.getpid()}.ckpt")

    def tensor(name, value):
        value = ms.Tensor(value)
        return value.astype(ms.bfloat16) if name in bf16_names else value

    try:
        ms.save_checkpoint([{"name": name, "data": tensor(name, value)} for name, value in params.items()], tmp)
        os.replace(tmp, path)
        umask = os.umask(0)
        os.umask(umask)
        os.chmod(path, 0o666 & ~umask)       # save_checkpoint writes 0400
    finally:
        if os.path.exists(tmp):
            os.remove(tmp)


def pet_config_from_yaml(path):
    """``(lora_alpha, lora_rank)`` from ``model.model_config.pet_config`` of a yaml (plain YAML read)."""
    config = read_yaml_mapping(path)
    pet = ((config.get("model") or {}).get("model_config") or {}).get("pet_config")
    if not pet or pet.get("lora_alpha") is None:
        raise MergeError(f"{path} has no model.model_config.pet_config with lora_alpha; pass --lora_alpha")
    return pet["lora_alpha"], pet.get("lora_rank")


def merge_files(base_ckpt, lora_ckpt, output, lora_alpha=None, lora_rank=None, config=None, overwrite=False,
                log=print):
    """Read, merge and write; returns the number of merged weights."""
    output = os.path.abspath(output)
    if os.path.isdir(output):
        raise MergeError(f"--output {output} is a folder; give a .ckpt file name")
    if not output.endswith(".ckpt"):
        raise MergeError(f"--output {output} must end with .ckpt")
    if os.path.exists(output) and not overwrite:
        raise MergeError(f"--output {output} exists; remove it, choose another name or pass --overwrite")
    if not os.path.isdir(os.path.dirname(output)):
        raise MergeError(f"folder of --output does not exist: {os.path.dirname(output)}")
    if config:
        yaml_alpha, yaml_rank = pet_config_from_yaml(config)
        lora_alpha = yaml_alpha if lora_alpha is None else lora_alpha
        lora_rank = yaml_rank if lora_rank is None else lora_rank
    if lora_alpha is None:
        raise MergeError("lora_alpha is needed: pass --lora_alpha A (and --lora_rank R) or --config with "
                         "model.model_config.pet_config")
    lora_files = checkpoint_files(lora_ckpt, "--lora_ckpt", allow_rank_dirs=False)
    base_files = checkpoint_files(base_ckpt, "--base_ckpt", allow_rank_dirs=False) if base_ckpt else []
    bf16_names = set()
    base = read_checkpoints(base_files, bf16_names)
    lora = read_checkpoints([f for f in lora_files if f not in base_files], bf16_names)
    changed = [n for n, v in lora.items() if is_network_weight(n) and n in base
               and (v.shape != base[n].shape or not np.array_equal(v, base[n]))]
    if changed:
        log(f"warning: {len(changed)} base weights differ between --base_ckpt and --lora_ckpt "
            f"(e.g. {changed[0]}); the --base_ckpt values are used")
    params = {**lora, **base}
    params.update({n: v for n, v in lora.items() if is_lora_parameter(n)})
    merged = merge_lora_weights(params, lora_alpha, lora_rank)
    pairs = lora_pairs(params)
    write_checkpoint(merged, output, bf16_names)
    log(f"merged {len(pairs)} LoRA pairs (alpha {lora_alpha}, scaling alpha/rank) into {len(merged)} weights: "
        f"{output}")
    return len(pairs)


def build_parser():
    parser = argparse.ArgumentParser(prog=PROG, description=__doc__.split("\n")[0])
    parser.add_argument("--base_ckpt", default=None,
                        help="base checkpoint file or folder (optional if --lora_ckpt holds the base weights)")
    parser.add_argument("--lora_ckpt", required=True,
                        help="LoRA checkpoint (trainable-params or full fine-tune checkpoint) file or folder")
    parser.add_argument("--output", required=True, help="merged .ckpt to write (never replaced without --overwrite)")
    parser.add_argument("--lora_alpha", type=float, default=None, help="LoRA alpha (or give --config)")
    parser.add_argument("--lora_rank", type=int, default=None, help="LoRA rank, checked against the tensors")
    parser.add_argument("--config", default=None, help="yaml whose model.model_config.pet_config gives alpha/rank")
    parser.add_argument("--overwrite", action="store_true", help="replace an existing --output")
    return parser


def main(argv=None):
    """Run the CLI; returns 0 on success, 2 (after one line on stderr) on bad input."""
    args = build_parser().parse_args(argv)

    def merge():
        merge_files(args.base_ckpt, args.lora_ckpt, args.output, lora_alpha=args.lora_alpha,
                    lora_rank=args.lora_rank, config=args.config, overwrite=args.overwrite)
    return run_main(merge, PROG)


if __name__ == "__main__":
    sys.exit(main())
