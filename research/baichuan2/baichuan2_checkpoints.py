"""Which checkpoint files a path names: the one resolver for every script and tool.

A checkpoint source (``--load_checkpoint``, ``--base_ckpt``/``--lora_ckpt``, ``--src_ckpt_dir``) is

* a ``.ckpt`` or ``.safetensors`` file;
* a folder of such files, taken together (a complete checkpoint, or a base checkpoint and a LoRA
  checkpoint side by side; names of later files win);
* a folder of ``rank_<n>/`` folders (a distributed run's output, or a split made by
  ``baichuan2_ckpt_layout``, which also writes a ``layout.json`` there).

Pure ``os``/``glob``: usable by the up-front checks before MindSpore is imported.
"""
import glob
import json
import os

from baichuan2_cli import UserInputError

CHECKPOINT_SUFFIXES = (".ckpt", ".safetensors")
#: ``layout.json``: written by ``baichuan2_ckpt_layout`` next to the ``rank_x/`` folders it splits.
LAYOUT_MANIFEST = "layout.json"


class CheckpointSourceError(UserInputError):
    """A checkpoint path that names no usable checkpoint."""


def checkpoint_format(path):
    """``"safetensors"`` or ``"ckpt"`` (the ``format`` argument of ``mindspore.load_checkpoint``)."""
    return "safetensors" if path.endswith(".safetensors") else "ckpt"


def files_in_folder(folder):
    """The ``.ckpt``/``.safetensors`` files directly in ``folder``, sorted by name."""
    return sorted(f for suffix in CHECKPOINT_SUFFIXES for f in glob.glob(os.path.join(folder, "*" + suffix)))


def rank_dirs(folder):
    """``{rank: path}`` of the ``rank_<n>/`` sub-folders of ``folder`` ({} if none or not a folder)."""
    ranks = {}
    for path in glob.glob(os.path.join(folder, "rank_*")):
        tail = os.path.basename(path)[len("rank_"):]
        if os.path.isdir(path) and tail.isdigit():
            ranks[int(tail)] = path
    return ranks


def is_split_layout(path):
    """A ``rank_x/`` folder written by ``baichuan2_ckpt_layout`` (it carries a ``layout.json``)."""
    return os.path.isdir(path) and os.path.isfile(os.path.join(path, LAYOUT_MANIFEST))


def checkpoint_files(path, what="load_checkpoint", allow_rank_dirs=True):
    """The checkpoint files ``path`` names, taken together; ``[]`` for a ``rank_x/`` layout.

    ``what`` names the option in the errors. With ``allow_rank_dirs=False`` a ``rank_x/`` layout
    is an error too (tools that need complete checkpoints).
    """
    if os.path.isfile(path):
        return [path]
    if not os.path.isdir(path):
        raise CheckpointSourceError(f"{what} not found: {path} (a .ckpt file or a folder of .ckpt files)")
    if allow_rank_dirs and rank_dirs(path):
        return []
    files = files_in_folder(path)
    if not files and rank_dirs(path):
        raise CheckpointSourceError(f"{what} {path} holds rank_x/ folders; merge them first with "
                                    "mindformers/tools/transform_ckpt.py --merge")
    if not files:
        raise CheckpointSourceError(f"{what} folder {path} holds no .ckpt file")
    return files


def single_checkpoint(folder, error=CheckpointSourceError):
    """The one checkpoint file of ``folder`` (a ``rank_x/`` folder holds exactly one); ``error`` if not one."""
    files = files_in_folder(folder)
    if len(files) != 1:
        names = ", ".join(os.path.basename(f) for f in files[:4])
        found = f"{len(files)} checkpoints ({names})" if files else "no checkpoint"
        raise error(f"{folder} holds {found}; exactly one .ckpt per folder is needed "
                    "(move the others away or pass the file itself)")
    return files[0]


def last_checkpoint(folder):
    """The checkpoint ``meta.json`` of MindFormers' CheckpointMonitor names, else the newest ``.ckpt``; or None."""
    meta = os.path.join(folder, "meta.json")
    if os.path.isfile(meta):
        try:
            with open(meta, encoding="utf-8") as handle:
                name = json.load(handle).get("last_ckpt_file")
        except (OSError, ValueError):
            name = None
        if name and os.path.isfile(os.path.join(folder, name)):
            return os.path.join(folder, name)
    files = glob.glob(os.path.join(folder, "*.ckpt"))
    return max(files, key=os.path.getmtime) if files else None


def needs_layout_transform(path):
    """Whether ``auto_trans_ckpt`` has work to do for ``path`` on a device without operator parallel.

    A file or a folder with exactly one checkpoint is cut for this rank, a ``rank_x/`` folder is
    re-laid; a folder of several complete checkpoints (base + LoRA) is loaded as is.
    """
    if not os.path.isdir(path) or rank_dirs(path):
        return True
    return len(files_in_folder(path)) == 1
