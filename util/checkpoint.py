"""Checkpoint IO: atomic, versioned saves and safe (`weights_only`) loads of every known format."""
import argparse
import hashlib
import logging
import os
import pickle
import tempfile
import zipfile
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from util.args import first_difference, legacy_settings, setting_name, show
from util.distributed import is_distributed
from util.errors import UserError
from util.faults import fault_point

log = logging.getLogger("hpm")

CHECKPOINT_VERSION = 1
_UMASK = os.umask(0)
os.umask(_UMASK)
FORMAT_PRETRAIN = "hpm-pretrain"
FORMAT_FINETUNE = "hpm-finetune"
FORMAT_LINPROBE = "hpm-linprobe"
SCRIPTS = {FORMAT_PRETRAIN: "main_pretrain.py", FORMAT_FINETUNE: "main_finetune.py",
           FORMAT_LINPROBE: "main_linprobe.py"}   # which script writes each format


def file_sha256(path: str | os.PathLike) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 24), b""):
            digest.update(block)
    return digest.hexdigest()


def checksum_path(path: Path) -> Path:
    """The sidecar holding a checkpoint's SHA-256, in `sha256sum` format (`sha256sum -c` checks it)."""
    return path.with_name(path.name + ".sha256")


def _fsync_dir(directory: Path) -> None:
    dir_fd = os.open(directory, os.O_RDONLY)
    try:
        os.fsync(dir_fd)
    finally:
        os.close(dir_fd)


def _write_replace(path: Path, write, fault: str | None = None) -> None:
    """`write(f)` into a temporary file in the same directory, fsync, then rename over `path`; the
    temporary file is removed on any failure. `fault`: the fault-injection point before the rename."""
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    try:
        with os.fdopen(fd, "wb") as f:
            write(f)
            f.flush()
            os.fsync(f.fileno())
        os.chmod(tmp, 0o666 & ~_UMASK)
        if fault:
            fault_point(fault)
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def write_bytes_atomic(path: str | os.PathLike, data: bytes) -> None:
    """Replace `path` with `data` in one step: readers see the old file or the new one, never a part."""
    _write_replace(Path(path), lambda f: f.write(data))


def save_atomic(obj: Any, path: str | os.PathLike) -> None:
    """torch.save to a temporary file in the same directory, fsync, rename over `path`, then write
    the file's SHA-256 beside it (`<name>.sha256`) the same way."""
    path = Path(path)

    def write_payload(f) -> None:
        fault_point("write")
        torch.save(obj, f)

    _write_replace(path, write_payload, fault="save")
    digest = file_sha256(path)
    _write_replace(checksum_path(path), lambda f: f.write(f"{digest}  {path.name}\n".encode()))
    _fsync_dir(path.parent)


def checkpoint_problem(path: Path) -> str | None:
    """Why `path` cannot be resumed from (damaged: its checksum differs, or unreadable), or None."""
    sidecar = checksum_path(path)
    if sidecar.is_file():
        if file_sha256(path) != (sidecar.read_text().split() or [""])[0]:
            return f"its SHA-256 differs from {sidecar.name} (the file was changed or cut short)"
        return None
    try:
        load_file(path, "--resume", mmap=True)
    except UserError as exc:
        return str(exc).split(": ", 1)[-1]
    return None


def _first_line(exc: BaseException) -> str:
    lines = str(exc).strip().splitlines()
    return f"{type(exc).__name__}: {lines[0][:120]}" if lines else type(exc).__name__


def _torch_load(path: Path, mmap: bool) -> Any:
    with torch.serialization.safe_globals([argparse.Namespace]):
        if mmap and zipfile.is_zipfile(path):
            return torch.load(path, map_location="cpu", weights_only=True, mmap=True)
        return torch.load(path, map_location="cpu", weights_only=True)


