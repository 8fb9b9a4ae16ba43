"""Reads a TensorBoard logdir at full resolution, without TensorFlow.

A run is any directory (at any depth, the logdir itself included) holding
files whose name contains ``"tfevents"``; its name is its path relative to
the logdir with ``/`` separators (``"."`` for the logdir itself).

Every record is read (no sampling) and CRC-checked. Bad data never raises:
truncated, corrupt or foreign files become warnings naming the file, and the
other files and runs still load. A missing logdir, or one without event
files, raises `LogdirError`.

Parsed files are cached by path: a file whose size and modification time did
not change is not read again, and a file that grew is read from where the
last read stopped (event files are append-only). The cache is what makes
repeated calls (the TensorBoard plugin polls) cheap. The cache keeps each
file's data as a few compact float64 arrays per tag (no per-record objects),
and returned `RunData` objects share those arrays whenever no sorting or
merging is needed: their arrays are read-only (writing raises ValueError).
Files are read in bounded chunks (`CHUNK_BYTES`), never whole.
"""

from __future__ import annotations

import dataclasses
import os
import threading

from tb_stability.reader import hparams
from tb_stability.reader.assemble import build_run
from tb_stability.reader.decode import FileState, read_file_into
from tb_stability.rundata import RunData, mark_held_out

__all__ = ["Logdir", "LogdirError", "LogdirReader", "load_logdir", "load_run"]

EVENT_FILE_MARKER = "tfevents"


class LogdirError(Exception):
    """The logdir is missing, not a directory, unreadable or holds no event files."""


@dataclasses.dataclass
class Logdir:
    """What `load_logdir` found.

    Attributes:
      path: The logdir as given.
      runs: Run name -> `RunData`.
      warnings: Problems not tied to one run (unreadable directories, ...).
        Per-file problems are in each run's ``warnings``.
    """

    path: str
    runs: dict[str, RunData] = dataclasses.field(default_factory=dict)
    warnings: list[str] = dataclasses.field(default_factory=list)


def _is_event_file(name: str) -> bool:
    return EVENT_FILE_MARKER in name


def file_order(name: str) -> tuple:
    """Sort key putting a run's event files in the order they were written.

    Names are ``events.out.tfevents.<time>.<host>.<pid>.<n>...`` (TensorFlow's
    and this project's writers): the numbers compare as numbers, so that the
    tenth file a process opens in one second (``.10``) comes after its ninth
    (``.9``), where the plain name would put it first.
    """
    return tuple((0, int(part), "") if part.isdigit() else (1, 0, part)
                 for part in name.split("."))


def find_runs(root: str, warnings: list[str]) -> dict[str, list[os.DirEntry]]:
    """Walks ``root`` and returns run name -> event file entries (in `file_order`).

    Symbolic links to directories are not followed (no cycles); unreadable
    directories become warnings.
    """
    runs: dict[str, list[os.DirEntry]] = {}
    stack = [root]
    while stack:
        directory = stack.pop()
        try:
            with os.scandir(directory) as iterator:
                entries = list(iterator)
        except OSError as error:
            rel = os.path.relpath(directory, root).replace(os.sep, "/")
            warnings.append(f"cannot read directory {rel!r}: {error.strerror or error}")
            continue
        files = []
        for entry in entries:
            try:
                if entry.is_dir(follow_symlinks=False):
                    stack.append(entry.path)
                elif _is_event_file(entry.name) and entry.is_file():
                    files.append(entry)
            except OSError:
                continue
        if files:
            name = os.path.relpath(directory, root).replace(os.sep, "/")
            runs[name] = sorted(files, key=lambda e: file_order(e.name))
    return runs


