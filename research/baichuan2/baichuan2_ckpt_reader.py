"""Stream the tensors of a MindSpore ``.ckpt`` file one by one, without holding the file in memory.

``mindspore.load_checkpoint`` reads the whole file into a ``bytes`` object, parses it into a protobuf
message and builds a dict of every tensor: loading Baichuan2-7B in fp16 (14 GB) into a network then
needs the network's 14 GB plus at least one more full copy. Here the file is mapped read-only
(``mmap``), its protobuf wire format is walked to index the entries (names, dims, types and where each
``tensor_content`` lies: only header bytes are touched), and each tensor is handed out in file order
as a numpy array that is a *view of the mapping* (file-backed pages, no anonymous memory; not
aligned in general, since protobuf places the bytes at any offset) or, for a
tensor MindSpore wrote in several slices, a private copy of that one tensor with the slices joined.
A caller copying each tensor into its network therefore peaks at the network plus the largest
tensor, plus page cache the kernel can drop.

The format (``mindspore/train/checkpoint.proto``, proto2), as ``mindspore.save_checkpoint`` writes it
(``serialization._exec_save``)::

    message Checkpoint { repeated Value value = 1; }
    message Value { required string tag = 1; oneof value { TensorProto tensor = 2; MapTensorProto maptensor = 3; } }
    message TensorProto { repeated int64 dims = 1; required string tensor_type = 2; required bytes tensor_content = 3; }

* The file is a concatenation of serialized ``Checkpoint`` messages, one per slice: a tensor larger
  than ``serialization.SLICE_SIZE`` (512 MiB) is written as several ``Value`` entries with the same
  tag and the full dims, whose contents concatenate to the tensor's bytes (``np.array_split`` on
  axis 0, or 512 MiB byte chunks); MindSpore joins consecutive entries with the same tag.
* ``dims == [0]`` (and ``[]``) is a scalar; ``tensor_type "str"`` is a string of ``append_dict``
  (UTF-32 code points, read as ``np.frombuffer(data, "U<n>")`` as MindSpore does).
* ``save_checkpoint(crc_check=True)`` appends ``b"crc_num"`` + the CRC-32 of everything before it as
  10 big-endian bytes; MindSpore strips that trailer whenever it is present and checks it only when
  asked (``crc_check``), as here.
* An encrypted file (``enc_key``) starts with MindSpore's cipher magic ``0x7F3A5ED8`` (little-endian
  uint32, ``_is_cipher_file``): refused with one line.

Entries this reader does not parse but MindSpore may (``maptensor``, ``Int4``/unknown tensor types,
protobuf groups) raise ``UnsupportedCheckpointError`` when the file is opened, so the caller can fall
back to ``mindspore.load_checkpoint`` for that file. A truncated or corrupt file raises
``CheckpointReadError`` with one line naming the file.

Only numpy and the standard library (MindSpore only for its numpy ``bfloat16`` dtype, on demand).
"""
import logging
import mmap
import os
import struct
import zlib
from dataclasses import dataclass

import numpy as np

from baichuan2_cli import UserInputError

__all__ = ["CheckpointReadError", "UnsupportedCheckpointError", "CheckpointFile", "TensorEntry", "iter_tensors",
           "np_dtype"]

logger = logging.getLogger("baichuan2")

# ``serialization._tensor_to_np_type`` of MindSpore 2.7.2 (the test compares the two), with
# ``BFloat16`` as MindSpore's ``tensor_to_np_type`` gives it (``mindspore.common.np_dtype.bfloat16``).
_TENSOR_TO_NP_TYPE = {"Int8": np.int8, "UInt8": np.uint8, "Int16": np.int16, "UInt16": np.uint16,
                      "Int32": np.int32, "UInt32": np.uint32, "Int64": np.int64, "UInt64": np.uint64,
                      "Float16": np.float16, "Float32": np.float32, "Float64": np.float64, "Bool": np.bool_}
STRING_TYPE = "str"
CRC_TAG = b"crc_num"
CRC_TRAILER_SIZE = len(CRC_TAG) + 10                  # b"crc_num" + crc32 as 10 big-endian bytes
CIPHER_MAGIC = struct.pack("<I", 0x7F3A5ED8)          # first 4 bytes of an encrypted checkpoint
_VARINT, _FIXED64, _LENGTH, _GROUP_START, _GROUP_END, _FIXED32 = 0, 1, 2, 3, 4, 5
_CRC_CHUNK = 64 * 2 ** 20                             # bytes hashed at a time (a view, no copy)


class CheckpointReadError(UserInputError):
    """A ``.ckpt`` that cannot be read: truncated, corrupt, failing its CRC, or encrypted (one line)."""


