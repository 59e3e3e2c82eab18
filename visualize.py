"""The paper's figure from a pretraining checkpoint: per image the input, the mask (HPM's at a
chosen alpha, or a random MAE mask), the reconstruction with the visible patches pasted back, and
the teacher's predicted-loss map as a colour heat map over the image, with a colour bar.

    python visualize.py --checkpoint output_dir/checkpoint-last.pth --images path/to/images --output fig.png

For a video checkpoint, per clip a few frames (every --frame_step-th) of the input, the mask (tubes
visible), the reconstruction and the predicted-loss map, and with --gif an animation of every frame:

    python visualize.py --checkpoint output_video/checkpoint-last.pth --videos path/to/videos --gif clips.gif

Needs matplotlib (requirements-dev.txt).
"""
import argparse
import importlib.util
import io
import logging
from pathlib import Path

import torch
from PIL import Image

import models_hpm
from engine_pretrain import clip_rows, reconstruction_rows
from util.args import HelpFormatter
from util.checkpoint import load_file, write_bytes_atomic
from util.colormap import VIRIDIS_ANCHORS, normalise_per_image
from util.data import IMG_EXTENSIONS, build_dataset, eval_transform, load_rgb
from util.errors import UserError, run_cli
from util.logger import setup_logging
from util.masking import hard_patch_mask, random_mask
from util.normalization import IMAGENET, stats_in_checkpoint
from util.shards import shard_files
from util.video import ClipSampling, ClipTransform, MovingDigitsClips, decode_frames

log = logging.getLogger("hpm")
INCHES_PER_IMAGE, DPI = 2.0, 100
VIDEO_EXTENSIONS = (".mp4", ".avi", ".webm", ".mkv", ".mov", ".m4v")


def get_args_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description="HPM figure", formatter_class=HelpFormatter)
    p.add_argument("--checkpoint", required=True, help="a pretraining checkpoint (ours, the reference's, MAE's)")
    p.add_argument("--images", nargs="+", default=None,
                   help="(image checkpoints) a folder of images, image files (any size), or a dataset as --data_path "
                        "names it (hf:DIR, WebDataset shards) (default: the built-in digits' validation images)")
    p.add_argument("--videos", nargs="+", default=None,
                   help="(video checkpoints) video files or folders of them (default: the built-in moving digits' "
                        "validation clips)")
    p.add_argument("--output", default="hpm_figure.png", help="the PNG to write")
    p.add_argument("--frame_step", type=int, default=4, help="(video) the figure shows every N-th frame")
    p.add_argument("--sampling_rate", type=int, default=4, help="(video) frames between a clip's sampled frames")
    p.add_argument("--gif", default=None, help="(video) also write an animated GIF of every frame to this path")
    p.add_argument("--alpha", type=float, default=0.5,
                   help="share of the masked patches chosen as hard by the teacher (the schedule's end value)")
    p.add_argument("--mask_ratio", type=float, default=None,
                   help="share of patches masked (default: the checkpoint's, e.g. 0.75 for MAE, 0.9 for VideoMAE)")
    p.add_argument("--seed", type=int, default=0, help="seed of the random part of the mask")
    p.add_argument("--num_images", type=int, default=4, help="columns of the figure (video: clips, one row group each)")
    p.add_argument("--model", default=None, help="pretraining model name (default: the checkpoint's)")
    return p


def load_images(inputs: list[str] | None, limit: int) -> list[Image.Image]:
    """The first `limit` images of the --images: files, folders (searched at any depth), or datasets
    as --data_path names them (hf:DIR, WebDataset shards; their train split); None: the built-in
    digits' validation images."""
    if inputs is None:
        dataset = build_dataset(None, "val", None)
        return [dataset[i][0] for i in range(min(limit, len(dataset)))]
    images: list[Image.Image] = []
    for item in inputs:
        if item.startswith("hf:") or "{" in item or item.endswith(".tar") or \
                (Path(item).is_dir() and shard_files(item, "train") is not None):
            dataset = build_dataset(item, "train", None, labelled=False)
            images += [dataset[i][0] for i in range(min(limit - len(images), len(dataset)))]
        else:
            images += [load_rgb(str(p)) for p in media_paths([item], limit - len(images))]
        if len(images) >= limit:
            break
    return images[:limit]


