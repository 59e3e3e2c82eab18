"""HPM (or, with --no-learning_loss, MAE) pretraining, on images or (the videomae_* models) clips.
`python main_pretrain.py` runs the built-in default: the tiny preset on scikit-learn's digits, in
a few minutes on a CPU; `--model videomae_vit_tiny_patch4` the same on the built-in moving digits."""
import argparse
import logging
from pathlib import Path

import torch
from torch.utils.tensorboard import SummaryWriter
from torchvision import transforms

from engine import Run, fit
from engine_pretrain import (
    PretrainTask,
    build_student,
    build_target,
    check_pretrain_args,
    make_optimizer,
    pretrain_args_parser,
)
from util.args import check_output_dir, default_workers, describe_run, run_settings
from util.checkpoint import FORMAT_PRETRAIN, find_resume, finished_run, load_file
from util.data import build_dataset, eval_transform, pretrain_transform, train_loader, with_transform
from util.distributed import cleanup
from util.errors import UserError, run_cli
from util.gpu_augment import collate_bytes, jpeg_bytes
from util.normalization import IMAGENET, Stats, dataset_stats, explicit_stats
from util.optim import effective_lr
from util.precision import make_scaler, precision_name, resolve_amp
from util.process import start_process
from util.video import ClipTransform, build_clip_dataset, frames_to_tensor

log = logging.getLogger("hpm")


def get_args_parser(add_help: bool = True) -> argparse.ArgumentParser:
    return pretrain_args_parser(add_help)


def frames_as_image(frames) -> torch.Tensor:
    """(T, H, W, 3) uint8 frames -> (3, T * H, W) in [0, 1]: a clip's pixels as one image, for the statistics."""
    return frames_to_tensor(frames).flatten(1, 2)


def pretraining_stats(args: argparse.Namespace, dataset, video: bool = False) -> Stats:
    """--mean/--std, the training set's own (--norm dataset) or ImageNet's; recorded in args (and so
    in every checkpoint)."""
    stats = explicit_stats(args.mean, args.std)
    if stats is not None and args.norm == "dataset":
        raise UserError("--norm dataset computes the statistics from the data: drop --mean/--std, or use "
                        "--norm imagenet with them")
    source = "--mean/--std"
    if stats is None and args.norm == "dataset":
        stats = dataset_stats(with_transform(dataset, frames_as_image if video else transforms.ToTensor()),
                              seed=args.seed, num_workers=args.num_workers)
        source = "computed from the training set"
    elif stats is None:
        stats, source = IMAGENET, "ImageNet's"
    log.info(f"normalisation: {stats} ({source})")
    args.mean, args.std = list(stats.mean), list(stats.std)
    return stats


def main(args: argparse.Namespace) -> PretrainTask | None:
    """Pretrain; returns the task (its `student` and `teacher`) for programmatic use, or None when the
    run in --output_dir had already finished."""
    dist_info, device = start_process(args.device, args.dist_url, args.dist_timeout, args.deterministic)
    args.world_size = dist_info.world_size
    filled = check_pretrain_args(args)
    settings = run_settings(args, dist_info.world_size)
    if args.num_workers is None:
        args.num_workers = default_workers(device.type)
    if args.experiment:
        args.output_dir = str(Path(args.output_dir) / args.experiment)
        args.log_dir = str(Path(args.log_dir) / args.experiment) if args.log_dir else None

    # Everything that can fail on bad input happens before the output directory is touched.
    frozen_target, target_dim = build_target(args)
    torch.manual_seed(args.seed)   # the same initial student (and so teacher) on every process
    student = build_student(args, target_dim).to(device)
    args.input_size = student.patch_embed.img_size[0]
    if student.video:
        dataset = build_clip_dataset(args.data_path, "train", None, args.num_frames, args.sampling_rate,
                                     labelled=False, bad_images=args.bad_images, video_decoder=args.video_decoder)
    else:
        dataset = build_dataset(args.data_path, "train", None, args.bad_images, labelled=False,
                                image_column=args.image_column, label_column=args.label_column)
    stats = pretraining_stats(args, dataset, student.video)
    train_transform = (ClipTransform(args.input_size, stats, as_uint8=True) if student.video
                       else pretrain_transform(args.input_size, stats))
    dataset = with_transform(dataset, train_transform)
    loader = train_loader(jpeg_bytes(dataset) if args.gpu_decode else dataset, dist_info, args.batch_size,
                          args.num_workers, args.pin_mem and device.type == "cuda" and not args.gpu_decode,
                          args.seed, collate_bytes if args.gpu_decode else None)
    lr_given = args.lr is not None
    args.lr = effective_lr(args, dist_info.world_size)
    amp_dtype = resolve_amp(args.amp, device)
    preview = None
    if dist_info.is_main:
        view = with_transform(dataset, ClipTransform(args.input_size, stats, train=False) if student.video
                              else eval_transform(args.input_size, stats, crop_pct=1.0))
        preview = torch.stack([view[i][0] for i in range(min(2 if student.video else 8, len(view)))]).to(device)
    task = PretrainTask(student, args, device, amp_dtype, dist_info.world_size, preview, stats, frozen_target,
                        steps_per_epoch=len(loader) // args.accum_iter)

    output_dir = check_output_dir(args.output_dir) if dist_info.is_main else Path(args.output_dir)
    resume_path = find_resume(args.resume, args.auto_resume, output_dir, FORMAT_PRETRAIN, settings)
    if finished_run(resume_path, FORMAT_PRETRAIN, args.model, args.epochs):
        cleanup()
        return None
    saved = load_file(resume_path, "--resume", mmap=True) if resume_path is not None else {}
    if saved.get("format") == FORMAT_PRETRAIN:
        saved = saved.get("args") or {}
        if saved.get("target", "pixel") != args.target:
            raise UserError(f"--resume {resume_path}: pretrained with --target {saved.get('target', 'pixel')}, but "
                            f"this run asks for --target {args.target}; keep the target or use another --output_dir")
    writer = None
    if dist_info.is_main:
        log_dir = check_output_dir(args.log_dir, "--log_dir") if args.log_dir else output_dir
        writer = SummaryWriter(log_dir=str(log_dir))
    run = Run(task, loader, make_optimizer(student, args, device), make_scaler(device, amp_dtype), device,
              dist_info, output_dir, FORMAT_PRETRAIN, args, writer, settings)
    start, _ = run.resume(resume_path)
    log.info(f"{task.name} pretraining of {args.model} ({task.num_parameters / 1e6:.2f} M parameters) on "
             f"{len(dataset)} {'clips' if student.video else 'images'} on {device}")
    log.info(describe_run(args, dist_info.world_size, precision_name(amp_dtype), filled, lr_given))
    fit(run, start)
    cleanup()
    return task


if __name__ == "__main__":
    run_cli(lambda: main(get_args_parser().parse_args()))
