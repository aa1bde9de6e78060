"""Reader for the IDX files of MNIST and Fashion-MNIST, gzipped or not, read in place.

IDX layout (all integers big-endian): two zero bytes, a type byte (0x08 = unsigned byte),
a byte with the number of dimensions ``d``, then ``d`` uint32 sizes, then the values in
C order. Images are ``(N, 28, 28)``, labels ``(N,)``.

Why our own reader: torchvision 0.29's ``read_image_file`` opens the path with plain
``open()``, so it needs the uncompressed files in ``<root>/<Class>/raw``. The Debian package
``dataset-fashion-mnist`` ships only the ``.gz`` files; using torchvision's reader on them
would mean writing a 55 MB uncompressed copy. Decompressing in memory reads them in place.
We also check the length against the header, where torchvision (``strict=False``) does not,
so a truncated file is reported instead of failing later on a reshape.
"""

import gzip
import math
import struct
import zlib
from pathlib import Path

import numpy as np
import torch

GZIP_MAGIC = b"\x1f\x8b"
UNSIGNED_BYTE = 0x08


class IDXFormatError(ValueError):
    """A file is not a complete IDX file of unsigned bytes."""


def _read_bytes(path: Path) -> bytes:
    with open(path, "rb") as file:
        head = file.read(2)
    if head != GZIP_MAGIC:
        return path.read_bytes()
    try:
        with gzip.open(path, "rb") as file:
            return file.read()
    except (OSError, EOFError, zlib.error) as error:  # BadGzipFile is an OSError
        raise IDXFormatError(f"{path} is a damaged or truncated gzip file ({error})") from error


def read_idx(path: str | Path) -> torch.Tensor:
    """Read an IDX file of unsigned bytes into a uint8 tensor with the header's shape.

    Raises ``IDXFormatError`` if the header is not IDX or the data is shorter or longer
    than the header says.
    """
    path = Path(path)
    data = _read_bytes(path)
    if len(data) < 4 or data[0:2] != b"\x00\x00":
        raise IDXFormatError(f"{path} does not start with an IDX header")
    type_code, ndim = data[2], data[3]
    if type_code != UNSIGNED_BYTE:
        raise IDXFormatError(f"{path} holds IDX type 0x{type_code:02x}; expected 0x08 (bytes)")
    header_length = 4 + 4 * ndim
    if ndim == 0 or len(data) < header_length:
        raise IDXFormatError(f"{path} has an incomplete IDX header")
    shape = struct.unpack(f">{ndim}I", data[4:header_length])
    expected, found = math.prod(shape), len(data) - header_length
    if found != expected:
        raise IDXFormatError(
            f"{path} should hold {expected} values for shape {shape} but holds {found}: "
            "the file is truncated or damaged"
        )
    values = np.frombuffer(data, dtype=np.uint8, offset=header_length).reshape(shape)
    return torch.from_numpy(values.copy())
