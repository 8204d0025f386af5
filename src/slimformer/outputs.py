"""Where slimformer writes: checks made before any work, one lock per output, and clean-up after.

Every output is checked at argument time, before a model is loaded: it may not be, contain, or lie
inside the input model or the built-in model cache (a `--overwrite` there would destroy the input),
and its location must accept a file. A `compress` run then holds an exclusive lock on its output for
the whole run, so two runs cannot share one output's resume checkpoint, and under that lock it
removes the temporary siblings a killed run left behind.
"""

from __future__ import annotations

import contextlib
import errno
import fcntl
import os
import re
import secrets
import shutil
import tempfile
from collections.abc import Iterator
from pathlib import Path

from slimformer.errors import UserError


def _resolved(path: Path) -> Path:
    return Path(os.path.abspath(path.expanduser())).resolve()


def protected_paths(*inputs: Path | None) -> dict[Path, str]:
    """The folders no output may touch, with what they are: the input folders and the model cache."""
    from slimformer.models.zoo import cache_dir

    found = {_resolved(cache_dir()): "the built-in model cache"}
    found.update({_resolved(p): "the input model" for p in inputs if p is not None})
    return found


def check_not_protected(out: Path, protected: dict[Path, str], what: str = "output") -> None:
    """UserError if `out` is, holds, or lies inside one of the `protected` folders."""
    target = _resolved(out)
    for folder, label in protected.items():
        if target == folder or folder.is_relative_to(target):
            held = "is" if target == folder else "contains"
            raise UserError(f"{what} '{out}' {held} {label} ('{folder}'): writing there would replace it; "
                            "choose an output outside it.")
        if target.is_relative_to(folder):
            raise UserError(f"{what} '{out}' lies inside {label} ('{folder}'): slimformer never writes into "
                            "its input; choose an output outside it.")


def check_writable(out: Path, what: str = "output") -> None:
    """UserError unless a file can be created where `out` will be (its nearest existing ancestor)."""
    place = Path(os.path.abspath(out.expanduser())).parent
    while not place.exists():
        place = place.parent
    if not place.is_dir():
        raise UserError(f"{what} '{out}': '{place}' is a file, not a folder.")
    try:
        fd, probe = tempfile.mkstemp(prefix=".slimformer-probe-", dir=place)
    except OSError as exc:
        raise UserError(f"{what} '{out}': cannot write in '{place}' ({exc.strerror or exc}); choose a writable "
                        "location.") from None
    os.close(fd)
    os.unlink(probe)


def check_folder_output(out: str | Path, *, protected: dict[Path, str], overwrite: bool) -> Path:
    """An output folder, checked before any work: absent or empty, or replaceable with `overwrite`."""
    out = Path(out).expanduser()
    if out.exists() and not out.is_dir():
        raise UserError(f"output '{out}' is a file, not a folder; choose a folder path.")
    if out.exists() and not overwrite and any(out.iterdir()):
        raise UserError(f"output folder '{out}' already exists and is not empty; choose another path or pass "
                        "--overwrite.")
    check_not_protected(out, protected)
    check_writable(out)
    return out


def check_file_output(out: str | Path, *, protected: dict[Path, str], what: str = "output",
                      overwrite: bool = True) -> Path:
    """An output file (--json, .onnx), checked before any work: its folder exists and is writable."""
    out = Path(out).expanduser()
    if out.is_dir():
        raise UserError(f"{what} '{out}' is a folder; give a file path.")
    if out.exists() and not overwrite:
        raise UserError(f"{what} '{out}' already exists; choose another path or pass --overwrite.")
    if not out.parent.is_dir():
        raise UserError(f"{what}: folder '{out.parent}' does not exist.")
    check_not_protected(out, protected, what)
    check_writable(out, what)
    return out


@contextlib.contextmanager
def atomic_file(out: Path) -> Iterator[Path]:
    """A temporary sibling of `out` to write one file into; renamed to `out` when the block finishes,
    removed if it fails: never a half-written file at `out`."""
    tmp = out.with_name(f".{out.name}.tmp-{os.getpid()}")
    try:
        yield tmp
        os.replace(tmp, out)
    finally:
        tmp.unlink(missing_ok=True)


def write_text_atomic(path: Path, text: str) -> None:
    """Write `path` through a temporary sibling and a rename."""
    with atomic_file(path) as tmp:
        tmp.write_text(text)


