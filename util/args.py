"""Argument parsers shared by every script: each script builds its parser from these parents and
adds its own group on top, so a flag is declared once for the whole project."""
import argparse
import os
import sys
import tempfile
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from util.errors import UserError
from util.precision import AMP_CHOICES


class HelpFormatter(argparse.ArgumentDefaultsHelpFormatter):
    """Shows each flag's default once, and none for flags whose help already says it or that have none."""

    def _get_help_string(self, action: argparse.Action) -> str:
        text = action.help or ""
        if "default" in text or action.default in (None, argparse.SUPPRESS) or action.default is False:
            return text
        return super()._get_help_string(action)


_AS_IMAGES = object()


@dataclass(frozen=True)
class DataDefault:
    """A flag's default that depends on the data it meets: the built-in data (a demo sized to finish
    in minutes on a CPU) or a --data_path (the paper's recipe for images, VideoMAE's for clips).
    `clips` / `built_in_clips`: where clips differ from images (default: as images)."""
    built_in: Any
    data_path: Any
    clips: Any = _AS_IMAGES
    built_in_clips: Any = _AS_IMAGES

    def value(self, built_in: bool, video: bool) -> Any:
        images = self.built_in if built_in else self.data_path
        if not video:
            return images
        clips = self.built_in_clips if built_in else self.clips
        return images if clips is _AS_IMAGES else clips

    def describe(self) -> str:
        text = f"{show(self.built_in)} on the built-in data, {show(self.data_path)} on a --data_path"
        if self.clips is not _AS_IMAGES:
            text += f" ({show(self.clips)} for clips)"
        if self.built_in_clips is not _AS_IMAGES:
            text += f"; {show(self.built_in_clips)} on the built-in clips"
        return text


def show(value: Any) -> str:
    """A flag's value as one would type it."""
    if isinstance(value, bool):
        return "on" if value else "off"
    if isinstance(value, (list, tuple)):
        return " ".join(show(v) for v in value)
    if value == "":
        return "''"
    if value is None:
        return "unset"
    return f"{value:g}" if isinstance(value, float) else str(value)


class RenamedFlag(argparse.Action):
    """A flag's old name, still accepted: sets the new flag's destination (through `renamed` for values
    that changed too) and says so in one line."""

    def __init__(self, option_strings: list[str], dest: str, renamed: dict | None = None, **kwargs) -> None:
        super().__init__(option_strings, dest, default=argparse.SUPPRESS, **kwargs)
        self.renamed = renamed or {}

    def __call__(self, parser, namespace, values, option_string=None) -> None:
        value = self.renamed.get(values, values)
        print(f"note: {option_string} {values} is now --{self.dest} {value}", file=sys.stderr)
        setattr(namespace, self.dest, value)


def legacy_settings(saved: dict) -> dict:
    """Settings saved before a flag was renamed, under today's names: `--hard_unit` (HPM) and
    `--mask_type` (the VideoMAE baseline) became one `--mask_unit`."""
    if "mask_unit" in saved or ("hard_unit" not in saved and "mask_type" not in saved):
        return saved
    unit = (saved.get("hard_unit", "tube") if saved.get("learning_loss", True)
            else {"tube": "tube", "random": "token"}.get(saved.get("mask_type", "tube"), "tube"))
    return {**saved, "mask_unit": unit}


def make_parser(description: str, parents: list[argparse.ArgumentParser], add_help: bool = True,
                **defaults) -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description=description, add_help=add_help, parents=parents,
                                formatter_class=HelpFormatter)
    p.set_defaults(**defaults)
    return p


def with_data_defaults(p: argparse.ArgumentParser, table: dict[str, DataDefault]) -> argparse.ArgumentParser:
    """Each flag of `table` gets None as its parsed default (filled in by `resolve_data_defaults`)
    and both of its values in --help."""
    for dest, default in table.items():
        action = next(a for a in p._actions if a.dest == dest)
        action.default = None
        action.help = f"{(action.help or '').split(' (default')[0]} (default: {default.describe()})"
    return p


