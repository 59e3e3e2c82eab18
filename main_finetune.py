"""Fine-tuning (and `--eval`) of a ViT classifier from HPM, MAE or timm weights.

`python main_finetune.py` fine-tunes the tiny preset on the built-in digits; pass
`--finetune output_dir/checkpoint-last.pth` to start from a pretraining run.
"""
import argparse
import logging

import torch
import torch.nn as nn
from timm.data import Mixup
from timm.layers import trunc_normal_
from timm.loss import LabelSmoothingCrossEntropy, SoftTargetCrossEntropy
from timm.utils import ModelEmaV3

import models_vit
from engine_finetune import ClassifierSetup, ClassifierTask, describe_eval, evaluate
from models_vit import build_classifier
from util.args import (
    AUGMENTATION_DEFAULTS,
    DataDefault,
    augmentation_parser,
    clip_parser,
    data_parser,
    make_parser,
    model_parser,
    pooling_parser,
    runtime_parser,
    training_parser,
    weights_parser,
    with_data_defaults,
)
from util.checkpoint import FORMAT_FINETUNE, load_pretrained
from util.data import finetune_transform
from util.distributed import cleanup
from util.errors import UserError, run_cli
from util.optim import param_groups_lrd
from util.video import finetune_clip_transform

log = logging.getLogger("hpm")


# The built-in data's values finish in minutes on a CPU; on a --data_path the reference's ImageNet recipe
# (ViT-B: 100 epochs; FINETUNE.md) for images and VideoMAE's Kinetics-400 recipe (800-epoch row) for clips.
FINETUNE_DEFAULTS = {
    "blr": DataDefault(2e-3, 5e-4, clips=1e-3),
    "epochs": DataDefault(30, 100),
    "warmup_epochs": DataDefault(2, 5),
    "layer_decay": DataDefault(0.75, 0.8, clips=0.75),
    "mixup": DataDefault(0.0, 0.8),
    "cutmix": DataDefault(0.0, 1.0),
    # on the built-in clips none: rotating or shifting a 12 px digit changes or hides its motion
    "aa": DataDefault("rand-m9-mstd0.5-inc1", "rand-m9-mstd0.5-inc1", clips="rand-m7-n4-mstd0.5-inc1",
                      built_in_clips=""),
    **AUGMENTATION_DEFAULTS,
}


def get_args_parser(add_help: bool = True) -> argparse.ArgumentParser:
    parents = [model_parser(models_vit.CLASSIFIERS.names(), "vit_tiny_patch4"), weights_parser(),
               pooling_parser(global_pool=True), data_parser(), augmentation_parser(), clip_parser(training=True),
               training_parser(), runtime_parser()]
    p = make_parser("ViT fine-tuning", parents, add_help, min_lr=1e-6, save_every=10)
    g = p.add_argument_group("fine-tuning recipe")
    g.add_argument("--nb_classes", type=int, default=None, help="number of classes (default: the dataset's)")
    g.add_argument("--eval", action="store_true", help="only evaluate (weights from --resume or --finetune)")
    g.add_argument("--layer_decay", type=float, default=None, help="layer-wise lr decay")
    g.add_argument("--drop_path", type=float, default=0.1, help="drop path rate")
    g.add_argument("--color_jitter", type=float, default=None, help="color jitter (off when RandAugment is on)")
    g.add_argument("--aa", type=str, default=None,
                   help="RandAugment policy ('' for none; clips: the same draw on every frame)")
    g.add_argument("--smoothing", type=float, default=0.1, help="label smoothing")
    g.add_argument("--reprob", type=float, default=0.25, help="random erasing probability")
    g.add_argument("--remode", type=str, default="pixel", help="random erasing mode")
    g.add_argument("--recount", type=int, default=1, help="random erasing count")
    g.add_argument("--mixup", type=float, default=None, help="mixup alpha (> 0 enables)")
    g.add_argument("--cutmix", type=float, default=None, help="cutmix alpha (> 0 enables)")
    g.add_argument("--cutmix_minmax", type=float, nargs="+", default=None,
                   help="cutmix min/max box ratio (overrides --cutmix)")
    g.add_argument("--mixup_prob", type=float, default=1.0, help="probability of mixup or cutmix per batch")
    g.add_argument("--mixup_switch_prob", type=float, default=0.5, help="probability of cutmix instead of mixup")
    g.add_argument("--mixup_mode", type=str, default="batch", choices=["batch", "pair", "elem"],
                   help="mix per batch, pair or element")
    g.add_argument("--num_sample", type=int, default=1,
                   help="clips: augmented copies of each decoded clip per step (VideoMAE's repeated augmentation; "
                        "the step's batch is batch_size x num_sample)")
    g.add_argument("--model_ema", action="store_true", help="keep and evaluate an EMA of the fine-tuned weights")
    g.add_argument("--model_ema_decay", type=float, default=0.9999, help="decay of --model_ema")
    return with_data_defaults(p, FINETUNE_DEFAULTS)


