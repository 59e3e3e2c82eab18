"""Frozen external ViTs whose features replace pixels as the reconstruction target (`--target
clip|dino`, the reference's `--learn_feature_loss`): every token after the final norm (CLIP: and
its projection to 512-d), class token dropped, from a local weights file (no download)."""
from pathlib import Path

import timm
import torch
import torch.nn as nn
from timm.models.vision_transformer import checkpoint_filter_fn

from util.checkpoint import clean_state_dict, load_file
from util.errors import UserError

DEFAULT_MODELS = {"clip": "vit_base_patch16_clip_224.openai", "dino": "vit_base_patch16_224.dino"}


def _read_state(path: Path) -> dict:
    if path.suffix == ".safetensors":
        from safetensors.torch import load_file as load_safetensors
        try:
            return load_safetensors(str(path))
        except Exception as exc:   # safetensors raises several kinds on damaged files
            raise UserError(f"--target_checkpoint {path}: unreadable ({type(exc).__name__}); use an intact "
                            f"copy") from None
    ckpt = load_file(path, "--target_checkpoint")
    for key in ("state_dict", "model", "teacher"):     # DINO's own files keep the weights under 'teacher'
        if isinstance(ckpt.get(key), dict):
            return ckpt[key]
    return ckpt


def _shape_overrides(model_name: str, state: dict) -> dict:
    """Patch size, width and depth of the weights file where they differ from `model_name`'s (a
    smaller or custom ViT saved from timm; heads of 64 channels)."""
    proj = state.get("patch_embed.proj.weight")
    if proj is None or proj.ndim != 4:
        return {}
    with torch.device("meta"):
        named = timm.create_model(model_name, pretrained=False)
    depth = 1 + max((int(k.split(".")[1]) for k in state if k.startswith("blocks.")), default=-1)
    found = {"patch_size": proj.shape[-1], "embed_dim": proj.shape[0], "depth": depth}
    if (named.patch_embed.patch_size[0], named.embed_dim, len(named.blocks)) == tuple(found.values()):
        return {}
    return {**found, "num_heads": max(1, found["embed_dim"] // 64)}


class FrozenTarget(nn.Module):
    """A timm ViT in eval mode without gradients; `forward` gives (N, L, C) patch features."""

    def __init__(self, kind: str, model_name: str | None, checkpoint: str | None, img_size: int,
                 patch_size: int) -> None:
        super().__init__()
        model_name = model_name or DEFAULT_MODELS[kind]
        if not checkpoint:
            raise UserError(f"--target {kind} needs --target_checkpoint FILE: the weights of {model_name} saved "
                            f"locally (PRETRAIN.md shows how); nothing is downloaded at run time")
        path = Path(checkpoint)
        if not path.is_file():
            raise UserError(f"--target_checkpoint {path}: no such file; save the weights of {model_name} there "
                            f"first (PRETRAIN.md)")
        state = clean_state_dict(_read_state(path), keep_decoders=True)
        state = {k: v for k, v in state.items() if not (kind == "dino" and k.startswith("head."))}
        num_classes = state["head.weight"].shape[0] if kind == "clip" and "head.weight" in state else 0
        try:
            model = timm.create_model(model_name, pretrained=False, img_size=img_size, num_classes=num_classes,
                                      **_shape_overrides(model_name, state))
            model.load_state_dict(checkpoint_filter_fn(state, model), strict=True)
        except (RuntimeError, KeyError, ValueError, IndexError) as exc:
            first = str(exc).strip().splitlines()[0][:200] if str(exc).strip() else type(exc).__name__
            raise UserError(f"--target_checkpoint {path} does not fit --target_model {model_name} ({first}); "
                            f"pass the matching --target_model") from None
        model_patch = model.patch_embed.patch_size[0]
        if model_patch != patch_size:
            raise UserError(f"--target_model {model_name} has patches of {model_patch} px but the student's are "
                            f"{patch_size} px: the targets must fall on the student's patch grid")
        self.model = model.eval().requires_grad_(False)
        self.project = kind == "clip" and isinstance(model.head, nn.Linear)
        self.dim = model.head.out_features if self.project else model.num_features

    def train(self, mode: bool = True) -> "FrozenTarget":
        self.training = mode
        self.model.eval()
        return self

    @torch.no_grad()
    def forward(self, imgs: torch.Tensor) -> torch.Tensor:
        tokens = self.model.forward_features(imgs)[:, self.model.num_prefix_tokens:]
        return self.model.head(tokens) if self.project else tokens
