"""Written files: whole or not at all, with the umask's mode, each at a named crash point.

safetensors (0.8) creates its files with mode 0600 whatever the umask: on a shared file
system, collaborators could not read each other's checkpoints and masks. Every file the
package writes goes through `atomic`, which gives it the umask's mode.
"""

import errno
import os
import shutil
from contextlib import contextmanager
from pathlib import Path

from opdgeo.crash import crash_point

# What a user can do about the file-system errors they meet; a rerun goes on from the last
# checkpoint or score a killed or failed job kept.
FILE_SYSTEM_FIXES = {
    errno.ENOSPC: "no space left on the device: free some (old results/, the Hugging Face "
                  "cache) or write to a larger disk, then run again",
    errno.EDQUOT: "disk quota exceeded: free some of your space or write elsewhere, then run "
                  "again",
    errno.EACCES: "permission denied: make it writable for you (chmod, chown) or run in a "
                  "folder you own",
    errno.EPERM: "operation not permitted: make it yours (chown) or run in a folder you own",
    errno.EROFS: "read-only file system: run from a writable copy of the folder",
}
# How libraries that are not Python name these errors (safetensors' Rust I/O errors,
# torch.save's stream writer on a full disk).
FOREIGN_NAMES = {"os error 28": errno.ENOSPC, "No space left on device": errno.ENOSPC,
                 "file write failed": errno.ENOSPC, "os error 122": errno.EDQUOT,
                 "os error 13": errno.EACCES, "os error 30": errno.EROFS}


def file_system_errno(error: BaseException) -> int | None:
    """The file-system error a user can fix (FILE_SYSTEM_FIXES) behind `error`, or None."""
    code = getattr(error, "errno", None)
    if code in FILE_SYSTEM_FIXES:
        return code
    return next((c for name, c in FOREIGN_NAMES.items() if name in str(error)), None)


def error_line(error: BaseException) -> str:
    """One line for an error: for a file-system error, what, which path and the fix."""
    code = file_system_errno(error)
    if code is None:
        return str(error)
    return f"{FILE_SYSTEM_FIXES[code]} ({getattr(error, 'filename', None) or error})"


def honour_umask(path: str | Path) -> None:
    """Give `path` (a file, or every file and folder in a folder) the mode a new one gets here."""
    path = Path(path)
    umask = os.umask(0o022)  # reading the umask means setting it; set straight back
    os.umask(umask)
    if path.is_file():
        path.chmod(0o666 & ~umask)
        return
    path.chmod(0o777 & ~umask)
    for item in path.rglob("*"):
        item.chmod((0o777 if item.is_dir() else 0o666) & ~umask)


def remove(path: str | Path) -> None:
    """Remove a file or a folder, if it is there."""
    path = Path(path)
    if path.is_dir() and not path.is_symlink():
        shutil.rmtree(path)
    else:
        path.unlink(missing_ok=True)


def link(source: str | Path, target: str | Path) -> None:
    """`target` as hard links to `source` (a file, or every file of a folder): a second name
    for written bytes, without copying them."""
    source = Path(source)
    if source.is_dir():
        shutil.copytree(source, target, copy_function=os.link)
    else:
        os.link(source, target)


def temporary_name(path: str | Path) -> Path:
    """Where `atomic` writes `path` before renaming it (a kill can leave it behind)."""
    path = Path(path)
    return path.with_name(path.name + ".tmp")


@contextmanager
def atomic(path: str | Path, point: str):
    """A temporary sibling to write `path` (a file, or a folder) into. When the block
    completes, the temporary gets the umask's mode and, after the crash point `point`
    (opdgeo.crash), replaces `path`: a kill or a full disk leaves the previous complete
    output or none, never a part. A block that fails removes its temporary."""
    path = Path(path)
    tmp = temporary_name(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    remove(tmp)  # a killed attempt's
    try:
        yield tmp
        honour_umask(tmp)
        crash_point(point)
        if path.is_dir():
            shutil.rmtree(path)
        tmp.replace(path)
    except Exception as error:
        code = file_system_errno(error)
        if code is not None and not isinstance(error, OSError):  # named with its path
            raise OSError(code, os.strerror(code), str(path)) from error
        raise
    finally:
        remove(tmp)
