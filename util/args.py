"""Argument parsers shared by every script: each script builds its parser from these parents and
adds its own group on top, so a flag is declared once for the whole project."""
import argparse
import tempfile
from pathlib import Path

from util.errors import UserError
from util.precision import AMP_CHOICES


class HelpFormatter(argparse.ArgumentDefaultsHelpFormatter):
    """Shows each flag's default once, and none for flags whose help already says it or that have none."""

    def _get_help_string(self, action: argparse.Action) -> str:
        text = action.help or ""
        if "default" in text or action.default in (None, argparse.SUPPRESS) or action.default is False:
            return text
        return super()._get_help_string(action)


def make_parser(description: str, parents: list[argparse.ArgumentParser], add_help: bool = True,
                **defaults) -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description=description, add_help=add_help, parents=parents, formatter_class=HelpFormatter)
    p.set_defaults(**defaults)
    return p


def model_parser(model_names: list[str], default: str) -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(add_help=False)
    g = p.add_argument_group("model")
    g.add_argument("--model", type=str, default=default,
                   help=f"registered model name (default: {default}); one of {', '.join(model_names)}")
    g.add_argument("--input_size", type=int, default=None, help="image size (default: the model's)")
    return p


def data_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(add_help=False)
    g = p.add_argument_group("data")
    g.add_argument("--data_path", type=str, default=None,
                   help="DIR with train/ and val/ ImageFolders or train.txt/val.txt lists (pretraining: any folder "
                        "of images, at any depth, no labels needed); WebDataset shards (a brace pattern such as "
                        "'shards/{split}-{000..099}.tar', a folder of .tar, or DIR/train/*.tar and DIR/val/*.tar); "
                        "hf:DIR for a local Hugging Face dataset (save_to_disk or Parquet) "
                        "(default: the built-in scikit-learn digits)")
    g.add_argument("--image_column", type=str, default="image", help="hf:DIR: the column holding the images")
    g.add_argument("--label_column", type=str, default="label",
                   help="hf:DIR: the column holding the labels (fine-tuning, probing, kNN)")
    g.add_argument("--bad_images", choices=["stop", "skip"], default="stop",
                   help="an unreadable image stops the run (naming the file), or is skipped with a warning")
    g.add_argument("--video_decoder", choices=["auto", "pyav", "torchcodec"], default="auto",
                   help="videos of a --data_path list file: torchcodec (needs the system's FFmpeg libraries) or "
                        "PyAV (needs nothing more); auto: torchcodec where it loads, else PyAV (the same frames but for "
                        "odd frame sizes, whose colour conversion can differ by a few levels)")
    g.add_argument("--mean", type=float, nargs=3, default=None, metavar=("R", "G", "B"),
                   help="per-channel mean to normalise with (with --std); default: the pretraining checkpoint's "
                        "statistics, else ImageNet's")
    g.add_argument("--std", type=float, nargs=3, default=None, metavar=("R", "G", "B"),
                   help="per-channel std to normalise with (with --mean)")
    g.add_argument("--batch_size", type=int, default=64, help="images per process per step")
    g.add_argument("--num_workers", type=int, default=2, help="data-loading worker processes per process")
    g.add_argument("--pin_mem", action=argparse.BooleanOptionalAction, default=True,
                   help="pin loader memory for faster host-to-GPU copies (GPU only)")
    return p


BUILT_IN_CROP_SCALE, CROP_SCALE = (0.5, 1.0), (0.08, 1.0)


def augmentation_parser() -> argparse.ArgumentParser:
    """The training crop and flip of fine-tuning and linear probing. Their defaults depend on the
    data: MAE's protocol on a --data_path, milder on the built-in digits (32 px digits lose their
    class in a crop of 8 % of their area, and a mirrored 2, 3 or 7 is no longer that digit)."""
    p = argparse.ArgumentParser(add_help=False)
    g = p.add_argument_group("augmentation")
    g.add_argument("--crop_scale", type=float, nargs=2, default=None, metavar=("MIN", "MAX"),
                   help=f"area range of the random resized crop (default: {CROP_SCALE[0]} {CROP_SCALE[1]}, MAE's; "
                        f"{BUILT_IN_CROP_SCALE[0]} {BUILT_IN_CROP_SCALE[1]} on the built-in digits)")
    g.add_argument("--hflip", type=float, default=None,
                   help="probability of a horizontal flip (default: 0.5; 0 on the built-in digits, whose "
                        "labels a mirror changes; 0 for any labels that tell left from right)")
    return p