class UnsupportedCheckpointError(CheckpointReadError):
    """A well-formed ``.ckpt`` holding entries this reader does not parse (``mindspore.load_checkpoint`` may)."""


def np_dtype(tensor_type):
    """numpy dtype of a checkpoint ``tensor_type`` string, as MindSpore's ``tensor_to_np_type``; None if unknown."""
    if tensor_type == "BFloat16":
        from mindspore.common import np_dtype as ms_np_dtype  # pylint: disable=import-outside-toplevel
        return np.dtype(ms_np_dtype.bfloat16)
    found = _TENSOR_TO_NP_TYPE.get(tensor_type)
    return None if found is None else np.dtype(found)


@dataclass(frozen=True)
class TensorEntry:
    """One tensor of the file: its slices' ``(offset, length)`` byte ranges in file order.

    ``shape``: the dims as MindSpore reads them (``[0]`` -> a scalar); ``dtype``: the ``tensor_type``
    string ("Float16", "BFloat16", "str", ...).
    """
    name: str
    dtype: str
    shape: tuple
    pieces: tuple

    @property
    def nbytes(self):
        return sum(length for _, length in self.pieces)


class _Corrupt(Exception):
    """Internal: a structural error at a byte offset (turned into one ``CheckpointReadError`` line)."""

    def __init__(self, detail, pos):
        super().__init__(detail)
        self.detail, self.pos = detail, pos


class _Unsupported(Exception):
    """Internal: valid protobuf this reader does not handle."""


def _varint(buf, pos, end):
    """``(value, next position)`` of the varint at ``pos`` (must end before ``end``)."""
    result, shift, start = 0, 0, pos
    while True:
        if pos >= end:
            raise _Corrupt("ends inside a varint", start)
        byte = buf[pos]
        pos += 1
        result |= (byte & 0x7F) << shift
        if byte < 0x80:
            return result, pos
        shift += 7
        if shift > 63:
            raise _Corrupt("malformed varint", start)


def _key(buf, pos, end):
    """``(field number, wire type, next position)``."""
    start = pos
    key, pos = _varint(buf, pos, end)
    field, wire_type = key >> 3, key & 7
    if field == 0 or wire_type in (6, 7):
        raise _Corrupt(f"invalid protobuf key {key}", start)
    if wire_type in (_GROUP_START, _GROUP_END):
        raise _Unsupported(f"protobuf group (field {field}) at byte {start}")
    return field, wire_type, pos


def _length(buf, pos, end):
    """``(start, stop)`` of the length-delimited payload whose length prefix is at ``pos``."""
    start = pos
    length, pos = _varint(buf, pos, end)
    if pos + length > end:
        raise _Corrupt(f"a field of {length} bytes runs past the end of its message (ends at byte {end})", start)
    return pos, pos + length


def _skip(buf, wire_type, pos, end):
    """Position after the payload of a field of ``wire_type`` (its key already read)."""
    if wire_type == _VARINT:
        return _varint(buf, pos, end)[1]
    if wire_type == _LENGTH:
        return _length(buf, pos, end)[1]
    size = 8 if wire_type == _FIXED64 else 4
    if pos + size > end:
        raise _Corrupt("ends inside a fixed-size field", pos)
    return pos + size


def _int64(value):
    """A varint read as protobuf ``int64`` (two's complement)."""
    return value - (1 << 64) if value >= 1 << 63 else value


def _parse_tensor(buf, pos, end):
    """``(dims list, tensor_type or None, (offset, length) or None)`` of the ``TensorProto`` in ``[pos, end)``."""
    dims, tensor_type, content = [], None, None
    while pos < end:
        field, wire_type, pos = _key(buf, pos, end)
        if field == 1 and wire_type == _VARINT:
            value, pos = _varint(buf, pos, end)
            dims.append(_int64(value))
        elif field == 1 and wire_type == _LENGTH:            # packed dims
            start, stop = _length(buf, pos, end)
            while start < stop:
                value, start = _varint(buf, start, stop)
                dims.append(_int64(value))
            pos = stop
        elif field == 2 and wire_type == _LENGTH:
            start, pos = _length(buf, pos, end)
            tensor_type = bytes(buf[start:pos]).decode("utf-8", errors="replace")
        elif field == 3 and wire_type == _LENGTH:
            start, pos = _length(buf, pos, end)
            content = (start, pos - start)
        else:
            pos = _skip(buf, wire_type, pos, end)
    return dims, tensor_type, content


