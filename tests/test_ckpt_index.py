"""Names and shapes of a checkpoint, read without loading it, equal what ``ms.load_checkpoint`` loads."""
import numpy as np
import pytest
import mindspore as ms
from mindspore.train import serialization

from baichuan2_ckpt_index import CheckpointIndexError, checkpoint_shapes
from baichuan2_preflight import PreflightError, read_checkpoint_shapes


def _tensors():
    rng = np.random.RandomState(0)
    return [
        {"name": "model.tok_embeddings.embedding_weight", "data": ms.Tensor(rng.randn(300, 16).astype(np.float16))},
        {"name": "lm_head.weight", "data": ms.Tensor(rng.randn(300, 16).astype(np.float32))},
        {"name": "model.norm_out.weight", "data": ms.Tensor(np.ones(16, np.float32))},
        {"name": "model.layers.0.attention.wq.mindpet_delta_lora_a", "data": ms.Tensor(rng.randn(8, 16), ms.bfloat16)},
        {"name": "global_step", "data": ms.Tensor(7, ms.int32)},                 # a scalar
        {"name": "big.weight", "data": ms.Tensor(rng.randn(70000, 3).astype(np.float32))},   # > 512 KB
    ]


def _loaded_shapes(path, fmt="ckpt"):
    return {name: tuple(value.shape) for name, value in ms.load_checkpoint(path, format=fmt).items()}


@pytest.mark.parametrize("crc_check", [False, True])
def test_ckpt_names_and_shapes_equal_the_loaded_ones(tmp_path, monkeypatch, crc_check):
    # A 1 KB slice size makes MindSpore write every tensor above 1 KB as several same-named entries.
    monkeypatch.setattr(serialization, "SLICE_SIZE", 1)
    path = str(tmp_path / "a.ckpt")
    ms.save_checkpoint(_tensors(), path, crc_check=crc_check, append_dict={"epoch_num": 2, "step_num": 10})
    shapes = checkpoint_shapes(path)
    assert shapes == _loaded_shapes(path)
    assert shapes["big.weight"] == (70000, 3) and shapes["global_step"] == ()
    assert {"epoch_num", "step_num"} <= set(shapes)


def test_safetensors_names_and_shapes(tmp_path):
    path = str(tmp_path / "a.safetensors")
    tensors = [t for t in _tensors() if t["data"].dtype != ms.bfloat16]
    ms.save_checkpoint(tensors, path, format="safetensors")
    assert checkpoint_shapes(path) == _loaded_shapes(path, "safetensors")


def test_reads_only_the_headers(tmp_path, monkeypatch):
    """Reading the index of a checkpoint touches a small part of its bytes."""
    path = str(tmp_path / "a.ckpt")
    ms.save_checkpoint([{"name": "w", "data": ms.Tensor(np.zeros((1024, 1024), np.float32))}], path)
    read = []
    real_open = open

    def counting_open(file, mode="r", *args, **kwargs):
        handle = real_open(file, mode, *args, **kwargs)
        if file == path:
            real_read = handle.read
            handle.read = lambda size=-1: read.append(len(data := real_read(size))) or data
        return handle
    monkeypatch.setattr("builtins.open", counting_open)
    assert checkpoint_shapes(path) == {"w": (1024, 1024)}
    assert 0 < sum(read) < 1000                  # of a 4 MB file


@pytest.mark.parametrize("content", [b"not a checkpoint at all\n", b"\x0a\xff\xff\xff\x0f\x01"])
def test_a_file_that_is_not_a_checkpoint_is_refused_clearly(tmp_path, content):
    path = tmp_path / "bad.ckpt"
    path.write_bytes(content)
    with pytest.raises(CheckpointIndexError):
        checkpoint_shapes(str(path))
    with pytest.raises(PreflightError, match=r"cannot read checkpoint .*bad\.ckpt: .*convert_weight\.py"):
        read_checkpoint_shapes([str(path)])


def test_a_truncated_checkpoint_is_refused(tmp_path):
    path = str(tmp_path / "a.ckpt")
    ms.save_checkpoint(_tensors()[:2], path)
    data = open(path, "rb").read()
    cut = tmp_path / "cut.ckpt"
    cut.write_bytes(data[:len(data) // 2])
    with pytest.raises(CheckpointIndexError, match="past the end|truncated"):
        checkpoint_shapes(str(cut))
