"""Crash-safe checkpoints: ``accelerator.save_state`` into a temporary folder, then an atomic rename.

Layout under a run's ``output_dir``::

    checkpoints/checkpoint-00000040/   model, optimiser, scheduler, RNG states (accelerate) + trainer_state.json
    checkpoints/checkpoint-00000080/   ... the last ``keep_last`` complete ones
    best/                              the best model so far by a validation metric (save_pretrained)

A checkpoint is first written to ``checkpoints/.tmp-checkpoint-<step>``; ``trainer_state.json``
(training progress plus the size of every file) is written last and everything is fsync-ed; only
then is the folder renamed to ``checkpoint-<step>``. A rename within one file system is atomic,
so a run killed at any moment, or a disk that fills up mid-write, leaves either the complete new
checkpoint or none: the previous one is untouched, and older ones are pruned only once the new one
is complete. :func:`find_latest_checkpoint` picks the newest folder whose ``trainer_state.json``
parses and whose files all have their recorded sizes, skipping partial or damaged ones.
"""

from __future__ import annotations

import json
import logging
import os
import re
import shutil
from collections.abc import Callable
from pathlib import Path
from typing import Any

logger = logging.getLogger(__name__)

CHECKPOINT_PREFIX = "checkpoint-"
TMP_PREFIX = ".tmp-"
STATE_FILE = "trainer_state.json"
_CHECKPOINT_RE = re.compile(rf"^{CHECKPOINT_PREFIX}(\d+)$")


def _fsync_tree(directory: Path) -> None:
    """Flush every file under ``directory`` (and the folders themselves) to disk."""
    for root, _, files in os.walk(directory):
        for name in files:
            with open(os.path.join(root, name), "rb") as handle:
                os.fsync(handle.fileno())
        _fsync_dir(Path(root))


def _fsync_dir(directory: Path) -> None:
    try:
        fd = os.open(directory, os.O_RDONLY)
    except OSError:  # some platforms cannot open folders; the rename is still atomic
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)


def _file_sizes(directory: Path) -> dict[str, int]:
    return {
        path.relative_to(directory).as_posix(): path.stat().st_size
        for path in sorted(directory.rglob("*"))
        if path.is_file() and path.name != STATE_FILE
    }


def _replace_directory(source: Path, target: Path) -> None:
    """Move the complete folder ``source`` to ``target`` atomically, replacing an existing ``target``.

    A folder cannot be renamed over a non-empty one, so an existing target is first renamed aside
    (``.tmp-old-<name>``) and deleted after the swap; :func:`_recover_swapped` undoes a crash in
    between.
    """
    aside = target.parent / f"{TMP_PREFIX}old-{target.name}"
    if aside.exists():
        shutil.rmtree(aside)
    if target.exists():
        os.replace(target, aside)
    os.replace(source, target)
    _fsync_dir(target.parent)
    if aside.exists():
        shutil.rmtree(aside, ignore_errors=True)


def _recover_swapped(target: Path) -> None:
    """If a crash happened between the two renames of :func:`_replace_directory`, put the old folder back."""
    aside = target.parent / f"{TMP_PREFIX}old-{target.name}"
    if aside.exists() and not target.exists():
        os.replace(aside, target)


def write_directory_atomically(target: str | Path, write: Callable[[Path], None]) -> Path:
    """Call ``write(tmp_folder)``, flush it, then move it to ``target`` in one rename.

    On any error the temporary folder is removed and ``target`` is left as it was.
    """
    target = Path(target)
    target.parent.mkdir(parents=True, exist_ok=True)
    _recover_swapped(target)
    tmp = target.parent / f"{TMP_PREFIX}{target.name}"
    if tmp.exists():
        shutil.rmtree(tmp)
    tmp.mkdir()
    try:
        write(tmp)
        _fsync_tree(tmp)
        _replace_directory(tmp, target)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return target


def checkpoint_step(path: str | Path) -> int | None:
    """The step number of a ``checkpoint-<step>`` folder name, or ``None``."""
    match = _CHECKPOINT_RE.match(Path(path).name)
    return int(match.group(1)) if match else None


def read_checkpoint_state(path: str | Path) -> dict[str, Any] | None:
    """The trainer state saved with a checkpoint, or ``None`` if the checkpoint is partial or damaged."""
    path = Path(path)
    try:
        manifest = json.loads((path / STATE_FILE).read_text(encoding="utf-8"))
        files = manifest["files"]
        for name, size in files.items():
            if (path / name).stat().st_size != size:
                return None
        return manifest["trainer_state"]
    except (OSError, ValueError, KeyError, TypeError):
        return None


def is_valid_checkpoint(path: str | Path) -> bool:
    """Whether ``path`` is a complete checkpoint (state file readable, every file at its recorded size)."""
    return read_checkpoint_state(path) is not None


