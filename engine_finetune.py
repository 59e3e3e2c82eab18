"""The classifier step (fine-tuning and linear probing) for the shared loop, the
full-validation-set evaluation, and the wiring both scripts share."""
import logging
from pathlib import Path
from typing import Callable

import torch
import torch.nn as nn
from torch.nn.parallel import DistributedDataParallel
from torch.utils.tensorboard import SummaryWriter

from engine import Run, Timer, fit, no_timer
from models_vit import build_classifier, is_video_classifier
from util.args import (
    DataDefault,
    check_augmentation,
    check_clip_args,
    check_common,
    check_output_dir,
    default_workers,
    describe_run,
    resolve_data_defaults,
    run_settings,
)
from util.checkpoint import find_resume, finished_run
from util.data import build_dataset, eval_loader, eval_transform, train_loader
from util.distributed import is_distributed
from util.errors import UserError
from util.normalization import downstream_stats
from util.optim import effective_lr
from util.precision import autocast, make_scaler, precision_name, resolve_amp
from util.process import start_process
from util.video import ClipViews, clip_dataset, stacked_views_collate

log = logging.getLogger("hpm")


def describe_eval(stats: dict[str, float]) -> str:
    return (f"accuracy of the network on the {stats['count']} validation samples: top-1 {stats['acc1']:.2f}%, "
            f"top-5 {stats['acc5']:.2f}%, loss {stats['loss']:.4f}")


