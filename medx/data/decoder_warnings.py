"""Decoder warnings that exist only on the C stderr: libjpeg's "Corrupt JPEG data".

A JPEG whose scan has bytes zeroed or scrambled still decodes: libjpeg (inside OpenCV) prints
"Corrupt JPEG data: premature end of data segment" to file descriptor 2, fills in what it
could not read, and OpenCV returns the wrong image as if nothing had happened. Neither OpenCV
nor Pillow hands the warning to the caller (Pillow drops it), so that stream is the one place
it exists.

`map_watching_decoders` runs a decode pass in a thread pool with descriptor 2 routed through
a pipe; a reader thread passes everything on to the real stderr except decoder warnings, which
it counts. A pass that saw none (nearly every pass) cost one pipe and nothing else. Which files
warned cannot be told from one stream shared by all threads, in which any other thread of the
process may also write, so a pass that saw warnings has its files decoded again in a child
process, whose stderr only its own decoders write to: there a watched pass and a bisection
(halves decoded again in parallel, a lone suspect decoded alone) find each file for sure.
"""

from __future__ import annotations

import json
import logging
import os
import subprocess
import sys
import threading
from collections.abc import Callable, Iterable, Sequence
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import TypeVar

import cv2
import numpy as np

log = logging.getLogger(__name__)

Item = TypeVar("Item")
Result = TypeVar("Result")

# libjpeg's warnings about the image data (jerror.h, JWRN_*). "Unknown JFIF revision" and
# "Unknown Adobe color transform" are left out: they concern metadata, the pixels are fine.
WARNINGS = (
    b"Corrupt JPEG data",
    b"Premature end of JPEG file",
    b"Inconsistent progression sequence",
    b"Invalid SOS parameters for sequential JPEG",
)
_SYNC = b"\x00medx-stderr-sync\x00"
_ONE_PASS = threading.Lock()


class _Tap:
    """Descriptor 2 through a pipe while it is open; decoder warnings are kept, the rest passed
    on to the real stderr."""

    def __init__(self) -> None:
        sys.stderr.flush()
        self._restore = os.dup(2)
        forward = os.dup(2)
        read_end, write_end = os.pipe()
        os.dup2(write_end, 2)
        os.close(write_end)
        self._changed = threading.Condition()
        self._warnings: list[str] = []
        self._syncs_seen = 0
        self._syncs_sent = 0
        self._pump = threading.Thread(
            target=self._run, args=(read_end, forward), name="medx-stderr", daemon=True
        )
        self._pump.start()

    def close(self) -> None:
        """Give descriptor 2 back; the pump ends when the last writer lets go of the pipe."""
        sys.stderr.flush()
        os.dup2(self._restore, 2)
        os.close(self._restore)
        self._pump.join(timeout=1.0)  # a child process may hold the pipe: it keeps forwarding

    def sync(self) -> list[str]:
        """Decoder warnings written since the last sync (everything written before is read)."""
        with self._changed:
            self._syncs_sent += 1
            wanted = self._syncs_sent
        os.write(2, _SYNC + b"\n")
        with self._changed:
            if not self._changed.wait_for(lambda: self._syncs_seen >= wanted, timeout=10.0):
                raise RuntimeError("the stderr reader thread stopped answering")
            found, self._warnings = self._warnings, []
        return found

    def _run(self, read_end: int, forward: int) -> None:
        pending = b""
        try:
            while chunk := os.read(read_end, 1 << 16):
                pending += chunk
                *lines, pending = pending.split(b"\n")
                for line in lines:
                    self._line(line, forward, newline=True)
                # A line written in one piece (libjpeg's, ours) may still arrive split in two:
                # hold back a tail that could be the start of one, pass anything else on now.
                if pending and not _could_be_ours(pending):
                    os.write(forward, pending)
                    pending = b""
        except OSError:  # the real stderr is gone: nothing left to forward to
            pass
        finally:
            if pending:
                self._line(pending, forward, newline=False)
            os.close(read_end)
            os.close(forward)

    def _line(self, line: bytes, forward: int, newline: bool) -> None:
        syncs = line.count(_SYNC)
        line = line.replace(_SYNC, b"")
        if line.startswith(WARNINGS):
            with self._changed:
                self._warnings.append(line.decode(errors="replace").strip())
        elif line or (newline and not syncs):
            os.write(forward, line + (b"\n" if newline and not syncs else b""))
        if syncs:
            with self._changed:
                self._syncs_seen += syncs
                self._changed.notify_all()


