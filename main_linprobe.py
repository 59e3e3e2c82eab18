"""Linear probing (MAE's protocol): a BatchNorm + linear head on the frozen encoder's class token.

`python main_linprobe.py` probes on the built-in digits; pass `--finetune` with pretrained weights.
"""
import argparse
import logging
from pathlib import Path

import torch
import torch.nn as nn
from torch.nn.parallel import DistributedDataParallel
from torch.utils.tensorboard import SummaryWriter
from torchvision import transforms
from timm.data.constants import IMAGENET_DEFAULT_MEAN, IMAGENET_DEFAULT_STD
from timm.layers import trunc_normal_

from engine_finetune import ClassifierRun, describe_eval, evaluate, fit
from main_finetune import build_classifier, classifier_parser
from models_vit import features
from util.args import check_common, check_output_dir, common_parser, effective_lr
from util.checkpoint import FORMAT_LINPROBE, find_resume, load_pretrained, resume_training
from util.data import build_dataset, eval_loader, eval_transform, train_loader
from util.distributed import cleanup
from util.errors import UserError, run_cli
from util.lars import LARS
from util.preemption import ResumePoint
from util.runtime import resolve_amp, start_process

log = logging.getLogger("hpm")


class LinearProbe(nn.Module):
    """A frozen ViT (always in eval mode, run without gradients) under a trainable head.

    The head replaces the ViT's own (`vit.head = BatchNorm1d + Linear`), so the saved
    `vit.state_dict()` has MAE's linear-probe keys (head.0.*, head.1.*).
    """

    def __init__(self, vit: nn.Module, num_classes: int) -> None:
        super().__init__()
        dim = vit.num_features
        head = nn.Linear(dim, num_classes)
        trunc_normal_(head.weight, std=0.01)
        nn.init.zeros_(head.bias)
        vit.head = nn.Sequential(nn.BatchNorm1d(dim, affine=False, eps=1e-6), head)
        vit.requires_grad_(False)
        vit.head.requires_grad_(True)
        self.vit = vit

    def train(self, mode: bool = True) -> "LinearProbe":
        self.training = mode
        self.vit.eval()
        self.vit.head.train(mode)
        return self

    def forward(self, imgs: torch.Tensor) -> torch.Tensor:
        with torch.no_grad():
            feats = features(self.vit, imgs)
        return self.vit.head(feats)


def get_args_parser(add_help: bool = True) -> argparse.ArgumentParser:
    p = argparse.ArgumentParser("Linear probing", add_help=add_help, parents=[common_parser(), classifier_parser()],
                                formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    g = p.add_argument_group("linear probing")
    g.add_argument("--optimizer", choices=["lars", "sgd"], default="lars",
                   help="LARS (MAE's protocol) or SGD with momentum 0.9 (the reference HPM script)")
    p.set_defaults(model="vit_tiny_patch4", global_pool=False, blr=0.1, weight_decay=0.0, epochs=20,
                   warmup_epochs=2, batch_size=256, save_every=10)
    return p


def probe_transform(input_size: int):
    return transforms.Compose([
        transforms.RandomResizedCrop(input_size, interpolation=transforms.InterpolationMode.BICUBIC),
        transforms.RandomHorizontalFlip(),
        transforms.ToTensor(),
        transforms.Normalize(IMAGENET_DEFAULT_MEAN, IMAGENET_DEFAULT_STD)])


def main(args: argparse.Namespace) -> None:
    dist_info, device = start_process(args.device, args.dist_url)
    check_common(args)
    if args.eval and not args.resume:
        raise UserError("--eval needs a linear-probe checkpoint: pass --resume PATH")

    probe_vit = build_classifier(args, 1)
    args.input_size = probe_vit.patch_embed.img_size[0]
    val_set = build_dataset(args.data_path, "val", eval_transform(args.input_size), args.bad_images)
    train_set = build_dataset(args.data_path, "train", probe_transform(args.input_size), args.bad_images)
    num_classes = args.nb_classes or getattr(train_set, "num_classes", None)
    if not num_classes:
        raise UserError("cannot tell the number of classes from the data: pass --nb_classes")
    torch.manual_seed(args.seed)
    vit = build_classifier(args, num_classes)
    if args.finetune:
        load_pretrained(vit, args.finetune, teacher=args.teacher)
    elif not args.resume:
        log.warning("no --finetune given: probing a randomly initialised encoder")
    model = LinearProbe(vit, num_classes).to(device)
    pin = args.pin_mem and device.type == "cuda"
    val_loader = eval_loader(val_set, dist_info, args.batch_size, args.num_workers, pin)
    amp_dtype = resolve_amp(args.amp, device)
    args.lr = effective_lr(args, dist_info.world_size)
    head_params = list(model.vit.head.parameters())
    if args.optimizer == "lars":
        optimizer = LARS(head_params, lr=args.lr, weight_decay=args.weight_decay)
    else:
        optimizer = torch.optim.SGD(head_params, lr=args.lr, momentum=0.9, weight_decay=args.weight_decay)
    scaler = torch.amp.GradScaler(device.type, enabled=amp_dtype == torch.float16)

    if args.eval:
        resume_training(Path(args.resume), FORMAT_LINPROBE, args.model, {"model": model.vit})
        stats = evaluate(model, val_loader, device, amp_dtype)
        log.info(describe_eval(stats))
        cleanup()
        return

    loader = train_loader(train_set, dist_info, args.batch_size, args.num_workers, pin, args.seed)
    output_dir = check_output_dir(args.output_dir) if dist_info.is_main else Path(args.output_dir)
    start, best_acc = ResumePoint(args.start_epoch), 0.0
    resume_path = find_resume(args.resume, args.auto_resume, output_dir)
    if resume_path is not None:
        ckpt = resume_training(resume_path, FORMAT_LINPROBE, args.model,
                               {"model": model.vit, "optimizer": optimizer, "scaler": scaler})
        start, best_acc = ResumePoint.from_checkpoint(ckpt), float(ckpt.get("best_acc1", 0.0))
        log.info(f"resumed from {resume_path} at {start}")
    train_model = model
    if dist_info.world_size > 1:
        train_model = DistributedDataParallel(model, device_ids=[device.index] if device.type == "cuda" else None)
    writer = SummaryWriter(log_dir=args.log_dir or str(output_dir)) if dist_info.is_main else None
    log.info(f"linear probing {args.model} ({'global pool' if args.global_pool else 'class token'}), "
             f"{num_classes} classes, {len(train_set)} training / {len(val_set)} validation images, "
             f"{args.optimizer} lr {args.lr:.3g}")

    run = ClassifierRun(train_model, model.vit, nn.CrossEntropyLoss(), loader, val_loader, optimizer, scaler, device,
                        amp_dtype, FORMAT_LINPROBE, output_dir, dist_info.is_main, dist_info.rank, writer=writer)
    fit(run, args, start, best_acc)
    cleanup()


if __name__ == "__main__":
    run_cli(lambda: main(get_args_parser().parse_args()))
