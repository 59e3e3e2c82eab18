"""Encoder weights in other frameworks' layouts: MAE's (our own key names), timm's (the same keys
in `model.safetensors` with a `config.json`) and Hugging Face's ViTMAE (q/k/v split, its names)."""
import json
from pathlib import Path

import torch

from util.errors import UserError

ENCODER_PREFIXES = ("cls_token", "pos_embed", "patch_embed.", "blocks.", "norm.", "fc_norm.")
HEADS = {64: 4, 192: 3, 384: 6, 768: 12, 1024: 16, 1280: 16}   # embedding width -> attention heads
TIMM_NAMES = {(384, 16, 12): "vit_small_patch16_224", (768, 16, 12): "vit_base_patch16_224",
              (1024, 16, 24): "vit_large_patch16_224", (1280, 14, 32): "vit_huge_patch14_224"}


def is_video_state(state: dict) -> bool:
    """Whether an encoder state dict takes clips (a Conv3d tubelet embedding)."""
    return "patch_embed.proj.weight" in state and state["patch_embed.proj.weight"].dim() == 5


def encoder_only(state: dict, what: str, path) -> tuple[dict, list[str]]:
    """The ViT encoder's tensors of a cleaned state dict; notes what was dropped besides decoders."""
    if "patch_embed.proj.weight" not in state or ("cls_token" not in state and not is_video_state(state)):
        raise UserError(f"{what} {path}: holds no ViT encoder (no patch_embed / cls_token weights); pass a "
                        f"pretraining or fine-tuning checkpoint")
    encoder = {k: v for k, v in state.items() if k.startswith(ENCODER_PREFIXES)}
    notes = []
    if any(k.startswith("head.") for k in state):
        notes.append("the classifier head was dropped (an encoder is exported)")
    return encoder, notes