def _could_be_ours(tail: bytes) -> bool:
    if _SYNC[:1] in tail:
        return True
    return any(w.startswith(tail[: len(w)]) for w in WARNINGS) and len(tail) < 512


def map_watching_decoders(
    fn: Callable[[Item], Result],
    items: Sequence[Item],
    files: Callable[[Item], Iterable[Path]],
    workers: int,
    name: str = "medx-decode",
) -> tuple[list[Result], dict[int, tuple[Path, str]]]:
    """``fn`` over ``items`` in a thread pool, and {index: (file, decoder warning)} for the
    items one of whose ``files(item)`` made a decoder warn. ``fn`` must not raise (return the
    error instead)."""
    if not items:
        return [], {}
    with _ONE_PASS, ThreadPoolExecutor(max_workers=workers, thread_name_prefix=name) as pool:
        try:
            tap = _Tap()
        except OSError as err:  # no descriptor 2 to watch (a daemon): decode unwatched
            log.debug("Decoder warnings not watched: %s", err)
            return list(pool.map(fn, items)), {}
        try:
            results = list(pool.map(fn, items))
            seen = tap.sync()
        finally:
            tap.close()
    if not seen:
        return results, {}
    log.info("Decoders warned %d times; decoding the files again to find which", len(seen))
    paths = list(dict.fromkeys(Path(f) for item in items for f in files(item)))
    warned = warned_files(paths, workers)
    blamed: dict[int, tuple[Path, str]] = {}
    for i, item in enumerate(items):
        for path in map(Path, files(item)):
            if path in warned:
                blamed[i] = (path, warned[path])
                break
    return results, blamed


def warned_files(paths: Sequence[Path], workers: int) -> dict[Path, str]:
    """{file: its first decoder warning} of the JPEGs among ``paths`` that make libjpeg warn,
    found in a child process (see the module); in this process if no child can be started."""
    request = json.dumps({"paths": [str(p) for p in paths], "workers": workers})
    try:
        done = subprocess.run(
            [sys.executable, "-m", __name__],
            input=request,
            capture_output=True,
            text=True,
            timeout=120 + len(paths),
            check=True,
        )
        found = json.loads(done.stdout)
    except (OSError, ValueError, subprocess.SubprocessError) as err:
        log.warning("Finding the files that made decoders warn in this process instead (%s)", err)
        found = _find([str(p) for p in paths], workers)
    return {Path(p): warning for p, warning in found.items()}


def _decode_jpeg(path: str) -> None:
    """Decode a JPEG as medx.data.io does (other files: nothing to do, libjpeg never sees them)."""
    data = np.fromfile(path, np.uint8)
    if data[:2].tobytes() == b"\xff\xd8":
        cv2.imdecode(data, cv2.IMREAD_ANYDEPTH | cv2.IMREAD_ANYCOLOR)


def _find(paths: list[str], workers: int) -> dict[str, str]:
    """{file: warning}: one watched pass over ``paths``, then bisection. Exact when no other
    thread decodes JPEGs meanwhile, as in the child process."""
    with _ONE_PASS, ThreadPoolExecutor(max_workers=workers) as pool:
        tap = _Tap()
        try:
            for _ in pool.map(_decode_jpeg, paths):
                pass
            seen = len(tap.sync())
            everything = list(range(len(paths)))
            blamed = _bisect(_decode_jpeg, paths, everything, seen, pool, tap) if seen else {}
        finally:
            tap.close()
    return {paths[i]: warning for i, warning in sorted(blamed.items())}


def _bisect(
    fn: Callable[[Item], object],
    items: Sequence[Item],
    group: list[int],
    expected: int,
    pool: ThreadPoolExecutor,
    tap: _Tap,
) -> dict[int, str]:
    """{index: warning} of the members of ``group``, which made about ``expected`` warnings:
    the first half is decoded again (in parallel) and counted, the second half gets the rest;
    a lone suspect is decoded alone and must warn again."""
    if len(group) == 1:
        fn(items[group[0]])
        found = tap.sync()
        return {group[0]: found[0]} if found else {}
    first, second = group[: len(group) // 2], group[len(group) // 2 :]
    for _ in pool.map(fn, [items[i] for i in first]):
        pass
    in_first = len(tap.sync())
    blamed = _bisect(fn, items, first, in_first, pool, tap) if in_first else {}
    if expected > in_first:
        blamed |= _bisect(fn, items, second, expected - in_first, pool, tap)
    return blamed


if __name__ == "__main__":  # the child process of warned_files
    request = json.load(sys.stdin)
    json.dump(_find(request["paths"], request["workers"]), sys.stdout)
