"""A GGUF file's metadata and tensor table, parsed in one pass over a memory map.

Why not gguf-py's `GGUFReader`: it makes a numpy view for every item of every metadata array,
which for a 49k-token vocabulary plus its merges takes ~2.5 s, more than the whole cold-start
budget. This parser decodes each string once with `struct` (~0.1 s) and leaves tensor bytes in the
memory map; `dequantize` unpacks the common types with torch and the rest with gguf-py's
`gguf.quants`, which knows every ggml type.

Every count and size is checked against the bytes left in the file before it is used, so a damaged
or hostile file ends in a ValueError here, never a huge allocation; `open_gguf` words it as a
CheckpointError, and `gguf_field` reads one metadata value checked for its type.
"""

import mmap
import struct
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from gguf.constants import GGML_QUANT_SIZES, GGMLQuantizationType

from ..errors import CheckpointError

# GGUF metadata value types: struct format of the scalars, 8 = string, 9 = array.
_SCALARS = {0: "<B", 1: "<b", 2: "<H", 3: "<h", 4: "<I", 5: "<i", 6: "<f", 7: "<?", 10: "<Q", 11: "<q", 12: "<d"}
_NUMPY = {0: "<u1", 1: "<i1", 2: "<u2", 3: "<i2", 4: "<u4", 5: "<i4", 6: "<f4", 7: "?", 10: "<u8", 11: "<i8", 12: "<f8"}
_STRING, _ARRAY = 8, 9
_MAX_NESTING = 4  # arrays of arrays: llama.cpp writes none; a mutated file could nest without end


@dataclass
class GGUFTensor:
    name: str
    tensor_type: GGMLQuantizationType
    shape: tuple  # torch order, slowest dimension first: (out_features, in_features) for a weight
    data: np.ndarray  # the raw bytes (uint8), a view of the memory map