def load_file(path: str | os.PathLike, what: str = "--resume", mmap: bool = False) -> dict:
    """Load a checkpoint without running code from it (argparse.Namespace is the only class allowed).

    `mmap` maps the tensors instead of reading them: cheap when only a few entries are needed."""
    path = Path(path)
    if not path.is_file():
        raise UserError(f"{what} {path}: no such file; check the path")
    try:
        obj = _torch_load(path, mmap)
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


WRAPPER_PREFIXES = ("module.", "_orig_mod.")
PRETRAIN_ONLY_PREFIXES = ("decoder_", "mask_token", "vis_mask_token")


def pick_state_dict(ckpt: dict, teacher: bool, path: str | os.PathLike, what: str) -> dict:
    """The weights inside any known checkpoint format; `teacher` picks the EMA teacher where there is one.

    Ours (`format` hpm-*): `model` / `teacher`. Reference HPM: `state_dict` / `ema_state_dict`.
    MAE: `model`. A bare (timm or other) state dict: the dict itself.
    """
    if ckpt.get("format") == FORMAT_PRETRAIN:
        key = "teacher" if teacher else "model"
    elif "state_dict" in ckpt or "ema_state_dict" in ckpt:
        key = "ema_state_dict" if teacher else "state_dict"
    elif isinstance(ckpt.get("model"), dict) or isinstance(ckpt.get("module"), dict):   # VideoMAE: either
        key = "model" if isinstance(ckpt.get("model"), dict) else "module"
        if teacher:
            raise UserError(f"{what} {path}: --teacher asks for the EMA teacher, but this checkpoint has none "
                            f"(an MAE or fine-tuning file); drop --teacher")
    elif ckpt and all(isinstance(v, torch.Tensor) for v in ckpt.values()):
        if teacher:
            raise UserError(f"{what} {path}: --teacher needs a pretraining checkpoint with a teacher; "
                            f"this is a bare state dict, drop --teacher")
        return ckpt
    else:
        raise UserError(f"{what} {path}: no weights found (keys: {', '.join(list(ckpt)[:8])}); expected an HPM, "
                        f"MAE or timm checkpoint")
    state = ckpt.get(key)
    if not isinstance(state, dict):
        raise UserError(f"{what} {path}: the checkpoint holds no '{key}' weights"
                        + ("; it is an MAE-mode run without a teacher, drop --teacher" if teacher else ""))
    return state


def clean_state_dict(state: dict, keep_decoders: bool = False) -> dict:
    """Strip wrapper prefixes (DDP, torch.compile) and (unless `keep_decoders`) drop pretraining-only tensors."""
    cleaned = {}
    for key, value in state.items():
        stripped = True
        while stripped:
            stripped = False
            for prefix in WRAPPER_PREFIXES:
                if key.startswith(prefix):
                    key, stripped = key[len(prefix):], True
        if keep_decoders or not key.startswith(PRETRAIN_ONLY_PREFIXES):
            cleaned[key] = value
    return cleaned


def read_weights(path: str | os.PathLike, teacher: bool = False, what: str = "--finetune") -> dict:
    """The weights of any supported checkpoint file or exported folder, in our key names, with
    wrapper prefixes and pretraining-only tensors removed."""
    from util.formats import read_folder
    path = Path(path)
    if path.is_dir():
        if teacher:
            raise UserError(f"{what} {path}: an exported folder holds one encoder; drop --teacher")
        return clean_state_dict(read_folder(path, what))
    state = pick_state_dict(load_file(path, what), teacher, path, what)
    if "encoder.patch_embed.proj.weight" in state or any(k.endswith("attn.q_bias") for k in state):
        from util.formats import from_videomae
        state = from_videomae(state)   # VideoMAE's own pretraining or fine-tuned layout
    return clean_state_dict(state)


def check_input_kind(state: dict, own: dict, path, what: str) -> None:
    """A one-line error when an image checkpoint meets a video network or back (their patch
    embeddings are Conv2d and Conv3d)."""
    theirs, mine = state.get("patch_embed.proj.weight"), own.get("patch_embed.proj.weight")
    if theirs is None or mine is None or theirs.dim() == mine.dim():
        return
    if mine.dim() == 5:
        raise UserError(f"{what} {path}: an image checkpoint, but the model takes clips; pass a video checkpoint, "
                        f"or an image model (--model vit_*)")
    raise UserError(f"{what} {path}: a video checkpoint, but the model takes images; pass an image checkpoint, "
                    f"or a video model (--model video_vit_*)")


