"""Which side files of an input model (tokenizer files, configs) raymerge may copy into an output.

A side file is copied only if it is a regular file of at most ``SIDE_FILE_BYTES`` that lies in the
model's directory: a ``tokenizer.json`` that is a symlink to ``~/.ssh/id_rsa`` or ``/dev/zero``
must not end up in (or fill) a published model. Two kinds of symlink leading out are accepted: the
Hugging Face hub cache's (snapshot files link into the repository's ``blobs/``), and a link to the
file of the same name in another model directory (one holding weights), as in a directory of
symlinks built to pair a model with another's tokenizer. Each check runs before any compute, so
a refused file costs nothing; the copy itself reads at most the cap.
"""

from __future__ import annotations

import os
import stat
from collections.abc import Iterable

from raymerge.engine.errors import CheckpointError
from raymerge.engine.storage import is_local, join_url, local_path

SIDE_FILE_BYTES = 64 << 20  # Llama 3's tokenizer.json is 9 MB; the largest real ones are tens of MB


def _inside(path: str, directory: str) -> bool:
    return os.path.commonpath([path, directory]) == directory


def _hub_blob(model_dir: str, target: str) -> bool:
    """Whether ``target`` is a blob of the hub cache repository that ``model_dir`` is a snapshot of
    (``…/models--org--name/snapshots/<rev>`` → ``…/models--org--name/blobs/<sha>``)."""
    snapshots = os.path.dirname(model_dir)
    if os.path.basename(snapshots) != "snapshots":
        return False
    return os.path.dirname(target) == os.path.join(os.path.dirname(snapshots), "blobs")


def _same_file_of_another_model(name: str, target: str) -> bool:
    """Whether ``target`` is the file of the same name in another model directory (one with weights):
    a directory of symlinks into another model, as built to give a model another tokenizer."""
    if os.path.basename(target) != name:
        return False
    try:
        siblings = os.listdir(os.path.dirname(target))
    except OSError:
        return False
    return any(
        f.endswith((".safetensors", ".safetensors.index.json")) or f.startswith("pytorch_model") for f in siblings
    )


def check_side_file(model: str, name: str, *, limit: int | None = None) -> bool:
    """True if model directory ``model`` has a copyable side file ``name``, False if it has none;
    ``CheckpointError`` (one line naming the file) if it has one that must not be copied.
    Remote files are not checked here: they are read with the size cap when copied."""
    if not is_local(model):
        return True
    limit = SIDE_FILE_BYTES if limit is None else limit
    directory = os.path.realpath(local_path(model))
    path = join_url(local_path(model), name)
    if not os.path.lexists(path):
        return False
    hint = "replace it with the real file inside the model directory, or pass --no-copy-tokenizer"
    target = os.path.realpath(path)
    if not (_inside(target, directory) or _hub_blob(directory, target) or _same_file_of_another_model(name, target)):
        raise CheckpointError(
            f"{name} is a symlink to {target}, outside the model directory; it is not copied", file=path, hint=hint
        )
    try:
        st = os.stat(path)
    except OSError as exc:
        raise CheckpointError(f"cannot read {name}: {exc.strerror}", file=path, hint=hint) from None
    if not stat.S_ISREG(st.st_mode):
        raise CheckpointError(f"{name} is not a regular file (a directory, FIFO or device)", file=path, hint=hint)
    if st.st_size > limit:
        raise CheckpointError(
            f"{name} is {st.st_size} bytes, more than the {limit}-byte limit for a side file", file=path, hint=hint
        )
    return True


def check_side_files(model: str, names: Iterable[str]) -> list[str]:
    """The names among ``names`` that ``model`` has, each checked by ``check_side_file``."""
    return [n for n in names if check_side_file(model, n)]


__all__ = ["SIDE_FILE_BYTES", "check_side_file", "check_side_files"]
