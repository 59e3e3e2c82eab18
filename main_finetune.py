"""Fine-tuning (and `--eval`) of a ViT classifier from HPM, MAE or timm weights.

`python main_finetune.py` fine-tunes the tiny preset on the built-in digits; pass
`--finetune output_dir/checkpoint-last.pth` to start from a pretraining run.
"""
import argparse
import logging
from pathlib import Path

import torch
import torch.nn as nn
from torch.nn.parallel import DistributedDataParallel
from torch.utils.tensorboard import SummaryWriter
from timm.data import Mixup
from timm.layers import trunc_normal_
from timm.loss import LabelSmoothingCrossEntropy, SoftTargetCrossEntropy
from timm.optim import param_groups_layer_decay
from timm.utils import ModelEmaV3

import models_vit
from engine_finetune import ClassifierRun, describe_eval, evaluate, fit
from util.args import check_common, check_output_dir, common_parser, effective_lr
from util.checkpoint import FORMAT_FINETUNE, find_resume, load_pretrained, resume_training
from util.data import build_dataset, eval_loader, eval_transform, finetune_transform, train_loader
from util.distributed import cleanup
from util.errors import UserError, run_cli
from util.preemption import ResumePoint
from util.runtime import resolve_amp, start_process

log = logging.getLogger("hpm")


def classifier_parser() -> argparse.ArgumentParser:
    """Flags shared by fine-tuning and linear probing: the classifier and where its weights come from."""
    p = argparse.ArgumentParser(add_help=False)
    g = p.add_argument_group("classifier")
    g.add_argument("--finetune", type=str, default=None,
                   help="pretrained weights: our pretraining checkpoints, reference HPM, MAE or timm files")
    g.add_argument("--teacher", action="store_true", help="take the EMA teacher's weights instead of the student's")
    g.add_argument("--global_pool", action="store_true", default=True,
                   help="average patch tokens + fc_norm (default)")
    g.add_argument("--cls_token", action="store_false", dest="global_pool",
                   help="use the class token after the pretrained norm")
    g.add_argument("--nb_classes", type=int, default=None, help="number of classes (default: the dataset's)")
    g.add_argument("--eval", action="store_true", help="only evaluate (weights from --resume or --finetune)")
    g.add_argument("--dist_eval", action="store_true", default=True,
                   help="evaluate sharded across processes (always exact: no sample dropped or repeated)")
    return p


