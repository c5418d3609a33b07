"""Writing a directory of files (a checkpoint, a saved model) all or nothing.

Files go to a sibling ``<name>.partial`` folder that is renamed into place only once every file
is written. A save that fails halfway (disk full, a crash) therefore never leaves a half-written
directory under the final name, and never replaces a complete one that was there before.
"""

from __future__ import annotations

import contextlib
import errno
import os
import shutil
from pathlib import Path
from typing import Iterator


class DiskFullError(OSError):
    """The disk filled up while saving; the message names the directory and how to make room."""


def is_disk_full(error: BaseException) -> bool:
    if isinstance(error, OSError) and error.errno in (errno.ENOSPC, errno.EDQUOT):
        return True
    # safetensors reports a full disk as SafetensorError("... No space left on device (os error 28)"), without the path.
    text = str(error)
    return "os error 28" in text or "No space left on device" in text


def disk_full_message(directory: Path) -> str:
    try:
        free = f"{shutil.disk_usage(directory.parent).free / 2**20:.1f} MiB free"
    except OSError:
        free = "free space unknown"
    return (
        f"disk full while writing {directory} ({free} on that filesystem): nothing was written under that name and "
        "the previous checkpoints are untouched. Free space there, or point work_dir at a larger disk, then rerun: "
        "the run resumes from its last committed checkpoint"
    )


@contextlib.contextmanager
def atomic_dir(directory: str | Path) -> Iterator[Path]:
    """Yield a scratch folder to fill; on success it becomes ``directory`` (replacing an older one)."""
    directory = Path(directory)
    partial = directory.with_name(directory.name + ".partial")
    shutil.rmtree(partial, ignore_errors=True)  # left by a save that was killed
    try:
        partial.mkdir(parents=True)
        yield partial
        if directory.exists():
            # rename() cannot replace a non-empty folder: move the old one aside first, drop it last.
            old = directory.with_name(directory.name + ".old")
            shutil.rmtree(old, ignore_errors=True)
            os.rename(directory, old)
            os.rename(partial, directory)
            shutil.rmtree(old, ignore_errors=True)
        else:
            os.rename(partial, directory)
    except BaseException as error:
        shutil.rmtree(partial, ignore_errors=True)
        if is_disk_full(error):
            raise DiskFullError(errno.ENOSPC, disk_full_message(directory)) from error
        raise