def load_pretrained(model: torch.nn.Module, path: str | os.PathLike, *, teacher: bool = False,
                    what: str = "--finetune", allowed_missing: tuple[str, ...] | None = None) -> list[str]:
    """Load encoder weights from any supported checkpoint into a timm ViT classifier.

    Cleans prefixes, drops decoder / mask-token keys, a head of the wrong shape and (for global
    pooling) the unused `norm`, resamples `pos_embed` to the model's grid, then requires that
    only `allowed_missing` keys (default: head, plus fc_norm for global pooling) are missing.
    Returns the missing keys.
    """
    from util.pos_embed import interpolate_pos_embed

    state = read_weights(path, teacher, what)
    own = model.state_dict()
    check_input_kind(state, own, path, what)
    uses_fc_norm = "fc_norm.weight" in own
    video = own["patch_embed.proj.weight"].dim() == 5
    if allowed_missing is None:
        allowed_missing = ("head.weight", "head.bias") + (("fc_norm.weight", "fc_norm.bias") if uses_fc_norm else ())
    if video:   # clips: the fixed table is the model's own
        state.pop("pos_embed", None)
        allowed_missing = (*allowed_missing, "pos_embed")
    if uses_fc_norm:
        for key in ("norm.weight", "norm.bias"):
            state.pop(key, None)
    for key in ("head.weight", "head.bias"):   # a head of other classes, or a model without one (features)
        if key in state and (key not in own or state[key].shape != own[key].shape):
            del state[key]
    if "pos_embed" in state and "pos_embed" in own and state["pos_embed"].shape != own["pos_embed"].shape:
        prefix = model.num_prefix_tokens if hasattr(model, "num_prefix_tokens") else 1
        state["pos_embed"] = interpolate_pos_embed(state["pos_embed"], tuple(model.patch_embed.grid_size), prefix)
    mismatched = [f"{k} {tuple(v.shape)} vs {tuple(own[k].shape)}" for k, v in state.items()
                  if k in own and v.shape != own[k].shape]
    unexpected = sorted(set(state) - set(own))
    missing = sorted(set(own) - set(state))
    bad_missing = [k for k in missing if k not in allowed_missing]
    if mismatched or unexpected or bad_missing:
        problems = []
        if mismatched:
            problems.append(f"shape mismatch: {', '.join(mismatched[:4])}")
        if bad_missing:
            problems.append(f"missing: {', '.join(bad_missing[:6])}{' ...' if len(bad_missing) > 6 else ''}")
        if unexpected:
            problems.append(f"unexpected: {', '.join(unexpected[:6])}{' ...' if len(unexpected) > 6 else ''}")
        raise UserError(f"{what} {path} does not fit this model ({'; '.join(problems)}); check --model "
                        f"and --global_pool/--cls_token")
    model.load_state_dict(state, strict=False)
    return [k for k in missing if not (video and k == "pos_embed")]


def save_training_checkpoint(paths: list[Path], fmt: str, model_name: str, next_epoch: int, args,
                             states: dict[str, Any]) -> None:
    """One versioned payload (each entry of `states` a module/optimizer/scaler or None), saved atomically."""
    payload = {"format": fmt, "version": CHECKPOINT_VERSION, "model_name": model_name, "next_epoch": next_epoch,
               "args": args_to_dict(args)}
    for key, value in states.items():
        payload[key] = value.state_dict() if hasattr(value, "state_dict") else value
    for path in paths:
        save_atomic(payload, path)