def resolve_augmentation(args: argparse.Namespace) -> None:
    """Fill in --crop_scale and --hflip from the data when they were not given (see augmentation_parser)."""
    built_in = args.data_path is None
    if args.crop_scale is None:
        args.crop_scale = list(BUILT_IN_CROP_SCALE if built_in else CROP_SCALE)
    if args.hflip is None:
        args.hflip = 0.0 if built_in else 0.5
    low, high = args.crop_scale
    if not 0.0 < low <= high <= 1.0:
        raise UserError(f"--crop_scale {low:g} {high:g} must satisfy 0 < MIN <= MAX <= 1, e.g. 0.08 1")
    if not 0.0 <= args.hflip <= 1.0:
        raise UserError(f"--hflip {args.hflip:g} is a probability: use a value in [0, 1]")


def clip_parser(training: bool) -> argparse.ArgumentParser:
    """How the video classifiers (video_vit_*) read clips: VideoMAE's sampling and test views. The
    built-in moving digits are 16 frames and are taken whole (one temporal view)."""
    p = argparse.ArgumentParser(add_help=False)
    g = p.add_argument_group("clips (video_vit_* models)")
    g.add_argument("--num_frames", type=int, default=None, help="frames per clip (default: the model's, 16)")
    g.add_argument("--sampling", choices=["dense", "segment"], default="dense",
                   help="dense: frames --sampling_rate apart from a random start (Kinetics); segment: one frame "
                        "of each of num_frames equal segments (TSN; Something-Something)")
    g.add_argument("--sampling_rate", type=int, default=4, help="dense: frames between sampled frames")
    g.add_argument("--test_clips", type=int, default=1,
                   help="temporal views of each validation video (VideoMAE: 5 on Kinetics, 2 on SSv2)")
    g.add_argument("--test_crops", type=int, default=1,
                   help="spatial views along the long side of each temporal view (VideoMAE: 3); the scores "
                        "(softmax) of all views are averaged")
    g.add_argument("--single_frame", action="store_true",
                   help="show the network every clip's middle frame repeated: what a single frame can tell "
                        "(a baseline for labels that need motion)")
    if training:
        g.add_argument("--no_flip", action="store_true",
                       help="never flip (as --hflip 0): for labels that tell left from right (Something-Something)")
    return p


CLIP_DEFAULTS = {"num_frames": None, "sampling": "dense", "sampling_rate": 4, "test_clips": 1, "test_crops": 1,
                 "single_frame": False, "no_flip": False}


def check_clip_args(args: argparse.Namespace, video: bool) -> None:
    """The clip flags (clip_parser): valid values for a video model, left alone for an image model."""
    if not video:
        changed = [f for f, default in CLIP_DEFAULTS.items() if getattr(args, f, default) != default]
        if changed:
            raise UserError(f"--{changed[0]} is for clips, but --model {args.model} takes images: use a video_vit_* "
                            f"model, or drop --{changed[0]}")
        return
    for flag in ("sampling_rate", "test_clips", "test_crops"):
        if getattr(args, flag) < 1:
            raise UserError(f"--{flag} {getattr(args, flag)} must be at least 1")
    if args.num_frames is not None and args.num_frames < 1:
        raise UserError(f"--num_frames {args.num_frames} must be at least 1")
    if getattr(args, "no_flip", False):
        if args.hflip not in (None, 0.0):
            raise UserError(f"--no_flip and --hflip {args.hflip:g} contradict each other; pass one")
        args.hflip = 0.0


def runtime_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(add_help=False)
    g = p.add_argument_group("runtime")
    g.add_argument("--device", type=str, default="auto", help="auto, cpu, cuda or cuda:N")
    g.add_argument("--amp", choices=AMP_CHOICES, default="auto",
                   help="mixed precision: auto = bf16 on GPUs that support it, else fp16 with a gradient "
                        "scaler; fp32 on CPU")
    g.add_argument("--seed", type=int, default=0, help="seed of every random number generator")
    g.add_argument("--dist_url", type=str, default="env://", help="process-group init method (torchrun sets env://)")
    g.add_argument("--dist_timeout", type=float, default=30.0,
                   help="minutes a collective may take before the process stops with an error naming its rank "
                        "(a stuck or dead rank), instead of waiting forever")
    return p


def weights_parser() -> argparse.ArgumentParser:
    """Where a classifier's (or kNN encoder's) pretrained weights come from."""
    p = argparse.ArgumentParser(add_help=False)
    g = p.add_argument_group("pretrained weights")
    g.add_argument("--finetune", type=str, default=None,
                   help="pretrained weights: our pretraining checkpoints, reference HPM, MAE or timm files")
    g.add_argument("--teacher", action="store_true", help="take the EMA teacher's weights instead of the student's")
    return p