def list_checkpoints(directory: str | Path, valid_only: bool = True) -> list[Path]:
    """``checkpoint-<step>`` folders under ``directory``, oldest first (only complete ones by default)."""
    directory = Path(directory)
    if not directory.is_dir():
        return []
    found = [p for p in directory.iterdir() if p.is_dir() and checkpoint_step(p) is not None]
    found.sort(key=checkpoint_step)
    if valid_only:
        for path in found:
            if not is_valid_checkpoint(path):
                logger.warning("Ignoring incomplete or damaged checkpoint %s.", path)
        found = [p for p in found if is_valid_checkpoint(p)]
    return found


def find_latest_checkpoint(directory: str | Path) -> Path | None:
    """The newest complete checkpoint under ``directory``, or ``None`` if there is none."""
    found = list_checkpoints(directory)
    return found[-1] if found else None


class CheckpointManager:
    """Saves and prunes ``accelerator.save_state`` checkpoints under ``directory``, crash-safely.

    Every process must call :meth:`save` (accelerate writes one RNG-state file per process);
    only the main process writes the state file, renames and prunes. The folder must be on a
    file system shared by all processes (as ``accelerator.save_state`` itself assumes).
    """

    def __init__(self, directory: str | Path, accelerator: Any, keep_last: int = 2):
        if keep_last < 1:
            raise ValueError(f"keep_last must be >= 1 (the checkpoint to resume from), got {keep_last}.")
        self.directory = Path(directory)
        self.accelerator = accelerator
        self.keep_last = keep_last

    def path_for(self, step: int) -> Path:
        return self.directory / f"{CHECKPOINT_PREFIX}{step:08d}"

    def latest(self) -> Path | None:
        return find_latest_checkpoint(self.directory)

    def save(self, step: int, trainer_state: dict[str, Any]) -> Path:
        """Write checkpoint ``step`` (accelerate state + ``trainer_state``) atomically; prune old ones.

        If a complete checkpoint of this step already exists it is kept as it is. On failure
        (e.g. ``OSError`` for a full disk) the partial folder is removed and the error re-raised;
        existing checkpoints are untouched.
        """
        accelerator = self.accelerator
        target = self.path_for(step)
        if self._on_main_process(lambda: is_valid_checkpoint(target)):
            return target
        tmp = self.directory / f"{TMP_PREFIX}{target.name}"
        if accelerator.is_main_process:
            self.directory.mkdir(parents=True, exist_ok=True)
            _recover_swapped(target)
            if tmp.exists():
                shutil.rmtree(tmp)
            tmp.mkdir()
        accelerator.wait_for_everyone()
        try:
            accelerator.save_state(str(tmp))
            accelerator.wait_for_everyone()
            if accelerator.is_main_process:
                manifest = {"step": step, "trainer_state": trainer_state, "files": _file_sizes(tmp)}
                with open(tmp / STATE_FILE, "w", encoding="utf-8") as handle:
                    json.dump(manifest, handle, indent=2)
                _fsync_tree(tmp)
                _replace_directory(tmp, target)
                self.prune()
        except BaseException:
            if accelerator.is_main_process:
                shutil.rmtree(tmp, ignore_errors=True)
            raise
        accelerator.wait_for_everyone()
        return target

    def _on_main_process(self, question: Callable[[], bool]) -> bool:
        """Answer ``question`` on the main process and share the answer: every process must take the same branch."""
        answer = [question() if self.accelerator.is_main_process else None]
        if self.accelerator.num_processes > 1:
            from accelerate.utils import broadcast_object_list

            broadcast_object_list(answer)
        return bool(answer[0])

    def load(self, path: str | Path) -> dict[str, Any]:
        """Restore the accelerate state (model, optimiser, scheduler, RNG) from ``path``; return the trainer state."""
        state = read_checkpoint_state(path)
        if state is None:
            raise ValueError(f"{str(path)!r} is not a complete checkpoint (no readable {STATE_FILE} or missing files).")
        self.accelerator.load_state(str(path))
        return state

    def prune(self) -> None:
        """Delete all but the newest ``keep_last`` complete checkpoints, and leftovers of interrupted writes."""
        complete = list_checkpoints(self.directory)
        for old in complete[: -self.keep_last]:
            shutil.rmtree(old, ignore_errors=True)
        newest = checkpoint_step(complete[-1]) if complete else None
        for path in self.directory.iterdir():
            step = checkpoint_step(path)
            # A damaged checkpoint older than a complete one can never be the one to resume from.
            if step is not None and newest is not None and step < newest and not is_valid_checkpoint(path):
                shutil.rmtree(path, ignore_errors=True)


__all__ = [
    "CheckpointManager",
    "checkpoint_step",
    "find_latest_checkpoint",
    "is_valid_checkpoint",
    "list_checkpoints",
    "read_checkpoint_state",
    "write_directory_atomically",
]