@contextlib.contextmanager
def atomic_folder(out: Path) -> Iterator[Path]:
    """A temporary sibling of `out` to write a folder into (`.NAME.tmp-XXXXXXXX`, readable as the umask
    allows); when the block finishes it replaces `out` whole, and if the block fails it is removed."""
    tmp = out.with_name(f".{out.name}.tmp-{secrets.token_hex(4)}")
    tmp.mkdir()
    try:
        yield tmp
        swap_in(tmp, out)
    finally:
        if tmp.exists():
            shutil.rmtree(tmp, ignore_errors=True)


def swap_in(tmp: Path, out: Path) -> None:
    """Put the finished folder `tmp` at `out`, replacing whatever is there: the old folder is renamed
    aside first and removed after, so `out` never holds a half-written result."""
    if out.exists():
        old = out.with_name(f".{out.name}.old-{os.getpid()}")
        os.replace(out, old)
        os.replace(tmp, out)
        shutil.rmtree(old, ignore_errors=True)
    else:
        os.replace(tmp, out)


class OutputLock:
    """An exclusive lock on one output for the whole run (`.<name>.lock` beside it; flock, so a killed
    run's lock is released by the kernel). A second run against a locked output is a UserError."""

    def __init__(self, out: Path) -> None:
        self.out = Path(os.path.abspath(out))
        self.path = self.out.parent / f".{self.out.name}.lock"
        self._fd: int | None = None
        self._made: list[Path] = []

    def __enter__(self) -> "OutputLock":
        missing = []
        place = self.out.parent
        while not place.exists():
            missing.append(place)
            place = place.parent
        for folder in reversed(missing):
            folder.mkdir()
            self._made.append(folder)
        while True:
            fd = os.open(self.path, os.O_RDWR | os.O_CREAT, 0o644)
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except BlockingIOError:
                os.close(fd)
                self._remove_made()
                raise UserError(f"output '{self.out}' is being written by another slimformer run (lock "
                                f"'{self.path}'); wait for it to finish or choose another output.") from None
            try:  # the file may have been unlinked by a run that finished between our open and flock
                same = os.stat(self.path).st_ino == os.fstat(fd).st_ino
            except FileNotFoundError:
                same = False
            if same:
                break
            os.close(fd)
        self._fd = fd
        remove_stale(self.out)
        return self

    def __exit__(self, *exc: object) -> None:
        if self._fd is not None:
            self.path.unlink(missing_ok=True)  # unlinked while held: see the inode check above
            os.close(self._fd)
            self._fd = None
        if not self.out.exists():
            self._remove_made()

    def _remove_made(self) -> None:
        for folder in reversed(self._made):
            try:
                folder.rmdir()  # only if still empty
            except OSError:
                break
        self._made = []


def remove_stale(out: Path) -> None:
    """Remove the temporary siblings of `out` that an interrupted run left (`.NAME.tmp-*`, `.NAME.old-*`).
    Call it only under the output's lock: then no other run is writing them."""
    if not out.parent.is_dir():
        return
    stale = re.compile(re.escape(f".{out.name}.") + r"(tmp-[A-Za-z0-9_]{8}|old-\d+)")
    for sibling in out.parent.iterdir():
        if stale.fullmatch(sibling.name):
            if sibling.is_dir() and not sibling.is_symlink():
                shutil.rmtree(sibling, ignore_errors=True)
            else:
                sibling.unlink(missing_ok=True)


def no_space_error(exc: BaseException, out: Path, needed_bytes: int) -> UserError | None:
    """A UserError for a full disk while writing `out` (ENOSPC or EDQUOT, also when a library wraps
    it, as safetensors does), saying how much the output needs; None for any other failure."""
    full = getattr(exc, "errno", None) in (errno.ENOSPC, errno.EDQUOT) or any(
        text in str(exc) for text in ("No space left on device", "os error 28", "Disk quota exceeded"))
    if not full:
        return None
    place = out.parent if out.parent.exists() else Path(tempfile.gettempdir())
    free = shutil.disk_usage(place).free
    return UserError(f"no space left on the device while writing '{out}': the output needs up to "
                     f"{needed_bytes / 1e6:.0f} MB and {free / 1e6:.1f} MB are free in '{place}'; free some space "
                     "or choose another location (nothing was written).")