def architecture(state: dict, num_frames: int = 16) -> dict:
    """ViT hyper-parameters read off an encoder state dict (heads from the standard width table). A
    video encoder adds num_frames (which its file does not say: `num_frames`) and tubelet_size; its
    size comes from the position table where there is one, else VideoMAE's 224."""
    proj = state["patch_embed.proj.weight"]
    embed_dim, patch = proj.shape[0], proj.shape[-1]
    depth = 1 + max(int(k.split(".")[1]) for k in state if k.startswith("blocks."))
    video = {}
    if proj.dim() == 5:
        video = {"num_frames": num_frames, "tubelet_size": proj.shape[2]}
        grid = round((state["pos_embed"].shape[1] / (num_frames // proj.shape[2])) ** 0.5) if "pos_embed" in state \
            else 224 // patch
    else:
        grid = round((state["pos_embed"].shape[1] - 1) ** 0.5)
    if embed_dim not in HEADS:
        raise UserError(f"embedding width {embed_dim} is not one of the registered ViTs "
                        f"({', '.join(map(str, HEADS))}): the number of attention heads is unknown")
    return {"img_size": grid * patch, "patch_size": patch, "embed_dim": embed_dim, "depth": depth,
            "num_heads": HEADS[embed_dim], "mlp_ratio": state["blocks.0.mlp.fc1.weight"].shape[0] / embed_dim,
            "global_pool": "fc_norm.weight" in state, **video}


def timm_config(arch: dict, mean, std) -> dict:
    """config.json for timm: `timm.create_model(architecture, pretrained=True,
    pretrained_cfg_overlay=dict(file=...), **model_args)`, or `local-dir:FOLDER`."""
    name = TIMM_NAMES.get((arch["embed_dim"], arch["patch_size"], arch["depth"]), "vit_base_patch16_224")
    model_args = {k: arch[k] for k in ("img_size", "patch_size", "embed_dim", "depth", "num_heads")}
    model_args.update(global_pool="avg" if arch["global_pool"] else "token", fc_norm=arch["global_pool"])
    return {"architecture": name, "num_classes": 0, "num_features": arch["embed_dim"],
            "global_pool": model_args["global_pool"], "model_args": model_args,
            "pretrained_cfg": {"input_size": [3, arch["img_size"], arch["img_size"]], "num_classes": 0,
                               "interpolation": "bicubic", "crop_pct": 0.875 if arch["img_size"] <= 224 else 1.0,
                               "mean": list(mean), "std": list(std), "first_conv": "patch_embed.proj",
                               "classifier": "head"}}


_HF_BLOCK = {"norm1": "layernorm_before", "norm2": "layernorm_after", "attn.proj": "attention.output.dense",
             "mlp.fc1": "intermediate.dense", "mlp.fc2": "output.dense"}


def _to_hf_blocks(state: dict, key_bias: bool) -> dict:
    """Our blocks.* -> transformers' encoder.layer.* (q, k, v split out of qkv); without `key_bias`
    (VideoMAE's layout) the key's bias is left out."""
    out = {}
    depth = 1 + max(int(k.split(".")[1]) for k in state if k.startswith("blocks."))
    for i in range(depth):
        ours, theirs = f"blocks.{i}.", f"encoder.layer.{i}."
        for kind in ("weight", "bias"):
            q, k, v = state[f"{ours}attn.qkv.{kind}"].chunk(3, dim=0)
            for name, part in (("query", q), ("key", k), ("value", v)):
                if key_bias or kind == "weight" or name != "key":
                    out[f"{theirs}attention.attention.{name}.{kind}"] = part
            for src, dst in _HF_BLOCK.items():
                out[f"{theirs}{dst}.{kind}"] = state[f"{ours}{src}.{kind}"]
    return out


def to_hf(state: dict) -> dict:
    """Our (MAE / timm) encoder keys -> Hugging Face ViTMAEModel's (q, k, v split out of qkv)."""
    out = {"embeddings.cls_token": state["cls_token"], "embeddings.position_embeddings": state["pos_embed"],
           "embeddings.patch_embeddings.projection.weight": state["patch_embed.proj.weight"],
           "embeddings.patch_embeddings.projection.bias": state["patch_embed.proj.bias"]}
    norm = "fc_norm" if "fc_norm.weight" in state else "norm"
    out["layernorm.weight"], out["layernorm.bias"] = state[f"{norm}.weight"], state[f"{norm}.bias"]
    out.update(_to_hf_blocks(state, key_bias=True))
    return {k: v.contiguous() for k, v in out.items()}


def to_hf_video(state: dict) -> dict:
    """Our video encoder keys -> transformers VideoMAEModel's (q, k, v split; the key has no bias
    there, and ours changes nothing: it adds the same number to every logit of a query's row). With
    global pooling (fc_norm) VideoMAEModel has no final norm (`use_mean_pooling`): fc_norm is left out."""
    out = {"embeddings.patch_embeddings.projection.weight": state["patch_embed.proj.weight"],
           "embeddings.patch_embeddings.projection.bias": state["patch_embed.proj.bias"]}
    if "fc_norm.weight" not in state:
        out["layernorm.weight"], out["layernorm.bias"] = state["norm.weight"], state["norm.bias"]
    out.update(_to_hf_blocks(state, key_bias=False))
    return {k: v.contiguous() for k, v in out.items()}


def hf_video_config(arch: dict) -> dict:
    """config.json of a transformers VideoMAEModel."""
    return {"architectures": ["VideoMAEModel"], "model_type": "videomae", "hidden_size": arch["embed_dim"],
            "num_hidden_layers": arch["depth"], "num_attention_heads": arch["num_heads"],
            "intermediate_size": int(arch["embed_dim"] * arch["mlp_ratio"]), "hidden_act": "gelu",
            "image_size": arch["img_size"], "patch_size": arch["patch_size"], "num_channels": 3,
            "num_frames": arch["num_frames"], "tubelet_size": arch["tubelet_size"], "qkv_bias": True,
            "use_mean_pooling": arch["global_pool"], "layer_norm_eps": 1e-6, "hidden_dropout_prob": 0.0,
            "attention_probs_dropout_prob": 0.0}


def to_videomae(state: dict) -> dict:
    """Our video encoder keys -> VideoMAE's fine-tuning layout (what its fine-tuned files hold and its
    fine-tuning script's --finetune reads): `attn.q_bias` / `attn.v_bias` instead of one qkv bias."""
    out = {}
    for key, value in state.items():
        if key.endswith("attn.qkv.bias"):
            q_bias, _, v_bias = value.chunk(3)
            out[key.replace("qkv.bias", "q_bias")], out[key.replace("qkv.bias", "v_bias")] = q_bias, v_bias
        elif key != "pos_embed":   # VideoMAE computes its fixed table
            out[key] = value
    return {k: v.contiguous() for k, v in out.items()}


def from_hf(state: dict) -> dict:
    """Hugging Face ViTMAE / ViT keys (legacy or current names) -> ours; the inverse of `to_hf`."""
    legacy = {}
    for key, value in state.items():
        key = key.removeprefix("vit.")
        key = (key.replace("layers.", "encoder.layer.").replace("attention.q_proj", "attention.attention.query")
               .replace("attention.k_proj", "attention.attention.key")
               .replace("attention.v_proj", "attention.attention.value")
               .replace("attention.o_proj", "attention.output.dense").replace("mlp.fc1", "intermediate.dense")
               .replace("mlp.fc2", "output.dense"))
        legacy[key] = value
    out = {"cls_token": legacy["embeddings.cls_token"], "pos_embed": legacy["embeddings.position_embeddings"],
           "patch_embed.proj.weight": legacy["embeddings.patch_embeddings.projection.weight"],
           "patch_embed.proj.bias": legacy["embeddings.patch_embeddings.projection.bias"],
           "norm.weight": legacy["layernorm.weight"], "norm.bias": legacy["layernorm.bias"]}
    out.update(_hf_layers(legacy, "encoder.layer.", "blocks."))
    return out


def _hf_layers(state: dict, theirs: str, ours: str, qkv: str = "attention.attention") -> dict:
    """transformers' layers `theirs`{i}.* (separate query / key / value, a key bias or none) -> our
    timm blocks `ours`{i}.* (one qkv; a missing key bias is 0, which changes nothing: it adds the same
    number to every logit of a query's row)."""
    out = {}
    depth = 1 + max(int(k[len(theirs):].split(".")[0]) for k in state if k.startswith(theirs))
    for i in range(depth):
        src, dst = f"{theirs}{i}.", f"{ours}{i}."
        q, k, v = (state[f"{src}{qkv}.{n}.weight"] for n in ("query", "key", "value"))
        out[f"{dst}attn.qkv.weight"] = torch.cat([q, k, v])
        q_bias = state.get(f"{src}{qkv}.query.bias", state.get(f"{src}{qkv}.q_bias"))   # VideoMAE saves q_bias
        v_bias = state.get(f"{src}{qkv}.value.bias", state.get(f"{src}{qkv}.v_bias"))
        if q_bias is not None:
            k_bias = state.get(f"{src}{qkv}.key.bias", torch.zeros_like(q_bias))
            out[f"{dst}attn.qkv.bias"] = torch.cat([q_bias, k_bias, v_bias])
        for mine, their in _HF_BLOCK.items():
            for kind in ("weight", "bias"):
                out[f"{dst}{mine}.{kind}"] = state[f"{src}{their}.{kind}"]
    return out


def from_hf_pretraining(state: dict, video: bool) -> dict:
    """transformers' ViTMAEForPreTraining / VideoMAEForPreTraining (or their encoder models) -> our
    pretraining network's keys; VideoMAE's fixed position tables are not saved (the network computes them)."""
    prefix = "videomae." if video else "vit."
    enc = {k.removeprefix(prefix): v for k, v in state.items()}
    out = {"patch_embed.proj.weight": enc["embeddings.patch_embeddings.projection.weight"],
           "patch_embed.proj.bias": enc["embeddings.patch_embeddings.projection.bias"],
           **_hf_layers(enc, "encoder.layer.", "blocks.")}
    if "layernorm.weight" in enc:
        out["norm.weight"], out["norm.bias"] = enc["layernorm.weight"], enc["layernorm.bias"]
    if not video:   # ViTMAE saves its (fixed) tables: they are loaded as they are
        out["cls_token"], out["pos_embed"] = enc["embeddings.cls_token"], enc["embeddings.position_embeddings"]
    if video and "encoder_to_decoder.weight" in state:
        out.update({"decoder_embed.weight": state["encoder_to_decoder.weight"], "mask_token": state["mask_token"],
                    "decoder_norm.weight": state["decoder.norm.weight"],
                    "decoder_norm.bias": state["decoder.norm.bias"],
                    "decoder_pred.weight": state["decoder.head.weight"],
                    "decoder_pred.bias": state["decoder.head.bias"],
                    **_hf_layers(state, "decoder.decoder_layers.", "decoder_blocks.")})
    elif not video and "decoder.decoder_embed.weight" in state:
        out.update({f"decoder_{n}.{kind}": state[f"decoder.decoder_{n}.{kind}"]
                    for n in ("embed", "norm", "pred") for kind in ("weight", "bias")})
        out["mask_token"], out["decoder_pos_embed"] = state["decoder.mask_token"], state["decoder.decoder_pos_embed"]
        out.update(_hf_layers(state, "decoder.decoder_encoder.layer.", "decoder_blocks."))
    return out


_VIDEOMAE_RENAMES = (("encoder.blocks.", "blocks."), ("decoder.blocks.", "decoder_blocks."), ("encoder.", ""),
                     ("decoder.norm.", "decoder_norm."), ("decoder.head.", "decoder_pred."),
                     ("encoder_to_decoder.", "decoder_embed."))


def from_videomae(state: dict) -> dict:
    """VideoMAE's own pretraining file ({"model": ...} with `encoder.` / `decoder.` prefixes, q_bias and
    v_bias) -> our pretraining network's keys (the key bias, which VideoMAE does not have, is 0)."""
    out = {}
    for key, value in state.items():
        if key.endswith("attn.v_bias"):
            continue
        name = next((mine + key[len(theirs):] for theirs, mine in _VIDEOMAE_RENAMES if key.startswith(theirs)), key)
        if key.endswith("attn.q_bias"):
            v_bias = state[key.removesuffix("q_bias") + "v_bias"]
            out[name.removesuffix("q_bias") + "qkv.bias"] = torch.cat([value, torch.zeros_like(value), v_bias])
        else:
            out[name] = value
    return out


def hf_config(arch: dict) -> dict:
    """config.json of a transformers ViTMAEModel (mask_ratio 0: nothing masked)."""
    return {"architectures": ["ViTMAEModel"], "model_type": "vit_mae", "hidden_size": arch["embed_dim"],
            "num_hidden_layers": arch["depth"], "num_attention_heads": arch["num_heads"],
            "intermediate_size": int(arch["embed_dim"] * arch["mlp_ratio"]), "hidden_act": "gelu",
            "image_size": arch["img_size"], "patch_size": arch["patch_size"], "num_channels": 3,
            "qkv_bias": True, "layer_norm_eps": 1e-6, "mask_ratio": 0.0, "hidden_dropout_prob": 0.0,
            "attention_probs_dropout_prob": 0.0}


def read_folder(folder: Path, what: str) -> dict:
    """The encoder state dict (our key names) of an exported timm or Hugging Face folder."""
    from safetensors.torch import load_file as load_safetensors
    weights, config = folder / "model.safetensors", folder / "config.json"
    if not weights.is_file():
        raise UserError(f"{what} {folder}: a folder without model.safetensors; pass a checkpoint file or an "
                        f"exported folder")
    try:
        state = load_safetensors(str(weights))
        kind = json.loads(config.read_text()).get("model_type") if config.is_file() else None
    except Exception as exc:   # safetensors and json raise several kinds on damaged files
        raise UserError(f"{what} {folder}: unreadable ({type(exc).__name__}); use an intact export") from None
    if kind == "videomae":
        return from_hf_video(state)
    return from_hf(state) if kind in ("vit_mae", "vit") else state


def from_hf_video(state: dict) -> dict:
    """transformers VideoMAEModel / VideoMAEForVideoClassification / VideoMAEForPreTraining -> our keys
    (fc_norm kept, `classifier` -> head)."""
    out = from_hf_pretraining(state, video=True)
    for theirs, ours in (("fc_norm", "fc_norm"), ("classifier", "head")):
        for kind in ("weight", "bias"):
            if f"{theirs}.{kind}" in state:
                out[f"{ours}.{kind}"] = state[f"{theirs}.{kind}"]
    return out
