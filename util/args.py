"""Argument groups shared by every script (each script adds its own on top via `parents=`)."""
import argparse
import tempfile
from pathlib import Path

from util.errors import UserError


def add_bad_images_flag(group) -> None:
    group.add_argument("--bad_images", choices=["stop", "skip"], default="stop",
                       help="an unreadable image stops the run (naming the file), or is skipped with a warning")


def common_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(add_help=False)
    g = p.add_argument_group("training")
    g.add_argument("--batch_size", type=int, default=64, help="images per process per step")
    g.add_argument("--epochs", type=int, default=40)
    g.add_argument("--accum_iter", type=int, default=1,
                   help="gradient accumulation steps (effective batch = batch_size x accum_iter x processes)")
    g.add_argument("--model", type=str, help="registered model name")
    g.add_argument("--input_size", type=int, default=None, help="image size (default: the model's)")
    g.add_argument("--weight_decay", type=float, default=0.05)
    g.add_argument("--lr", type=float, default=None,
                   help="absolute learning rate (default: blr x effective batch / 256)")
    g.add_argument("--blr", type=float, default=1e-3, help="base learning rate for an effective batch of 256")
    g.add_argument("--min_lr", type=float, default=0.0, help="floor of the cosine schedule")
    g.add_argument("--warmup_epochs", type=float, default=5)
    g.add_argument("--clip_grad", type=float, default=None, help="clip gradients to this total norm")
    g.add_argument("--amp", choices=["auto", "fp16", "bf16", "none"], default="auto",
                   help="mixed precision; auto = bf16 on GPUs that support it, none on CPU")
    g = p.add_argument_group("data")
    g.add_argument("--data_path", type=str, default=None,
                   help="DIR with train/ and val/ ImageFolders or train.txt/val.txt lists; "
                        "default: the built-in scikit-learn digits")
    add_bad_images_flag(g)
    g.add_argument("--num_workers", type=int, default=2)
    g.add_argument("--pin_mem", action="store_true", default=True, help="pin loader memory (GPU only)")
    g.add_argument("--no_pin_mem", action="store_false", dest="pin_mem")
    g = p.add_argument_group("output and resuming")
    g.add_argument("--output_dir", type=str, default="./output_dir", help="checkpoints and log.txt")
    g.add_argument("--log_dir", type=str, default=None, help="tensorboard events (default: output_dir)")
    g.add_argument("--save_every", type=int, default=20, help="also keep checkpoint-<epoch>.pth every N epochs")
    g.add_argument("--print_freq", type=int, default=20, help="log every N steps (the only host syncs)")
    g.add_argument("--resume", type=str, default=None, help="checkpoint to resume from")
    g.add_argument("--auto_resume", action=argparse.BooleanOptionalAction, default=True,
                   help="resume from output_dir/checkpoint-last.pth when it exists")
    g.add_argument("--start_epoch", type=int, default=0, help="first epoch when not resuming")
    g = p.add_argument_group("runtime")
    g.add_argument("--device", type=str, default="auto", help="auto, cpu, cuda or cuda:N")
    g.add_argument("--seed", type=int, default=0)
    g.add_argument("--world_size", type=int, default=1, help="set by the launcher (torchrun/submitit)")
    g.add_argument("--dist_url", type=str, default="env://")
    return p


def check_common(args: argparse.Namespace) -> None:
    """Flag checks that need no data or model; each failure is one line naming the flag."""
    for flag in ("batch_size", "epochs", "accum_iter", "save_every", "print_freq"):
        if getattr(args, flag) < 1:
            raise UserError(f"--{flag} {getattr(args, flag)} must be at least 1")
    if args.num_workers < 0:
        raise UserError(f"--num_workers {args.num_workers} must be 0 or more")
    if args.warmup_epochs < 0:
        raise UserError(f"--warmup_epochs {args.warmup_epochs} must be 0 or more")


def check_output_dir(path: str, flag: str = "--output_dir") -> Path:
    """Create the directory if needed and prove it is writable, without touching existing files."""
    out = Path(path)
    try:
        out.mkdir(parents=True, exist_ok=True)
        tempfile.NamedTemporaryFile(dir=out, prefix=".write-test-").close()   # created, then deleted
    except OSError as exc:
        raise UserError(f"{flag} {out}: cannot write there ({exc.strerror or exc}); choose a writable "
                        f"directory") from None
    return out


def effective_lr(args: argparse.Namespace, world_size: int) -> float:
    eff_batch = args.batch_size * args.accum_iter * world_size
    return args.lr if args.lr is not None else args.blr * eff_batch / 256