def view_scores(model: nn.Module, inputs: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Scores and per-sample loss inputs: logits of images (N, 3, H, W) or single clips; for test views
    (N, V, 3, T, H, W) the log of the softmax averaged over the V views of each video (VideoMAE's
    multi-view test), so each video counts once. -> (N, K) scores, (N, K) log-probabilities."""
    if inputs.dim() == 6:
        n, v = inputs.shape[:2]
        probs = model(inputs.flatten(0, 1)).float().softmax(-1).view(n, v, -1).mean(1)
        log_probs = probs.clamp_min(torch.finfo(probs.dtype).tiny).log()
        return log_probs, log_probs
    logits = model(inputs).float()
    return logits, logits.log_softmax(-1)


@torch.no_grad()
def evaluate(model: nn.Module, loader, device: torch.device, amp_dtype=None) -> dict[str, float]:
    """Top-1, top-5 and loss over every sample of the (sharded, unpadded) validation set; a sample
    with several test views is scored on their averaged softmax (`view_scores`)."""
    model.eval()
    totals = torch.zeros(4, dtype=torch.float64, device=device)   # loss sum, top1, top5, count
    for imgs, targets in loader:
        imgs = imgs.to(device, non_blocking=True)
        targets = targets.to(device, non_blocking=True)
        with autocast(device, amp_dtype):
            scores, log_probs = view_scores(model, imgs)
        k = min(5, scores.shape[1])
        top = scores.topk(k, dim=1).indices
        hits = top == targets.unsqueeze(1)
        totals += torch.stack([nn.functional.nll_loss(log_probs.float(), targets, reduction="sum").double(),
                               hits[:, :1].sum().double(), hits.sum().double(),
                               torch.ones_like(targets, dtype=torch.float64).sum()])   # counted on the device: no sync
    if is_distributed():
        torch.distributed.all_reduce(totals)
    loss, top1, top5, count = totals.tolist()
    count = max(count, 1.0)
    return {"loss": loss / count, "acc1": 100.0 * top1 / count, "acc5": 100.0 * top5 / count, "count": int(count)}


class ClassifierTask:
    """Supervised training of a classifier (fine-tuning, or a linear probe's head); each epoch ends
    with the full validation set, and the best top-1 is kept as checkpoint-best.pth."""

    objective = "loss"
    finite_losses = {"loss": "training"}
    score_key = "test_acc1"
    generators = ()

    def __init__(self, model: nn.Module, saved_model: nn.Module, criterion: nn.Module, val_loader,
                 device: torch.device, amp_dtype: torch.dtype | None, world_size: int = 1,
                 mixup_fn: Callable | None = None, model_ema=None) -> None:
        self.saved_model = saved_model                 # what checkpoints hold and validation scores
        self.model = model
        if world_size > 1:
            self.model = DistributedDataParallel(model, device_ids=[device.index] if device.type == "cuda" else None)
        self.criterion, self.val_loader = criterion, val_loader
        self.device, self.amp_dtype = device, amp_dtype
        self.mixup_fn, self.model_ema = mixup_fn, model_ema

    def train(self) -> None:
        self.model.train()

    def forward(self, batch, epoch: int, timer: Timer = no_timer) -> dict[str, torch.Tensor]:
        imgs = batch[0].to(self.device, non_blocking=True)
        targets = batch[1].to(self.device, non_blocking=True)
        if self.mixup_fn is not None:
            if imgs.dim() == 5:   # clips: timm's CutMix boxes index the last two dims, so fold time into channels
                mixed, targets = self.mixup_fn(imgs.flatten(1, 2), targets)
                imgs = mixed.view(imgs.shape)
            else:
                imgs, targets = self.mixup_fn(imgs, targets)
        with timer("forward"), autocast(self.device, self.amp_dtype):
            return {"loss": self.criterion(self.model(imgs), targets)}

    def after_optimizer_step(self, epoch: int, timer: Timer = no_timer) -> None:
        if self.model_ema is not None:
            self.model_ema.update(self.model)

    def scalars(self, epoch: int) -> dict[str, float]:
        return {}

    def states(self) -> dict:
        return {"model": self.saved_model, "model_ema": self.model_ema.module if self.model_ema is not None else None}

    def end_epoch(self, epoch: int, writer) -> dict:
        stats = evaluate(self.saved_model, self.val_loader, self.device, self.amp_dtype)
        record = {f"test_{k}": v for k, v in stats.items()}
        if self.model_ema is not None:
            ema_stats = evaluate(self.model_ema.module, self.val_loader, self.device, self.amp_dtype)
            record.update({f"test_ema_{k}": v for k, v in ema_stats.items()})
        if writer is not None:
            for key in ("acc1", "acc5", "loss"):
                writer.add_scalar(f"test/{key}", stats[key], epoch)
            writer.flush()
        return record

    def describe(self, record: dict) -> str:
        ema = f", EMA top-1 {record['test_ema_acc1']:.2f}%" if "test_ema_acc1" in record else ""
        return (f"epoch {record['epoch']}: top-1 {record['test_acc1']:.2f}% top-5 {record['test_acc5']:.2f}% on "
                f"{record['test_count']} samples (best {record['best_acc1']:.2f}%){ema}")


class ClassifierSetup:
    """What fine-tuning and linear probing wire up alike: process, data, loaders, precision,
    learning rate, output directory, tensorboard and the loop's `Run`."""

    def __init__(self, args, fmt: str, data_defaults: dict[str, DataDefault],
                 train_transform: Callable | None, clip_train_transform: Callable | None = None) -> None:
        """`fmt`: the script's checkpoint format; `data_defaults`: its defaults that depend on the data
        (util.args.DataDefault); `train_transform(size, args, stats)` augments training images (None:
        evaluation only), `clip_train_transform` the clips of a video classifier."""
        self.args, self.fmt, self.finished = args, fmt, False
        self.dist, self.device = start_process(args.device, args.dist_url, args.dist_timeout,
                                               args.deterministic)
        self.video = is_video_classifier(args.model)
        check_clip_args(args, self.video)
        self.filled = resolve_data_defaults(args, data_defaults, self.video)
        check_common(args)
        check_augmentation(args)
        self.settings = run_settings(args, self.dist.world_size)
        if args.num_workers is None:
            args.num_workers = default_workers(self.device.type)
        probe = build_classifier(args, 1)
        args.input_size = probe.patch_embed.img_size[0]
        weights = args.finetune or (args.resume if args.eval else None)
        stats = downstream_stats(weights, args.mean, args.std, "--finetune" if args.finetune else "--resume")
        args.mean, args.std = list(stats.mean), list(stats.std)
        self.train_set = None
        if self.video:
            frames = probe.patch_embed.num_frames
            self.val_set = clip_dataset(args, "val", ClipViews(args.input_size, stats, args.test_crops,
                                                                args.single_frame), frames, train=False)
            if train_transform is not None:
                self.train_set = clip_dataset(args, "train", clip_train_transform(args.input_size, args, stats), frames,
                                              train=True)
        else:
            columns = dict(image_column=args.image_column, label_column=args.label_column)
            self.val_set = build_dataset(args.data_path, "val", eval_transform(args.input_size, stats),
                                         args.bad_images, **columns)
            if train_transform is not None:
                self.train_set = build_dataset(args.data_path, "train", train_transform(args.input_size, args, stats),
                                               args.bad_images, **columns)
        self.num_classes = args.nb_classes or getattr(self.train_set or self.val_set, "num_classes", None)
        if not self.num_classes:
            raise UserError("cannot tell the number of classes from the data: pass --nb_classes")
        torch.manual_seed(args.seed)
        self.pin = args.pin_mem and self.device.type == "cuda"
        self.val_loader = eval_loader(self.val_set, self.dist, args.batch_size, args.num_workers, self.pin)
        self.amp_dtype = resolve_amp(args.amp, self.device)
        self.lr_given = args.lr is not None
        args.lr = effective_lr(args, self.dist.world_size)
        self.output_dir = Path(args.output_dir)

    def prepare_output(self) -> Path | None:
        """The training loader and the output directory; returns the checkpoint to resume from, if any.
        Sets `finished` when the run in the output directory has already finished (nothing to do)."""
        args = self.args
        collate = stacked_views_collate if getattr(args, "num_sample", 1) > 1 else None
        self.loader = train_loader(self.train_set, self.dist, args.batch_size, args.num_workers, self.pin, args.seed,
                                   collate)
        if self.dist.is_main:
            self.output_dir = check_output_dir(args.output_dir)
        path = find_resume(args.resume, args.auto_resume, self.output_dir, self.fmt, self.settings)
        self.finished = finished_run(path, self.fmt, args.model, args.epochs)
        return path

    def fit(self, task: ClassifierTask, optimizer: torch.optim.Optimizer, resume_path: Path | None,
            what: str) -> None:
        """Resume if asked, then train to args.epochs with the shared loop; `what` heads the start line."""
        writer = SummaryWriter(log_dir=self.args.log_dir or str(self.output_dir)) if self.dist.is_main else None
        run = Run(task, self.loader, optimizer, make_scaler(self.device, self.amp_dtype), self.device, self.dist,
                  self.output_dir, self.fmt, self.args, writer, self.settings)
        start, best = run.resume(resume_path)
        log.info(f"{what}, {self.describe()}")
        log.info(describe_run(self.args, self.dist.world_size, precision_name(self.amp_dtype), self.filled,
                              self.lr_given))
        fit(run, start, best)

    def describe(self) -> str:
        what = "videos" if self.video else "images"
        views = f", {self.args.test_clips} x {self.args.test_crops} test views" if self.video else ""
        return (f"{self.num_classes} classes, {len(self.train_set)} training / {len(self.val_set)} validation "
                f"{what}{views}")
