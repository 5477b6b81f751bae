"""core/media/temp_files.py and the publishing in files.py: a save killed by SIGTERM/SIGINT leaves no
`.partial` file, leftovers of a killed process are swept by the next save, and a GIF is published
together with its PNG sidecar or not at all."""
from __future__ import annotations

import os
import signal
import subprocess
import sys
import textwrap
import threading
import time
from pathlib import Path

import pytest
import torch

from flipbook_pack.core.errors import VideoWriteError
from flipbook_pack.core.media import files as video_files
from flipbook_pack.core.media import save, temp_files
from flipbook_pack.core.media.metadata import build_metadata
from flipbook_pack.core.media.save import VideoSettings, save_video

ROOT = Path(__file__).resolve().parent.parent.parent
posix_only = pytest.mark.skipif(os.name != "posix", reason="POSIX signals")

# A slow save (0.2 s a frame) that says when its temp file exists; run in the main thread, or in a
# worker thread while the main thread waits, as ComfyUI runs nodes.
SLOW_SAVE = textwrap.dedent("""
    import importlib.util, os, sys, threading, time
    root, out, thread = sys.argv[1], sys.argv[2], sys.argv[3]
    spec = importlib.util.spec_from_file_location("flipbook_pack", root + "/__init__.py",
                                                  submodule_search_locations=[root])
    pack = importlib.util.module_from_spec(spec); sys.modules["flipbook_pack"] = pack; spec.loader.exec_module(pack)
    import torch
    from flipbook_pack.core.media.save import VideoSettings, save_video

    def slow(done, total):
        if done == 1:
            print(os.getpid(), flush=True)
        time.sleep(0.2)

    def run():
        save_video(torch.rand(100, 16, 16, 3), out, "clip", "mp4", VideoSettings(), {}, progress=slow)

    if thread == "worker":
        threading.Thread(target=run, daemon=True).start()
        while True:
            time.sleep(0.05)
    run()
""")


