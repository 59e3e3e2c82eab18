"""Linear probing (MAE's protocol): a BatchNorm + linear head on the frozen encoder's class token.

`python main_linprobe.py` probes on the built-in digits; pass `--finetune` with pretrained weights.
"""
import argparse
import logging
from pathlib import Path

import torch
import torch.nn as nn

import models_vit
from engine_finetune import ClassifierSetup, ClassifierTask, describe_eval, evaluate
from models_vit import LinearProbe, build_classifier, pooling_name
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
from util.checkpoint import FORMAT_LINPROBE, load_pretrained, resume_training
from util.data import probe_transform
from util.distributed import cleanup
from util.errors import UserError, run_cli
from util.lars import LARS
from util.video import probe_clip_transform

log = logging.getLogger("hpm")


# The built-in data's values train the head in 100 steps (LARS scales each step by 0.001 x the weight
# norm over the gradient norm, so a short run needs a rate far above ImageNet's); on a --data_path,
# MAE's protocol (90 epochs, effective batch 16384 = 512 x 4 accumulation x 8 GPUs; FINETUNE.md).
LINPROBE_DEFAULTS = {
    "blr": DataDefault(50.0, 0.1),
    "epochs": DataDefault(20, 90),
    "warmup_epochs": DataDefault(2, 10),
    "batch_size": DataDefault(256, 512),
    **AUGMENTATION_DEFAULTS,
}


def get_args_parser(add_help: bool = True) -> argparse.ArgumentParser:
    parents = [model_parser(models_vit.CLASSIFIERS.names(), "vit_tiny_patch4"), weights_parser(),
               pooling_parser(global_pool=False), data_parser(), augmentation_parser(), clip_parser(training=True),
               training_parser(), runtime_parser()]
    p = make_parser("Linear probing", parents, add_help, weight_decay=0.0, save_every=10)
    g = p.add_argument_group("linear probing")
    g.add_argument("--nb_classes", type=int, default=None, help="number of classes (default: the dataset's)")
    g.add_argument("--eval", action="store_true", help="only evaluate a linear-probe checkpoint (--resume)")
    g.add_argument("--optimizer", choices=["lars", "sgd"], default="lars",
                   help="LARS (MAE's protocol) or SGD with momentum 0.9 (the reference HPM script)")
    return with_data_defaults(p, LINPROBE_DEFAULTS)


def main(args: argparse.Namespace) -> None:
    if args.eval and not args.resume:
        raise UserError("--eval needs a linear-probe checkpoint: pass --resume PATH")
    setup = ClassifierSetup(args, FORMAT_LINPROBE, LINPROBE_DEFAULTS, probe_transform, probe_clip_transform)
    vit = build_classifier(args, setup.num_classes)
    if args.finetune:
        load_pretrained(vit, args.finetune, teacher=args.teacher)
    elif not args.resume:
        log.warning("no --finetune given: probing a randomly initialised encoder")
    model = LinearProbe(vit, setup.num_classes).to(setup.device)
    head_params = list(model.vit.head.parameters())
    if args.optimizer == "lars":
        optimizer = LARS(head_params, lr=args.lr, weight_decay=args.weight_decay)
    else:
        optimizer = torch.optim.SGD(head_params, lr=args.lr, momentum=0.9, weight_decay=args.weight_decay)

    if args.eval:
        resume_training(Path(args.resume), FORMAT_LINPROBE, args.model, {"model": model.vit})
        log.info(describe_eval(evaluate(model, setup.val_loader, setup.device, setup.amp_dtype)))
        cleanup()
        return

    resume_path = setup.prepare_output()
    if setup.finished:
        cleanup()
        return
    task = ClassifierTask(model, model.vit, nn.CrossEntropyLoss(), setup.val_loader, setup.device, setup.amp_dtype,
                          setup.dist.world_size)
    setup.fit(task, optimizer, resume_path,
              f"linear probing {args.model} ({pooling_name(vit)}, {args.optimizer})")
    cleanup()


if __name__ == "__main__":
    run_cli(lambda: main(get_args_parser().parse_args()))
