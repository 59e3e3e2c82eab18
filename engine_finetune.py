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
from models_vit import build_classifier
from util.args import check_common, check_output_dir, resolve_augmentation
from util.checkpoint import find_resume
from util.data import build_dataset, eval_loader, eval_transform, train_loader
from util.distributed import is_distributed
from util.errors import UserError
from util.normalization import downstream_stats
from util.optim import effective_lr
from util.precision import autocast, make_scaler, resolve_amp
from util.process import start_process

log = logging.getLogger("hpm")


def describe_eval(stats: dict[str, float]) -> str:
    return (f"accuracy of the network on the {stats['count']} validation images: top-1 {stats['acc1']:.2f}%, "
            f"top-5 {stats['acc5']:.2f}%, loss {stats['loss']:.4f}")


@torch.no_grad()
def evaluate(model: nn.Module, loader, device: torch.device, amp_dtype=None) -> dict[str, float]:
    """Top-1, top-5 and loss over every sample of the (sharded, unpadded) validation set."""
    model.eval()
    totals = torch.zeros(4, dtype=torch.float64, device=device)   # loss sum, top1, top5, count
    for imgs, targets in loader:
        imgs = imgs.to(device, non_blocking=True)
        targets = targets.to(device, non_blocking=True)
        with autocast(device, amp_dtype):
            logits = model(imgs)
        logits = logits.float()
        k = min(5, logits.shape[1])
        top = logits.topk(k, dim=1).indices
        hits = top == targets.unsqueeze(1)
        totals += torch.stack([nn.functional.cross_entropy(logits, targets, reduction="sum").double(),
                               hits[:, :1].sum().double(), hits.sum().double(),
                               torch.tensor(float(len(targets)), dtype=torch.float64, device=device)])
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
                f"{record['test_count']} images (best {record['best_acc1']:.2f}%){ema}")


class ClassifierSetup:
    """What fine-tuning and linear probing wire up alike: process, data, loaders, precision,
    learning rate, output directory, tensorboard and the loop's `Run`."""

    def __init__(self, args, train_transform: Callable | None) -> None:
        self.args = args
        self.dist, self.device = start_process(args.device, args.dist_url, args.dist_timeout)
        check_common(args)
        resolve_augmentation(args)
        args.input_size = build_classifier(args, 1).patch_embed.img_size[0]
        weights = args.finetune or (args.resume if args.eval else None)
        stats = downstream_stats(weights, args.mean, args.std, "--finetune" if args.finetune else "--resume")
        args.mean, args.std = list(stats.mean), list(stats.std)
        columns = dict(image_column=args.image_column, label_column=args.label_column)
        self.val_set = build_dataset(args.data_path, "val", eval_transform(args.input_size, stats), args.bad_images,
                                     **columns)
        self.train_set = None
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
        args.lr = effective_lr(args, self.dist.world_size)
        self.output_dir = Path(args.output_dir)

    def prepare_output(self) -> Path | None:
        """The training loader and the output directory; returns the checkpoint to resume from, if any."""
        args = self.args
        self.loader = train_loader(self.train_set, self.dist, args.batch_size, args.num_workers, self.pin, args.seed)
        if self.dist.is_main:
            self.output_dir = check_output_dir(args.output_dir)
        return find_resume(args.resume, args.auto_resume, self.output_dir)

    def fit(self, task: ClassifierTask, optimizer: torch.optim.Optimizer, fmt: str, resume_path: Path | None,
            what: str) -> None:
        """Resume if asked, then train to args.epochs with the shared loop; `what` heads the start line."""
        writer = SummaryWriter(log_dir=self.args.log_dir or str(self.output_dir)) if self.dist.is_main else None
        run = Run(task, self.loader, optimizer, make_scaler(self.device, self.amp_dtype), self.device, self.dist,
                  self.output_dir, fmt, self.args, writer)
        start, best = run.resume(resume_path)
        log.info(f"{what}, {self.describe()}, lr {self.args.lr:.3g}")
        fit(run, start, best)

    def describe(self) -> str:
        return (f"{self.num_classes} classes, {len(self.train_set)} training / {len(self.val_set)} validation "
                f"images")
