"""Names and shapes of the tensors in a checkpoint file, read without loading the tensors.

Checking that a checkpoint fits a network needs only its names and shapes; ``ms.load_checkpoint``
reads and converts every byte (14 GB for Baichuan2-7B in fp16) before the real load does it again.
Here a MindSpore ``.ckpt`` is walked as a protobuf stream, seeking over each ``tensor_content``, and a
``.safetensors`` file is read through its JSON header.

``.ckpt`` layout (``mindspore/train/checkpoint.proto``), as written by ``ms.save_checkpoint``: a
sequence of ``Checkpoint.value`` entries (field 1), each ``Value {tag = 1; TensorProto tensor = 2;
MapTensorProto maptensor = 3}`` with ``TensorProto {repeated int64 dims = 1; string tensor_type = 2;
bytes tensor_content = 3}``. A tensor larger than MindSpore's slice size is written as several
entries with the same tag and the full dims; ``dims == [0]`` means a scalar; the file may end with a
17-byte ``crc_num`` trailer.
"""
import os

__all__ = ["CheckpointIndexError", "checkpoint_shapes"]

_CRC_TRAILER = b"crc_num"
_CRC_TRAILER_SIZE = 17
# protobuf wire types
_VARINT, _FIXED64, _LENGTH, _FIXED32 = 0, 1, 2, 5


class CheckpointIndexError(ValueError):
    """The file is not a readable MindSpore checkpoint / safetensors file."""


def checkpoint_shapes(path):
    """``{name: shape tuple}`` of every tensor in the ``.ckpt`` or ``.safetensors`` file ``path``."""
    if path.endswith(".safetensors"):
        return _safetensors_shapes(path)
    return _ckpt_shapes(path)


def _safetensors_shapes(path):
    from safetensors import safe_open  # pylint: disable=import-outside-toplevel
    try:
        with safe_open(path, framework="np") as handle:
            return {name: tuple(handle.get_slice(name).get_shape()) for name in handle.keys()}
    except Exception as error:  # pylint: disable=broad-except
        raise CheckpointIndexError(f"not a safetensors file ({str(error).splitlines()[0]})") from None


class _Reader:
    """Protobuf wire-format reading over a seekable binary file, within a byte limit."""

    def __init__(self, handle, size):
        self.handle = handle
        self.size = size

    def tell(self):
        return self.handle.tell()

    def varint(self):
        result, shift = 0, 0
        while True:
            byte = self.handle.read(1)
            if not byte:
                raise CheckpointIndexError("truncated (ends inside a field)")
            result |= (byte[0] & 0x7F) << shift
            if byte[0] < 0x80:
                return result
            shift += 7
            if shift > 63:
                raise CheckpointIndexError("malformed varint")

    def key(self):
        key = self.varint()
        return key >> 3, key & 7

    def length(self, end):
        length = self.varint()
        if self.tell() + length > end:
            raise CheckpointIndexError("a field runs past the end of its message")
        return length

    def field_end(self, end):
        """Read a length prefix; return where that field ends."""
        length = self.length(end)
        return self.tell() + length

    def skip(self, wire_type, end):
        if wire_type == _VARINT:
            self.varint()
        elif wire_type == _FIXED64:
            self.handle.seek(8, os.SEEK_CUR)
        elif wire_type == _LENGTH:
            self.handle.seek(self.length(end), os.SEEK_CUR)
        elif wire_type == _FIXED32:
            self.handle.seek(4, os.SEEK_CUR)
        else:
            raise CheckpointIndexError(f"unknown protobuf wire type {wire_type}")


def _ckpt_shapes(path):
    size = os.path.getsize(path)
    shapes = {}
    with open(path, "rb") as handle:
        if size >= _CRC_TRAILER_SIZE:
            handle.seek(size - _CRC_TRAILER_SIZE)
            if handle.read(len(_CRC_TRAILER)) == _CRC_TRAILER:
                size -= _CRC_TRAILER_SIZE
            handle.seek(0)
        reader = _Reader(handle, size)
        while reader.tell() < size:
            field, wire_type = reader.key()
            if field != 1 or wire_type != _LENGTH:
                raise CheckpointIndexError(f"unexpected field {field} (wire type {wire_type}) at byte "
                                           f"{reader.tell()}: not a MindSpore checkpoint")
            end = reader.field_end(size)
            name, dims = _read_value(reader, end)
            if name is None:
                raise CheckpointIndexError(f"an entry without a name at byte {reader.tell()}")
            if dims is not None:        # map tensors (no dense dims) are not network weights
                shapes[name] = () if dims == [0] else tuple(dims)
            handle.seek(end)
    return shapes


def _read_value(reader, end):
    """One ``Checkpoint.Value``: (tag, dims or None)."""
    name, dims = None, None
    while reader.tell() < end:
        field, wire_type = reader.key()
        if field == 1 and wire_type == _LENGTH:
            name = reader.handle.read(reader.length(end)).decode("utf-8", errors="replace")
        elif field == 2 and wire_type == _LENGTH:
            tensor_end = reader.field_end(end)
            dims = _read_dims(reader, tensor_end)
            reader.handle.seek(tensor_end)
        else:
            reader.skip(wire_type, end)
    return name, dims


def _read_dims(reader, end):
    """``TensorProto.dims`` (packed or not), skipping ``tensor_type`` and ``tensor_content``."""
    dims = []
    while reader.tell() < end:
        field, wire_type = reader.key()
        if field == 1 and wire_type == _VARINT:
            dims.append(reader.varint())
        elif field == 1 and wire_type == _LENGTH:
            packed_end = reader.field_end(end)
            while reader.tell() < packed_end:
                dims.append(reader.varint())
        else:
            reader.skip(wire_type, end)
    return dims
