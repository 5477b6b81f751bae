"""Atomic, never-overwriting output files named the way ComfyUI names them."""
from __future__ import annotations

import os
import re
import tempfile
from contextlib import contextmanager
from pathlib import Path
from typing import Callable, Iterator

from ..errors import VideoWriteError

_SAFE_PREFIX = re.compile(r"^[^\x00]+$")


def output_folder(output_dir: Path, filename_prefix: str) -> tuple[Path, str, str]:
    """(folder, base name, subfolder) for a prefix like 'flipbook/cat'; refuses paths leaving output_dir."""
    prefix = filename_prefix.strip().replace("\\", "/") or "flipbook"
    if not _SAFE_PREFIX.match(prefix) or prefix.startswith("/") or ".." in prefix.split("/"):
        raise VideoWriteError(f"filename_prefix {filename_prefix!r} must be a relative name inside the output folder.")
    subfolder, _, base = prefix.rpartition("/")
    folder = (output_dir / subfolder).resolve()
    if output_dir.resolve() not in (folder, *folder.parents):
        raise VideoWriteError(f"filename_prefix {filename_prefix!r} points outside the output folder.")
    return folder, base or "flipbook", subfolder


def _next_counter(folder: Path, base: str, suffix: str) -> int:
    """One counter for every format (as ComfyUI's own savers share it), so sidecars never collide."""
    pattern = re.compile(re.escape(base) + r"_(\d{5,})_\.")
    numbers = [int(m.group(1)) for name in os.listdir(folder) if (m := pattern.match(name))]
    return max(numbers, default=0) + 1


def _umask() -> int:
    """The process umask, read without changing it where the OS allows (ComfyUI saves from a worker thread)."""
    try:
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith("Umask:"):
                return int(line.split()[1], 8)
    except OSError:
        pass
    mask = os.umask(0o022)
    os.umask(mask)
    return mask


def _publish_mode(path: Path) -> None:
    """mkstemp makes 0600 files; outputs get the usual 0666 & ~umask so servers and other users can read them."""
    os.chmod(path, 0o666 & ~_umask())


@contextmanager
def atomic_output(folder: Path, base: str, suffix: str) -> Iterator[tuple[Path, list[Path]]]:
    """Yields (temp path, [final path]); on success the temp file is linked to a fresh unique name.

    The final name is claimed with a hard link, which fails if the name exists, so two saves never
    overwrite each other; on any error the temp file is removed and nothing is left behind.
    """
    try:
        folder.mkdir(parents=True, exist_ok=True)
        handle, temp_name = tempfile.mkstemp(prefix=f".{base}.", suffix=".partial" + suffix, dir=folder)
        os.close(handle)
    except OSError as exc:
        raise VideoWriteError(f"Cannot write to {folder}: {exc.strerror or exc}. Check the output folder.") from None
    temp, final = Path(temp_name), []
    try:
        yield temp, final
        _publish_mode(temp)
        final.append(_claim_name(temp, folder, base, suffix))
    finally:
        temp.unlink(missing_ok=True)


def _claim_name(temp: Path, folder: Path, base: str, suffix: str) -> Path:
    counter = _next_counter(folder, base, suffix)
    while True:
        target = folder / f"{base}_{counter:05}_{suffix}"
        try:
            os.link(temp, target)
            return target
        except FileExistsError:
            counter += 1
        except OSError:
            return _claim_without_links(temp, target)


def _claim_without_links(temp: Path, target: Path) -> Path:
    """For filesystems without hard links: reserve the name exclusively, then replace it."""
    while True:
        try:
            os.close(os.open(target, os.O_CREAT | os.O_EXCL | os.O_WRONLY))
        except FileExistsError:
            stem, counter, suffix = target.name.rsplit("_", 2)
            target = target.with_name(f"{stem}_{int(counter) + 1:05}_{suffix}")
            continue
        except OSError as exc:
            raise VideoWriteError(f"Cannot write {target}: {exc.strerror or exc}.") from None
        try:
            os.replace(temp, target)
            return target
        except OSError as exc:
            target.unlink(missing_ok=True)  # the empty placeholder must not stay behind
            raise VideoWriteError(f"Cannot write {target}: {exc.strerror or exc}.") from None


def claim_sidecar(video: Path, suffix: str, write: Callable[[Path], None]) -> Path:
    """Write a companion file next to `video` (same stem), atomically; never overwrites."""
    base = video.name[: -len(video.suffix)]
    handle, temp_name = tempfile.mkstemp(prefix=f".{base}.", suffix=".partial" + suffix, dir=video.parent)
    os.close(handle)
    temp = Path(temp_name)
    try:
        write(temp)
        _publish_mode(temp)
        for name in (base + suffix, *(f"{base}.workflow{n or ''}{suffix}" for n in range(100))):
            try:
                os.link(temp, video.with_name(name))
                return video.with_name(name)
            except FileExistsError:
                continue
            except OSError:  # no hard links here (exFAT, some network shares)
                return _claim_without_links(temp, video.with_name(name))
        raise VideoWriteError(f"No free name for the sidecar of {video.name}.")
    finally:
        temp.unlink(missing_ok=True)
