"""Checkpoint IO: atomic, versioned saves and safe (`weights_only`) loads of every known format."""
import argparse
import os
import pickle
import tempfile
import zipfile
from pathlib import Path
from typing import Any

import torch

from util.errors import UserError

CHECKPOINT_VERSION = 1
_UMASK = os.umask(0)
os.umask(_UMASK)
FORMAT_PRETRAIN = "hpm-pretrain"
FORMAT_FINETUNE = "hpm-finetune"
FORMAT_LINPROBE = "hpm-linprobe"


def save_atomic(obj: Any, path: str | os.PathLike) -> None:
    """torch.save to a temporary file in the same directory, fsync, then rename over `path`."""
    path = Path(path)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    try:
        with os.fdopen(fd, "wb") as f:
            torch.save(obj, f)
            f.flush()
            os.fsync(f.fileno())
        os.chmod(tmp, 0o666 & ~_UMASK)
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
    dir_fd = os.open(path.parent, os.O_RDONLY)
    try:
        os.fsync(dir_fd)
    finally:
        os.close(dir_fd)


def _first_line(exc: BaseException) -> str:
    lines = str(exc).strip().splitlines()
    return f"{type(exc).__name__}: {lines[0][:120]}" if lines else type(exc).__name__


def load_file(path: str | os.PathLike, what: str = "--resume") -> dict:
    """Load a checkpoint without running code from it (argparse.Namespace is the only class allowed)."""
    path = Path(path)
    if not path.is_file():
        raise UserError(f"{what} {path}: no such file; check the path")
    try:
        with torch.serialization.safe_globals([argparse.Namespace]):
            obj = torch.load(path, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as exc:
        text = str(exc)
        if "Weights only load failed" in text:
            detail = next((ln.strip() for ln in text.splitlines() if "nsupported" in ln), "disallowed object")
            raise UserError(f"{what} {path}: refused to load, the file would run code or build objects other "
                            f"than tensors and plain containers ({detail[:160]}); load only checkpoints "
                            f"you trust, re-saved as a plain state dict") from None
        raise UserError(f"{what} {path}: not a readable checkpoint ({_first_line(exc)}); "
                        f"is it truncated? use an intact copy") from None
    except Exception as exc:  # the unpickler and zip reader raise many kinds on a damaged file
        raise UserError(f"{what} {path}: not a readable checkpoint ({_first_line(exc)}); "
                        f"is it truncated or another kind of file? use an intact copy") from None
    if not isinstance(obj, dict):
        raise UserError(f"{what} {path}: expected a checkpoint dict, found {type(obj).__name__}")
    return obj


def args_to_dict(args: argparse.Namespace) -> dict:
    return {k: (str(v) if isinstance(v, Path) else v) for k, v in vars(args).items()}


def check_format(ckpt: dict, expected: str, path: str | os.PathLike, what: str = "--resume") -> None:
    """Resuming needs a checkpoint written by the same kind of script."""
    found = ckpt.get("format")
    if found != expected:
        kind = found or "a foreign or pretrained-weights file"
        raise UserError(f"{what} {path}: this is {kind}, not a {expected} checkpoint; resume only from this "
                        f"script's own checkpoints (use --finetune to start from pretrained weights)")
    if ckpt.get("version", 0) > CHECKPOINT_VERSION:
        raise UserError(f"{what} {path}: written by a newer version ({ckpt['version']}) of this code; upgrade")