def resume_training(path: Path, fmt: str, model_name: str, states: dict[str, Any]) -> dict:
    """Restore every object of `states` from one of this script's checkpoints; returns the checkpoint.
    The file is memory-mapped: each tensor is read as it is copied into place, not all first."""
    ckpt = load_file(path, "--resume", mmap=True)
    check_format(ckpt, fmt, path)
    if ckpt.get("model_name") != model_name:
        raise UserError(f"--resume {path}: checkpoint of model {ckpt.get('model_name')}, but --model is "
                        f"{model_name}: pass --model {ckpt.get('model_name')} or use another output_dir")
    for key, target in states.items():
        if target is None:
            if ckpt.get(key) is not None:
                raise UserError(f"--resume {path}: the checkpoint holds a '{key}' state that this run would drop; "
                                f"match the flags of the run that wrote it")
            continue
        if ckpt.get(key) is None:
            raise UserError(f"--resume {path}: the checkpoint has no '{key}' state, but this run needs one; "
                            f"match the flags of the run that wrote it")
        if isinstance(ckpt[key], dict) and not ckpt[key]:
            continue  # e.g. the state of a disabled gradient scaler
        try:
            target.load_state_dict(ckpt[key])
        except (RuntimeError, ValueError, KeyError) as exc:
            first = str(exc).strip().splitlines()[0][:200]
            raise UserError(f"--resume {path}: '{key}' does not fit this run ({first}); check --model and "
                            f"flags") from None
    return ckpt


def _numbered(output_dir: Path) -> list[Path]:
    """checkpoint-<epoch>.pth files, newest first."""
    found = [p for p in output_dir.glob("checkpoint-*.pth") if p.stem.split("-", 1)[1].isdigit()]
    return sorted(found, key=lambda p: int(p.stem.split("-", 1)[1]), reverse=True)


def saved_settings(ckpt: dict) -> tuple[dict, bool]:
    """A checkpoint's run settings, and whether they are a legacy `args` (see first_difference)."""
    if isinstance(ckpt.get("settings"), dict):
        return legacy_settings(ckpt["settings"]), False
    return legacy_settings(ckpt.get("args") or {}), True


def check_same_run(path: Path, fmt: str, settings: dict, output_dir: Path) -> None:
    """Auto-resume continues a checkpoint of the same script and settings only: anything else is
    another run, refused in one line before any file is touched."""
    ckpt = load_file(path, "--output_dir", mmap=True)
    if ckpt.get("format") != fmt:
        theirs = SCRIPTS.get(ckpt.get("format"), "another program")
        raise UserError(f"--output_dir {output_dir} holds a run of {theirs} ({path.name}), not of {SCRIPTS[fmt]}: "
                        f"pass another --output_dir for this run")
    difference = first_difference(*saved_settings(ckpt), settings)
    if difference is not None:
        key, then, now = difference
        raise UserError(f"--output_dir {output_dir} holds another run ({path.name}: {setting_name(key)} {show(then)} "
                        f"there, {show(now)} now): pass another --output_dir for a new run, or --resume {path} to "
                        f"continue that one on purpose with these settings")


def find_resume(resume: str | None, auto_resume: bool, output_dir: Path, fmt: str | None = None,
                settings: dict | None = None) -> Path | None:
    """The checkpoint to resume from (`_find_resume`), chosen by rank 0 alone and broadcast to the
    others (the same answer, or the same one-line error, everywhere): only one process hashes
    checkpoints of several GiB on a shared file system."""
    if not is_distributed():
        return _find_resume(resume, auto_resume, output_dir, fmt, settings)
    found: list = [None, None]
    if torch.distributed.get_rank() == 0:
        try:
            found[0] = _find_resume(resume, auto_resume, output_dir, fmt, settings)
        except UserError as exc:
            found[1] = str(exc)
    torch.distributed.broadcast_object_list(found, src=0)
    if found[1] is not None:
        raise UserError(found[1])
    return found[0]


