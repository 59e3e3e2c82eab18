"""torch.hub entry points for a local clone:

    model = torch.hub.load("path/to/clone", "hpm_vit_base_patch16", source="local", checkpoint=PATH)

`checkpoint` is any file the project reads (pretraining, reference HPM, MAE, timm, fine-tuned) or
a folder written by export.py; `teacher=True` takes the EMA teacher; other keyword arguments
(`num_classes`, `global_pool`, `img_size`, ...) go to the classifier. Without `num_classes`
the model returns features (no head). The `hpm_video_*` entries take clips (N, 3, T, H, W).
"""
import models_vit

dependencies = ["torch", "timm"]


def _load(name: str, checkpoint: str | None = None, teacher: bool = False, **kwargs):
    kwargs.setdefault("num_classes", 0)
    kwargs.setdefault("global_pool", False)
    return models_vit.create_classifier(name, pretrained=checkpoint, teacher=teacher, **kwargs)


def hpm_vit_small_patch16(checkpoint: str | None = None, **kwargs):
    return _load("vit_small_patch16", checkpoint, **kwargs)


def hpm_vit_base_patch16(checkpoint: str | None = None, **kwargs):
    return _load("vit_base_patch16", checkpoint, **kwargs)


def hpm_vit_large_patch16(checkpoint: str | None = None, **kwargs):
    return _load("vit_large_patch16", checkpoint, **kwargs)


def hpm_vit_huge_patch14(checkpoint: str | None = None, **kwargs):
    return _load("vit_huge_patch14", checkpoint, **kwargs)


def hpm_vit_tiny_patch4(checkpoint: str | None = None, **kwargs):
    return _load("vit_tiny_patch4", checkpoint, **kwargs)


def hpm_video_vit_small_patch16(checkpoint: str | None = None, **kwargs):
    """Clips (N, 3, 16, 224, 224); `checkpoint` any video file the project reads (ours, VideoMAE's,
    transformers VideoMAE folders); features: the mean of the normed tokens (`global_pool=True`: fc_norm)."""
    return _load("video_vit_small_patch16", checkpoint, **kwargs)


def hpm_video_vit_base_patch16(checkpoint: str | None = None, **kwargs):
    return _load("video_vit_base_patch16", checkpoint, **kwargs)


def hpm_video_vit_large_patch16(checkpoint: str | None = None, **kwargs):
    return _load("video_vit_large_patch16", checkpoint, **kwargs)


def hpm_video_vit_huge_patch16(checkpoint: str | None = None, **kwargs):
    return _load("video_vit_huge_patch16", checkpoint, **kwargs)


def hpm_video_vit_tiny_patch4(checkpoint: str | None = None, **kwargs):
    return _load("video_vit_tiny_patch4", checkpoint, **kwargs)
