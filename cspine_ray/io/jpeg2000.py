"""Half-resolution reads: the JPEG 2000 5/3 low-pass band, decoded directly or computed.

A lossless JPEG 2000 file stores its image as a reversible 5/3 wavelet pyramid, so a decoder can
return it at 1/2, 1/4, ... resolution without decoding the finer levels: a 512 px CT slice
decodes to 256 px in about a quarter of the CPU time of a full decode (7.3 vs 26.4 ms; see
BENCHMARKS.md).

`halve` computes the same low-pass (LL) band from pixels decoded any other way, by the integer
lifting of ITU-T T.800 Annex F (vertical pass, then horizontal). The two agree bit for bit
(tests/test_jpeg2000.py), so a study's shard is identical whatever transfer syntax stores it,
and the band is a proper anti-aliasing filter for downsampling ((-1, 2, 6, 2, -1) / 8).

`decode_reduced` takes the fast path only for codestreams where that equality holds: one
component, one tile, image origin 0, reversible 5/3, enough decomposition levels, signedness
and precision as the DICOM header says (a narrower precision only if no value was clamped), and a
size Pillow reduces correctly. Anything else returns None and the caller decodes in full.
"""

from __future__ import annotations

import io
import struct
from dataclasses import dataclass
from functools import lru_cache

import numpy as np
import pydicom
from pydicom.encaps import get_frame

# lossless-only and lossless-or-lossy JPEG 2000; a lossy (9/7) codestream is refused by its COD
JPEG2000_SYNTAXES = frozenset({"1.2.840.10008.1.2.4.90", "1.2.840.10008.1.2.4.91"})


