"""Weighted kNN evaluation (DINO's protocol) of a pretrained encoder's frozen features.

`python main_knn.py --finetune output_dir/checkpoint-last.pth` evaluates on the built-in digits.
"""
import argparse
import logging
from pathlib import Path

import torch

import models_vit
from models_vit import build_classifier, features, is_video_classifier
from util.args import (
    check_clip_args,
    check_output_dir,
    clip_parser,
    data_parser,
    default_workers,
    describe_run,
    make_parser,
    model_parser,
    pooling_parser,
    runtime_parser,
    weights_parser,
)
from util.checkpoint import load_file, load_pretrained
from util.data import build_dataset, eval_loader, eval_transform
from util.distributed import DistInfo, cleanup, gather_in_order
from util.errors import UserError, run_cli
from util.knn import knn_classify
from util.logger import append_json_log
from util.normalization import downstream_stats
from util.precision import autocast, precision_name, resolve_amp
from util.process import start_process
from util.video import ClipViews, clip_dataset

log = logging.getLogger("hpm")
FEATURE_FILES = ("train_features", "train_labels", "val_features", "val_labels")


def get_args_parser(add_help: bool = True) -> argparse.ArgumentParser:
    parents = [model_parser(models_vit.CLASSIFIERS.names(), "vit_tiny_patch4"), weights_parser(),
               pooling_parser(global_pool=False), data_parser(), clip_parser(training=False), runtime_parser()]
    p = make_parser("kNN evaluation", parents, add_help, batch_size=128, amp="none")
    g = p.add_argument_group("kNN")
    g.add_argument("--nb_knn", type=int, nargs="+", default=[10, 20, 100, 200], help="values of k")
    g.add_argument("--temperature", type=float, default=0.07, help="voting weight exp(similarity / T)")
    g.add_argument("--output_dir", type=str, default="./output_dir", help="where log_knn.txt is appended")
    g.add_argument("--dump_features", type=str, default=None, help="save the extracted features to DIR")
    g.add_argument("--load_features", type=str, default=None, help="reuse features saved with --dump_features")
    return p


@torch.no_grad()
def extract(model: torch.nn.Module, dataset, dist_info: DistInfo, args, device, amp_dtype) -> tuple:
    """Features and labels of the whole dataset, in dataset order, on every rank."""
    loader = eval_loader(dataset, dist_info, args.batch_size, args.num_workers, args.pin_mem and device.type == "cuda")
    feats, labels = [], []
    for imgs, targets in loader:
        with autocast(device, amp_dtype):
            feats.append(features(model, imgs.to(device, non_blocking=True)).float())
        labels.append(targets.to(device))
    feats = torch.cat(feats) if feats else torch.zeros(0, model.num_features, device=device)
    labels = torch.cat(labels) if labels else torch.zeros(0, dtype=torch.long, device=device)
    return gather_in_order(feats, len(dataset)).cpu(), gather_in_order(labels, len(dataset)).cpu()


def main(args: argparse.Namespace) -> None:
    dist_info, device = start_process(args.device, args.dist_url, args.dist_timeout, args.deterministic)
    if args.batch_size < 1 or min(args.nb_knn) < 1:
        raise UserError("--batch_size and every --nb_knn value must be at least 1")
    check_clip_args(args, is_video_classifier(args.model))
    if args.num_workers is None:
        args.num_workers = default_workers(device.type)
    output_dir = check_output_dir(args.output_dir) if dist_info.is_main else Path(args.output_dir)
    if args.load_features:
        stored = {name: load_file(Path(args.load_features) / f"{name}.pth", "--load_features")["tensor"]
                  for name in FEATURE_FILES}
        train_f, train_l, val_f, val_l = (stored[n] for n in FEATURE_FILES)
    else:
        if not args.finetune:
            log.warning("no --finetune given: features of a randomly initialised encoder")
        model = build_classifier(args, 0)
        if args.finetune:
            load_pretrained(model, args.finetune, teacher=args.teacher,
                            allowed_missing=("fc_norm.weight", "fc_norm.bias"))
        model = model.to(device).eval()
        size = model.patch_embed.img_size[0]
        amp_dtype = resolve_amp(args.amp, device)
        log.info(describe_run(args, dist_info.world_size, precision_name(amp_dtype), []))
        stats = downstream_stats(args.finetune, args.mean, args.std)
        args.mean, args.std = list(stats.mean), list(stats.std)
        if is_video_classifier(model):   # every video's test views, features averaged over them
            views = ClipViews(size, stats, args.test_crops, args.single_frame)
            frames = model.patch_embed.num_frames
            train_set, val_set = (clip_dataset(args, split, views, frames, train=False) for split in ("train", "val"))
        else:
            columns = dict(image_column=args.image_column, label_column=args.label_column)
            train_set = build_dataset(args.data_path, "train", eval_transform(size, stats), args.bad_images, **columns)
            val_set = build_dataset(args.data_path, "val", eval_transform(size, stats), args.bad_images, **columns)
        train_f, train_l = extract(model, train_set, dist_info, args, device, amp_dtype)
        val_f, val_l = extract(model, val_set, dist_info, args, device, amp_dtype)
        if args.dump_features and dist_info.is_main:
            dump = check_output_dir(args.dump_features, "--dump_features")
            for name, tensor in zip(FEATURE_FILES, (train_f, train_l, val_f, val_l)):
                torch.save({"tensor": tensor}, dump / f"{name}.pth")
            log.info(f"features saved to {dump}")
    if dist_info.is_main:
        log.info(f"kNN on {len(train_l)} training / {len(val_l)} validation features of dimension {train_f.shape[1]}")
        results = knn_classify(train_f.to(device), train_l.to(device), val_f.to(device), val_l.to(device),
                               args.nb_knn, args.temperature)   # on the GPU where there is one
        for k, (top1, top5) in results.items():
            log.info(f"{k}-NN classifier: top-1 {top1:.2f}%, top-5 {top5:.2f}%")
        append_json_log(output_dir / "log_knn.txt", {"finetune": args.finetune, "teacher": args.teacher,
                                                     "mean": args.mean, "std": args.std,
                                                     "temperature": args.temperature,
                                                     **{f"k{k}_acc1": r[0] for k, r in results.items()},
                                                     **{f"k{k}_acc5": r[1] for k, r in results.items()}})
    cleanup()


if __name__ == "__main__":
    run_cli(lambda: main(get_args_parser().parse_args()))
