"""Claiming ``<runs_dir>/<name>`` for one run: exclusively (a lock beside it, released by the
kernel if the process dies), never deleting a folder that is not an ncfast run, and under
``--overwrite`` building the new run beside the old one and swapping it in only once the new run
has written its first checkpoint, so a run that fails before that leaves the old one byte for
byte."""

from __future__ import annotations

import ctypes
import errno
import fcntl
import fnmatch
import os
import shutil
from pathlib import Path

from .checkpoint import CHECKPOINT, CONFIG, PREVIOUS, RUN_FILES, CheckpointError
from .config import ConfigError, show_value


def _foreign(path: Path) -> list[str]:
    """The entries of ``path`` that are not run files."""
    return sorted(p.name for p in path.iterdir()
                  if not any(fnmatch.fnmatchcase(p.name, pat) for pat in RUN_FILES))


def _nonempty(path: Path) -> bool:
    return path.is_dir() and any(path.iterdir())


def _swap_names(b: Path) -> tuple[Path, Path]:
    """Where the fallback swap of run folder ``b`` parks the old run, and its marker file."""
    return b.with_name(f".{b.name}.old"), b.with_name(f".{b.name}.swap")


def _marker_text(folder: Path) -> str:
    st = os.lstat(folder)  # device and inode: kept by rename, so they name the parked folder
    return f"ncfast swap {st.st_dev} {st.st_ino}\n"


def _reads(marker: Path, prefix: str) -> bool:
    try:
        return marker.is_file() and marker.read_text().startswith(prefix)
    except (OSError, UnicodeDecodeError):
        return False


def _exchange(a: Path, b: Path) -> None:
    """Swap two folders in one step (Linux renameat2 RENAME_EXCHANGE); where that is missing,
    three renames through ``.<b>.old``, marked by ``.<b>.swap`` so that
    :meth:`RunFolder._recover` completes them after a kill (and touches nothing else)."""
    try:
        libc = ctypes.CDLL(None, use_errno=True)
        if libc.renameat2(-100, os.fsencode(a), -100, os.fsencode(b), 2) == 0:
            return
    except (AttributeError, OSError):
        pass
    old, marker = _swap_names(b)
    with open(marker, "x") as f:  # never over a file of the user's
        f.write(_marker_text(b))
    os.rename(b, old)
    os.rename(a, b)
    os.rename(old, a)
    marker.unlink()