def get_args_parser(add_help: bool = True) -> argparse.ArgumentParser:
    p = argparse.ArgumentParser("ViT fine-tuning", add_help=add_help, parents=[common_parser(), classifier_parser()],
                                formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    g = p.add_argument_group("fine-tuning recipe")
    g.add_argument("--layer_decay", type=float, default=0.75, help="layer-wise lr decay")
    g.add_argument("--drop_path", type=float, default=0.1, help="drop path rate")
    g.add_argument("--color_jitter", type=float, default=None, help="color jitter (off when RandAugment is on)")
    g.add_argument("--aa", type=str, default="rand-m9-mstd0.5-inc1", help="RandAugment policy ('' for none)")
    g.add_argument("--smoothing", type=float, default=0.1, help="label smoothing")
    g.add_argument("--reprob", type=float, default=0.25, help="random erasing probability")
    g.add_argument("--remode", type=str, default="pixel", help="random erasing mode")
    g.add_argument("--recount", type=int, default=1, help="random erasing count")
    g.add_argument("--mixup", type=float, default=0.0, help="mixup alpha (> 0 enables)")
    g.add_argument("--cutmix", type=float, default=0.0, help="cutmix alpha (> 0 enables)")
    g.add_argument("--cutmix_minmax", type=float, nargs="+", default=None, help="cutmix min/max ratio")
    g.add_argument("--mixup_prob", type=float, default=1.0)
    g.add_argument("--mixup_switch_prob", type=float, default=0.5)
    g.add_argument("--mixup_mode", type=str, default="batch", choices=["batch", "pair", "elem"])
    g.add_argument("--model_ema", action="store_true", help="keep and evaluate an EMA of the fine-tuned weights")
    g.add_argument("--model_ema_decay", type=float, default=0.9999)
    p.set_defaults(model="vit_tiny_patch4", blr=2e-3, epochs=30, warmup_epochs=2, min_lr=1e-6, weight_decay=0.05,
                   save_every=10)
    return p


def build_classifier(args: argparse.Namespace, num_classes: int, **kwargs) -> nn.Module:
    if args.input_size is not None:
        kwargs["img_size"] = args.input_size
    try:
        return models_vit.create_classifier(args.model, num_classes=num_classes, global_pool=args.global_pool,
                                            **kwargs)
    except (ValueError, AssertionError) as exc:
        raise UserError(str(exc) if "--model" in str(exc) else f"--model {args.model}: {exc}") from None


def main(args: argparse.Namespace) -> None:
    dist_info, device = start_process(args.device, args.dist_url)
    check_common(args)
    if args.eval and not (args.resume or args.finetune):
        raise UserError("--eval needs weights: pass --resume <fine-tuned checkpoint> (or --finetune)")

    probe = build_classifier(args, 1)
    args.input_size = probe.patch_embed.img_size[0]
    val_set = build_dataset(args.data_path, "val", eval_transform(args.input_size), args.bad_images)
    train_set = None if args.eval else build_dataset(args.data_path, "train",
                                                     finetune_transform(args.input_size, args), args.bad_images)
    num_classes = args.nb_classes or getattr(train_set or val_set, "num_classes", None)
    if not num_classes:
        raise UserError("cannot tell the number of classes from the data: pass --nb_classes")
    torch.manual_seed(args.seed)
    model = build_classifier(args, num_classes, drop_path_rate=args.drop_path).to(device)
    pin = args.pin_mem and device.type == "cuda"
    val_loader = eval_loader(val_set, dist_info, args.batch_size, args.num_workers, pin)
    amp_dtype = resolve_amp(args.amp, device)

    if args.eval:
        if args.resume:
            load_pretrained(model, args.resume, what="--resume", allowed_missing=())
        else:
            load_pretrained(model, args.finetune, teacher=args.teacher)
        stats = evaluate(model, val_loader, device, amp_dtype)
        log.info(describe_eval(stats))
        cleanup()
        return

    loader = train_loader(train_set, dist_info, args.batch_size, args.num_workers, pin, args.seed)
    output_dir = check_output_dir(args.output_dir) if dist_info.is_main else Path(args.output_dir)
    resume_path = find_resume(args.resume, args.auto_resume, output_dir)
    if args.finetune and resume_path is None:
        missing = load_pretrained(model, args.finetune, teacher=args.teacher)
        log.info(f"loaded pretrained weights from {args.finetune}; newly initialised: {', '.join(missing)}")
        trunc_normal_(model.head.weight, std=2e-5)
    elif resume_path is None:
        log.warning("no --finetune given: training from random initialisation")

    args.lr = effective_lr(args, dist_info.world_size)
    param_groups = param_groups_layer_decay(model, args.weight_decay, model.no_weight_decay(),
                                            layer_decay=args.layer_decay)
    optimizer = torch.optim.AdamW(param_groups, lr=args.lr, fused=device.type in ("cuda", "cpu"))
    scaler = torch.amp.GradScaler(device.type, enabled=amp_dtype == torch.float16)
    model_ema = ModelEmaV3(model, decay=args.model_ema_decay) if args.model_ema else None
    start, best_acc = ResumePoint(args.start_epoch), 0.0
    if resume_path is not None:
        ckpt = resume_training(resume_path, FORMAT_FINETUNE, args.model,
                               {"model": model, "model_ema": model_ema.module if model_ema else None,
                                "optimizer": optimizer, "scaler": scaler})
        start, best_acc = ResumePoint.from_checkpoint(ckpt), float(ckpt.get("best_acc1", 0.0))
        log.info(f"resumed from {resume_path} at {start}")

    mixup_fn = None
    if args.mixup > 0 or args.cutmix > 0 or args.cutmix_minmax is not None:
        mixup_fn = Mixup(mixup_alpha=args.mixup, cutmix_alpha=args.cutmix, cutmix_minmax=args.cutmix_minmax,
                         prob=args.mixup_prob, switch_prob=args.mixup_switch_prob, mode=args.mixup_mode,
                         label_smoothing=args.smoothing, num_classes=num_classes)
        criterion = SoftTargetCrossEntropy()
    elif args.smoothing > 0:
        criterion = LabelSmoothingCrossEntropy(smoothing=args.smoothing)
    else:
        criterion = nn.CrossEntropyLoss()

    train_model = model
    if dist_info.world_size > 1:
        train_model = DistributedDataParallel(model, device_ids=[device.index] if device.type == "cuda" else None)
    writer = SummaryWriter(log_dir=args.log_dir or str(output_dir)) if dist_info.is_main else None
    log.info(f"fine-tuning {args.model} ({sum(p.numel() for p in model.parameters()) / 1e6:.2f} M parameters), "
             f"{num_classes} classes, {len(train_set)} training / {len(val_set)} validation images, lr {args.lr:.3g}")

    run = ClassifierRun(train_model, model, criterion, loader, val_loader, optimizer, scaler, device, amp_dtype,
                        FORMAT_FINETUNE, output_dir, dist_info.is_main, dist_info.rank, mixup_fn, model_ema, writer)
    fit(run, args, start, best_acc)
    cleanup()


if __name__ == "__main__":
    run_cli(lambda: main(get_args_parser().parse_args()))
