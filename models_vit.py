"""ViT classifiers for fine-tuning, linear probing and kNN, on timm's VisionTransformer.

Global pooling (the default) averages the patch tokens and applies `fc_norm`; the pretrained
`norm` is then unused. With `global_pool=False` the class token after `norm` is used.
State-dict keys are MAE's: cls_token, pos_embed, patch_embed.*, blocks.*, norm.* or fc_norm.*, head.*.

The video classifiers (`video_vit_*`) are the same timm network with VideoMAE's conventions: a
tubelet embedding, no class token, a fixed 1-D sinusoid position table, and always mean pooling:
`fc_norm` of the mean token (`global_pool=True`, fine-tuning) or the mean of the `norm`-ed tokens
(`global_pool=False`: the pretrained encoder as it is, for kNN and probing).
"""
from functools import partial

import torch
import torch.nn as nn
from timm.layers import trunc_normal_
from timm.models.vision_transformer import VisionTransformer

from util.errors import UserError
from util.patches import TubeletEmbed
from util.pos_embed import get_1d_sinusoid_table
from util.registry import ModelRegistry

CLASSIFIERS = ModelRegistry("classifier")


def _vit(global_pool: bool = True, pretrained: str | None = None, teacher: bool = False,
         **kwargs) -> VisionTransformer:
    """`pretrained`: any checkpoint file the project reads (ours, the reference's, MAE's, timm's) or
    a folder written by export.py; `teacher` takes an HPM checkpoint's EMA teacher."""
    model = VisionTransformer(global_pool="avg" if global_pool else "token", fc_norm=global_pool, qkv_bias=True,
                              norm_layer=partial(nn.LayerNorm, eps=1e-6), **kwargs)
    if pretrained is not None:
        from util.checkpoint import load_pretrained
        load_pretrained(model, pretrained, teacher=teacher, what="pretrained")
    return model


class VideoViT(VisionTransformer):
    """A timm VisionTransformer on clips (N, 3, T, H, W): VideoMAE's fine-tuning network. The head
    starts at timm's init x 0.001 (VideoMAE's `init_scale`); `pos_embed` is fixed (not trained) and
    recomputed from the network's own geometry, so checkpoints need not carry it."""

    def __init__(self, num_frames: int = 16, tubelet_size: int = 2, global_pool: bool = True, **kwargs) -> None:
        embed = partial(TubeletEmbed, num_frames=num_frames, tubelet_size=tubelet_size)
        super().__init__(class_token=False, global_pool="avg", fc_norm=global_pool, embed_layer=embed, **kwargs)
        self.pos_embed.requires_grad_(False)
        self.pos_embed.data.copy_(get_1d_sinusoid_table(self.patch_embed.num_patches, self.embed_dim))
        if isinstance(self.head, nn.Linear):
            with torch.no_grad():
                self.head.weight.mul_(0.001)
                self.head.bias.mul_(0.001)


def _video_vit(pretrained: str | None = None, teacher: bool = False, global_pool: bool = True,
               **kwargs) -> VideoViT:
    """`pretrained`: any video checkpoint the project reads (ours, VideoMAE's pretraining or
    fine-tuned files, transformers VideoMAE folders, export.py's); `teacher` the EMA teacher."""
    cfg = {"img_size": 224, "patch_size": 16, "num_frames": 16, "tubelet_size": 2, **kwargs}
    model = VideoViT(global_pool=global_pool, qkv_bias=True, norm_layer=partial(nn.LayerNorm, eps=1e-6), **cfg)
    if pretrained is not None:
        from util.checkpoint import load_pretrained
        load_pretrained(model, pretrained, teacher=teacher, what="pretrained")
    return model


def is_video_classifier(model: nn.Module | str) -> bool:
    """Whether a classifier (or a registered classifier's name) takes clips."""
    return model.startswith("video_") if isinstance(model, str) else isinstance(model, VideoViT)


