"""Written files readable as the umask allows, like every other file a tool writes.

safetensors (0.8) creates its files with mode 0600 whatever the umask: on a shared file
system, collaborators could not read each other's checkpoints and masks.
"""

import os
from pathlib import Path


def honour_umask(path: str | Path) -> None:
    """Give `path` (a file, or every file in a folder) the mode a new file gets here."""
    path = Path(path)
    umask = os.umask(0o022)  # reading the umask means setting it; set straight back
    os.umask(umask)
    for file in [path] if path.is_file() else [p for p in path.rglob("*") if p.is_file()]:
        file.chmod(0o666 & ~umask)