def _parse_value(buf, pos, end):
    """``(tag, kind, tensor fields)`` of the ``Checkpoint.Value`` in ``[pos, end)``; kind "tensor"/"maptensor"."""
    tag, kind, tensor = None, None, None
    while pos < end:
        field_start = pos
        field, wire_type, pos = _key(buf, pos, end)
        if field == 1 and wire_type == _LENGTH:
            start, pos = _length(buf, pos, end)
            tag = bytes(buf[start:pos]).decode("utf-8", errors="replace")
        elif field == 2 and wire_type == _LENGTH:
            start, pos = _length(buf, pos, end)
            kind, tensor = "tensor", _parse_tensor(buf, start, pos)
        elif field == 3 and wire_type == _LENGTH:
            pos = _length(buf, pos, end)[1]
            kind, tensor = "maptensor", None
        elif field in (1, 2, 3):
            raise _Corrupt(f"field {field} of a checkpoint entry has wire type {wire_type}", field_start)
        else:
            pos = _skip(buf, wire_type, pos, end)
    return tag, kind, tensor


class CheckpointFile:
    """An open ``.ckpt`` file: the index of its tensors and their arrays, over a read-only ``mmap``.

    ``entries``: ``TensorEntry`` per tensor in file order (consecutive slices of one tag joined into
    one entry). Opening walks the entry headers only; ``crc_check=True`` also hashes the whole file
    (through the mapping: page cache, no copy) against its ``crc_num`` trailer, as
    ``mindspore.load_checkpoint(crc_check=True)``. Use as a context manager.
    """

    def __init__(self, path, crc_check=False):
        self.path = path
        self._file = None
        self._map = None
        try:
            self._open(crc_check)
        except BaseException:
            self.close()
            raise

    def _error(self, detail, cls=CheckpointReadError):
        return cls(f"checkpoint {self.path}: {detail}")

    def _open(self, crc_check):
        size = os.path.getsize(self.path)
        if size == 0:
            raise self._error("the file is empty; re-save or re-convert it")
        self._file = open(self.path, "rb")  # pylint: disable=consider-using-with
        self._map = mmap.mmap(self._file.fileno(), 0, access=mmap.ACCESS_READ)
        if hasattr(mmap, "MADV_SEQUENTIAL"):       # read ahead: the tensors are read front to back
            self._map.madvise(mmap.MADV_SEQUENTIAL)
        buf = self._map
        if buf[:len(CIPHER_MAGIC)] == CIPHER_MAGIC:
            raise self._error("the file is encrypted (saved with enc_key); decrypt it first, this loader reads "
                              "plain checkpoints only")
        end = size
        if size >= CRC_TRAILER_SIZE and buf[size - CRC_TRAILER_SIZE:size - 10] == CRC_TAG:
            end = size - CRC_TRAILER_SIZE
            if crc_check:
                self._check_crc(end, int.from_bytes(buf[size - 10:size], "big"))
        elif crc_check:
            logger.warning("checkpoint %s has no crc code to check", self.path)
        self.entries = self._index(buf, end, size)

    def _check_crc(self, end, stored):
        crc = 0
        view = memoryview(self._map)
        try:
            for start in range(0, end, _CRC_CHUNK):
                stop = min(start + _CRC_CHUNK, end)
                crc = zlib.crc32(view[start:stop], crc)
                self.release(start, stop - start)          # hashed: no need to keep it mapped
        finally:
            view.release()
        if crc != stored:
            raise self._error(f"the crc check failed (stored {stored:#010x}, computed {crc:#010x}): the file is "
                              "damaged; re-save or re-convert it")

    def _index(self, buf, end, size):
        """``TensorEntry`` list of ``buf[:end]``, slices of one tag joined; raises on corrupt/unsupported."""
        entries, pos = [], 0
        try:
            while pos < end:
                field, wire_type, pos = _key(buf, pos, end)
                if field != 1 or wire_type != _LENGTH:
                    if field == 1:
                        raise _Corrupt(f"top-level field 1 has wire type {wire_type}", pos)
                    pos = _skip(buf, wire_type, pos, end)     # unknown field: skipped, as protobuf does
                    continue
                value_start, value_end = _length(buf, pos, end)
                tag, kind, tensor = _parse_value(buf, value_start, value_end)
                pos = value_end
                if tag is None:
                    raise _Corrupt("an entry without its required tag", value_start)
                if kind == "maptensor":
                    raise _Unsupported(f"map tensor {tag!r}")
                if kind is None:
                    raise _Corrupt(f"entry {tag!r} holds no tensor", value_start)
                self._add_slice(entries, tag, tensor, value_start)
        except _Corrupt as error:
            raise self._error(f"truncated or corrupt at byte {error.pos} of {size} ({error.detail}); re-save or "
                              "re-convert it") from None
        except _Unsupported as error:
            raise self._error(f"holds {error} (not read by this streaming reader)",
                              UnsupportedCheckpointError) from None
        return [self._finish(entry) for entry in entries]

    @staticmethod
    def _add_slice(entries, tag, tensor, pos):
        dims, tensor_type, content = tensor
        if tensor_type is None or content is None:
            raise _Corrupt(f"tensor {tag!r} lacks its required {'tensor_type' if tensor_type is None else 'content'}",
                           pos)
        if tensor_type != STRING_TYPE and np_dtype(tensor_type) is None:
            raise _Unsupported(f"tensor {tag!r} of type {tensor_type!r}")
        if entries and entries[-1]["name"] == tag:      # the next slice of the same tensor
            last = entries[-1]
            if last["dtype"] != tensor_type or last["dims"] != dims:
                raise _Corrupt(f"slices of {tag!r} disagree ({last['dtype']} {last['dims']} vs {tensor_type} {dims})",
                               pos)
            last["pieces"].append(content)
        else:
            entries.append({"name": tag, "dtype": tensor_type, "dims": dims, "pieces": [content], "pos": pos})

    def _finish(self, entry):
        dims = entry["dims"]
        shape = () if dims in ([], [0]) else tuple(dims)
        result = TensorEntry(entry["name"], entry["dtype"], shape, tuple(entry["pieces"]))
        if result.dtype != STRING_TYPE:
            need = -1 if min(shape, default=0) < 0 else \
                int(np.prod(shape, dtype=np.int64)) * np_dtype(result.dtype).itemsize
            if need != result.nbytes:
                raise self._error(f"tensor {result.name!r} {result.dtype} {list(shape)} needs {need} bytes but the "
                                  f"file holds {result.nbytes} (truncated or corrupt near byte {entry['pos']}); "
                                  "re-save or re-convert it")
        return result

    def array(self, entry):
        """The tensor of ``entry``: a read-only view of the mapping (one slice; protobuf puts it at any byte
        offset, so the view is in general not aligned: copy it, ``np.array(view)``, before handing it to a
        framework) or a private, aligned, writable copy with the slices joined (several); a ``str`` for a
        string entry."""
        if entry.dtype == STRING_TYPE:
            data = b"".join(self._map[offset:offset + length] for offset, length in entry.pieces)
            # MindSpore: np.frombuffer(joined, "U" + str(len(last slice) // 4))[0]
            return str(np.frombuffer(data, "U" + str(entry.pieces[-1][1] // 4))[0])
        dtype = np_dtype(entry.dtype)
        count = entry.nbytes // dtype.itemsize
        if len(entry.pieces) == 1:
            offset = entry.pieces[0][0]
            return np.frombuffer(self._map, dtype=dtype, count=count, offset=offset).reshape(entry.shape)
        joined = np.empty(count, dtype=dtype)
        target, pos = joined.view(np.uint8), 0
        for offset, length in entry.pieces:
            target[pos:pos + length] = np.frombuffer(self._map, dtype=np.uint8, count=length, offset=offset)
            self.release(offset, length)
            pos += length
        return joined.reshape(entry.shape)

    def release(self, offset, length):
        """Drop ``[offset, offset + length)`` from this process's mapped pages (read again from the page cache
        or the file if touched later; the mapping is read-only, so nothing is lost)."""
        if self._map is None or not hasattr(mmap, "MADV_DONTNEED"):
            return
        start = offset - offset % mmap.PAGESIZE
        stop = min(offset + length, len(self._map))
        if stop > start:
            self._map.madvise(mmap.MADV_DONTNEED, start, stop - start)

    def __iter__(self):
        """``(name, array, tensor_type)`` per tensor in file order (see ``array``)."""
        for entry in self.entries:
            yield entry.name, self.array(entry), entry.dtype
            # the caller has copied the view by now (or keeps it and faults the pages in again)
            for offset, length in entry.pieces:
                self.release(offset, length)

    def close(self):
        """Unmap and close; a view still held by the caller keeps the mapping alive until it is dropped."""
        if self._map is not None:
            try:
                self._map.close()
            except BufferError:          # numpy views exported: the mapping goes with the last of them
                pass
            self._map = None
        if self._file is not None:
            self._file.close()
            self._file = None

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.close()


def iter_tensors(path, crc_check=False):
    """``(name, array, tensor_type)`` of every entry of the ``.ckpt`` at ``path``, in file order.

    ``array``: numpy array of the tensor's shape and dtype (a read-only view of the file for a tensor
    written in one slice, a writable private copy for one written in several), or ``str`` for a
    string entry (``tensor_type`` "str"). Raises ``CheckpointReadError`` (one line naming the file)
    for an encrypted, truncated or corrupt file before the first item, ``UnsupportedCheckpointError``
    for entries only ``mindspore.load_checkpoint`` reads.
    """
    with CheckpointFile(path, crc_check=crc_check) as ckpt:
        yield from ckpt
