"""An uploaded study (a zip or tar of its DICOM files) -> a folder of plain files, or a refusal.

The upload comes from outside, so nothing in it is trusted: member names never become paths
(files are written as `00000.dcm`, `00001.dcm`, ... in one fresh folder; the series reader orders
slices by their headers, not by name), and an archive is refused, before anything is written,
when it holds a member that is not a plain file or directory (symlinks, hard links, devices), a
name that would escape (absolute, `..`, a drive), more files than `max_files`, or declares more
bytes than `max_expanded_bytes`. What is declared bounds what is written: zipfile stops a member
at its declared size and then fails its CRC (a member that lies is refused), tarfile reads
exactly the declared size.
"""

from __future__ import annotations

import io
import stat
import tarfile
import zipfile
import zlib
from dataclasses import dataclass
from pathlib import Path, PurePosixPath, PureWindowsPath


class ArchiveError(ValueError):
    """The upload cannot be read as a study; the message says why (answered with a 4xx)."""


@dataclass(frozen=True)
class Limits:
    max_request_bytes: int = 1 << 30     # the upload itself (a 512x512x600 study is ~300 MB raw)
    max_expanded_bytes: int = 3 << 30    # what it may expand to
    max_files: int = 4096                # slices (and other members) in one study


def _safe_name(name: str) -> bool:
    """A member name that stays inside the archive's own root."""
    if not name or "\x00" in name:
        return False
    for pure in (PurePosixPath(name), PureWindowsPath(name)):
        if pure.is_absolute() or pure.drive or ".." in pure.parts:
            return False
    return True


def _zip_kind(info: zipfile.ZipInfo) -> str:
    mode = stat.S_IFMT(info.external_attr >> 16)  # 0 when the zip stores no Unix mode
    if mode == stat.S_IFLNK:
        return "a symbolic link"
    if info.is_dir() or mode == stat.S_IFDIR:
        return "dir"
    return "file" if mode in (0, stat.S_IFREG) else "not a plain file"


def _tar_kind(info: tarfile.TarInfo) -> str:
    if info.issym() or info.islnk():
        return "a link"
    if info.isdir():
        return "dir"
    return "file" if info.isreg() else "not a plain file"


def _plain_files(members: list, name, kind, size, limits: Limits) -> list:
    """The file members of an archive, after refusing any member that could escape or explode.

    Members are named by their place in the archive (#1, #2, ...), never by their name: a file
    name from outside may hold a patient's name, and refusals are logged."""
    files, total = [], 0
    for i, member in enumerate(members, 1):
        if not _safe_name(name(member)):
            raise ArchiveError(f"archive member #{i} would be written outside the study")
        what = kind(member)
        if what == "dir":
            continue
        if what != "file":
            raise ArchiveError(f"archive member #{i} is {what}")
        files.append(member)
        total += size(member)
        _check_totals(len(files), total, limits)
    return files


def _check_totals(n_files: int, n_bytes: int, limits: Limits) -> None:
    if n_files > limits.max_files:
        raise ArchiveError(f"the archive holds more than {limits.max_files} files")
    if n_bytes > limits.max_expanded_bytes:
        raise ArchiveError(f"the archive expands to more than {limits.max_expanded_bytes >> 20} MiB")


def _write_all(streams, dest: Path) -> None:
    """Copy each member's stream into dest/<index>.dcm (never under the member's own name)."""
    for i, open_stream in enumerate(streams):
        with open_stream() as source, open(dest / f"{i:05d}.dcm", "wb") as out:
            while block := source.read(1 << 20):
                out.write(block)


def extract_study(data: bytes | Path, dest: Path, limits: Limits = Limits()) -> Path:
    """Write the files of an uploaded zip or tar (optionally gzip/bz2/xz), given as bytes or as
    the file it was spooled to, into `dest`, a new folder; returns it. Raises ArchiveError with
    the reason for anything it refuses."""
    size = len(data) if isinstance(data, (bytes, bytearray)) else Path(data).stat().st_size
    if size > limits.max_request_bytes:
        raise ArchiveError(f"the upload is larger than {limits.max_request_bytes >> 20} MiB")
    dest.mkdir(parents=True, exist_ok=False)
    if isinstance(data, (bytes, bytearray)):
        _extract(io.BytesIO(data), dest, limits)
    else:
        with open(data, "rb") as spooled:
            _extract(spooled, dest, limits)
    if not any(dest.iterdir()):
        raise ArchiveError("the archive holds no files")
    return dest


def _extract(buffer, dest: Path, limits: Limits) -> None:
    if zipfile.is_zipfile(buffer):
        try:
            with zipfile.ZipFile(buffer) as archive:
                members = _plain_files(archive.infolist(), lambda m: m.filename, _zip_kind,
                                       lambda m: m.file_size, limits)
                _write_all([lambda m=m: archive.open(m) for m in members], dest)
        except (zipfile.BadZipFile, zipfile.LargeZipFile, NotImplementedError, RuntimeError,
                OSError, EOFError, zlib.error) as e:
            # the type only: zipfile's messages quote member names
            raise ArchiveError(f"the zip archive cannot be read ({type(e).__name__})") from None
    else:
        buffer.seek(0)
        try:
            with tarfile.open(fileobj=buffer, mode="r:*") as archive:
                members = _plain_files(archive.getmembers(), lambda m: m.name, _tar_kind,
                                       lambda m: m.size, limits)
                _write_all([lambda m=m: archive.extractfile(m) for m in members], dest)
        except tarfile.ReadError:
            raise ArchiveError("the upload is neither a zip nor a tar archive (or is truncated)") from None
        except (tarfile.TarError, EOFError, OSError) as e:
            raise ArchiveError(f"the tar archive cannot be read ({type(e).__name__})") from None
