"""Minimal pure-Python safetensors reader/writer on top of torch (no numpy, no safetensors pkg).

Format: 8-byte little-endian u64 header length N, N bytes of JSON
{name: {"dtype", "shape", "data_offsets": [start, end]}, "__metadata__": {str: str}?},
then the raw little-endian data buffer; offsets are relative to the buffer start and the
tensors tile the buffer contiguously.
"""
import json
import struct
import sys

import torch

if sys.byteorder != "little":  # the raw buffer is little-endian; we copy memory as is
    raise RuntimeError("st.py assumes a little-endian host")

_DTYPES = {
    "F64": torch.float64,
    "F32": torch.float32,
    "F16": torch.float16,
    "BF16": torch.bfloat16,
    "I64": torch.int64,
    "I32": torch.int32,
    "I16": torch.int16,
    "I8": torch.int8,
    "U8": torch.uint8,
    "BOOL": torch.bool,
}
_NAMES = {v: k for k, v in _DTYPES.items()}


def load(path):
    """Returns ({name: tensor}, metadata dict or {}). Tensors are fresh, owned CPU copies."""
    with open(path, "rb") as f:
        raw = f.read()
    if len(raw) < 8:
        raise ValueError(f"{path}: too short for a safetensors file")
    (n,) = struct.unpack("<Q", raw[:8])
    if 8 + n > len(raw):
        raise ValueError(f"{path}: header length {n} exceeds file size")
    header = json.loads(raw[8 : 8 + n].decode("utf-8"))
    meta = header.pop("__metadata__", None) or {}
    buf = bytearray(raw[8 + n :])
    out = {}
    for name, info in header.items():
        dtype = _DTYPES.get(info["dtype"])
        if dtype is None:
            raise ValueError(f"{path}: tensor {name}: unsupported dtype {info['dtype']}")
        shape = [int(s) for s in info["shape"]]
        start, end = (int(v) for v in info["data_offsets"])
        numel = 1
        for s in shape:
            numel *= s
        itemsize = torch.empty((), dtype=dtype).element_size()
        if end - start != numel * itemsize or end > len(buf) or start < 0:
            raise ValueError(f"{path}: tensor {name}: bad data_offsets {start}..{end} for {shape}")
        if numel == 0:
            t = torch.empty(shape, dtype=dtype)
        else:
            t = torch.frombuffer(buf, dtype=dtype, count=numel, offset=start).reshape(shape).clone()
        out[name] = t
    return out, meta


def save(path, tensors, metadata=None):
    """Writes {name: tensor} (any CPU/GPU tensor of a supported dtype) to `path`."""
    names = sorted(tensors)
    header = {}
    blobs = []
    offset = 0
    for name in names:
        t = tensors[name].detach().to("cpu").contiguous()
        if t.dtype not in _NAMES:
            raise ValueError(f"tensor {name}: unsupported dtype {t.dtype}")
        nbytes = t.numel() * t.element_size()
        header[name] = {
            "dtype": _NAMES[t.dtype],
            "shape": list(t.shape),
            "data_offsets": [offset, offset + nbytes],
        }
        blob = bytearray(nbytes)
        if nbytes:
            torch.frombuffer(blob, dtype=torch.uint8).copy_(t.reshape(-1).view(torch.uint8))
        blobs.append(blob)
        offset += nbytes
    if metadata:
        header["__metadata__"] = {str(k): str(v) for k, v in metadata.items()}
    hjson = json.dumps(header, separators=(",", ":")).encode("utf-8")
    hjson += b" " * ((8 - len(hjson) % 8) % 8)  # align the data buffer to 8 bytes
    with open(path, "wb") as f:
        f.write(struct.pack("<Q", len(hjson)))
        f.write(hjson)
        for blob in blobs:
            f.write(blob)
