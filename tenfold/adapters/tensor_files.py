"""One tensor file read with every size checked before the memory it implies is taken.

safetensors: the header (8-byte length, then JSON) is checked first: bounded length, known dtypes, every tensor's
data_offsets exactly its shape x itemsize, inside the file, the tensors tiling the data section without overlap
(safetensors' own rule). Only then is the data section read, once, and the tensors are views of it.
Pickled .bin: only torch's zip format (torch.save since 1.6), uncompressed, its records no larger than the file;
torch then checks each storage record against the size the pickle claims. Every tensor must be a plain dense CPU
tensor covering its own storage region: an expanded (stride-0) or otherwise non-contiguous tensor, one larger than
its storage or overlapping another is refused before any op touches it (each would make the first op on it
allocate or read far more than the file holds).
"""

from __future__ import annotations

import math
import zipfile
from typing import BinaryIO

import torch

from . import strict_json
from .errors import AdapterFormatError, where
from .limits import MAX_HEADER_BYTES, MAX_TENSOR_DIMS, MAX_TENSOR_NAME, MAX_TENSORS

SAFETENSORS_DTYPES = {
    "F64": torch.float64, "F32": torch.float32, "F16": torch.float16, "BF16": torch.bfloat16,
    "I64": torch.int64, "I32": torch.int32, "I16": torch.int16, "I8": torch.int8, "U8": torch.uint8,
    "U16": torch.uint16, "U32": torch.uint32, "U64": torch.uint64, "BOOL": torch.bool,
    "F8_E4M3": torch.float8_e4m3fn, "F8_E5M2": torch.float8_e5m2,
}
_HEADER_DEPTH = 3  # {name: {"shape": [...]}}


