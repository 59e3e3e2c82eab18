"""HPM (or, with --no-learning_loss, MAE) pretraining. `python main_pretrain.py` runs the
built-in default: the tiny preset on scikit-learn's digits, in a few minutes on a CPU."""
import argparse
import copy
import dataclasses
import datetime
import logging
import time
from pathlib import Path

import torch
from torch.nn.parallel import DistributedDataParallel
from torch.utils.tensorboard import SummaryWriter
from timm.optim import param_groups_weight_decay

import models_hpm
from engine_pretrain import PretrainSetup, make_mask, reconstruction_grid, train_one_epoch
from util.args import check_common, check_output_dir, common_parser, effective_lr
from util.checkpoint import FORMAT_PRETRAIN, find_resume, resume_training, save_training_checkpoint
from util.data import build_dataset, eval_transform, pretrain_transform, train_loader, with_transform
from util.distributed import cleanup
from util.errors import UserError, run_cli
from util.masking import block_mask, random_mask, regular_mask
from util.preemption import STOP, ResumePoint, rng_state
from util.runtime import append_json_log, resolve_amp, seed_epoch, start_process
from util.schedules import hard_patch_alpha

log = logging.getLogger("hpm")


def get_args_parser(add_help: bool = True) -> argparse.ArgumentParser:
    p = argparse.ArgumentParser("HPM pretraining", add_help=add_help, parents=[common_parser()],
                                formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    g = p.add_argument_group("HPM")
    g.add_argument("--mask_ratio", type=float, default=0.75, help="share of patches masked")
    g.add_argument("--norm_pix_loss", action="store_true", help="per-patch normalised pixel targets")
    g.add_argument("--learning_loss", action=argparse.BooleanOptionalAction, default=True,
                   help="HPM: loss predictor + EMA teacher choosing hard patches; off = MAE baseline")
    g.add_argument("--relative", action=argparse.BooleanOptionalAction, default=True,
                   help="relative (ranking) loss-prediction objective; off = absolute (MSE) objective")
    g.add_argument("--mask_regular", action="store_true", help="MAE mode: UM-MAE 2x2 regular mask")
    g.add_argument("--mask_block", action="store_true", help="MAE mode: contiguous block mask")
    g.add_argument("--vis_mask_ratio", type=float, default=0.0,
                   help="UM-MAE: share of visible tokens replaced by a learned token in the encoder")
    g.add_argument("--compile", action="store_true",
                   help="torch.compile the student and the teacher: faster steps after a one-time compile")
    g.add_argument("--experiment", type=str, default=None,
                   help="name of the run: outputs go to output_dir/<experiment>")
    p.set_defaults(model="mae_vit_tiny_patch4", blr=1.5e-3, epochs=40, warmup_epochs=5, clip_grad=5.0,
                   weight_decay=0.05)
    return p


def build_model(args: argparse.Namespace) -> models_hpm.MaskedAutoencoderHPM:
    kwargs = dict(mask_ratio=args.mask_ratio, norm_pix_loss=args.norm_pix_loss, learning_loss=args.learning_loss,
                  relative=args.relative, vis_mask_ratio=args.vis_mask_ratio)
    if args.input_size is not None:
        kwargs["img_size"] = args.input_size
    try:
        return models_hpm.create_pretrain_model(args.model, **kwargs)
    except ValueError as exc:
        raise UserError(str(exc)) from None


def check_args(args: argparse.Namespace) -> None:
    check_common(args)
    if not 0.0 < args.mask_ratio < 1.0:
        raise UserError(f"--mask_ratio {args.mask_ratio} must lie in (0, 1), e.g. 0.75")
    if not 0.0 <= args.vis_mask_ratio < 1.0:
        raise UserError(f"--vis_mask_ratio {args.vis_mask_ratio} must lie in [0, 1)")
    if args.learning_loss and (args.mask_regular or args.mask_block):
        raise UserError("--mask_regular/--mask_block choose the MAE baseline's mask, but HPM's masks come "
                        "from its teacher: add --no-learning_loss, or drop the mask flag")
    if args.mask_regular and args.mask_block:
        raise UserError("--mask_regular and --mask_block exclude each other: pick one")
    if args.mask_regular and args.mask_ratio != 0.75:
        raise UserError(f"--mask_regular keeps one patch of each 2x2 cell, so it needs --mask_ratio 0.75 "
                        f"(got {args.mask_ratio})")


def mae_mask_fn(args: argparse.Namespace, model: models_hpm.MaskedAutoencoderHPM):
    g, m = model.grid_size, model.num_masked
    if args.mask_regular:
        return lambda n, device, gen: regular_mask(n, g, device=device, generator=gen)
    if args.mask_block:
        return lambda n, device, gen: block_mask(n, g, m, device=device, generator=gen)
    return lambda n, device, gen: random_mask(n, g * g, m, device=device, generator=gen)


def make_setup(args: argparse.Namespace, student: models_hpm.MaskedAutoencoderHPM, device: torch.device,
               amp_dtype: torch.dtype | None, world_size: int) -> PretrainSetup:
    """Teacher (HPM), AdamW (no decay on 1-D parameters and biases), scaler, DDP and compile."""
    teacher = copy.deepcopy(student).eval().requires_grad_(False) if args.learning_loss else None
    optimizer = torch.optim.AdamW(param_groups_weight_decay(student, args.weight_decay), lr=args.lr,
                                  betas=(0.9, 0.95), fused=device.type in ("cuda", "cpu"))
    scaler = torch.amp.GradScaler(device.type, enabled=amp_dtype == torch.float16)
    model = student
    if world_size > 1:
        model = DistributedDataParallel(student, device_ids=[device.index] if device.type == "cuda" else None)
    if args.compile:
        model = torch.compile(model)
        if teacher is not None:
            teacher.predict_losses = torch.compile(teacher.predict_losses)
    return PretrainSetup(model, student, teacher, optimizer, scaler, mae_mask_fn(args, student),
                         torch.Generator(device=device), device, amp_dtype)


def main(args: argparse.Namespace) -> tuple[models_hpm.MaskedAutoencoderHPM, models_hpm.MaskedAutoencoderHPM | None]:
    """Pretrain; returns the student and the teacher (None for MAE) for programmatic use."""
    dist_info, device = start_process(args.device, args.dist_url)
    args.world_size = dist_info.world_size
    check_args(args)
    if args.experiment:
        args.output_dir = str(Path(args.output_dir) / args.experiment)
        args.log_dir = str(Path(args.log_dir) / args.experiment) if args.log_dir else None

    # Everything that can fail on bad input happens before the output directory is touched.
    torch.manual_seed(args.seed)   # the same initial student (and so teacher) on every process
    student = build_model(args).to(device)
    args.input_size = student.patch_embed.img_size[0]
    dataset = build_dataset(args.data_path, "train", pretrain_transform(args.input_size), args.bad_images)
    loader = train_loader(dataset, dist_info, args.batch_size, args.num_workers,
                          args.pin_mem and device.type == "cuda", args.seed)
    output_dir = check_output_dir(args.output_dir) if dist_info.is_main else Path(args.output_dir)
    resume_path = find_resume(args.resume, args.auto_resume, output_dir)

    args.lr = effective_lr(args, dist_info.world_size)
    setup = make_setup(args, student, device, resolve_amp(args.amp, device), dist_info.world_size)
    teacher, amp_dtype = setup.teacher, setup.amp_dtype
    start = ResumePoint(args.start_epoch)
    if resume_path is not None:
        ckpt = resume_training(resume_path, FORMAT_PRETRAIN, args.model, {
            "model": student, "teacher": teacher, "optimizer": setup.optimizer, "scaler": setup.scaler})
        if teacher is None and ckpt.get("teacher") is not None:
            raise UserError(f"--resume {resume_path}: an HPM checkpoint, but --no-learning_loss is set; drop it")
        start = ResumePoint.from_checkpoint(ckpt)
        log.info(f"resumed from {resume_path} at {start}")
    mask_generator = setup.mask_generator

    writer = None
    if dist_info.is_main:
        preview = with_transform(dataset, eval_transform(args.input_size, crop_pct=1.0))
        preview_imgs = torch.stack([preview[i][0] for i in range(min(8, len(preview)))]).to(device)
        log_dir = check_output_dir(args.log_dir, "--log_dir") if args.log_dir else output_dir
        writer = SummaryWriter(log_dir=str(log_dir))
    n_params = sum(p.numel() for p in student.parameters() if p.requires_grad)
    log.info(f"{'HPM' if teacher is not None else 'MAE'} pretraining of {args.model} ({n_params / 1e6:.2f} M "
             f"parameters) on {len(dataset)} images, {dist_info.world_size} process(es) on {device}, "
             f"lr {args.lr:.3g}, effective batch {args.batch_size * args.accum_iter * dist_info.world_size}, "
             f"amp {amp_dtype}")

    STOP.install()
    steps_per_epoch = len(loader)
    started = time.time()
    for epoch in range(start.epoch, args.epochs):
        mask_generator.manual_seed(seed_epoch(args.seed, dist_info.rank, epoch))
        first_step = start.first_step(epoch, dist_info.is_main, mask_generator)
        loader.sampler.set_epoch(epoch, skip=first_step * args.batch_size)
        stats, next_step = train_one_epoch(setup, loader, epoch, args, writer, first_step)
        finished = next_step >= steps_per_epoch
        if dist_info.is_main:
            paths = [output_dir / "checkpoint-last.pth"]
            if finished and ((epoch + 1) % args.save_every == 0 or epoch + 1 == args.epochs):
                paths.append(output_dir / f"checkpoint-{epoch}.pth")
            save_training_checkpoint(paths, FORMAT_PRETRAIN, args.model, epoch + int(finished), args,
                                     {"model": student, "teacher": teacher, "optimizer": setup.optimizer,
                                      "scaler": setup.scaler,
                                      "next_step": 0 if finished else next_step,
                                      "rng": None if finished else rng_state(mask_generator)})
        if not finished:
            STOP.finish(epoch, next_step)
            return student, teacher
        if dist_info.is_main:
            append_json_log(output_dir / "log.txt", {"epoch": epoch, **{f"train_{k}": v for k, v in stats.items()},
                                                     "n_parameters": n_params})
            log_images(writer, setup, preview_imgs, epoch, args)
            done = epoch + 1 - start.epoch
            eta = (time.time() - started) / done * (args.epochs - epoch - 1)
            log.info(f"epoch {epoch} done: loss {stats['loss']:.4f}; run ETA {datetime.timedelta(seconds=int(eta))}")
    if writer is not None:
        writer.close()
    log.info(f"training time {datetime.timedelta(seconds=int(time.time() - started))}")
    cleanup()
    return student, teacher


def log_images(writer: SummaryWriter, setup: PretrainSetup, imgs: torch.Tensor, epoch: int, args) -> None:
    """The same images and mask seed every epoch, masked as this epoch's training masks them."""
    fixed = dataclasses.replace(setup, mask_generator=torch.Generator(device=imgs.device).manual_seed(args.seed))
    mask = make_mask(fixed, imgs, hard_patch_alpha(epoch, args.epochs))
    pred_loss = setup.teacher.predict_losses(imgs).float() if setup.teacher is not None else None
    writer.add_image("reconstruction", reconstruction_grid(setup.student, imgs, mask, pred_loss), epoch)
    writer.flush()


if __name__ == "__main__":
    run_cli(lambda: main(get_args_parser().parse_args()))