def _start_slow_save(out: Path, thread: str):
    proc = subprocess.Popen([sys.executable, "-c", SLOW_SAVE, str(ROOT), str(out), thread],
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    pid = proc.stdout.readline().strip()
    if not pid:
        proc.kill()
        pytest.fail(f"the slow save did not start: {proc.communicate(timeout=60)[1][-2000:]}")
    partials = [p.name for p in out.iterdir()]
    assert len(partials) == 1 and partials[0].startswith(".clip.") and f"-{pid}-" in partials[0], partials
    return proc


def _partials(folder: Path):
    return [p.name for p in folder.rglob("*") if ".partial" in p.name]


@posix_only
@pytest.mark.parametrize("thread", ["main", "worker"])
@pytest.mark.parametrize("signum", [signal.SIGTERM, signal.SIGINT])
def test_a_signal_during_encoding_leaves_no_partial_file(tmp_path, thread, signum):
    proc = _start_slow_save(tmp_path, thread)
    proc.send_signal(signum)
    _, err = proc.communicate(timeout=60)
    assert proc.returncode != 0, err
    if signum == signal.SIGTERM:  # the process still dies of SIGTERM, as without the handler
        assert proc.returncode == -signal.SIGTERM, err
    assert list(tmp_path.iterdir()) == [], err  # no .partial, and nothing published


@posix_only
def test_leftovers_of_a_killed_save_are_swept_by_the_next_save(tmp_path):
    proc = _start_slow_save(tmp_path, "main")
    proc.kill()  # SIGKILL: no handler runs, so its temp file stays
    proc.communicate(timeout=60)
    (left,) = _partials(tmp_path)
    saved = save_video(torch.rand(1, 8, 8, 3), tmp_path, "clip", "png", VideoSettings(), {})
    assert sorted(p.name for p in tmp_path.iterdir()) == [saved.path.name]


def _make(folder: Path, name: str, age_s: float = 0) -> Path:
    path = folder / name
    path.write_bytes(b"x")
    if age_s:
        os.utime(path, (time.time() - age_s, time.time() - age_s))
    return path


def _dead_pid() -> int:
    proc = subprocess.Popen([sys.executable, "-c", "pass"])
    proc.wait()
    return proc.pid


@posix_only
def test_sweep_removes_what_no_live_save_owns_and_keeps_the_rest(tmp_path):
    hour = temp_files.STALE_AFTER_S
    other_host = "ffffff" if temp_files._HOST != "ffffff" else "eeeeee"
    gone = [
        _make(tmp_path, temp_files.temp_name("a", ".mp4", pid=_dead_pid())),  # its process is dead
        _make(tmp_path, temp_files.temp_name("b", ".gif", pid=os.getpid())),  # our pid, but no save of ours
        _make(tmp_path, temp_files.temp_name("c", ".png", pid=os.getppid()), age_s=25 * hour),  # alive but a day old
        _make(tmp_path, f".d.{other_host}-1-0123abcd.partial.webm", age_s=hour + 60),  # another machine's, old
        _make(tmp_path, ".e.k2j3h4g5.partial.mp4", age_s=hour + 60),  # the older mkstemp naming, old
    ]
    kept = [
        _make(tmp_path, temp_files.temp_name("f", ".mp4", pid=os.getppid()), age_s=2 * hour),  # a live save's
        _make(tmp_path, f".g.{other_host}-1-0123abcd.partial.webm"),  # another machine's, being written
        _make(tmp_path, ".h.k2j3h4g5.partial.mp4"),  # older naming, fresh
        _make(tmp_path, "clip_00001_.mp4", age_s=2 * hour),
        _make(tmp_path, "notes.partial.txt", age_s=2 * hour),
        _make(tmp_path, ".hidden", age_s=2 * hour),
    ]
    (tmp_path / ".dir.k2j3h4g5.partial.mp4").mkdir()
    removed = temp_files.sweep_stale(tmp_path)
    assert sorted(removed) == sorted(gone)
    assert all(path.exists() for path in kept) and (tmp_path / ".dir.k2j3h4g5.partial.mp4").is_dir()


def test_sweep_never_removes_a_temp_file_of_a_save_in_flight(tmp_path):
    swept = []

    def sweep_midway(done, total):
        if done == 1:
            swept.extend(temp_files.sweep_stale(tmp_path, now=time.time() + 10 * temp_files.LIVE_OWNER_STALE_AFTER_S))
            assert len(_partials(tmp_path)) == 1

    saved = save_video(torch.rand(3, 8, 8, 3), tmp_path, "clip", "mp4", VideoSettings(), {}, progress=sweep_midway)
    assert swept == [] and [p.name for p in tmp_path.iterdir()] == [saved.path.name]


def test_a_refused_save_does_not_sweep(tmp_path):
    stale = _make(tmp_path, ".e.k2j3h4g5.partial.mp4", age_s=2 * temp_files.STALE_AFTER_S)
    with pytest.raises(Exception):
        save_video(torch.full((1, 8, 8, 3), float("nan")), tmp_path, "clip", "mp4", VideoSettings(), {})
    assert stale.exists()


def test_in_flight_temp_files_are_removed_at_exit(tmp_path):
    with temp_files.temp_file(tmp_path, "clip", ".mp4") as temp:
        assert temp.exists() and f"-{os.getpid()}-" in temp.name
        temp_files.remove_in_flight()  # what atexit and the signal handler run
        assert not temp.exists()
    assert list(tmp_path.iterdir()) == []


@posix_only
def test_signal_handlers_are_installed_only_from_the_main_thread_and_never_replace_others():
    previous = signal.getsignal(signal.SIGTERM), signal.getsignal(signal.SIGINT)

    def theirs(signum, frame):
        pass

    try:
        signal.signal(signal.SIGTERM, theirs)
        signal.signal(signal.SIGINT, signal.default_int_handler)  # Python's own: KeyboardInterrupt
        assert temp_files.install_signal_cleanup() is False
        assert signal.getsignal(signal.SIGTERM) is theirs and signal.getsignal(signal.SIGINT) is signal.default_int_handler
        signal.signal(signal.SIGTERM, signal.SIG_DFL)
        results = []
        worker = threading.Thread(target=lambda: results.append(temp_files.install_signal_cleanup()))
        worker.start()
        worker.join()
        assert results == [False] and signal.getsignal(signal.SIGTERM) == signal.SIG_DFL  # no error, no handler
        assert temp_files.install_signal_cleanup() is True  # the main thread can
        assert signal.getsignal(signal.SIGTERM) is temp_files._on_signal
        assert signal.getsignal(signal.SIGINT) is signal.default_int_handler
    finally:
        signal.signal(signal.SIGTERM, previous[0])
        signal.signal(signal.SIGINT, previous[1])


def test_sidecar_that_cannot_be_written_takes_the_gif_with_it(tmp_path, monkeypatch):
    def disk_full(path, *args):
        path.write_bytes(b"half a png")
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(save, "write_png", disk_full)
    with pytest.raises(VideoWriteError) as caught:
        save_video(torch.rand(2, 8, 8, 3), tmp_path, "clip", "gif", VideoSettings(), build_metadata({"1": {}}, None))
    assert str(caught.value) == ("Writing the .png sidecar failed: [Errno 28] No space left on device. "
                                 "Nothing was written.")
    assert list(tmp_path.iterdir()) == []


@pytest.mark.parametrize("error", [OSError(28, "No space left on device"), KeyboardInterrupt()])
def test_sidecar_that_cannot_be_published_unpublishes_the_gif(tmp_path, monkeypatch, error):
    def fail(temp, video, suffix):
        assert video.exists()  # the GIF was linked a moment ago
        raise error

    monkeypatch.setattr(video_files, "_claim_sidecar", fail)
    with pytest.raises(VideoWriteError if isinstance(error, OSError) else KeyboardInterrupt) as caught:
        save_video(torch.rand(2, 8, 8, 3), tmp_path, "clip", "gif", VideoSettings(), build_metadata({"1": {}}, None))
    if isinstance(error, OSError):
        assert str(caught.value) == ("Cannot write the sidecar of clip_00001_.gif: No space left on device. "
                                     "Nothing was written.")
    assert list(tmp_path.iterdir()) == []


@pytest.mark.skipif(not hasattr(os, "fork"), reason="needs fork")
def test_a_forked_child_never_removes_its_parents_temp_files(tmp_path):
    with temp_files.temp_file(tmp_path, "clip", ".mp4") as temp:
        child = os.fork()
        if child == 0:  # the child exits the way a normal process does: atexit runs
            temp_files.remove_in_flight()
            os._exit(0)
        os.waitpid(child, 0)
        assert temp.exists()