class LogdirReader:
    """A logdir reader with a per-file cache; thread-safe.

    Most callers use the module-level `load_logdir`, which shares one instance.
    """

    def __init__(self):
        self._lock = threading.Lock()
        self._files: dict[str, FileState] = {}
        self._runs: dict[tuple[str, str], tuple[tuple, RunData]] = {}

    def load_logdir(self, path: str | os.PathLike) -> Logdir:
        """Loads every run under ``path``; see `tb_stability.reader.load_logdir`."""
        root = _check_dir(path)
        result = Logdir(path=os.fspath(path))
        with self._lock:
            found = find_runs(root, result.warnings)
            if not found:
                raise LogdirError(f"no TensorBoard event files under {os.fspath(path)!r}")
            for name, entries in found.items():
                result.runs[name] = self._load(root, name, entries)
            self._forget_missing(root, found)
        mark_held_out(result.runs)
        result.runs.update(hparams.adopt_timestamped_sessions(result.runs))
        return result

    def load_run(self, path: str | os.PathLike, name: str = ".") -> RunData:
        """Loads the event files directly inside ``path`` as one run."""
        root = _check_dir(path)
        with self._lock:
            try:
                with os.scandir(root) as iterator:
                    entries = [e for e in iterator if _is_event_file(e.name) and e.is_file()]
            except OSError as error:
                raise LogdirError(f"cannot read {os.fspath(path)!r}: {error}") from error
            if not entries:
                raise LogdirError(f"no TensorBoard event files in {os.fspath(path)!r}")
            return self._load(root, name, sorted(entries, key=lambda e: file_order(e.name)),
                              label_root=root)

    def clear(self) -> None:
        """Forgets every cached file."""
        with self._lock:
            self._files.clear()
            self._runs.clear()

    def _load(self, root, name, entries, label_root=None) -> RunData:
        states = [self._read(entry, os.path.relpath(entry.path, label_root or root))
                  for entry in entries]
        signature = tuple(
            (s.path, s.size, s.mtime_ns, s.offset, len(s.all_warnings())) for s in states
        )
        # Keyed by (root, name), not by the joined path: the same directory is
        # run "a/b" under one logdir and run "b" under "<logdir>/a".
        key = (root, name)
        cached = self._runs.get(key)
        if cached is None or cached[0] != signature:
            cached = (signature, build_run(name, states))
            self._runs[key] = cached
        run = cached[1]
        return dataclasses.replace(run, warnings=list(run.warnings))

    def _read(self, entry: os.DirEntry, label: str) -> FileState:
        path = os.path.abspath(entry.path)
        label = label.replace(os.sep, "/")
        state = self._files.get(path)
        if state is not None and state.label != label:
            state = None  # read before under another logdir: warnings must name it anew
        try:
            stat = os.stat(path)
        except OSError as error:
            return _failed(path, label, error)
        if state is not None and (state.size, state.mtime_ns) == (stat.st_size, stat.st_mtime_ns):
            return state
        if state is None or state.dead or stat.st_size < state.size:
            state = FileState(path=path, label=label)
        start = state.offset
        try:
            with open(path, "rb") as handle:
                handle.seek(start)
                end = _read_chunks(state, handle, start, stat.st_size)
        except OSError as error:
            self._files.pop(path, None)
            return _failed(path, label, error)
        finally:
            state.consolidate()
        state.size, state.mtime_ns = end, stat.st_mtime_ns
        if state.size == 0:
            state.tail_warning = f"{label}: empty event file (0 bytes)"
        self._files[path] = state
        return state

    def _forget_missing(self, root: str, found: dict) -> None:
        present = {os.path.abspath(e.path) for entries in found.values() for e in entries}
        prefix = os.path.join(os.path.abspath(root), "")
        for path in [p for p in self._files if p.startswith(prefix) and p not in present]:
            del self._files[path]
        run_keys = {(root, name) for name in found}
        for key in [k for k in self._runs if k[0] == root and k not in run_keys]:
            del self._runs[key]


# Files are read in chunks of this many bytes (more for a larger record), so
# reading never holds a whole big file in memory.
CHUNK_BYTES = 16 << 20


def _read_chunks(state: FileState, handle, start: int, size: int) -> int:
    """Parses ``handle`` from ``start`` to its end into ``state``; returns the end offset.

    ``size`` is the file size from ``stat``: a file found corrupt is not read
    further, and counts as read up to there.
    """
    carry = b""
    while True:
        chunk = handle.read(CHUNK_BYTES)
        data = carry + chunk if carry else chunk
        read_file_into(state, data, start)
        end = start + len(data)
        if len(chunk) < CHUNK_BYTES or state.dead:
            return max(end, size) if state.dead else end
        # Continue from the first record not consumed (an incomplete one).
        carry = data[state.offset - start:]
        start = state.offset


def _failed(path: str, label: str, error: OSError) -> FileState:
    state = FileState(path=path, label=label)
    state.warnings.append(f"{label}: cannot read file: {error.strerror or error}")
    return state


def _check_dir(path) -> str:
    try:
        text = os.fspath(path)
    except TypeError as error:
        raise LogdirError(f"not a path: {path!r}") from error
    if not os.path.exists(text):
        raise LogdirError(f"logdir {text!r} does not exist")
    if not os.path.isdir(text):
        raise LogdirError(f"logdir {text!r} is not a directory")
    return os.path.abspath(text)


_DEFAULT_READER = LogdirReader()


def load_logdir(path: str | os.PathLike) -> Logdir:
    """Loads every run under a logdir at full resolution.

    Args:
      path: The logdir.

    Returns:
      A `Logdir` with ``runs`` (name -> `RunData`) and logdir-level warnings.

    Raises:
      LogdirError: If ``path`` does not exist, is not a directory or holds no
        event files.
    """
    return _DEFAULT_READER.load_logdir(path)


def load_run(path: str | os.PathLike, name: str = ".") -> RunData:
    """Loads the event files directly inside one run directory.

    Args:
      path: The run directory.
      name: The run name to report (``"."`` by default).

    Raises:
      LogdirError: If ``path`` is missing or holds no event files.
    """
    return _DEFAULT_READER.load_run(path, name)
