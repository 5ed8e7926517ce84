"""Output directories written whole: into a fresh temporary sibling, then renamed into place.

    with output_dir("/tmp/hf_out", overwrite=False, what="export") as tmp:
        write files into tmp
    # /tmp/hf_out now holds exactly those files

A directory that already holds files is refused unless `overwrite`, which replaces it as a
whole: no stale file of an earlier output (an old shard index next to a new single file) can
survive next to the new ones. An interrupted write leaves the old directory untouched and a
`.<name>.tmp-<pid>` sibling behind. In a multi-process job only process 0 writes and renames;
the others get None and must not write.
"""

from __future__ import annotations

import contextlib
import os
import shutil

import jax


def check_writable(path: str, *, overwrite: bool, what: str, flag: str) -> None:
    """Raises FileExistsError when `path` holds files and `overwrite` is off."""
    if os.path.isdir(path) and os.listdir(path) and not overwrite:
        raise FileExistsError(f"{what} directory {path} is not empty; pass {flag} to replace it "
                              f"as a whole, or choose a new directory")
    if os.path.exists(path) and not os.path.isdir(path):
        raise FileExistsError(f"{what} path {path} exists and is not a directory")


@contextlib.contextmanager
def output_dir(path: str | os.PathLike, *, overwrite: bool, what: str = "output",
               flag: str = "--overwrite"):
    """Yields a temporary directory (None on processes other than 0) that replaces `path`
    when the block finishes without an exception."""
    path = os.path.abspath(os.fspath(path))
    check_writable(path, overwrite=overwrite, what=what, flag=flag)
    if jax.process_index() != 0:
        yield None
        return
    parent, name = os.path.split(path)
    os.makedirs(parent, exist_ok=True)
    tmp = os.path.join(parent, f".{name}.tmp-{os.getpid()}")
    shutil.rmtree(tmp, ignore_errors=True)
    os.makedirs(tmp)
    try:
        yield tmp
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    old = None
    if os.path.exists(path):
        old = os.path.join(parent, f".{name}.old-{os.getpid()}")
        os.replace(path, old)
    os.replace(tmp, path)
    if old is not None:
        shutil.rmtree(old, ignore_errors=True)