def media_paths(inputs: list[str], limit: int, extensions: tuple[str, ...] = IMG_EXTENSIONS,
                flag: str = "--images") -> list[Path]:
    """The first `limit` files of `inputs` (files, or folders searched at any depth for `extensions`)."""
    paths = []
    for item in map(Path, inputs):
        if item.is_dir():
            paths += sorted(p for p in item.rglob("*") if p.suffix.lower() in extensions)
        elif item.is_file():
            paths.append(item)
        else:
            raise UserError(f"{flag} {item}: no such file or folder")
    if not paths:
        raise UserError(f"{flag} {' '.join(inputs)}: no files found ({', '.join(extensions)})")
    return paths[:limit]


def load_networks(path: str, override: str | None, mask_ratio: float | None):
    """The student (with its decoders) and, where the checkpoint has one, the teacher."""
    overrides = {} if mask_ratio is None else {"mask_ratio": mask_ratio}
    student = models_hpm.load_pretrain_model(path, override, **overrides)
    if Path(path).is_dir():   # a transformers folder: no teacher
        return student.eval(), None, IMAGENET
    ckpt = load_file(path, "--checkpoint", mmap=True)
    teacher = None
    if student.learning_loss and isinstance(ckpt.get("teacher", ckpt.get("ema_state_dict")), dict):
        teacher = models_hpm.load_pretrain_model(path, override, teacher=True, **overrides).eval()
    return student.eval(), teacher, stats_in_checkpoint(ckpt) or IMAGENET


def draw(rows: list[torch.Tensor], heat: torch.Tensor | None, labels: list[str], output: Path) -> None:
    """One labelled row per entry of `rows` (N images each), the heat map blended over the input."""
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    from matplotlib.colors import LinearSegmentedColormap
    n = rows[0].shape[0]
    num_rows = len(rows) + (heat is not None)
    fig, axes = plt.subplots(num_rows, n, figsize=(INCHES_PER_IMAGE * n + 1.0, INCHES_PER_IMAGE * num_rows),
                             dpi=DPI, squeeze=False, gridspec_kw=dict(left=0.12, right=0.86))
    for r, (row, label) in enumerate(zip(rows, labels)):
        for c in range(n):
            axes[r][c].imshow(row[c].permute(1, 2, 0).cpu().numpy())
        axes[r][0].set_ylabel(label)
    if heat is not None:
        cmap = LinearSegmentedColormap.from_list("hpm", [tuple(v / 255 for v in a) for a in VIRIDIS_ANCHORS])
        for c in range(n):
            axes[-1][c].imshow(rows[0][c].permute(1, 2, 0).cpu().numpy())
            shown = axes[-1][c].imshow(heat[c].cpu().numpy(), cmap=cmap, vmin=0, vmax=1, alpha=0.6,
                                       extent=(-0.5, rows[0].shape[-1] - 0.5, rows[0].shape[-2] - 0.5, -0.5))
        axes[-1][0].set_ylabel(labels[-1])
        bar = fig.colorbar(shown, ax=[axes[r][c] for r in range(num_rows) for c in range(n)], fraction=0.03)
        bar.set_label("predicted loss (each image: low to high)")
    for ax in axes.flat:
        ax.set_xticks([])
        ax.set_yticks([])
    buffer = io.BytesIO()
    fig.savefig(buffer, format="png", dpi=DPI)
    plt.close(fig)
    write_bytes_atomic(output, buffer.getvalue())


def load_clips(inputs: list[str] | None, limit: int, frames: int, sampling_rate: int, transform) -> torch.Tensor:
    """(N, 3, T, H, W): the centre clip of each video (or the built-in validation clips)."""
    if inputs is None:
        dataset = MovingDigitsClips("val", transform, frames)
        return torch.stack([dataset[i][0] for i in range(min(limit, len(dataset)))])
    centre = ClipSampling("dense", frames, sampling_rate, train=False)
    return torch.stack([transform(decode_frames(str(p), lambda total: centre(total)[0]))
                        for p in media_paths(inputs, limit, VIDEO_EXTENSIONS, "--videos")])


def gif_frames(rows_per_clip: list[list[torch.Tensor]]) -> list[Image.Image]:
    """One image per frame: each clip's rows (input | mask | reconstruction | loss map, every frame)
    side by side, the clips one under another."""
    frames = []
    for t in range(rows_per_clip[0][0].shape[0]):
        grid = torch.cat([torch.cat([row[t] for row in clip], dim=-1) for clip in rows_per_clip], dim=-2)   # (3, H, W)
        pixels = (grid.clamp(0, 1) * 255).round().byte().permute(1, 2, 0).cpu().numpy()
        frames.append(Image.fromarray(pixels).resize((grid.shape[-1] * 4, grid.shape[-2] * 4), Image.NEAREST))
    return frames


