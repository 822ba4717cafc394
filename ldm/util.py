"""Plumbing shared by every part of the project: config-to-object, crash-safe file writes, a script's exit code."""
from __future__ import annotations

import importlib
import os
import secrets
import sys
from contextlib import contextmanager
from pathlib import Path
from typing import Any, Callable, Iterator, Mapping


class ConfigError(ValueError):
    """A user-facing configuration problem; main.py prints it as one line."""


def get_obj_from_str(path: str) -> Any:
    """Import ``package.module.Name`` and return ``Name``."""
    if not isinstance(path, str) or "." not in path:
        raise ConfigError(f"target {path!r} is not an import path like 'package.module.Class'")
    module_name, attr = path.rsplit(".", 1)
    try:
        module = importlib.import_module(module_name)
    except ModuleNotFoundError as err:
        # Only blame the target when the missing module is the target's own, not one of its imports.
        if err.name and module_name.startswith(err.name):
            raise ConfigError(f"target {path!r}: module {module_name!r} does not import ({err})") from err
        raise
    try:
        return getattr(module, attr)
    except AttributeError as err:
        import difflib

        close = difflib.get_close_matches(attr, [n for n in dir(module) if not n.startswith("_")], n=2)
        hint = f"; did you mean {' or '.join(close)}?" if close else ""
        raise ConfigError(f"target {path!r}: module {module_name!r} has no attribute {attr!r}{hint}") from err


def instantiate_from_config(config: Mapping | None, **extra: Any) -> Any:
    """Build ``target(**params, **extra)`` from a ``{target, params}`` mapping.

    The strings ``__is_first_stage__`` and ``__is_unconditional__`` are kept for CompVis compatibility
    and mean "no object".
    """
    if config is None or config in ("__is_first_stage__", "__is_unconditional__"):
        return None
    if "target" not in config:
        raise ConfigError(f"expected a 'target' key in config block with keys {sorted(config)}")
    params = dict(config.get("params") or {})
    params.update(extra)
    return get_obj_from_str(config["target"])(**params)


def count_params(module, trainable_only: bool = False) -> int:
    return sum(p.numel() for p in module.parameters() if p.requires_grad or not trainable_only)


PARTIAL_GLOB = ".*.part"  # the names ``atomic_path`` writes to; what an interrupted write may leave behind


@contextmanager
def atomic_path(path: str | os.PathLike, durable: bool = False) -> Iterator[Path]:
    """A temporary path beside ``path`` to write the file to; renamed over ``path`` when the ``with`` block ends
    normally, deleted when it raises (Ctrl-C included), so ``path`` is always the complete old file or the complete
    new one, never half of either.

    The name is hidden and unique (``.<name>.<pid>-<random>.part``, same folder, so the rename is atomic): a scan
    for ``*.png`` or ``*.ckpt`` never meets a partial file and two processes never write the same one. It ends in
    ``.part``, so PIL needs ``format=`` to save there. ``durable``: also fsync the file before the rename and the
    folder after it, so a power cut cannot leave the new name pointing at unwritten data (for checkpoints).
    """
    path = Path(path)
    tmp = path.with_name(f".{path.name}.{os.getpid()}-{secrets.token_hex(4)}.part")
    try:
        yield tmp
        if durable:
            with open(tmp, "rb+") as f:
                os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise
    if durable:
        _fsync_dir(path.parent)


def _fsync_dir(directory: Path) -> None:
    """Persist a rename; without this a power loss can roll the directory entry back."""
    try:
        fd = os.open(directory, os.O_RDONLY)
    except OSError:  # platforms that cannot open directories
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)


def run_cli(action: Callable[..., Any], *args: Any, errors: tuple[type[BaseException], ...] = (),
            interrupted: str | None = None) -> int:
    """A script's exit code for ``action(*args)``: the int it returns (0 when it returns anything else); 2 after
    one ``error:`` line when the user's input is wrong (a ``ConfigError``, or one of the script's ``errors``);
    with ``interrupted`` (for work that a re-run resumes), 130 after that line when Ctrl-C stops it."""
    try:
        result = action(*args)
    except (ConfigError, *errors) as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        if interrupted is None:
            raise
        print(interrupted, file=sys.stderr)
        return 130
    return result if isinstance(result, int) and not isinstance(result, bool) else 0
