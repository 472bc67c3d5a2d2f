"""Files replaced atomically: a reader sees the old content or the new, never part of either.

Used for secrets (the Cognito refresh-token cache, the local CA's key) as much as for
certificates, so the temporary file is created 0600 (``mkstemp``) and gets its final mode
only once written: a secret is never readable by others, even for an instant.
"""

from __future__ import annotations

import contextlib
import os
import tempfile
from pathlib import Path


def replace_file(target: Path, content: bytes, mode: int = 0o600) -> None:
    """Write ``content`` to a temporary file beside ``target``, flush it to disk, then rename it over ``target``."""
    descriptor, temporary = tempfile.mkstemp(dir=target.parent, prefix=f".{target.name}.", suffix=".tmp")
    try:
        with os.fdopen(descriptor, "wb") as file:
            file.write(content)
            file.flush()
            os.fsync(file.fileno())
        os.chmod(temporary, mode)
        os.replace(temporary, target)
    except BaseException:
        with contextlib.suppress(OSError):
            os.unlink(temporary)
        raise