def halved(n: int, levels: int) -> int:
    """Samples along one side after `levels` halvings: the ceiling of n / 2**levels."""
    return -(-n // (1 << levels))


def halved_shape(shape: tuple[int, int], levels: int) -> tuple[int, int]:
    """Shape of the low-pass band after `levels` halvings (a decoder's reduced size)."""
    return halved(shape[0], levels), halved(shape[1], levels)


def stored_range(bits_stored: int, signed: bool) -> tuple[int, int]:
    """The values a pixel of this many stored bits can hold (a decoder clamps to it)."""
    if signed:
        return -(1 << (bits_stored - 1)), (1 << (bits_stored - 1)) - 1
    return 0, (1 << bits_stored) - 1


def _low_pass(x: np.ndarray, axis: int) -> np.ndarray:
    """One reversible 5/3 analysis step along `axis`, keeping the low-pass half (int32)."""
    x = np.moveaxis(x, axis, 0)
    n = x.shape[0]
    if n == 1:  # a single sample at an even position is its own low-pass
        return np.moveaxis(x, 0, axis)
    even, odd = x[0::2], x[1::2]
    # symmetric extension: X(N) = X(N-2) when N is even
    right = even[1:] if n % 2 else np.concatenate([even[1:], even[-1:]])
    high = odd - ((even[: len(odd)] + right) >> 1)  # >> on signed ints floors, as the standard says
    # Y(-1) = Y(1); and Y(N) = Y(N-2) when N is odd
    before = np.concatenate([high[:1], high])[: len(even)]
    after = high if n % 2 == 0 else np.concatenate([high, high[-1:]])
    return np.moveaxis(even + ((before + after + 2) >> 2), 0, axis)


def halve(pixels: np.ndarray, levels: int, value_range: tuple[int, int]) -> np.ndarray:
    """The 5/3 low-pass band of a (rows, cols) integer image after `levels` halvings, int32.

    Clamped to `value_range` like a JPEG 2000 decoder clamps its output to the sample precision.
    """
    x = np.asarray(pixels).astype(np.int32)
    for _ in range(levels):
        x = _low_pass(_low_pass(x, 0), 1)
    return np.clip(x, *value_range, out=x) if levels else x


@dataclass(frozen=True)
class Codestream:
    """What `decode_reduced` checks in a JPEG 2000 main header."""

    width: int
    height: int
    origin: tuple[int, int]  # XOsiz, YOsiz
    tile: tuple[int, int]  # XTsiz, YTsiz
    components: int
    precision: int
    signed: bool
    levels: int  # decomposition levels (COD; a COC overrides it)
    reversible: bool  # 5/3 wavelet (lossless); False for 9/7


def parse_header(data: bytes) -> Codestream | None:
    """The SIZ and COD/COC facts of a raw codestream (or a JP2 box file's); None if malformed."""
    start = data.find(b"\xff\x4f\xff\x51")  # SOC then SIZ: skips JP2 boxes if present
    if start < 0:
        return None
    pos = start + 2
    size = cod = coc = None
    try:
        while pos + 4 <= len(data):
            marker, length = struct.unpack(">HH", data[pos : pos + 4])
            body = data[pos + 4 : pos + 2 + length]
            if marker == 0xFF51:  # SIZ
                _, xsiz, ysiz, xo, yo, xt, yt, _, _, csiz = struct.unpack(">HIIIIIIIIH", body[:36])
                ssiz = body[36]
                size = (xsiz - xo, ysiz - yo, (xo, yo), (xt, yt), csiz, (ssiz & 0x7F) + 1, bool(ssiz & 0x80))
            elif marker == 0xFF52:  # COD: Scod, SGcod (4 bytes), then levels and transform
                cod = (body[5], body[9] == 1)
            elif marker == 0xFF53 and body[0] == 0:  # COC of component 0 (1-byte index when Csiz < 257)
                coc = (body[2], body[6] == 1)
            elif marker == 0xFF90:  # SOT: the main header is over
                break
            pos += 2 + length
    except (struct.error, IndexError):
        return None
    if size is None or cod is None:
        return None
    width, height, origin, tile, components, precision, signed = size
    levels, reversible = coc or cod  # a COC overrides the COD wherever it stands in the header
    return Codestream(width, height, origin, tile, components, precision, signed, levels, reversible)


@lru_cache(maxsize=None)
def pillow_decodes_jpeg2000() -> bool:
    from PIL import features

    return bool(features.check("jpg_2000"))


def _pillow_reduced_shape(shape: tuple[int, int], levels: int) -> tuple[int, int]:
    """The size Pillow allots for a reduced decode: it rounds where the codestream takes the ceiling
    (33 px at 1/4 -> 8, not 9), and then cannot decode; such sizes take the full decode."""
    power = 1 << levels
    return (int((shape[0] + (power >> 1)) / power), int((shape[1] + (power >> 1)) / power))


def decode_reduced(ds: pydicom.Dataset, levels: int) -> np.ndarray | None:
    """Stored pixel values at 1/2**levels resolution straight from a JPEG 2000 codestream.

    Equal to `halve(ds.pixel_array, levels, ...)`; None when the file is not JPEG 2000 or its
    codestream is one where that equality is not guaranteed (the caller then decodes in full).
    """
    meta = getattr(ds, "file_meta", None)
    syntax = str(meta.get("TransferSyntaxUID", "")) if meta is not None else ""
    if levels < 1 or syntax not in JPEG2000_SYNTAXES or not pillow_decodes_jpeg2000():
        return None
    if int(ds.get("NumberOfFrames", 1) or 1) != 1:
        return None
    try:
        data = get_frame(ds.PixelData, 0, number_of_frames=1)
    except Exception:  # malformed encapsulation: the full decode names the problem
        return None
    cs = parse_header(data)
    rows, cols = int(ds.Rows), int(ds.Columns)
    bits_stored = int(ds.get("BitsStored", 0) or 0)
    if (cs is None or not cs.reversible or cs.levels < levels or cs.components != 1
            or cs.origin != (0, 0) or cs.tile[0] < cs.width or cs.tile[1] < cs.height
            or (cs.height, cs.width) != (rows, cols) or not 9 <= cs.precision <= bits_stored <= 16
            or cs.signed != bool(int(ds.get("PixelRepresentation", 0) or 0))
            or _pillow_reduced_shape((rows, cols), levels) != halved_shape((rows, cols), levels)):
        return None
    from PIL import Image

    try:
        with Image.open(io.BytesIO(data)) as image:
            image.reduce = levels  # Pillow's JPEG 2000 plugin decodes at this resolution level
            image.load()
            raw = np.asarray(image)
    except OSError:  # let the full decode report (or survive) whatever Pillow refused
        return None
    if raw.dtype != np.uint16 or raw.shape != halved_shape((rows, cols), levels):
        return None
    # Pillow scales samples to 16 bits and shifts signed ones to unsigned: undo both
    values = (raw.astype(np.int32) >> (16 - cs.precision))
    if cs.signed:
        values -= 1 << (cs.precision - 1)
    if cs.precision < bits_stored:
        # the decoder clamped to the codestream's narrower range; `halve` clamps to BitsStored.
        # Equal unless a value sits on that narrower range's edge: then decode in full.
        lo, hi = stored_range(cs.precision, cs.signed)
        if values.min() <= lo or values.max() >= hi:
            return None
    return values
