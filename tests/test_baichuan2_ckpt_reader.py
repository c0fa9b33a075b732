"""The streaming ``.ckpt`` reader (``baichuan2_ckpt_reader``) and the loader built on it (``load_weights``).

* Round trips against ``mindspore.load_checkpoint`` for files written by ``mindspore.save_checkpoint``:
  every dtype Baichuan2 checkpoints use (and the others of MindSpore's table), scalars and ``append_dict``
  values, tensors written in several slices (``SLICE_SIZE`` patched small for the save, both of the
  saver's slicing paths), the ``crc_num`` trailer; arrays compared bit for bit.
* Truncated, corrupt, encrypted and failing-CRC files: one line naming the file.
* ``load_weights`` on a plain ``.ckpt``: the values ``load_param_into_net`` would set (casts, prefixes,
  later files win, LoRA rename), its errors, the fall-back for map tensors.
* Memory, measured in fresh processes: streaming peaks at the network plus about one tensor,
  ``mindspore.load_checkpoint`` at the network plus a full copy.

Run as a script (``child ...``) it is the child of the memory test.
"""
import json
import os
import subprocess
import sys
from collections import OrderedDict
from types import SimpleNamespace

import numpy as np
import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
PLUGIN = os.path.join(ROOT, "research", "baichuan2")
BENCHMARKS = os.path.join(ROOT, "benchmarks")
for _path in (PLUGIN, BENCHMARKS):
    if _path not in sys.path:
        sys.path.insert(0, _path)

MIB = 2 ** 20


# ----- helpers ----------------------------------------------------------------------------------------

def _ms():
    import mindspore as ms  # pylint: disable=import-outside-toplevel
    return ms


def save(path, tensors, **kwargs):
    """``mindspore.save_checkpoint`` of ``{name: numpy array or (array, mindspore dtype)}`` (the latter cast,
    e.g. to bfloat16, which numpy cannot make itself)."""
    ms = _ms()
    items = []
    for name, value in tensors.items():
        if isinstance(value, tuple):                      # (array, mindspore dtype)
            tensor = ms.Tensor(value[0], dtype=value[1])
        else:
            tensor = ms.Tensor(value)
        items.append({"name": name, "data": tensor})
    ms.save_checkpoint(items, str(path), **kwargs)
    return str(path)


def bits(array):
    """The bytes of an array (exact comparison, bf16 included) with its shape."""
    return np.ascontiguousarray(array).tobytes(), tuple(array.shape)


def reader_dict(path, **kwargs):
    from baichuan2_ckpt_reader import iter_tensors  # pylint: disable=import-outside-toplevel
    return OrderedDict((name, (value, dtype)) for name, value, dtype in iter_tensors(path, **kwargs))


def assert_same_as_mindspore(path, **kwargs):
    """Names (in file order), dtypes, shapes and bytes of every entry equal ``mindspore.load_checkpoint``'s."""
    ms = _ms()
    expected = ms.load_checkpoint(path, **kwargs)
    got = reader_dict(path, **kwargs)
    assert list(got) == list(expected)
    for name, value in expected.items():
        array, dtype = got[name]
        if isinstance(value, str):
            assert (array, dtype) == (value, "str")
            continue
        assert dtype == str(value.dtype), name
        assert array.dtype == value.asnumpy().dtype, name
        assert bits(array) == bits(value.asnumpy()), name
    return got


# ----- the reader against mindspore.load_checkpoint ---------------------------------------------------

def test_dtypes_scalars_and_append_dict_round_trip(tmp_path):
    ms = _ms()
    rng = np.random.RandomState(0)
    tensors = {
        "fp16": rng.randn(7, 5).astype(np.float16),
        "fp32": rng.randn(3, 4, 2).astype(np.float32),
        "bf16": (rng.randn(6, 3).astype(np.float32), ms.bfloat16),
        "int32": rng.randint(-2 ** 31, 2 ** 31 - 1, size=(9,)).astype(np.int32),
        "int64": np.array([-1, 2 ** 40], np.int64), "int8": np.array([-128, 127], np.int8),
        "uint8": np.array([0, 255], np.uint8), "fp64": np.array([1e-300, -2.5]), "bool": np.array([True, False]),
        "scalar": np.array(3.5, np.float32), "empty_rows": np.zeros((0, 4), np.float32),
    }
    path = save(tmp_path / "dtypes.ckpt", tensors, append_dict={"epoch_num": 3, "lr": 0.5, "note": "hello 你好"})
    got = assert_same_as_mindspore(path)
    assert got["bf16"][1] == "BFloat16" and got["scalar"][0].shape == () and got["note"] == ("hello 你好", "str")
    assert not got["fp16"][0].flags.writeable           # one slice: a view of the file, no copy