def pooling_parser(global_pool: bool) -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(add_help=False)
    g = p.add_argument_group("pooling")
    g.add_argument("--global_pool", action="store_true", default=global_pool,
                   help="average the patch tokens, then fc_norm" + (" (default)" if global_pool else ""))
    g.add_argument("--cls_token", action="store_false", dest="global_pool",
                   help="the class token after the pretrained norm (video_vit_* models, which have none: the "
                        "average of the tokens after the pretrained norm)" + ("" if global_pool else " (default)"))
    return p


def training_parser() -> argparse.ArgumentParser:
    """Optimisation, schedule, outputs and resuming: what every training script has."""
    p = argparse.ArgumentParser(add_help=False)
    g = p.add_argument_group("training")
    g.add_argument("--epochs", type=int, default=40, help="training epochs")
    g.add_argument("--accum_iter", type=int, default=1,
                   help="gradient accumulation steps (effective batch = batch_size x accum_iter x processes)")
    g.add_argument("--weight_decay", type=float, default=0.05, help="AdamW / SGD / LARS weight decay")
    g.add_argument("--lr", type=float, default=None,
                   help="absolute learning rate (default: blr x effective batch / 256)")
    g.add_argument("--blr", type=float, default=1e-3, help="base learning rate for an effective batch of 256")
    g.add_argument("--min_lr", type=float, default=0.0, help="floor of the cosine schedule")
    g.add_argument("--warmup_epochs", type=float, default=5, help="linear learning-rate warm-up, in epochs")
    g.add_argument("--clip_grad", type=float, default=None, help="clip gradients to this total norm (unset: no clipping)")
    g.add_argument("--max_skipped_steps", type=int, default=100,
                   help="fp16: stop with an error after this many optimizer steps in a row that the gradient "
                        "scaler skipped for non-finite gradients")
    g = p.add_argument_group("output and resuming")
    g.add_argument("--output_dir", type=str, default="./output_dir", help="checkpoints and log.txt")
    g.add_argument("--log_dir", type=str, default=None, help="tensorboard events (default: output_dir)")
    g.add_argument("--save_every", type=int, default=20, help="also keep checkpoint-<epoch>.pth every N epochs")
    g.add_argument("--print_freq", type=int, default=20, help="log every N steps (the only host syncs)")
    g.add_argument("--save_retry", action="store_true",
                   help="when a checkpoint cannot be written (disk full), warn and keep training, retrying at the "
                        "next save, instead of stopping")
    g.add_argument("--resume", type=str, default=None, help="checkpoint to resume from")
    g.add_argument("--auto_resume", action=argparse.BooleanOptionalAction, default=True,
                   help="resume from output_dir/checkpoint-last.pth when it exists")
    g.add_argument("--start_epoch", type=int, default=0, help="first epoch when not resuming")
    return p


def check_common(args: argparse.Namespace) -> None:
    """Flag checks that need no data or model; each failure is one line naming the flag."""
    for flag in ("batch_size", "epochs", "accum_iter", "save_every", "print_freq", "max_skipped_steps"):
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


def namespace_to_argv(parser: argparse.ArgumentParser, args: argparse.Namespace,
                      skip: tuple[str, ...] = ()) -> list[str]:
    """The shortest command line that `parser` parses back into `args`: each flag whose value differs
    from its default, in the parser's order (so equal settings give equal commands). `skip`: dests left out."""
    argv: list[str] = []
    seen = set(skip)
    for action in parser._actions:
        if not action.option_strings or action.dest in seen or action.default == argparse.SUPPRESS:
            continue
        seen.add(action.dest)
        value = getattr(args, action.dest, action.default)
        if value == action.default:
            continue
        flag = action.option_strings[0]
        if isinstance(action, argparse.BooleanOptionalAction):
            argv.append(flag if value else "--no-" + flag[2:])
        elif action.nargs == 0:   # store_true / store_false / store_const
            if value != action.const:
                raise ValueError(f"{flag}: the value {value!r} cannot be written as a flag")
            argv.append(flag)
        elif isinstance(action, argparse._AppendAction):   # repeatable: once per value
            argv += [token for item in value for token in (flag, str(item))]
        elif isinstance(value, (list, tuple)):
            argv += [flag, *map(str, value)]
        else:
            argv += [flag, str(value)]
    return argv