def features(model: VisionTransformer, inputs: torch.Tensor) -> torch.Tensor:
    """Pooled representation before the head: images (N, 3, H, W) or clips (N, 3, T, H, W) -> (N, D);
    test views of clips (N, V, 3, T, H, W) -> the mean over each clip's V views."""
    if inputs.dim() == 6:
        n, v = inputs.shape[:2]
        return features(model, inputs.flatten(0, 1)).view(n, v, -1).mean(1)
    return model.forward_head(model.forward_features(inputs), pre_logits=True)


def pooling_name(model: VisionTransformer) -> str:
    if isinstance(model, VideoViT):   # always mean pooling: fc_norm after it, or the pretrained norm before it
        return "mean token, fc_norm" if not isinstance(model.fc_norm, nn.Identity) else "mean of the normed tokens"
    return "global pool" if model.global_pool == "avg" else "class token"


@CLASSIFIERS.register()
def vit_tiny_patch4(**kwargs) -> VisionTransformer:
    """CPU preset for 32-pixel inputs, the encoder of `mae_vit_tiny_patch4`."""
    return _vit(**{"img_size": 32, "patch_size": 4, "embed_dim": 64, "depth": 2, "num_heads": 4, **kwargs})


@CLASSIFIERS.register()
def vit_small_patch16(**kwargs) -> VisionTransformer:
    return _vit(patch_size=16, embed_dim=384, depth=12, num_heads=6, **kwargs)


@CLASSIFIERS.register()
def vit_base_patch16(**kwargs) -> VisionTransformer:
    return _vit(patch_size=16, embed_dim=768, depth=12, num_heads=12, **kwargs)


@CLASSIFIERS.register()
def vit_large_patch16(**kwargs) -> VisionTransformer:
    return _vit(patch_size=16, embed_dim=1024, depth=24, num_heads=16, **kwargs)


@CLASSIFIERS.register()
def vit_huge_patch14(**kwargs) -> VisionTransformer:
    return _vit(patch_size=14, embed_dim=1280, depth=32, num_heads=16, **kwargs)


@CLASSIFIERS.register()
def video_vit_tiny_patch4(**kwargs) -> VideoViT:
    """CPU preset for clips of 16 frames of 32 x 32, the encoder of `videomae_vit_tiny_patch4`."""
    return _video_vit(**{"img_size": 32, "patch_size": 4, "embed_dim": 64, "depth": 2, "num_heads": 4, **kwargs})


@CLASSIFIERS.register()
def video_vit_small_patch16(**kwargs) -> VideoViT:
    return _video_vit(embed_dim=384, depth=12, num_heads=6, **kwargs)


@CLASSIFIERS.register()
def video_vit_base_patch16(**kwargs) -> VideoViT:
    return _video_vit(embed_dim=768, depth=12, num_heads=12, **kwargs)


@CLASSIFIERS.register()
def video_vit_large_patch16(**kwargs) -> VideoViT:
    return _video_vit(embed_dim=1024, depth=24, num_heads=16, **kwargs)


@CLASSIFIERS.register()
def video_vit_huge_patch16(**kwargs) -> VideoViT:
    return _video_vit(embed_dim=1280, depth=32, num_heads=16, **kwargs)


def create_classifier(name: str, **kwargs) -> VisionTransformer:
    return CLASSIFIERS.create(name, **kwargs)


def build_classifier(args, num_classes: int, **kwargs) -> VisionTransformer:
    """The classifier named by --model (at --input_size, with --global_pool), or a one-line error."""
    if args.input_size is not None:
        kwargs["img_size"] = args.input_size
    if getattr(args, "num_frames", None) is not None and is_video_classifier(args.model):
        kwargs.update(num_frames=args.num_frames)
    try:
        return create_classifier(args.model, num_classes=num_classes, global_pool=args.global_pool, **kwargs)
    except (ValueError, AssertionError) as exc:
        raise UserError(str(exc) if "--model" in str(exc) else f"--model {args.model}: {exc}") from None


class LinearProbe(nn.Module):
    """A frozen ViT (always in eval mode, run without gradients) under a trainable head.

    The head replaces the ViT's own (`vit.head = BatchNorm1d + Linear`), so the saved
    `vit.state_dict()` has MAE's linear-probe keys (head.0.*, head.1.*).
    """

    def __init__(self, vit: VisionTransformer, num_classes: int) -> None:
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