def _find_resume(resume: str | None, auto_resume: bool, output_dir: Path, fmt: str | None = None,
                 settings: dict | None = None) -> Path | None:
    """--resume if given (a damaged file is an error); else, when auto-resuming, the newest intact
    checkpoint of output_dir: checkpoint-last.pth, or (with a warning naming both files) the newest
    numbered one that passes its checksum. Existing checkpoints that are all damaged are an error,
    never a silent start from scratch. With `fmt` and `settings`, auto-resume only continues a
    checkpoint of the same script and settings (check_same_run).

    Also removes the temporary files of saves that a killed run left behind (they are never
    read: a checkpoint only appears under its name once it is complete).
    """
    output_dir = Path(output_dir)
    if resume:
        path = Path(resume)
        problem = checkpoint_problem(path) if path.is_file() else None
        if problem is not None:
            raise UserError(f"--resume {path}: {problem}; use an intact copy or another checkpoint")
        if settings is not None and path.is_file():
            ckpt = load_file(path, "--resume", mmap=True)
            difference = first_difference(*saved_settings(ckpt), settings) if ckpt.get("format") == fmt else None
            if difference is not None:
                key, then, now = difference
                log.warning(f"--resume {path}: continuing on purpose with other settings than the run that wrote "
                            f"it ({setting_name(key)} {show(then)} there, {show(now)} now)")
        _remove_stale(output_dir)
        return path
    if not auto_resume:
        _remove_stale(output_dir)
        return None
    candidates = [p for p in [output_dir / "checkpoint-last.pth", *_numbered(output_dir)] if p.is_file()]
    first_problem = None
    for path in candidates:
        problem = checkpoint_problem(path)
        if problem is None:
            if fmt is not None and settings is not None:
                check_same_run(path, fmt, settings, output_dir)
            if first_problem is not None:
                log.warning(f"{candidates[0]} is damaged ({first_problem}); resuming from {path} instead")
            _remove_stale(output_dir)
            return path
        first_problem = first_problem or problem
    if candidates:
        raise UserError(f"--output_dir {output_dir}: every checkpoint there is damaged ({candidates[0].name}: "
                        f"{first_problem}); restore one from a copy, or pass --no-auto_resume to start afresh")
    _remove_stale(output_dir)
    return None


def _remove_stale(output_dir: Path) -> None:
    for stale in output_dir.glob(".checkpoint-*.tmp"):
        stale.unlink(missing_ok=True)


def finished_run(path: Path | None, fmt: str, model_name: str, epochs: int) -> bool:
    """Whether `path` is a checkpoint of format `fmt` and model `model_name` that already holds every
    one of `epochs` epochs (and no partial one), said in one line. Another kind of file is left to the
    resume's own one-line error."""
    if path is None:
        return False
    ckpt = load_file(path, "--resume", mmap=True)
    finished = (ckpt.get("format") == fmt and ckpt.get("model_name") == model_name
                and int(ckpt.get("next_epoch", 0)) >= epochs and not ckpt.get("next_step"))
    if finished:
        log.info(f"{path} has finished all {epochs} epochs of this run: nothing to do (raise --epochs to train "
                 f"longer, or pass another --output_dir for a new run)")
    return finished


@dataclass
class ResumePoint:
    """Where a run continues: the epoch, the step inside it, and the RNG states saved at that step
    (one entry per rank)."""
    epoch: int = 0
    step: int = 0
    rng: list | None = None

    def __str__(self) -> str:
        return f"epoch {self.epoch}" + (f", step {self.step}" if self.step else "")

    @classmethod
    def from_checkpoint(cls, ckpt: dict) -> "ResumePoint":
        rng = ckpt.get("rng")
        return cls(int(ckpt["next_epoch"]), int(ckpt.get("next_step", 0)), [rng] if isinstance(rng, dict) else rng)

    def rng_of(self, epoch: int, rank: int) -> dict | None:
        """The saved RNG state of `rank` when resuming inside `epoch`, else None."""
        if epoch != self.epoch or not self.step or not self.rng or rank >= len(self.rng):
            return None
        return self.rng[rank]

    def first_step(self, epoch: int) -> int:
        return self.step if epoch == self.epoch else 0