class GGUFFile:
    """`fields`: metadata key -> Python value (str, int, float, bool or list); `tensors`: GGUFTensor list."""

    def __init__(self, path):
        self.path = Path(path)
        with open(self.path, "rb") as f:
            # Copy-on-write: tensors can wrap the bytes without a copy, and no write ever reaches the file.
            self._map = mmap.mmap(f.fileno(), 0, access=mmap.ACCESS_COPY)
        self._buf = memoryview(self._map)
        self._pos = 0
        magic, self.version, n_tensors, n_fields = self._unpack("<4sIQQ")
        if magic != b"GGUF" or self.version not in (2, 3):
            raise ValueError(f"not a GGUF version 2 or 3 file (magic {magic!r}, version {self.version})")
        self._check_count(n_fields, 12)  # a key's length, its type
        self.fields = {}
        for _ in range(n_fields):
            key = self._string()
            if key in self.fields:
                raise ValueError(f"metadata key {key!r} appears twice")
            self.fields[key] = self._value(self._unpack("<I")[0], 0)
        self._check_count(n_tensors, 24)  # a name's length, n_dims, type, offset
        infos = [self._tensor_info() for _ in range(n_tensors)]
        alignment = self.fields.get("general.alignment", 32)
        if type(alignment) is not int or alignment <= 0 or alignment & (alignment - 1):
            raise ValueError(f"general.alignment {alignment!r} is not a power of two")
        data_start = -(-self._pos // alignment) * alignment
        self.tensors = []
        for name, dims, ggml_type, offset in infos:
            self.tensors.append(self._tensor(name, dims, ggml_type, data_start + offset))
        if len({t.name for t in self.tensors}) != len(self.tensors):
            raise ValueError("two tensors share a name")

    def release(self, tensor: GGUFTensor) -> None:
        """Drop the file pages behind a tensor that has been converted, so loading does not keep the
        whole file resident beside the model (they are read again from disk if ever touched)."""
        if not hasattr(self._map, "madvise"):
            return
        start = tensor.data.ctypes.data - np.frombuffer(self._buf, np.uint8, 1).ctypes.data  # offset in the file
        first_page = -(-start // mmap.PAGESIZE) * mmap.PAGESIZE
        end_page = (start + tensor.data.nbytes) // mmap.PAGESIZE * mmap.PAGESIZE
        if end_page > first_page:
            self._map.madvise(mmap.MADV_DONTNEED, first_page, end_page - first_page)

    # --- primitive reads, each bounds-checked ------------------------------------------------------

    def _unpack(self, fmt: str):
        size = struct.calcsize(fmt)
        if self._pos + size > len(self._buf):
            raise ValueError(f"the file ends at byte {len(self._buf)}, inside its header")
        values = struct.unpack_from(fmt, self._buf, self._pos)
        self._pos += size
        return values

    def _check_count(self, count: int, min_item_bytes: int):
        if count * min_item_bytes > len(self._buf) - self._pos:
            raise ValueError(f"a count of {count} items cannot fit in the {len(self._buf) - self._pos} bytes left")

    def _string(self) -> str:
        (length,) = self._unpack("<Q")
        end = self._pos + length
        if end > len(self._buf):
            raise ValueError(f"a string of {length} bytes runs past the end of the file")
        text = str(self._buf[self._pos : end], "utf-8")  # UnicodeDecodeError is a ValueError
        self._pos = end
        return text

    def _value(self, kind: int, depth: int):
        if kind in _SCALARS:
            return self._unpack(_SCALARS[kind])[0]
        if kind == _STRING:
            return self._string()
        if kind != _ARRAY or depth >= _MAX_NESTING:
            raise ValueError(f"metadata value type {kind} is unknown")
        item_kind, count = self._unpack("<IQ")
        if item_kind in _NUMPY:  # numbers: one numpy read, not a Python loop
            dtype = np.dtype(_NUMPY[item_kind])
            self._check_count(count, dtype.itemsize)
            values = np.frombuffer(self._buf, dtype, count, self._pos).tolist()
            self._pos += count * dtype.itemsize
            return values
        self._check_count(count, 8)  # a string's length, or an inner array's type and length
        return [self._value(item_kind, depth + 1) for _ in range(count)]

    def _tensor_info(self):
        name = self._string()
        (n_dims,) = self._unpack("<I")
        if n_dims > 4:
            raise ValueError(f"tensor {name!r} has {n_dims} dimensions; ggml allows at most 4")
        dims = self._unpack(f"<{n_dims}Q")
        ggml_type, offset = self._unpack("<IQ")
        return name, dims, ggml_type, offset

    def _tensor(self, name, dims, raw_type, start) -> GGUFTensor:
        try:
            ggml_type = GGMLQuantizationType(raw_type)
            block_size, block_bytes = GGML_QUANT_SIZES[ggml_type]
        except (ValueError, KeyError):
            raise ValueError(f"tensor {name!r} has unknown type number {raw_type}") from None
        n_elements = 1
        for d in dims:
            n_elements *= d
        if dims and dims[0] % block_size:
            raise ValueError(f"tensor {name!r}: rows of {dims[0]} values do not fill {block_size}-value blocks")
        n_bytes = n_elements // block_size * block_bytes
        if start + n_bytes > len(self._buf):
            raise ValueError(f"tensor {name!r} ({n_bytes} bytes at {start}) runs past the end of the file")
        data = np.frombuffer(self._buf, np.uint8, n_bytes, start)
        return GGUFTensor(name, ggml_type, tuple(reversed(dims)), data)  # ggml lists dims fastest first


def open_gguf(path) -> GGUFFile:
    """A GGUF file's metadata and tensor table, or a one-line CheckpointError if it is not a readable GGUF."""
    path = Path(path)
    with open(path, "rb") as f:
        magic, version = f.read(4), int.from_bytes(f.read(4), "little")
    if magic != b"GGUF":
        raise CheckpointError(f"{path} is not a GGUF file (it starts with {magic!r}, not b'GGUF'); pass a .gguf checkpoint")
    if version not in (2, 3):
        raise CheckpointError(f"{path} is GGUF version {version}; llama_lite reads versions 2 and 3, "
                              "convert the model again with a current llama.cpp")
    try:
        return GGUFFile(path)
    except (ValueError, OverflowError, MemoryError) as e:
        raise CheckpointError(f"{path} is a damaged GGUF file ({e}); download it again") from None


REQUIRED = object()  # gguf_field's default: the key must be present


def gguf_field(reader: GGUFFile, key: str, default=REQUIRED, kind=None):
    """The value of metadata `key` (str, int, float, bool or list); with `kind`, a CheckpointError
    unless it is of that type (a file's metadata can hold any type under any key)."""
    if key not in reader.fields:
        if default is REQUIRED:
            raise CheckpointError(f"{reader.path}: metadata {key!r} is missing; the file is not a complete GGUF model")
        return default
    value = reader.fields[key]
    if kind is not None:
        wanted = (int, float) if kind is float else kind
        if not isinstance(value, wanted) or (isinstance(value, bool) and kind is not bool):
            raise CheckpointError(f"{reader.path}: metadata {key!r} is a {type(value).__name__}, not a {kind.__name__}")
    return value


def dequantize(tensor: GGUFTensor, dtype=torch.float32) -> torch.Tensor:
    """A GGUF tensor in `dtype` (each value computed in float32, rounded once) of its torch shape,
    filled from dequantized_rows: unpacked whole, a 49152 x 576 Q8_0 embedding took two float32 copies
    (226 MB) at once, which set the peak memory of a whole batch-1 run."""
    out = torch.empty(tensor.shape, dtype=dtype)
    rows_of_out = out.view(-1, tensor.shape[-1]) if tensor.shape else out.view(1, 1)
    start = 0
    for rows in dequantized_rows(tensor):
        rows_of_out[start:start + len(rows)] = rows
        start += len(rows)
    return out


def dequantized_rows(tensor: GGUFTensor):
    """A GGUF tensor's rows (its last dimension) in float32, DEQUANTIZE_VALUES at a time. The types
    common in Llama GGUFs are unpacked with torch (all cores; ~6x faster than numpy, half the cold start
    for a 135M model); every other type goes through gguf-py's reference code, whole."""
    row_len = tensor.shape[-1] if tensor.shape else 1
    unpack = _TORCH_UNPACKERS.get(tensor.tensor_type)
    if unpack is None:
        from gguf.quants import dequantize as gguf_dequantize

        yield torch.from_numpy(gguf_dequantize(tensor.data, tensor.tensor_type)).float().view(-1, row_len)
        return
    block_size, block_bytes = GGML_QUANT_SIZES[tensor.tensor_type]
    blocks = torch.from_numpy(tensor.data).view(-1, row_len // block_size, block_bytes)  # (rows, blocks a row, bytes)
    step = max(1, DEQUANTIZE_VALUES // row_len)
    for start in range(0, len(blocks), step):
        part = blocks[start:start + step]
        yield unpack(part.reshape(-1, block_bytes)).view(len(part), row_len)


# 64 KB of float32 at a time: under glibc's 128 KB mmap threshold. Larger temporaries are mapped and
# unmapped, and each such free raises the threshold, after which loading's other temporaries come from
# the heap between kept weights and stay resident as holes (4 MB chunks: +130 MB at the end of loading).
DEQUANTIZE_VALUES = 1 << 14


# Types whose blocks map onto llama_lite's own quantized layers without loss: "int4" (kernels.Int4Linear,
# up to the scales' rounding to bfloat16). (Q8_0 blocks kept as int8 lost to a bfloat16 head: compiled-step.md.)
KEPT_TYPES = {GGMLQuantizationType.Q4_0: "int4", GGMLQuantizationType.Q4_1: "int4"}


def int4_values(tensor: GGUFTensor):
    """A Q4_0 / Q4_1 tensor's own values, as (q (out, in) uint8 0..15, scale, offset (out, in // 32)
    float32) with weight = q * scale + offset: the blocks as they are, nothing rounded."""
    _, block_bytes = GGML_QUANT_SIZES[tensor.tensor_type]
    blocks = torch.from_numpy(tensor.data).view(-1, block_bytes)  # (n_blocks, block_bytes)
    rows, groups = tensor.shape[0], tensor.shape[1] // 32
    scale = _f16(blocks, 0)
    if tensor.tensor_type == GGMLQuantizationType.Q4_0:  # d * (q - 8)
        q, offset = _nibbles(blocks[:, 2:]), -8 * scale
    else:  # Q4_1: d * q + m
        q, offset = _nibbles(blocks[:, 4:]), _f16(blocks, 2)
    return q.reshape(rows, -1), scale.view(rows, groups), offset.view(rows, groups)


def _f16(blocks, start):
    """Column `start` (and start+1) of each block read as one float16 scale: (n_blocks, 1) float32."""
    return blocks[:, start : start + 2].contiguous().view(torch.float16).float()


def _nibbles(packed):
    """ggml's 4-bit packing: byte j holds value j in its low nibble and value j + 16 in its high one."""
    return torch.cat((packed & 0x0F, packed >> 4), dim=-1)  # (n_blocks, 32) of 0..15


_TORCH_UNPACKERS = {
    GGMLQuantizationType.F32: lambda b: b.view(torch.float32),  # copied into the result, not kept as the map's
    GGMLQuantizationType.F16: lambda b: b.view(torch.float16).float(),
    GGMLQuantizationType.BF16: lambda b: b.view(torch.bfloat16).float(),
    # Q8_0: f16 scale d, 32 int8 values: d * q
    GGMLQuantizationType.Q8_0: lambda b: _f16(b, 0) * b[:, 2:].view(torch.int8),
    # Q4_0: f16 scale d, 32 nibbles: d * (q - 8)
    GGMLQuantizationType.Q4_0: lambda b: _f16(b, 0) * (_nibbles(b[:, 2:]).float() - 8),
    # Q4_1: f16 scale d, f16 minimum m, 32 nibbles: d * q + m
    GGMLQuantizationType.Q4_1: lambda b: _f16(b, 0) * _nibbles(b[:, 4:]) + _f16(b, 2),
}
