import math
import platform
import resource
import subprocess
import sys

import pytest
import torch

from tests.helpers import REPO
from util.losses import absolute_loss_prediction, reconstruction_loss, relative_loss_prediction
from util.masking import block_mask, hard_patch_mask, num_masked_patches, random_mask, regular_mask
from util.patches import patchify, unpatchify
from util.pos_embed import get_2d_sincos_pos_embed, interpolate_pos_embed
from util.schedules import cosine_lr, hard_patch_alpha, teacher_decay


def test_patchify_round_trip_and_element_order():
    imgs = torch.randn(2, 3, 32, 32)
    patches = patchify(imgs, 4)
    assert patches.shape == (2, 64, 48)
    assert torch.equal(unpatchify(patches, 4), imgs)
    # patch k = (row 1, col 2); element (r, c, ch) at index (r * p + c) * 3 + ch
    k, r, c, ch = 1 * 8 + 2, 3, 1, 2
    assert patches[1, k, (r * 4 + c) * 3 + ch] == imgs[1, ch, 4 + r, 8 + c]


def test_pos_embed_formula():
    d, g = 16, 5
    table = get_2d_sincos_pos_embed(d, g)
    assert table.shape == (1 + g * g, d)
    assert torch.all(table[0] == 0)
    for k in [0, 3, 7, 24]:
        row, col = k // g, k % g
        for i in range(d // 4):
            w = 1.0 / 10000 ** (i / (d / 4))
            expect = [math.sin(col * w), math.cos(col * w), math.sin(row * w), math.cos(row * w)]
            got = table[1 + k, [i, d // 4 + i, d // 2 + i, 3 * d // 4 + i]].tolist()
            assert got == pytest.approx(expect, abs=1e-6)


def test_pos_embed_interpolation_matches_bicubic():
    pos = torch.randn(1, 1 + 14 * 14, 32)
    new = interpolate_pos_embed(pos, (16, 16))
    grid = pos[:, 1:].reshape(1, 14, 14, 32).permute(0, 3, 1, 2)
    expect = torch.nn.functional.interpolate(grid, size=(16, 16), mode="bicubic", align_corners=False)
    expect = torch.cat([pos[:, :1], expect.permute(0, 2, 3, 1).reshape(1, 256, 32)], dim=1)
    torch.testing.assert_close(new, expect, atol=1e-5, rtol=1e-5)
    assert interpolate_pos_embed(pos, (14, 14)) is pos


def _gen(seed=0):
    return torch.Generator().manual_seed(seed)


def test_num_masked_rounding_and_bounds():
    assert num_masked_patches(196, 0.75) == 147
    assert num_masked_patches(64, 0.75) == 48
    for bad in [0.0, 1.0, -0.1, 1.5]:
        with pytest.raises(ValueError, match="--mask_ratio"):
            num_masked_patches(196, bad)


@pytest.mark.parametrize("kind", ["random", "regular", "block", "hard"])
def test_every_mask_has_exactly_m_masked_and_is_reproducible(kind):
    n, g = 64, 14
    L, m = g * g, num_masked_patches(g * g, 0.75)

    def make(seed):
        gen = _gen(seed)
        if kind == "random":
            return random_mask(n, L, m, generator=gen)
        if kind == "regular":
            return regular_mask(n, g, generator=gen)
        if kind == "block":
            return block_mask(n, g, m, generator=gen)
        return hard_patch_mask(torch.randn(n, L, generator=_gen(99)), m, 0.3, generator=gen)

    mask = make(1)
    assert mask.dtype == torch.bool and mask.shape == (n, L)
    assert torch.all(mask.sum(1) == m)
    assert torch.equal(mask, make(1))
    assert not torch.equal(mask, make(2))


def test_regular_mask_one_visible_per_cell():
    mask = regular_mask(32, 8, generator=_gen())
    cells = mask.view(32, 4, 2, 4, 2).permute(0, 1, 3, 2, 4).reshape(32, 16, 4)
    assert torch.all((~cells).sum(-1) == 1)


@pytest.mark.parametrize("grid, ratio, side", [(14, 0.75, 7), (8, 0.75, 4), (6, 0.75, 3)])
def test_block_mask_is_one_visible_square_in_the_top_left_quadrant(grid, ratio, side):
    n = 3000
    mask = block_mask(n, grid, num_masked_patches(grid * grid, ratio), generator=_gen()).view(n, grid, grid)
    visible = ~mask
    rows, cols = visible.any(2), visible.any(1)                          # (n, g) rows / columns with a visible patch
    tops, lefts = rows.float().argmax(1), cols.float().argmax(1)
    for k in range(n):                                                   # every patch of every mask
        expect = torch.zeros(grid, grid, dtype=torch.bool)
        expect[tops[k]:tops[k] + side, lefts[k]:lefts[k] + side] = True
        assert torch.equal(visible[k], expect)
    corners = grid // 2
    assert int(tops.max()) == int(lefts.max()) == corners - 1 and int(tops.min()) == int(lefts.min()) == 0
    counts = torch.bincount(tops * corners + lefts, minlength=corners * corners).float()
    expect = n / corners ** 2
    chi2 = ((counts - expect) ** 2 / expect).sum().item()
    assert chi2 < {49: 84.0, 16: 37.7, 9: 26.1}[corners ** 2]              # 99.9 % quantiles, k - 1 dof


def test_block_mask_needs_a_square_number_of_visible_patches():
    with pytest.raises(ValueError, match="--mask_ratio"):
        block_mask(2, 14, num_masked_patches(196, 0.6))


def test_hard_patch_mask_contains_top_k_and_rest_is_uniform():
    n, L, m, alpha = 4000, 16, 12, 0.5
    k = int(m * alpha)
    pred = torch.randn(n, L, generator=_gen(5))
    mask = hard_patch_mask(pred, m, alpha, generator=_gen(6))
    top = torch.topk(pred, k, dim=1).indices
    assert torch.all(torch.gather(mask, 1, top))
    # the other m - k masked patches are uniform over the L - k non-top patches:
    # count, per rank of predicted loss (excluding the top k), how often it is masked
    ranks = torch.argsort(torch.argsort(pred, dim=1, descending=True), dim=1)
    counts = torch.zeros(L - k)
    for r in range(k, L):
        counts[r - k] = (mask & (ranks == r)).sum()
    expect = n * (m - k) / (L - k)
    chi2 = ((counts - expect) ** 2 / expect).sum().item()
    assert chi2 < 27.9  # 99.9% quantile of chi-square with 9 degrees of freedom


def test_hard_patch_mask_without_hard_patches_is_random():
    pred = torch.arange(16.0).expand(2000, -1)
    mask = hard_patch_mask(pred, 8, 0.1, generator=_gen())  # int(8 * 0.1) = 0
    freq = mask.float().mean(0)
    assert torch.all((freq - 0.5).abs() < 0.06)


def test_reconstruction_loss_norm_pix():
    pred, target = torch.randn(2, 5, 12), torch.randn(2, 5, 12) * 3 + 1
    loss, per_patch = reconstruction_loss(pred, target, norm_pix=True)
    t = (target - target.mean(-1, keepdim=True)) / torch.sqrt(target.var(-1, unbiased=True, keepdim=True) + 1e-6)
    torch.testing.assert_close(per_patch, ((pred - t) ** 2).mean(-1))
    torch.testing.assert_close(loss, ((pred - t) ** 2).mean())


def _relative_brute_force(pred, target):
    total, pairs = 0.0, 0
    for n in range(pred.shape[0]):
        for i in range(pred.shape[1]):
            for j in range(pred.shape[1]):
                s = torch.sigmoid(pred[n, j] - pred[n, i])
                if target[n, j] > target[n, i]:
                    total += -torch.log(s + 1e-6)
                elif target[n, j] < target[n, i]:
                    total += -torch.log(1 - s + 1e-6)
                else:
                    continue
                pairs += 1
    return total / pairs


def test_relative_objective_equals_brute_force_with_ties():
    pred = torch.randn(3, 7, generator=_gen(1))
    target = torch.randint(0, 4, (3, 7), generator=_gen(2)).float()  # many ties
    torch.testing.assert_close(relative_loss_prediction(pred, target), _relative_brute_force(pred, target))


def test_absolute_objective_formula():
    pred, target = torch.randn(3, 9), torch.rand(3, 9)
    z = (target - target.mean(1, keepdim=True)) / torch.sqrt(target.var(1, keepdim=True) + 1e-6)
    torch.testing.assert_close(absolute_loss_prediction(pred, target), ((pred - z) ** 2).mean())


def test_schedules():
    assert hard_patch_alpha(0, 200) == pytest.approx(0.5 / 200)
    assert hard_patch_alpha(199, 200) == pytest.approx(0.5)
    assert teacher_decay(0) == pytest.approx(0.999)
    assert teacher_decay(50) == pytest.approx(0.99945)
    assert teacher_decay(100) == teacher_decay(500) == 0.9999
    assert cosine_lr(0, 1.0, 0.0, 10, 100) == 0.0
    assert cosine_lr(5, 1.0, 0.0, 10, 100) == pytest.approx(0.5)
    assert cosine_lr(10, 1.0, 0.1, 10, 100) == pytest.approx(1.0)
    assert cosine_lr(55, 1.0, 0.1, 10, 100) == pytest.approx(0.55)
    assert cosine_lr(100, 1.0, 0.1, 10, 100) == pytest.approx(0.1)


def test_optimizer_step_counts_steps_the_fp16_scaler_skips():
    from util.optim import optimizer_step
    w = torch.nn.Parameter(torch.ones(3))
    opt = torch.optim.SGD([w], lr=0.1)
    scaler = torch.amp.GradScaler("cpu", enabled=True, init_scale=2.0 ** 4)
    scaler.scale((w * torch.tensor([1.0, float("inf"), 1.0])).sum()).backward()
    grad_norm, skipped = optimizer_step(opt, scaler, [w], clip_grad=1.0)
    assert skipped.item() == 1.0 and torch.equal(w.data, torch.ones(3)) and w.grad is None
    scaler.scale(w.sum()).backward()
    grad_norm, skipped = optimizer_step(opt, scaler, [w], clip_grad=None)
    assert skipped.item() == 0.0 and grad_norm is None and not torch.equal(w.data, torch.ones(3))


@pytest.mark.parametrize("scale, one_nan", [(1e-3, False), (10.0, False), (1e-3, True)])
def test_clip_grad_norm_matches_torch(scale, one_nan):
    """Below the limit the gradients are untouched; above it, or NaN, they change as torch's do."""
    from util.optim import clip_grad_norm
    torch.manual_seed(0)
    shapes = [(64, 32), (32,), (3, 5, 7), (1,)]
    ours = [torch.nn.Parameter(torch.zeros(s)) for s in shapes]
    theirs = [torch.nn.Parameter(torch.zeros(s)) for s in shapes]
    for a, b in zip(ours, theirs):
        a.grad = torch.randn(a.shape) * scale
        b.grad = a.grad.clone()
    if one_nan:
        ours[0].grad[3, 4] = theirs[0].grad[3, 4] = float("nan")
    ours.append(torch.nn.Parameter(torch.zeros(2)))   # no gradient: skipped by both
    untouched = [p.grad.clone() for p in ours[:-1]]
    norm = clip_grad_norm(ours, 1.0)
    expected = torch.nn.utils.clip_grad_norm_(theirs, 1.0)
    torch.testing.assert_close(norm, expected, rtol=1e-5, atol=0, equal_nan=True)
    for a, b, before in zip(ours, theirs, untouched):
        torch.testing.assert_close(a.grad, b.grad, rtol=1e-5, atol=0, equal_nan=True)
        if scale < 1 and not one_nan:
            assert torch.equal(a.grad, before)
    assert ours[-1].grad is None


FAULTS_OF_A_REALLOCATION = """
import resource, sys, torch
from util.process import retain_freed_memory
if sys.argv[1] == "retain":
    assert retain_freed_memory()
def allocate_and_free():
    blocks = [torch.ones(1 << 20) for _ in range(64)]   # 64 x 4 MiB, like a step's activations
    del blocks
allocate_and_free()
before = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
allocate_and_free()
print(resource.getrusage(resource.RUSAGE_SELF).ru_minflt - before)
"""


@pytest.mark.skipif(platform.libc_ver()[0] != "glibc", reason="the allocator setting is glibc's")
def test_retained_memory_is_reused_without_page_faults():
    def faults(mode: str) -> int:
        out = subprocess.run([sys.executable, "-c", FAULTS_OF_A_REALLOCATION, mode], capture_output=True,
                             text=True, cwd=REPO, check=True)
        return int(out.stdout.split()[-1])
    pages = 64 * (4 << 20) // resource.getpagesize()
    assert faults("default") > 0.75 * pages       # glibc hands the freed blocks back to the kernel
    assert faults("retain") < 0.25 * pages


def _mae_lr_scale(name: str, depth: int, decay: float) -> float:
    """MAE's rule written out: embeddings decay ** (depth + 1), block i decay ** (depth - i), the rest 1."""
    if name in ("cls_token", "pos_embed") or name.startswith("patch_embed."):
        return decay ** (depth + 1)
    if name.startswith("blocks."):
        return decay ** (depth - int(name.split(".")[1]))
    return 1.0


@pytest.mark.parametrize("model_name, depth", [("vit_base_patch16", 12), ("vit_large_patch16", 24)])
@pytest.mark.parametrize("global_pool", [True, False])
def test_layer_decay_scales_every_parameter_as_mae(model_name, depth, global_pool):
    from models_vit import create_classifier
    from util.optim import param_groups_lrd
    with torch.device("meta"):
        model = create_classifier(model_name, num_classes=1000, global_pool=global_pool)
    groups = param_groups_lrd(model, 0.05, model.no_weight_decay(), 0.75)
    by_param = {id(p): g for g in groups for p in g["params"]}
    names = dict(model.named_parameters())
    assert len(by_param) == len(names)
    for name, param in names.items():
        group = by_param[id(param)]
        assert group["lr_scale"] == pytest.approx(_mae_lr_scale(name, depth, 0.75)), name
        no_decay = param.ndim == 1 or name in ("pos_embed", "cls_token")
        assert group["weight_decay"] == (0.0 if no_decay else 0.05), name
    final_norm = "fc_norm.weight" if global_pool else "norm.weight"
    assert by_param[id(names[final_norm])]["lr_scale"] == 1.0
    assert by_param[id(names["head.weight"])]["lr_scale"] == 1.0


def test_eval_crop_ratio_follows_the_reference():
    from util.data import eval_transform
    assert eval_transform(224).transforms[0].size == 256
    assert eval_transform(32).transforms[0].size == 36
    assert eval_transform(384).transforms[0].size == 384      # crop ratio 1.0 above 224 px
    assert eval_transform(448).transforms[1].size == (448, 448)


def test_probe_crop_is_one_clamped_draw():
    """Every box lies inside the image and equals the single draw of area and log-ratio."""
    from PIL import Image

    from util.data import SingleDrawResizedCrop
    img = Image.new("RGB", (40, 30))
    scale, ratio = (0.08, 1.0), (3 / 4, 4 / 3)
    for seed in range(300):
        torch.manual_seed(seed)
        top, left, h, w = SingleDrawResizedCrop.get_params(img, scale, ratio)
        assert 0 <= top and top + h <= 30 and 0 <= left and left + w <= 40 and h >= 1 and w >= 1
        torch.manual_seed(seed)
        area = 1200 * torch.empty(1).uniform_(*scale).item()
        aspect = math.exp(torch.empty(1).uniform_(math.log(ratio[0]), math.log(ratio[1])).item())
        assert (h, w) == (min(round(math.sqrt(area / aspect)), 30), min(round(math.sqrt(area * aspect)), 40))


def test_default_randaugment_runs_on_the_installed_pillow_including_zero_bit_posterize():
    """timm's rand-m9-mstd0.5-inc1 can ask for 0-bit posterize, which Pillow 13 rejects."""
    import argparse

    import PIL
    from PIL import Image
    from timm.data.auto_augment import RandAugment

    from util.data import finetune_transform, posterize_any_bits
    img = Image.fromarray(torch.randint(0, 256, (40, 40, 3), dtype=torch.uint8).numpy())
    assert posterize_any_bits(img, 0).getextrema() == ((0, 0), (0, 0), (0, 0))
    assert posterize_any_bits(img, 8) is img
    args = argparse.Namespace(color_jitter=None, aa="rand-m9-mstd0.5-inc1", reprob=0.25, remode="pixel", recount=1,
                              crop_scale=[0.08, 1.0], hflip=0.5)
    transform = finetune_transform(32, args)
    ops = [op for t in transform.transforms if isinstance(t, RandAugment) for op in t.ops]
    posterize = [op for op in ops if op.name.startswith("Posterize")]
    assert posterize and all(op.aug_fn is posterize_any_bits for op in posterize)
    for op in posterize:          # the strongest magnitude: 0 bits with the increasing variant
        op.prob, op.magnitude, op.magnitude_std = 1.0, 10, 0
        assert op(img).size == img.size
    torch.manual_seed(0)
    for _ in range(50):
        assert transform(img).shape == (3, 32, 32)
    print(f"RandAugment ran on Pillow {PIL.__version__}")


@pytest.mark.parametrize("gpu, capability, expected", [("H100", (9, 0), torch.bfloat16),
                                                       ("A100", (8, 0), torch.bfloat16),
                                                      ("V100", (7, 0), torch.float16), ("T4", (7, 5), torch.float16)])
def test_amp_auto_picks_native_bf16_or_else_fp16_on_gpus_and_fp32_on_cpu(monkeypatch, gpu, capability, expected):
    """V100 and T4 only emulate bf16 (is_bf16_supported() says yes there): auto takes fp16 on them."""
    from util.precision import make_scaler, resolve_amp
    seen = []
    monkeypatch.setattr(torch.cuda, "is_bf16_supported", lambda *a, **k: True)   # what emulation answers
    monkeypatch.setattr(torch.cuda, "get_device_capability", lambda device=None: seen.append(device) or capability)
    assert resolve_amp("auto", torch.device("cuda", 1)) == expected
    assert seen == [torch.device("cuda", 1)]          # the run's own GPU is asked
    assert resolve_amp("none", torch.device("cuda")) is None
    assert resolve_amp("auto", torch.device("cpu")) is None and resolve_amp("fp16", torch.device("cpu")) is None
    assert make_scaler(torch.device("cpu"), torch.float16).is_enabled()
    assert not make_scaler(torch.device("cpu"), torch.bfloat16).is_enabled()