def make_criterion(args: argparse.Namespace, num_classes: int) -> tuple[nn.Module, Mixup | None]:
    """Mixup/CutMix with soft targets, else label smoothing, else plain cross-entropy."""
    if args.mixup > 0 or args.cutmix > 0 or args.cutmix_minmax is not None:
        mixup_fn = Mixup(mixup_alpha=args.mixup, cutmix_alpha=args.cutmix, cutmix_minmax=args.cutmix_minmax,
                         prob=args.mixup_prob, switch_prob=args.mixup_switch_prob, mode=args.mixup_mode,
                         label_smoothing=args.smoothing, num_classes=num_classes)
        return SoftTargetCrossEntropy(), mixup_fn
    if args.smoothing > 0:
        return LabelSmoothingCrossEntropy(smoothing=args.smoothing), None
    return nn.CrossEntropyLoss(), None


def main(args: argparse.Namespace) -> None:
    if args.eval and not (args.resume or args.finetune):
        raise UserError("--eval needs weights: pass --resume <fine-tuned checkpoint> (or --finetune)")
    video = models_vit.is_video_classifier(args.model)
    if args.num_sample < 1 or (args.num_sample > 1 and not video):
        raise UserError(f"--num_sample {args.num_sample}: repeated augmentation is for clips (video_vit_* models), "
                        f"at least 1")
    setup = ClassifierSetup(args, FORMAT_FINETUNE, FINETUNE_DEFAULTS, None if args.eval else finetune_transform,
                            finetune_clip_transform)
    model = build_classifier(args, setup.num_classes, drop_path_rate=args.drop_path).to(setup.device)

    if args.eval:
        if args.resume:
            load_pretrained(model, args.resume, what="--resume", allowed_missing=())
        else:
            load_pretrained(model, args.finetune, teacher=args.teacher)
        log.info(describe_eval(evaluate(model, setup.val_loader, setup.device, setup.amp_dtype)))
        cleanup()
        return

    resume_path = setup.prepare_output()
    if setup.finished:
        cleanup()
        return
    if args.finetune and resume_path is None:
        missing = load_pretrained(model, args.finetune, teacher=args.teacher)
        log.info(f"loaded pretrained weights from {args.finetune}; newly initialised: {', '.join(missing)}")
        trunc_normal_(model.head.weight, std=2e-5)
    elif resume_path is None:
        log.warning("no --finetune given: training from random initialisation")

    param_groups = param_groups_lrd(model, args.weight_decay, model.no_weight_decay(), args.layer_decay)
    optimizer = torch.optim.AdamW(param_groups, lr=args.lr, fused=setup.device.type in ("cuda", "cpu"))
    model_ema = ModelEmaV3(model, decay=args.model_ema_decay) if args.model_ema else None
    criterion, mixup_fn = make_criterion(args, setup.num_classes)
    task = ClassifierTask(model, model, criterion, setup.val_loader, setup.device, setup.amp_dtype,
                          setup.dist.world_size, mixup_fn, model_ema)
    setup.fit(task, optimizer, resume_path,
              f"fine-tuning {args.model} ({sum(p.numel() for p in model.parameters()) / 1e6:.2f} M parameters)")
    cleanup()


if __name__ == "__main__":
    run_cli(lambda: main(get_args_parser().parse_args()))
