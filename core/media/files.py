"""Atomic, never-overwriting output files named the way ComfyUI names them, and the rules a
filename_prefix must follow (checked when the workflow is queued and again when saving)."""
from __future__ import annotations

import os
import re
from contextlib import ExitStack, contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Iterator, Optional

from ..errors import FilenamePrefixError, VideoWriteError
from .temp_files import longest_temp_name, sweep_stale, temp_file

NAME_MAX = 255  # bytes in one file name: ext4, XFS, btrfs, ZFS, APFS (NTFS: 255 UTF-16 units)
LONGEST_SUFFIX = ".webm"  # names are checked for the longest format's suffix, so any format fits
SIDECAR_SUFFIX = ".png"
_COUNTER_WIDTH = 7  # room for counters up to 9,999,999 (they start at 5 digits: 00001)
_EXAMPLE = "use a name relative to the output folder, such as 'flipbook/clip'"


def _shown(text: str) -> str:
    """The prefix as messages quote it: escaped, and cut short when long, so the message stays one line."""
    return repr(text) if len(text) <= 60 else f"{text[:40]!r}… ({len(os.fsencode(text))} bytes)"


def _names_for(base: str) -> list[str]:
    """The longest names a save under `base` creates: the video, its sidecar and their temp files."""
    stem = f"{base}_{'9' * _COUNTER_WIDTH}_"
    return [stem + LONGEST_SUFFIX, f"{stem}.workflow99{SIDECAR_SUFFIX}",
            longest_temp_name(base=base, suffix=LONGEST_SUFFIX), longest_temp_name(base=base, suffix=SIDECAR_SUFFIX)]


def max_name_bytes() -> int:
    """How long (UTF-8 bytes) the name part of a prefix may be."""
    return NAME_MAX - max(len(name) for name in _names_for(""))


def check_filename_prefix(filename_prefix: str) -> tuple[str, str]:
    """(subfolder, base name) of a prefix like 'flipbook/cat', or a FilenamePrefixError saying which rule it breaks.

    The node's validator calls this when the workflow is queued and the save calls it again, so a
    prefix is judged by the same rules both times, before anything is written.
    """
    if not isinstance(filename_prefix, str):
        raise FilenamePrefixError(f"filename_prefix must be text, got {type(filename_prefix).__name__}; {_EXAMPLE}.")
    prefix = filename_prefix.strip().replace("\\", "/") or "flipbook"
    shown = _shown(filename_prefix)
    if "\x00" in prefix:
        raise FilenamePrefixError(f"filename_prefix {shown} contains a NUL byte (\\x00), which no file name can "
                                  "hold; remove it.")
    if prefix.startswith("/") or re.match(r"[A-Za-z]:", prefix):
        raise FilenamePrefixError(f"filename_prefix {shown} is an absolute path; {_EXAMPLE}.")
    parts = prefix.split("/")
    if ".." in parts:
        raise FilenamePrefixError(f"filename_prefix {shown} contains '..', which would leave the output folder; "
                                  f"{_EXAMPLE}, without '..'.")
    subfolder, base = "/".join(parts[:-1]), parts[-1] or "flipbook"
    for part in parts[:-1]:
        if len(os.fsencode(part)) > NAME_MAX:
            raise FilenamePrefixError(f"filename_prefix {shown}: the folder name {_shown(part)} is over the "
                                      f"{NAME_MAX}-byte limit of file names; shorten it.")
    size, limit = len(os.fsencode(base)), max_name_bytes()
    if size > limit:
        raise FilenamePrefixError(
            f"filename_prefix {shown}: its name part is {size} bytes, but at most {limit} fit, so that the "
            f"saved file, its sidecar and their temporary '.NAME.….partial.ext' files stay within the "
            f"{NAME_MAX}-byte limit of file names; shorten the part after the last '/'.")
    return subfolder, base


def output_folder(output_dir: Path, filename_prefix: str) -> tuple[Path, str, str]:
    """(folder, base name, subfolder) for a prefix like 'flipbook/cat'; refuses paths leaving output_dir."""
    subfolder, base = check_filename_prefix(filename_prefix)
    folder = (output_dir / subfolder).resolve()
    if output_dir.resolve() not in (folder, *folder.parents):  # a symbolic link inside the output folder
        raise FilenamePrefixError(f"filename_prefix {_shown(filename_prefix)} leads outside the output folder "
                                  f"(to {folder}) through a symbolic link; use a folder that stays inside it.")
    return folder, base, subfolder


def _next_counter(folder: Path, base: str) -> int:
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
    """Temp files are 0600; outputs get the usual 0666 & ~umask so servers and other users can read them."""
    os.chmod(path, 0o666 & ~_umask())


@dataclass
class Output:
    temp: Path  # write the video here
    sidecar_temp: Optional[Path] = None  # and the sidecar here, when one was asked for
    path: Optional[Path] = None  # the published names, set when the block ends without an error
    sidecar: Optional[Path] = None


@contextmanager
def atomic_output(folder: Path, base: str, suffix: str, *, sidecar_suffix: Optional[str] = None) -> Iterator[Output]:
    """Yields temp paths to write; when the block succeeds they are linked to fresh unique names.

    The final name is claimed with a hard link, which fails if the name exists, so two saves never
    overwrite each other; on any error (or a signal) the temp files are removed and nothing is left.
    A video and its sidecar are published together or not at all.
    """
    with ExitStack() as stack:
        try:
            folder.mkdir(parents=True, exist_ok=True)
            sweep_stale(folder)
            out = Output(stack.enter_context(temp_file(folder, base=base, suffix=suffix)))
            if sidecar_suffix is not None:
                out.sidecar_temp = stack.enter_context(temp_file(folder, base=base, suffix=sidecar_suffix))
        except OSError as exc:
            raise VideoWriteError(f"Cannot write to {folder}: {exc.strerror or exc}. Check the output folder.") from None
        yield out
        _publish_mode(out.temp)
        video = _claim_name(out.temp, folder, base, suffix)
        if out.sidecar_temp is not None:
            try:
                _publish_mode(out.sidecar_temp)
                out.sidecar = _claim_sidecar(out.sidecar_temp, video, sidecar_suffix)
            except BaseException as exc:
                video.unlink(missing_ok=True)  # ours, claimed a moment ago: without its sidecar it must not stay
                if isinstance(exc, OSError) and not isinstance(exc, VideoWriteError):
                    raise VideoWriteError(f"Cannot write the sidecar of {video.name}: {exc.strerror or exc}. "
                                          "Nothing was written.") from None
                raise
        out.path = video


def _claim_name(temp: Path, folder: Path, base: str, suffix: str) -> Path:
    counter = _next_counter(folder, base)
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


def _claim_sidecar(temp: Path, video: Path, suffix: str) -> Path:
    """The companion's name: the video's stem, or `.workflowN` when a file of that name exists; never overwrites."""
    stem = video.name[: -len(video.suffix)]
    for name in (stem + suffix, *(f"{stem}.workflow{n or ''}{suffix}" for n in range(100))):
        try:
            os.link(temp, video.with_name(name))
            return video.with_name(name)
        except FileExistsError:
            continue
        except OSError:  # no hard links here (exFAT, some network shares)
            return _claim_without_links(temp, video.with_name(name))
    raise VideoWriteError(f"No free name for the sidecar of {video.name}; remove {stem}.workflow*{suffix} files.")
