"""Export a pretrained (or fine-tuned) encoder for other frameworks.

    python export.py --checkpoint output_dir/checkpoint-last.pth --format mae --output hpm_vit_b.pth
    python export.py --checkpoint output_dir/checkpoint-last.pth --format timm --output hpm_vit_b_timm
    python export.py --checkpoint output_dir/checkpoint-last.pth --format hf --output hpm_vit_b_hf

Formats: `mae`, MAE's release format `{"model": encoder state dict}` (Detectron2's ViTDet,
MMSegmentation's MAE converter); `timm`, a folder with `model.safetensors` and `config.json`;
`hf`, a folder that `transformers.ViTMAEModel.from_pretrained` loads offline (a video encoder:
`transformers.VideoMAEModel`); `videomae` (video encoders), VideoMAE's own fine-tuning-ready file.
See TRANSFER.md.
"""
import argparse
import json
import logging
import os
import shutil
import tempfile
from pathlib import Path

from util.args import HelpFormatter
from util.checkpoint import load_file, read_weights, save_atomic
from util.errors import UserError, run_cli
from util.formats import (
    architecture,
    encoder_only,
    hf_config,
    hf_video_config,
    is_video_state,
    timm_config,
    to_hf,
    to_hf_video,
    to_videomae,
)
from util.logger import setup_logging
from util.normalization import Stats, downstream_stats

log = logging.getLogger("hpm")
FORMATS = ("mae", "timm", "hf", "videomae")


def get_args_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description="Export an encoder", formatter_class=HelpFormatter)
    p.add_argument("--checkpoint", required=True,
                   help="a pretraining checkpoint (ours, the reference HPM's, MAE's) or a fine-tuned one")
    p.add_argument("--teacher", action="store_true", help="export the EMA teacher instead of the student")
    p.add_argument("--format", required=True,
                   help="mae: {'model': encoder} file; timm: safetensors + config.json folder; hf: ViTMAEModel "
                        "(video: VideoMAEModel) folder; videomae: VideoMAE's {'model': encoder} fine-tuning file "
                        "(video encoders)")
    p.add_argument("--output", required=True, help="the file (mae, videomae) or folder (timm, hf) to write")
    p.add_argument("--force", action="store_true", help="replace an existing output")
    p.add_argument("--mean", type=float, nargs=3, default=None, metavar=("R", "G", "B"),
                   help="normalisation for config.json (default: the checkpoint's statistics, else ImageNet's)")
    p.add_argument("--std", type=float, nargs=3, default=None, metavar=("R", "G", "B"),
                   help="normalisation std for config.json (with --mean)")
    return p


def _write_folder(output: Path, files: dict[str, bytes | dict], force: bool) -> None:
    """Write every file into a temporary sibling folder, then move it into place in one rename."""
    tmp = Path(tempfile.mkdtemp(prefix=f".{output.name}.", dir=output.parent))
    try:
        for name, content in files.items():
            data = json.dumps(content, indent=2).encode() if isinstance(content, dict) else content
            (tmp / name).write_bytes(data)
        if output.exists():
            old = output.with_name(f".{output.name}.old")
            os.replace(output, old)
            os.replace(tmp, output)
            shutil.rmtree(old)
        else:
            os.replace(tmp, output)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise


def export(checkpoint: str, fmt: str, output: str, teacher: bool = False, force: bool = False,
           mean: list[float] | None = None, std: list[float] | None = None) -> list[str]:
    """Export; returns notes on what was left out. Nothing is written on any error."""
    from safetensors.torch import save as safetensors_bytes
    if fmt not in FORMATS:
        raise UserError(f"--format {fmt}: unknown; choose one of {', '.join(FORMATS)}")
    out = Path(output)
    if out.exists() and not force:
        raise UserError(f"--output {out} exists; choose another path or pass --force to replace it")
    if not out.parent.is_dir():
        raise UserError(f"--output {out}: the folder {out.parent} does not exist; create it first")
    ckpt = load_file(checkpoint, "--checkpoint", mmap=True)   # its args; read_weights reads the weights
    state, notes = encoder_only(read_weights(checkpoint, teacher, "--checkpoint"), "--checkpoint", checkpoint)
    video = is_video_state(state)
    args = ckpt.get("args") if isinstance(ckpt.get("args"), dict) else {}
    arch = architecture(state, int(args.get("num_frames") or 16))
    stats = downstream_stats(checkpoint, mean, std, "--checkpoint")
    if video and fmt in ("mae", "timm"):
        raise UserError(f"--format {fmt}: {checkpoint} is a video encoder; export it as hf (VideoMAEModel) or "
                        f"videomae (VideoMAE's own file)")
    if fmt == "videomae" and not video:
        raise UserError(f"--format videomae: {checkpoint} is an image encoder; export it as mae, timm or hf")
    if fmt == "videomae":
        save_atomic({"model": to_videomae(state), "normalization": stats.as_dict(), "architecture": arch}, out)
    elif fmt == "mae":
        save_atomic({"model": state, "normalization": stats.as_dict(), "architecture": arch}, out)
    elif fmt == "timm":
        _write_folder(out, {"model.safetensors": safetensors_bytes(state, metadata={"format": "pt"}),
                            "config.json": timm_config(arch, stats.mean, stats.std)}, force)
    else:
        convert, config = (to_hf_video, hf_video_config(arch)) if video else (to_hf, hf_config(arch))
        _write_folder(out, {"model.safetensors": safetensors_bytes(convert(state), metadata={"format": "pt"}),
                            "config.json": {**config, "image_mean": list(stats.mean), "image_std": list(stats.std)}},
                      force)
        if arch["global_pool"]:
            notes.append("fine-tuned with global pooling: VideoMAEModel (use_mean_pooling) has no final norm, so "
                         "fc_norm is not in the folder; apply it after averaging the tokens" if video else
                         "fine-tuned with global pooling: the HF `layernorm` holds fc_norm, apply it after "
                         "averaging the tokens")
    frames = f"{arch['num_frames']} frames of " if video else ""
    log.info(f"exported {'the teacher' if teacher else 'the encoder'} of {checkpoint} "
             f"(ViT {arch['embed_dim']}-d, {arch['depth']} blocks, patch {arch['patch_size']}, "
             f"{frames}{arch['img_size']} px) as {fmt} to {out}")
    pixel = Stats(tuple(255 * m for m in stats.mean), tuple(255 * s for s in stats.std))
    log.info(f"normalisation: {stats} on [0, 1] pixels; on 0-255 pixels (Detectron2's model.pixel_mean / "
             f"pixel_std, MMSegmentation's data_preprocessor mean / std, both RGB): {pixel}; see TRANSFER.md")
    for note in notes:
        log.info(f"note: {note}")
    return notes


def main(args: argparse.Namespace) -> None:
    setup_logging(True)
    export(args.checkpoint, args.format, args.output, args.teacher, args.force, args.mean, args.std)


if __name__ == "__main__":
    run_cli(lambda: main(get_args_parser().parse_args()))