def resolve_data_defaults(args: argparse.Namespace, table: dict[str, DataDefault], video: bool) -> list[str]:
    """Fill every flag of `table` that was not passed with its value for the data at hand (the
    built-in data, or a --data_path of images or clips); returns them as flags, for the start line."""
    built_in = args.data_path is None
    filled = []
    for dest, default in table.items():
        if getattr(args, dest) is None:
            value = default.value(built_in, video)
            setattr(args, dest, list(value) if isinstance(value, tuple) else value)
            filled.append(f"--{dest} {show(value)}")
    return filled


def default_workers(device_type: str) -> int:
    """Loader workers per process when --num_workers is not given: 2 on CPU (the training competes
    for the same cores); on GPUs the CPUs this process may use, shared with the other processes of
    its node (torchrun's LOCAL_WORLD_SIZE) where the affinity is the node's, one kept for the
    training process itself, at most 10 (MAE's and VideoMAE's value)."""
    if device_type == "cpu":
        return 2
    cpus = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else (os.cpu_count() or 1)
    if cpus >= (os.cpu_count() or cpus):   # the node's CPUs, not a per-task share (SLURM --cpus-per-task)
        cpus //= max(1, int(os.environ.get("LOCAL_WORLD_SIZE", "1")))
    return max(1, min(10, cpus - 1))


def describe_run(args: argparse.Namespace, world_size: int, precision: str, filled: list[str],
                 lr_given: bool | None = None) -> str:
    """The start line: how the batch is made up, the learning rate and schedule (training scripts:
    `lr_given` says whether --lr was passed), precision, loader workers, and which values came from
    the data-dependent defaults."""
    batch = f"{world_size} process(es) x {args.batch_size} per process"
    if lr_given is not None:
        effective = world_size * args.batch_size * args.accum_iter
        batch += f" x {args.accum_iter} accumulation = effective batch {effective}"
        lr = (f"lr {args.lr:.3g} (--lr)" if lr_given
              else f"lr {args.lr:.3g} = blr {args.blr:g} x {effective} / 256")
        batch += f"; {lr}; epochs {args.epochs}, warm-up {args.warmup_epochs:g}"
    where = "the built-in data" if args.data_path is None else "a --data_path"
    defaults = f"defaults for {where}: {' '.join(filled)}" if filled else "no data-dependent defaults"
    return f"run: {batch}; precision {precision}; {args.num_workers} loader worker(s) per process; {defaults}"


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
                        "PyAV (needs nothing more); auto: torchcodec where it loads, else PyAV (the same frames but "
                        "for odd frame sizes, whose colour conversion can differ by a few levels)")
    g.add_argument("--mean", type=float, nargs=3, default=None, metavar=("R", "G", "B"),
                   help="per-channel mean to normalise with (with --std); default: pretraining, ImageNet's (or the "
                        "training set's with --norm dataset); the other scripts, the statistics the --finetune "
                        "checkpoint was pretrained with, else ImageNet's")
    g.add_argument("--std", type=float, nargs=3, default=None, metavar=("R", "G", "B"),
                   help="per-channel std to normalise with (with --mean)")
    g.add_argument("--batch_size", type=int, default=64, help="images per process per step")
    g.add_argument("--num_workers", type=int, default=None,
                   help="data-loading worker processes per process (default: 2 on CPU; on GPUs the CPUs each "
                        "process may use, one kept for itself, at most 10)")
    g.add_argument("--pin_mem", action=argparse.BooleanOptionalAction, default=True,
                   help="pin loader memory for faster host-to-GPU copies (GPU only)")
    return p


AUGMENTATION_DEFAULTS = {
    # 32 px digits lose their class in a crop of 8 % of their area, and a mirrored 2, 3 or 7 is no longer that digit
    "crop_scale": DataDefault((0.5, 1.0), (0.08, 1.0)),
    "hflip": DataDefault(0.0, 0.5),
}