def test_dtype_table_is_mindspores():
    """The reader's tensor_type -> numpy table is MindSpore's (``serialization.tensor_to_np_type``)."""
    from mindspore.train import serialization  # pylint: disable=import-outside-toplevel
    from baichuan2_ckpt_reader import np_dtype  # pylint: disable=import-outside-toplevel
    names = [name for name in serialization.tensor_to_ms_type if name not in ("str", "Int4")]
    for name in names:
        assert np_dtype(name) == np.dtype(serialization.tensor_to_np_type(name)), name
    assert np_dtype("Int4") is None                     # qint4x2: left to mindspore.load_checkpoint


@pytest.mark.parametrize("writer", ["save_checkpoint", "ndarray"])
def test_tensor_written_in_slices_is_joined(tmp_path, monkeypatch, writer):
    """A tensor over ``SLICE_SIZE`` (512 MiB in MindSpore; patched to 1 KiB here) is written as several entries
    with one tag: ``save_checkpoint`` cuts its bytes in ``1024 * SLICE_SIZE``-byte chunks, the ndarray path
    (async save) cuts rows with ``np.array_split``. Both are joined into one private array."""
    from mindspore.train import serialization  # pylint: disable=import-outside-toplevel
    from baichuan2_ckpt_reader import CheckpointFile  # pylint: disable=import-outside-toplevel
    ms = _ms()
    big = np.arange(250 * 7, dtype=np.float32).reshape(250, 7) / 7      # 7000 bytes: 7 slices of <= 1 KiB
    half = np.arange(999, dtype=np.float16)
    path = str(tmp_path / f"{writer}.ckpt")
    monkeypatch.setattr(serialization, "SLICE_SIZE", 1)                 # KiB
    if writer == "save_checkpoint":
        save(path, {"small": np.ones(3, np.float32), "big": big, "bf16": (big, ms.bfloat16), "half": half})
    else:
        serialization._exec_save(path, OrderedDict(  # pylint: disable=protected-access
            small=[[3], "Float32", np.ones(3, np.float32)], big=[list(big.shape), "Float32", big],
            half=[[999], "Float16", half]))
    monkeypatch.undo()
    with CheckpointFile(path) as ckpt:
        pieces = {entry.name: len(entry.pieces) for entry in ckpt.entries}
    assert pieces["small"] == 1 and pieces["big"] == -(-big.nbytes // 1024) and pieces["half"] == 2
    got = assert_same_as_mindspore(path)
    assert got["big"][0].flags.writeable and np.array_equal(got["big"][0], big)


def test_crc_trailer_is_checked_when_asked(tmp_path):
    path = save(tmp_path / "crc.ckpt", {"a": np.arange(64, dtype=np.float32), "b": np.ones((2, 3), np.float16)},
                crc_check=True)
    assert_same_as_mindspore(path, crc_check=True)
    assert_same_as_mindspore(path)                        # the trailer is stripped without checking, too
    from baichuan2_ckpt_reader import CheckpointReadError  # pylint: disable=import-outside-toplevel
    data = bytearray(open(path, "rb").read())
    data[len(data) // 2] ^= 0xFF                          # inside a tensor's content: still parses
    damaged = tmp_path / "damaged.ckpt"
    damaged.write_bytes(bytes(data))
    with pytest.raises(CheckpointReadError) as error:
        reader_dict(str(damaged), crc_check=True)
    message = str(error.value)
    assert str(damaged) in message and "crc check failed" in message and "\n" not in message
    with pytest.raises(ValueError):                       # MindSpore agrees
        _ms().load_checkpoint(str(damaged), crc_check=True)


def _one_line_error(path):
    from baichuan2_ckpt_reader import CheckpointReadError  # pylint: disable=import-outside-toplevel
    with pytest.raises(CheckpointReadError) as error:
        reader_dict(str(path))
    message = str(error.value)
    assert message.startswith(f"checkpoint {path}: ") and "\n" not in message, message
    return message


def test_truncated_corrupt_empty_and_encrypted_files_are_one_line_errors(tmp_path, monkeypatch):
    from mindspore.train import serialization  # pylint: disable=import-outside-toplevel
    path = save(tmp_path / "ok.ckpt", {"a": np.arange(300, dtype=np.float32), "b": np.ones(50, np.float16)})
    data = open(path, "rb").read()
    cut = tmp_path / "cut.ckpt"
    cut.write_bytes(data[:len(data) - 40])                # ends inside b's content
    assert "truncated or corrupt" in _one_line_error(cut)
    garbage = tmp_path / "garbage.ckpt"
    garbage.write_bytes(b"\xff" * 64)
    assert "truncated or corrupt" in _one_line_error(garbage)
    empty = tmp_path / "empty.ckpt"
    empty.write_bytes(b"")
    assert "empty" in _one_line_error(empty)
    # A file cut exactly after one slice of a sliced tensor parses, but the tensor is short.
    monkeypatch.setattr(serialization, "SLICE_SIZE", 1)
    sliced = save(tmp_path / "sliced.ckpt", {"big": np.arange(1024, dtype=np.float32)})     # 4 slices
    monkeypatch.undo()
    data = open(sliced, "rb").read()
    short = tmp_path / "short.ckpt"
    from baichuan2_ckpt_reader import CheckpointFile  # pylint: disable=import-outside-toplevel
    with CheckpointFile(sliced) as ckpt:
        first_end = ckpt.entries[0].pieces[0][0] + ckpt.entries[0].pieces[0][1]
    short.write_bytes(data[:first_end])
    assert "needs 4096 bytes but the file holds 1024" in _one_line_error(short)
    encrypted = str(tmp_path / "enc.ckpt")
    _ms().save_checkpoint([{"name": "a", "data": _ms().Tensor(np.ones(4, np.float32))}], encrypted,
                          enc_key=b"0123456789abcdef")
    assert "encrypted" in _one_line_error(encrypted)


def _map_tensor_file(path):
    """A checkpoint with one tensor and one map tensor entry (protobuf written with MindSpore's own classes)."""
    from mindspore.train.checkpoint_pb2 import Checkpoint  # pylint: disable=import-outside-toplevel
    ckpt = Checkpoint()
    value = ckpt.value.add()
    value.tag = "w"
    value.tensor.dims.extend([2, 2])
    value.tensor.tensor_type = "Float32"
    value.tensor.tensor_content = np.arange(4, dtype=np.float32).tobytes()
    value = ckpt.value.add()
    value.tag = "table"
    for array in (np.arange(3, dtype=np.int64), np.ones((3, 2), np.float32), np.zeros(3, np.int32)):
        tensor = value.maptensor.tensor.add()
        tensor.dims.extend(array.shape)
        tensor.tensor_type = str(array.dtype)
        tensor.tensor_content = array.tobytes()
    with open(path, "wb") as handle:
        handle.write(ckpt.SerializeToString())
    return str(path)


def test_map_tensors_are_left_to_mindspore(tmp_path):
    from baichuan2_ckpt_reader import UnsupportedCheckpointError  # pylint: disable=import-outside-toplevel
    path = _map_tensor_file(tmp_path / "map.ckpt")
    with pytest.raises(UnsupportedCheckpointError, match="map tensor 'table'"):
        reader_dict(path)


# ----- load_weights on plain .ckpt files --------------------------------------------------------------

def _net(specs):
    """A Cell with one Parameter per ``name: (shape, mindspore dtype)``, filled with -1."""
    ms = _ms()

    class Net(ms.nn.Cell):
        def __init__(self):
            super().__init__()
            for name, (shape, dtype) in specs.items():
                setattr(self, name.replace(".", "_"),
                        ms.Parameter(ms.Tensor(np.full(shape, -1), dtype=dtype), name=name))
    return Net()


def _load(path, net):
    from baichuan2_inference import load_weights  # pylint: disable=import-outside-toplevel
    load_weights(SimpleNamespace(load_checkpoint=str(path), auto_trans_ckpt=False), net)


def _values(net):
    return {name: param.asnumpy() for name, param in net.parameters_dict().items()}


def test_load_weights_sets_what_load_param_into_net_sets(tmp_path, monkeypatch):
    """Same dtypes, casts (fp32 -> fp16, bf16 -> fp32, int64 -> int32), sliced tensors, a name prefix and the
    KV cache buffer left alone: the streamed network equals the one ``load_param_into_net`` fills."""
    from mindspore.train import serialization  # pylint: disable=import-outside-toplevel
    ms = _ms()
    rng = np.random.RandomState(1)
    values = {"emb": rng.randn(300, 8).astype(np.float32), "norm": rng.randn(8).astype(np.float32),
              "head": (rng.randn(16, 8).astype(np.float32), ms.bfloat16), "ids": np.arange(6, dtype=np.int64),
              "half": rng.randn(4, 4).astype(np.float16)}
    specs = {"emb": ((300, 8), ms.float16), "norm": ((8,), ms.float32), "head": ((16, 8), ms.float32),
             "ids": ((6,), ms.int32), "half": ((4, 4), ms.float16), "layer.key_past": ((2, 2), ms.float16)}
    monkeypatch.setattr(serialization, "SLICE_SIZE", 2)                  # emb (9600 bytes) in 5 slices
    path = save(tmp_path / "net.ckpt", {("network." + k if k == "half" else k): v for k, v in values.items()},
                append_dict={"global_step": 7, "note": "x"})
    monkeypatch.undo()
    streamed, reference = _net(specs), _net(specs)
    _load(path, streamed)
    ms.load_param_into_net(reference, ms.load_checkpoint(path))
    got, want = _values(streamed), _values(reference)
    for name in specs:
        assert got[name].dtype == want[name].dtype and bits(got[name]) == bits(want[name]), name
    assert np.all(got["layer.key_past"] == -1)


def test_load_weights_folder_later_files_win_and_lora_rename(tmp_path):
    ms = _ms()
    folder = tmp_path / "base_and_lora"
    folder.mkdir()
    save(folder / "a_base.ckpt", {"w": np.ones(3, np.float32), "v": np.zeros(2, np.float32)})
    save(folder / "b_lora.ckpt", {"v": np.full(2, 5, np.float32),
                                  "w.tk_delta_lora_a": np.full((1, 3), 2.0, np.float32)})     # old LoRA spelling
    net = _net({"w": ((3,), ms.float32), "v": ((2,), ms.float32), "w.mindpet_delta_lora_a": ((1, 3), ms.float32)})
    _load(folder, net)
    got = _values(net)
    assert np.all(got["w"] == 1) and np.all(got["v"] == 5) and np.all(got["w.mindpet_delta_lora_a"] == 2)


def test_load_weights_errors_are_one_line(tmp_path):
    from baichuan2_cli import UserInputError  # pylint: disable=import-outside-toplevel
    ms = _ms()
    path = save(tmp_path / "wrong.ckpt", {"w": np.ones((3, 4), np.float32)})
    cases = [({"w": ((4, 3), ms.float32)}, f"checkpoint {path}: w has shape [3, 4] but the network's parameter "
                                           "has [4, 3]"),
             ({"w": ((3, 4), ms.int32)}, "w is Float32 but the network's parameter is Int32"),
             ({"w": ((3, 4), ms.float32), "u": ((1,), ms.float32)}, "lacks ['u']")]
    for specs, text in cases:
        with pytest.raises(UserInputError) as error:
            _load(path, _net(specs))
        assert text in str(error.value) and "\n" not in str(error.value), str(error.value)
    cut = tmp_path / "cut.ckpt"
    cut.write_bytes(open(path, "rb").read()[:-5])
    with pytest.raises(UserInputError, match=f"checkpoint {cut}: truncated or corrupt"):
        _load(cut, _net({"w": ((3, 4), ms.float32)}))


def test_load_weights_falls_back_to_mindspore_for_map_tensors(tmp_path):
    ms = _ms()
    net = _net({"w": ((2, 2), ms.float32)})
    _load(_map_tensor_file(tmp_path / "map.ckpt"), net)
    assert np.array_equal(_values(net)["w"], np.arange(4, dtype=np.float32).reshape(2, 2))


def test_prefixed_names_follow_load_param_into_net():
    from baichuan2_ckpt_loader import prefixed_names  # pylint: disable=import-outside-toplevel
    ckpt = ["network.a", "network.b", "other.c", "d"]
    assert prefixed_names(ckpt, ["a", "b", "c", "x"]) == {"network.a": "a", "network.b": "b", "other.c": "c"}
    assert prefixed_names(["a"], ["b"]) == {}


def test_streamed_only_for_complete_ckpt_files(tmp_path):
    from baichuan2_ckpt_loader import streams_checkpoint  # pylint: disable=import-outside-toplevel
    (tmp_path / "m.ckpt").write_bytes(b"")
    (tmp_path / "s.safetensors").write_bytes(b"")
    (tmp_path / "ranks" / "rank_0").mkdir(parents=True)
    assert streams_checkpoint(str(tmp_path / "m.ckpt"))
    assert not streams_checkpoint(str(tmp_path / "m.ckpt"), auto_trans_ckpt=True)
    assert not streams_checkpoint(str(tmp_path))                     # a .safetensors among them
    assert not streams_checkpoint(str(tmp_path / "s.safetensors"))
    assert not streams_checkpoint(str(tmp_path / "ranks")) and not streams_checkpoint("")


# ----- memory: streaming against mindspore.load_checkpoint, measured in fresh processes -----------------

# Six 64 MiB fp32 tensors written in 3 slices each (SLICE_SIZE patched to 24 MiB: the join path, where the
# reader makes a private copy) and one 16 MiB tensor in one slice (the view path, copied by the loader).
MEMORY_TENSORS = [(f"layer{i}.w", (4096, 4096)) for i in range(6)] + [("norm.w", (1024, 4096))]
MEMORY_SLICE_KIB = 24 * 1024


def _child(mode, path):
    """``save`` the memory checkpoint, or load it (``stream`` / ``mindspore``) and print the RssAnon figures."""
    os.environ.setdefault("GLOG_v", "3")
    import mindspore as ms  # pylint: disable=import-outside-toplevel
    from bench_memory import AnonSampler, proc_status  # pylint: disable=import-outside-toplevel
    if mode == "save":
        from mindspore.train import serialization  # pylint: disable=import-outside-toplevel
        serialization.SLICE_SIZE = MEMORY_SLICE_KIB
        ms.save_checkpoint([{"name": name, "data": ms.Tensor(np.full(shape, i + 1, np.float32))}
                            for i, (name, shape) in enumerate(MEMORY_TENSORS)], path)
        return

    def load(file, net):
        if mode == "stream":
            _load(file, net)
        else:                 # the former path of load_weights: a dict of every tensor, then load_param_into_net
            ms.load_param_into_net(net, ms.load_checkpoint(file))

    specs = {name: (shape, ms.float32) for name, shape in MEMORY_TENSORS}
    # Warm-up on a tiny copy of the same path: one-time allocations of the runtime go into the baseline.
    tiny = path + ".tiny.ckpt"
    ms.save_checkpoint([{"name": "t", "data": ms.Tensor(np.ones((4, 4), np.float32))}], tiny)
    load(tiny, _net({"t": ((4, 4), ms.float32)}))
    os.remove(tiny)
    before = proc_status()
    net = _net(specs)
    built = proc_status()
    with AnonSampler() as anon:
        load(path, net)
    after = proc_status()
    for i, (name, _) in enumerate(MEMORY_TENSORS):
        assert np.all(net.parameters_dict()[name].asnumpy() == i + 1), name
    print(json.dumps({"before": before["RssAnon"], "built": built["RssAnon"], "peak": anon.peak,
                      "after": after["RssAnon"], "after_file": after["RssFile"]}))


def _run_child(*args):
    result = subprocess.run([sys.executable, os.path.abspath(__file__), "child", *args], capture_output=True,
                            text=True, timeout=600, check=False, env=dict(os.environ, GLOG_v="3"))
    assert result.returncode == 0, result.stderr[-3000:]
    return json.loads(result.stdout.strip().splitlines()[-1]) if args[0] != "save" else None


def test_streaming_peaks_at_the_network_plus_one_tensor(tmp_path):
    path = str(tmp_path / "memory.ckpt")
    _run_child("save", path)
    weights = sum(4 * int(np.prod(shape)) for _, shape in MEMORY_TENSORS)           # 400 MiB
    largest = max(4 * int(np.prod(shape)) for _, shape in MEMORY_TENSORS)            # 64 MiB
    stream = _run_child("stream", path)
    full = _run_child("mindspore", path)
    report = {mode: {k: round((v - r["before"]) / MIB, 1) for k, v in r.items() if k != "before"}
              for mode, r in (("stream", stream), ("mindspore", full))}
    print("MiB above the process before the network was built:", json.dumps(report))
    for result in (stream, full):               # the network's weights are resident before loading starts
        assert result["built"] - result["before"] > weights - largest, report
    # Streaming holds the network (weights) plus the tensor in flight: the reader's copy of it, which becomes
    # the parameter's data while set_data frees the old one before the next tensor is read (weights + 1 x
    # largest). A second largest tensor of room covers the allocator and the 5 ms sampler; two tensors in
    # flight at once, or any full copy (6.25 x largest here), would exceed it.
    assert stream["peak"] - stream["before"] < weights + 2 * largest, report
    # mindspore.load_checkpoint builds a dict holding every tensor before load_param_into_net copies them
    # in: the network plus a full copy (weights + weights), less one tensor of sampling margin.
    assert full["peak"] - full["before"] > weights + (weights - largest), report


if __name__ == "__main__":
    if len(sys.argv) == 4 and sys.argv[1] == "child":
        _child(sys.argv[2], sys.argv[3])
    else:
        sys.exit("usage: test_baichuan2_ckpt_reader.py child save|stream|mindspore PATH")