class RunFolder:
    """The claimed run folder. ``path`` is where the run writes now: the run folder itself, or
    under ``--overwrite`` of an existing run a staging folder beside it until :meth:`commit`."""

    def __init__(self, run_dir: Path, resume: bool, overwrite: bool):
        self.final = run_dir
        self.path = run_dir
        self.staging: Path | None = None
        self._lock_file = run_dir.with_name(f".{run_dir.name}.lock")
        self._created: list[Path] = []  # runs_dir and the parents this claim made, deepest first
        self._fd: int | None = None
        self._claim(resume, overwrite)

    # -- claiming -----------------------------------------------------------------------

    def _lock(self) -> None:
        runs_dir = self.final.parent
        try:
            if not runs_dir.is_dir():
                missing = [p for p in (runs_dir, *runs_dir.parents) if not p.exists()]
                runs_dir.mkdir(parents=True, exist_ok=True)  # another run may make it too
                self._created = missing
            while True:  # the lock file may be replaced between open and flock: retry
                fd = os.open(self._lock_file, os.O_RDWR | os.O_CREAT, 0o644)
                try:
                    fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
                except BlockingIOError:
                    os.close(fd)
                    self._remove_runs_dir()
                    raise ConfigError(f"run folder {str(self.final)!r} is in use by another "
                                      f"ncfast train process; wait for it to end, or choose "
                                      f"another name=") from None
                try:
                    same = os.stat(self._lock_file).st_ino == os.fstat(fd).st_ino
                except FileNotFoundError:
                    same = False
                if same:
                    self._fd = fd
                    return
                os.close(fd)
        except OSError as err:
            self._remove_runs_dir()
            raise ConfigError(f"config key 'runs_dir' must be a folder this process can write "
                              f"to, got {show_value(str(runs_dir))} ({err.strerror or err})") \
                from None

    def _claim(self, resume: bool, overwrite: bool) -> None:
        if resume and overwrite:
            raise ConfigError("pass --resume or --overwrite, not both")
        self._lock()
        try:
            self._recover()
            self._check(resume, overwrite)
        except BaseException:
            self.release()
            raise

    def _recover(self) -> None:
        """Finish what a process killed inside :meth:`commit` or before it left behind."""
        old, marker = _swap_names(self.final)
        # killed inside the fallback swap with the old run parked at old (a folder of that name
        # that the marker does not name is the user's, and stays as it is)
        if os.path.lexists(old) and _reads(marker, _marker_text(old)):
            if not os.path.lexists(self.final):  # before the new run moved in: put it back
                os.rename(old, self.final)
            elif old.is_symlink():
                old.unlink()
            else:
                shutil.rmtree(old)
        if not os.path.lexists(old) and _reads(marker, "ncfast swap "):
            marker.unlink()  # the swap's marker, its parked folder put back, deleted or not made
        stale = self.final.with_name(f".{self.final.name}.new")
        if stale.is_dir():  # a new run that never reached its first checkpoint
            if _foreign(stale):
                raise ConfigError(f"{str(stale)!r} is in the way of --overwrite and holds "
                                  f"files that are not a run's; move it away")
            shutil.rmtree(stale)

    def _check(self, resume: bool, overwrite: bool) -> None:
        where = repr(str(self.final))
        if self.final.exists() and not self.final.is_dir():
            raise ConfigError(f"run folder {where} exists and is not a folder; choose another "
                              f"name=")
        exists = _nonempty(self.final)
        foreign = _foreign(self.final) if exists else []
        is_run = exists and not foreign and (self.final / CONFIG).is_file()
        has_checkpoint = (self.final / CHECKPOINT).is_file()
        shown = ", ".join(repr(n) for n in foreign[:5]) + (", ..." if len(foreign) > 5 else "")
        if resume and foreign and (self.final / CONFIG).is_file():
            # a run folder with files of the user's added: resume does not write beside them
            raise ConfigError(f"cannot resume run folder {where}: it holds {shown}, which a run "
                              f"does not write; move them out of the folder and run --resume "
                              f"again")
        if exists and not is_run:
            raise ConfigError(f"{where} exists and is not an ncfast run folder (it holds "
                              f"{shown or 'no config.yaml'}); it is never replaced or deleted: "
                              f"choose another name= or runs_dir=")
        if exists and not has_checkpoint and not overwrite and (self.final / PREVIOUS).is_file():
            # checkpoint.pt removed by hand: the one that remains is the way on, not --overwrite
            raise CheckpointError(f"run folder {where} has no {CHECKPOINT} but has {PREVIOUS}: "
                                  f"to resume from it, move it over {CHECKPOINT} (mv "
                                  f"{str(self.final / PREVIOUS)!r} "
                                  f"{str(self.final / CHECKPOINT)!r}) and run --resume")
        if resume:
            if not has_checkpoint:
                hint = ("the run stopped before its first checkpoint; start it again with "
                        "--overwrite" if exists else "start the run without --resume")
                raise CheckpointError(f"cannot resume: no checkpoint at "
                                      f"{str(self.final / CHECKPOINT)!r}; {hint}")
            return
        if exists and not overwrite:
            if has_checkpoint:
                raise ConfigError(f"run folder {where} already exists; pass --resume to "
                                  f"continue it, --overwrite to replace it, or choose another "
                                  f"name=")
            raise ConfigError(f"run folder {where} holds a run that stopped before its first "
                              f"checkpoint (nothing to resume); pass --overwrite to start it "
                              f"again, or choose another name=")
        if exists:  # --overwrite of a run: build beside it
            in_the_way = [p for p in _swap_names(self.final) if os.path.lexists(p)]
            if in_the_way:  # not the swap's (recovered above): the user's, left untouched
                raise ConfigError(f"{str(in_the_way[0])!r} is in the way of --overwrite (the "
                                  f"swap of the new run for the old one may need that name); "
                                  f"it is not ncfast's and is left untouched: move or rename it")
            self.staging = self.final.with_name(f".{self.final.name}.new")
            self.path = self.staging

    # -- writing ------------------------------------------------------------------------

    def create(self) -> None:
        """Make the folder the run writes to (after every check and load has passed)."""
        self.path.mkdir(exist_ok=True)

    def commit(self) -> None:
        """Under --overwrite: swap the new run in for the old one (called after the new run's
        first checkpoint) and delete the old run. A no-op otherwise."""
        if self.staging is None:
            return
        if not os.path.lexists(self.final):  # the old run was removed meanwhile: no swap
            os.rename(self.staging, self.final)
        else:
            _exchange(self.staging, self.final)
            if self.staging.is_symlink():  # the run folder was a link: drop it, keep its target
                self.staging.unlink()
            else:
                shutil.rmtree(self.staging)
        self.staging, self.path = None, self.final

    def release(self) -> None:
        """Drop an uncommitted staging folder and the lock (always call it, also on errors)."""
        if self.staging is not None and self.staging.exists():
            shutil.rmtree(self.staging)
        self.staging = None
        if self._fd is not None:
            try:
                os.unlink(self._lock_file)
            except FileNotFoundError:
                pass
            os.close(self._fd)
            self._fd = None
        self._remove_runs_dir()

    def _remove_runs_dir(self) -> None:
        for folder in self._created:
            try:
                os.rmdir(folder)  # only if nothing was written there
            except OSError as err:
                if err.errno not in (errno.ENOTEMPTY, errno.EEXIST, errno.ENOENT):
                    raise
                break