def read_safetensors(f: BinaryIO, size: int, path) -> dict[str, torch.Tensor]:
    if size < 8:
        raise AdapterFormatError(f"{path}: corrupt or truncated safetensors file ({size} bytes, no header)")
    length = int.from_bytes(f.read(8), "little")
    if length > min(MAX_HEADER_BYTES, size - 8):
        raise AdapterFormatError(f"{path}: corrupt or truncated safetensors file: the header claims {length} bytes; "
                                 f"expected at most {min(MAX_HEADER_BYTES, size - 8)} (the file's size and the "
                                 f"header limit)")
    try:
        text = f.read(length).decode("utf-8")
    except UnicodeDecodeError:
        raise AdapterFormatError(f"{path}: corrupt safetensors file: the header is not UTF-8 JSON") from None
    header = strict_json.loads(text, f"{path} (header)", _HEADER_DEPTH)
    if not isinstance(header, dict):
        raise AdapterFormatError(f"{path}: corrupt safetensors file: expected a JSON object as header, found "
                                 f"{type(header).__name__}")
    metadata = header.pop("__metadata__", None)
    if metadata is not None and not (isinstance(metadata, dict) and all(isinstance(v, str) for v in metadata.values())):
        raise AdapterFormatError(f"{where(path, '__metadata__')}: expected a mapping of strings to strings")
    _check_count(len(header), path)
    layout = sorted(_header_entry(name, entry, path) for name, entry in header.items())
    data_size, position = size - 8 - length, 0
    for begin, end, name, _, _ in layout:
        if begin != position:
            raise AdapterFormatError(
                f"{where(path, name)}: corrupt safetensors file: data_offsets start at {begin}, expected {position} "
                f"(tensors must tile the data section in order, without gaps or overlaps)")
        position = end
    if position != data_size:
        raise AdapterFormatError(f"{path}: corrupt or truncated safetensors file: the header describes {position} "
                                 f"bytes of tensor data, the file holds {data_size}")
    data = bytearray(data_size)
    view, filled = memoryview(data), 0
    while filled < data_size:
        got = f.readinto(view[filled:])
        if not got:
            raise AdapterFormatError(f"{path}: corrupt or truncated safetensors file (it shrank while being read)")
        filled += got
    tensors = {}
    for begin, end, name, dtype, shape in layout:
        itemsize = torch.empty((), dtype=dtype).element_size()
        if end == begin:
            tensors[name] = torch.empty(shape, dtype=dtype)
            continue
        tensor = torch.frombuffer(data, dtype=dtype, count=(end - begin) // itemsize, offset=begin).reshape(shape)
        tensors[name] = tensor if begin % itemsize == 0 else tensor.clone()  # aligned for every kernel
    return tensors


def _header_entry(name: str, entry, path) -> tuple:
    _check_name(name, path)
    if not isinstance(entry, dict) or set(entry) != {"dtype", "shape", "data_offsets"}:
        raise AdapterFormatError(f"{where(path, name)}: corrupt safetensors header: expected an object with dtype, "
                                 f"shape and data_offsets, found {str(entry)[:120]}")
    dtype = SAFETENSORS_DTYPES.get(entry["dtype"]) if isinstance(entry["dtype"], str) else None
    if dtype is None:
        raise AdapterFormatError(f"{where(path, name)}: corrupt safetensors header: expected a dtype of "
                                 f"{', '.join(SAFETENSORS_DTYPES)}, found {str(entry['dtype'])[:40]!r}")
    shape, offsets = entry["shape"], entry["data_offsets"]
    if not (isinstance(shape, list) and len(shape) <= MAX_TENSOR_DIMS and all(_natural(n) for n in shape)):
        raise AdapterFormatError(f"{where(path, name)}: corrupt safetensors header: expected a shape of at most "
                                 f"{MAX_TENSOR_DIMS} non-negative integers, found {str(shape)[:120]}")
    if not (isinstance(offsets, list) and len(offsets) == 2 and all(_natural(n) for n in offsets)
            and offsets[0] <= offsets[1]):
        raise AdapterFormatError(f"{where(path, name)}: corrupt safetensors header: expected data_offsets "
                                 f"[begin, end] with 0 <= begin <= end, found {str(offsets)[:120]}")
    need = math.prod(shape) * torch.empty((), dtype=dtype).element_size()
    if offsets[1] - offsets[0] != need:
        raise AdapterFormatError(f"{where(path, name)}: corrupt safetensors header: shape {shape} of {entry['dtype']} "
                                 f"takes {need} bytes, data_offsets {offsets} hold {offsets[1] - offsets[0]}")
    return offsets[0], offsets[1], name, dtype, tuple(shape)


def read_pickle(f: BinaryIO, size: int, path) -> dict[str, torch.Tensor]:
    if f.read(4) != b"PK\x03\x04":
        raise AdapterFormatError(f"{path}: cannot be read as a weights-only torch pickle: expected torch's zip format "
                                 f"(torch.save since torch 1.6); re-save it with a current torch")
    f.seek(0)
    try:
        with zipfile.ZipFile(f) as archive:
            records = archive.infolist()
    except Exception as e:  # any malformed archive: the same answer
        raise AdapterFormatError(f"{path}: cannot be read as a weights-only torch pickle ({type(e).__name__}: "
                                 f"{str(e)[:200]})") from None
    packed = [r.filename for r in records if r.compress_type != zipfile.ZIP_STORED or r.file_size != r.compress_size]
    if packed:
        raise AdapterFormatError(f"{where(path, packed[0])}: cannot be read as a weights-only torch pickle: a "
                                 f"compressed record; torch.save writes every record uncompressed")
    if sum(r.file_size for r in records) > size:
        raise AdapterFormatError(f"{path}: cannot be read as a weights-only torch pickle: its records claim more "
                                 f"bytes than the file holds")
    _check_count(len(records), path)
    f.seek(0)
    try:
        tensors = torch.load(f, map_location="cpu", weights_only=True)
    except Exception as e:  # pickle, zip and unpickler errors all mean the same thing here
        raise AdapterFormatError(f"{path}: cannot be read as a weights-only torch pickle ({type(e).__name__}: "
                                 f"{str(e)[:300]})") from None
    if not isinstance(tensors, dict) or not all(isinstance(v, torch.Tensor) for v in tensors.values()):
        raise AdapterFormatError(f"{path}: expected a mapping of tensor names to tensors")
    regions: dict[int, list] = {}
    for name, tensor in tensors.items():
        if not isinstance(name, str):
            raise AdapterFormatError(f"{path}: expected tensor names to be strings, found {str(name)[:80]!r}")
        _check_name(name, path)
        _check_dense(tensor, name, path)
        start = tensor.untyped_storage().data_ptr() + tensor.storage_offset() * tensor.element_size()
        regions.setdefault(tensor.untyped_storage().data_ptr(), []).append(
            (start, start + tensor.numel() * tensor.element_size(), name))
    for spans in regions.values():
        spans.sort()
        for (_, end, first), (begin, _, second) in zip(spans, spans[1:]):
            if begin < end:
                raise AdapterFormatError(f"{where(path, second)}: its data overlaps the tensor {first!r}; expected "
                                         f"every tensor to own its values")
    return tensors


def _check_dense(tensor: torch.Tensor, name: str, path) -> None:
    if tensor.layout != torch.strided or tensor.is_nested or tensor.is_quantized or tensor.device.type != "cpu":
        raise AdapterFormatError(f"{where(path, name)}: expected a dense CPU tensor, found layout {tensor.layout} on "
                                 f"{tensor.device}")
    if len(tensor.shape) > MAX_TENSOR_DIMS:
        raise AdapterFormatError(f"{where(path, name)}: expected at most {MAX_TENSOR_DIMS} dimensions, found "
                                 f"{len(tensor.shape)}")
    if not tensor.is_contiguous():
        raise AdapterFormatError(
            f"{where(path, name)}: expected a contiguous tensor that holds its own values, found shape "
            f"{list(tensor.shape)} with strides {list(tensor.stride())} (an expanded or strided view: its "
            f"{tensor.numel()} values are not in the file)")
    need = (tensor.storage_offset() + tensor.numel()) * tensor.element_size()
    if need > tensor.untyped_storage().nbytes():
        raise AdapterFormatError(f"{where(path, name)}: shape {list(tensor.shape)} needs {need} bytes, its storage in "
                                 f"the file holds {tensor.untyped_storage().nbytes()}")


def _check_name(name: str, path) -> None:
    if len(name) > MAX_TENSOR_NAME:
        raise AdapterFormatError(f"{where(path, name[:80] + '...')}: expected a tensor name of at most "
                                 f"{MAX_TENSOR_NAME} characters, found {len(name)}")


def _check_count(count: int, path) -> None:
    if count > MAX_TENSORS:
        raise AdapterFormatError(f"{path}: expected at most {MAX_TENSORS} tensors, found {count}")


def _natural(value) -> bool:
    return isinstance(value, int) and not isinstance(value, bool) and value >= 0