def augmentation_parser() -> argparse.ArgumentParser:
    """The training crop and flip of fine-tuning and linear probing: MAE's protocol on a --data_path,
    milder on the built-in digits (AUGMENTATION_DEFAULTS)."""
    p = argparse.ArgumentParser(add_help=False)
    g = p.add_argument_group("augmentation")
    g.add_argument("--crop_scale", type=float, nargs=2, default=None, metavar=("MIN", "MAX"),
                   help="area range of the random resized crop")
    g.add_argument("--hflip", type=float, default=None,
                   help="probability of a horizontal flip (0 for labels that tell left from right)")
    return p


def check_augmentation(args: argparse.Namespace) -> None:
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
    g.add_argument("--deterministic", action="store_true",
                   help="GPUs: deterministic kernels where torch has them (a warning names each operator without "
                        "one), so a resumed run retraces an uninterrupted one more closely, somewhat slower; CPU "
                        "runs are deterministic without it (RELIABILITY.md)")
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
                   help="average the patch tokens, then fc_norm" + (" (default)" if global_pool else
                                                                    " (default: --cls_token)"))
    g.add_argument("--cls_token", action="store_false", dest="global_pool", default=global_pool,
                   help="the class token after the pretrained norm (video_vit_* models, which have none: the "
                        "average of the tokens after the pretrained norm)" + (" (default: --global_pool)"
                                                                              if global_pool else " (default)"))
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
    g.add_argument("--clip_grad", type=float, default=None,
                   help="clip gradients to this total norm; 0: no clipping (default: no clipping)")
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
    if args.num_workers is not None and args.num_workers < 0:
        raise UserError(f"--num_workers {args.num_workers} must be 0 or more")
    if args.warmup_epochs < 0:
        raise UserError(f"--warmup_epochs {args.warmup_epochs} must be 0 or more")


# Flags a restart may change without making it another run: how the work is spread and logged, not
# what is computed. The effective batch stands for --batch_size, --accum_iter and the process count,
# so that a run may continue on fewer GPUs with more accumulation.
RESTART_SAFE = frozenset({
    "epochs", "num_workers", "print_freq", "save_every", "save_retry", "pin_mem", "device", "dist_url",
    "dist_timeout", "output_dir", "log_dir", "experiment", "resume", "auto_resume", "start_epoch",
    "max_skipped_steps", "video_decoder", "bad_images", "compile", "grad_checkpointing", "batch_size",
    "accum_iter", "eval", "world_size", "deterministic"})


def run_settings(args: argparse.Namespace, world_size: int) -> dict:
    """What makes a run this run (saved in its checkpoints; auto-resume continues only an equal one):
    every setting but those of RESTART_SAFE, plus the effective batch."""
    settings = {k: plain(v) for k, v in vars(args).items() if k not in RESTART_SAFE}
    settings["effective_batch"] = args.batch_size * args.accum_iter * world_size
    return settings


def plain(value: Any) -> Any:
    """A setting as it reads back from a checkpoint: paths as strings, tuples as lists."""
    if isinstance(value, Path):
        return str(value)
    if isinstance(value, (list, tuple)):
        return [plain(v) for v in value]
    return value


def first_difference(saved: dict, legacy: bool, settings: dict) -> tuple[str, Any, Any] | None:
    """The first setting (in flag order) whose saved value differs from this run's, as (name, saved,
    now), or None. `legacy`: `saved` is a checkpoint's args from before settings were saved, rewritten
    after parsing, so only the values this run has already resolved are compared."""
    for key, value in settings.items():
        if key in saved and not (legacy and value is None) and plain(saved[key]) != value:
            return key, saved[key], value
    return None


def setting_name(key: str) -> str:
    return "the effective batch" if key == "effective_batch" else f"--{key}"


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
