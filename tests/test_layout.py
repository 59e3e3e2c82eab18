"""The token layouts: what differs between images and clips, owned by one value each that the network
asks (util/layout.py), and a network that holds no data statistics."""
import pytest
import torch

import models_hpm
from util.layout import ClipLayout, ImageLayout
from util.masking import tube_means
from util.normalization import IMAGENET, Stats
from util.patches import gather_patches

OWN = Stats((0.3, 0.35, 0.4), (0.2, 0.25, 0.3))


def test_image_layout():
    layout = ImageLayout(32, 4, 3, 0.75)
    assert (layout.num_prefix, layout.num_patches, layout.num_masked, layout.patch_dim) == (1, 64, 48, 48)
    assert layout.position_table(16).shape == (1, 65, 16)
    imgs = torch.randn(2, 3, 32, 32)
    torch.testing.assert_close(layout.unpatchify(layout.patchify(imgs)), imgs)
    mask = layout.random_mask(5, imgs.device, torch.Generator().manual_seed(0))
    assert mask.shape == (5, 64) and (mask.sum(1) == 48).all()
    assert layout.num_hard(0.5) == 24 and torch.equal(layout.ranking_units(mask.float()), mask.float())


@pytest.mark.parametrize("unit", ["tube", "token"])
def test_clip_layout(unit):
    layout = ClipLayout(32, 4, 3, 0.9, 16, 2, unit)
    assert (layout.num_prefix, layout.frames, layout.num_patches, layout.patch_dim) == (0, 8, 512, 96)
    assert layout.num_masked == 8 * layout.masked_per_frame
    clips = torch.randn(2, 3, 16, 32, 32)
    torch.testing.assert_close(layout.unpatchify(layout.patchify(clips)), clips)
    mask = layout.random_mask(3, clips.device, torch.Generator().manual_seed(0))
    tubes = mask.view(3, 8, 64)
    assert (mask.sum(1) == layout.num_masked).all()
    assert torch.equal(tubes, tubes[:, :1].expand_as(tubes)) == (unit == "tube")   # the same at every time step
    values = torch.randn(3, layout.num_masked)
    expected = tube_means(values, 8) if unit == "tube" else values
    torch.testing.assert_close(layout.ranking_units(values), expected)
    assert layout.num_hard(0.5) == int((layout.masked_per_frame if unit == "tube" else layout.num_masked) * 0.5)


def test_the_network_holds_no_statistics_and_its_target_follows_the_inputs():
    """VideoMAE's target is the clip un-normalised with what normalised it: the run's own statistics are
    passed in (they travel with the checkpoint), none live in the network."""
    torch.manual_seed(0)
    student = models_hpm.create_pretrain_model("videomae_vit_tiny_patch4", learning_loss=False)
    assert not any("pixel" in name for name, _ in student.named_buffers())
    pixels = torch.rand(2, 3, 16, 32, 32)
    inputs = {}
    for stats in (IMAGENET, OWN):
        mean, std = (torch.tensor(v).view(1, 3, 1, 1, 1) for v in (stats.mean, stats.std))
        inputs[stats] = (pixels - mean) / std
        torch.testing.assert_close(student.pixel_target(inputs[stats], stats), student.patchify(pixels),
                                   atol=1e-6, rtol=0)
    mask = student.random_mask(2, pixels.device, torch.Generator().manual_seed(0))
    out = student(inputs[OWN], mask)
    losses = student.forward_loss(inputs[OWN], out, stats=OWN)
    target = gather_patches(student.patchify(pixels), out.ids_masked)
    torch.testing.assert_close(losses.recon, (out.pred - target).square().mean(), atol=1e-6, rtol=1e-5)


def test_the_baselines_mask_policy_comes_from_the_layout():
    image = ImageLayout(32, 4, 3, 0.75)
    for kind in ("random", "regular", "block"):
        mask = image.mask_policy(kind)(3, torch.device("cpu"), torch.Generator().manual_seed(0))
        assert mask.shape == (3, 64) and (mask.sum(1) == image.num_masked).all()
    clip = ClipLayout(32, 4, 3, 0.9, 16, 2, "tube")
    assert clip.mask_policy("random") == clip.random_mask
    with pytest.raises(ValueError, match="the block mask is for images"):
        clip.mask_policy("block")


@pytest.mark.parametrize("old, value, unit", [("--hard_unit", "token", "token"), ("--hard_unit", "tube", "tube"),
                                              ("--mask_type", "random", "token"), ("--mask_type", "tube", "tube")])
def test_the_former_unit_flags_are_read_as_mask_unit_with_a_note(old, value, unit, capsys):
    import main_pretrain
    from engine_pretrain import build_student, check_pretrain_args
    args = main_pretrain.get_args_parser().parse_args(["--model", "videomae_vit_tiny_patch4", old, value])
    assert args.mask_unit == unit and not hasattr(args, "hard_unit") and not hasattr(args, "mask_type")
    assert capsys.readouterr().err.strip() == f"note: {old} {value} is now --mask_unit {unit}"
    check_pretrain_args(args)
    assert build_student(args).layout.unit == unit


def test_runs_saved_under_the_former_flags_are_still_the_same_run():
    from util.args import first_difference, legacy_settings
    old_hpm = {"model": "videomae_vit_tiny_patch4", "learning_loss": True, "hard_unit": "token", "mask_type": "tube"}
    old_mae = {"model": "videomae_vit_tiny_patch4", "learning_loss": False, "hard_unit": "tube", "mask_type": "random"}
    assert legacy_settings(old_hpm)["mask_unit"] == "token" and legacy_settings(old_mae)["mask_unit"] == "token"
    now = {"model": "videomae_vit_tiny_patch4", "learning_loss": True, "mask_unit": "tube"}
    assert first_difference(legacy_settings(old_hpm), True, now) == ("mask_unit", "token", "tube")
    assert first_difference(legacy_settings(old_hpm), True, {**now, "mask_unit": "token"}) is None