def write_gif(frames: list[Image.Image], path: Path) -> None:
    buffer = io.BytesIO()
    frames[0].save(buffer, format="GIF", save_all=True, append_images=frames[1:], duration=150, loop=0)
    write_bytes_atomic(path, buffer.getvalue())


def video_figure(args: argparse.Namespace, student, teacher, stats, output: Path) -> Path:
    if args.images is not None:
        raise UserError(f"--images: {args.checkpoint} is a video checkpoint; pass --videos (or nothing, for the "
                        f"built-in clips)")
    if args.frame_step < 1 or args.sampling_rate < 1:
        raise UserError("--frame_step and --sampling_rate must be at least 1")
    clips = load_clips(args.videos, args.num_images, student.patch_embed.num_frames, args.sampling_rate,
                       ClipTransform(student.patch_embed.img_size[0], stats, train=False))
    generator = torch.Generator().manual_seed(args.seed)
    pred_loss = None
    if teacher is not None:
        pred_loss = teacher.predict_losses(clips)
        mask, mask_label = student.hard_mask(pred_loss, args.alpha, generator), f"HPM mask, α {args.alpha:g}"
    else:
        mask, mask_label = student.random_mask(clips.shape[0], clips.device, generator), "VideoMAE mask"
    # every frame once (the GIF's); the figure shows every --frame_step-th of them
    per_clip = [clip_rows(student, clips[c:c + 1], mask[c:c + 1], None if pred_loss is None else pred_loss[c:c + 1],
                          stats, every=1) for c in range(clips.shape[0])]
    names = [mask_label] + (["reconstruction"] if student.target_dim is None else []) + \
            (["predicted loss"] if pred_loss is not None else [])
    rows, labels = [], []
    for c, clip in enumerate(per_clip):
        rows += [row[::args.frame_step] for row in clip]
        labels += [f"clip {c + 1}", *names]   # short: a row is 2 inches high
    draw(rows, None, labels, output)
    log.info(f"wrote {output}: {clips.shape[0]} clips, {len(rows)} rows of {rows[0].shape[0]} frames")
    if args.gif:
        write_gif(gif_frames(per_clip), Path(args.gif))
        log.info(f"wrote {args.gif}: {clips.shape[2]} frames")
    return output


@torch.no_grad()
def main(args: argparse.Namespace) -> Path:
    setup_logging(True)
    if not 0.0 <= args.alpha <= 1.0:
        raise UserError(f"--alpha {args.alpha} must lie in [0, 1]")
    if args.num_images < 1:
        raise UserError(f"--num_images {args.num_images} must be at least 1")
    output = Path(args.output)
    for path, flag in ((output, "--output"), (Path(args.gif) if args.gif else None, "--gif")):
        if path is not None and not path.parent.is_dir():
            raise UserError(f"{flag} {path}: the folder {path.parent} does not exist")
    if importlib.util.find_spec("matplotlib") is None:
        raise UserError("visualize.py needs matplotlib: pip install -r requirements-dev.txt")
    student, teacher, stats = load_networks(args.checkpoint, args.model, args.mask_ratio)
    if student.video:
        return video_figure(args, student, teacher, stats, output)
    if args.videos is not None or args.gif:
        raise UserError(f"--videos / --gif: {args.checkpoint} is an image checkpoint; pass --images")
    size = student.patch_embed.img_size[0]
    transform = eval_transform(size, stats)
    imgs = torch.stack([transform(img) for img in load_images(args.images, args.num_images)])
    generator = torch.Generator().manual_seed(args.seed)
    n, num_patches = imgs.shape[0], student.patch_embed.num_patches
    heat = None
    if teacher is not None:
        pred_loss = teacher.predict_losses(imgs)
        mask = hard_patch_mask(pred_loss, student.num_masked, args.alpha, generator=generator)
        g = student.grid_size
        heat = torch.nn.functional.interpolate(normalise_per_image(pred_loss).view(n, 1, g, g), size=(size, size),
                                               mode="nearest")[:, 0]
        mask_label = f"HPM mask (alpha {args.alpha:g})"
    else:
        mask = random_mask(n, num_patches, student.num_masked, generator=generator)
        mask_label = "random mask (MAE)"
    rows = reconstruction_rows(student, imgs, mask, stats)
    labels = ["input", mask_label] + (["reconstruction"] if len(rows) == 3 else []) + ["predicted loss"]
    draw(rows, heat, labels, output)
    log.info(f"wrote {output}: {n} images, {len(rows) + (heat is not None)} rows")
    return output


if __name__ == "__main__":
    run_cli(lambda: main(get_args_parser().parse_args()))
