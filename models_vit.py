"""ViT classifiers for fine-tuning, linear probing and kNN, on timm's VisionTransformer.

Global pooling (the default) averages the patch tokens and applies `fc_norm`; the pretrained
`norm` is then unused. With `global_pool=False` the class token after `norm` is used.
State-dict keys are MAE's: cls_token, pos_embed, patch_embed.*, blocks.*, norm.* or fc_norm.*, head.*.
"""
from functools import partial

import torch
import torch.nn as nn
from timm.models.vision_transformer import VisionTransformer

from util.registry import ModelRegistry

CLASSIFIERS = ModelRegistry("classifier")


def _vit(global_pool: bool = True, **kwargs) -> VisionTransformer:
    return VisionTransformer(global_pool="avg" if global_pool else "token", fc_norm=global_pool, qkv_bias=True,
                             norm_layer=partial(nn.LayerNorm, eps=1e-6), **kwargs)


def features(model: VisionTransformer, imgs: torch.Tensor) -> torch.Tensor:
    """Pooled representation before the head: (N, 3, H, W) -> (N, D)."""
    return model.forward_head(model.forward_features(imgs), pre_logits=True)


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


def create_classifier(name: str, **kwargs) -> VisionTransformer:
    return CLASSIFIERS.create(name, **kwargs)
