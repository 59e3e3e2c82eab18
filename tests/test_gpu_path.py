"""What the GPU path needs, checked on CPU: predicted losses in float32 under bf16 autocast, the
tubelet embedding as a matrix product equal to its Conv3d, clips leaving the loader's workers as
uint8, and loader workers sized for the machine."""
import numpy as np
import pytest
import torch

import models_hpm
from engine_pretrain import PretrainTask
from util.args import default_workers
from util.normalization import IMAGENET
from util.patches import TubeletEmbed
from util.rng import seed_all
from util.video import ClipTransform, normalise_clips


@pytest.mark.parametrize("model, hard_unit", [("mae_vit_tiny_patch4", "tube"), ("videomae_vit_tiny_patch4", "tube"),
                                              ("videomae_vit_tiny_patch4", "token")])
def test_predicted_losses_are_float32_under_bf16_autocast(model, hard_unit):
    """The teacher ranks the predicted losses and the student's objective compares them: rounded to
    bf16 (8 significand bits) they tied at the cut, and a tie is broken by position."""
    torch.manual_seed(0)
    kwargs = {"hard_unit": hard_unit} if model.startswith("videomae") else {}
    student = models_hpm.create_pretrain_model(model, **kwargs)
    shape = (4, 3, 16, 32, 32) if student.video else (4, 3, 32, 32)
    inputs = torch.randn(shape)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        ranked = student.predict_losses(inputs)
        out = student(inputs, student.random_mask(4, inputs.device, torch.Generator().manual_seed(0)))
        losses = student.forward_loss(inputs, out)
    assert ranked.dtype == torch.float32 and out.loss_pred.dtype == torch.float32
    assert all(len(torch.unique(row)) == row.numel() for row in ranked)   # no ties among the ranked values
    assert torch.isfinite(losses.loss_pred)
    fp32 = student.predict_losses(inputs)   # and without autocast, the float32 values as before
    assert fp32.dtype == torch.float32 and (fp32 - ranked).abs().max() < 0.1 * fp32.abs().max()


@pytest.mark.parametrize("frames, tubelet, size, patch", [(16, 2, 32, 4), (4, 1, 48, 16), (8, 4, 32, 8)])
def test_tubelet_embedding_equals_its_conv3d(frames, tubelet, size, patch):
    torch.manual_seed(0)
    embed = TubeletEmbed(size, patch, 3, 40, num_frames=frames, tubelet_size=tubelet)
    assert list(embed.state_dict()) == ["proj.weight", "proj.bias"]   # the released files' keys
    clips = torch.randn(2, 3, frames, size, size, requires_grad=True)
    ours = embed(clips)
    conv = embed.proj(clips).flatten(2).transpose(1, 2)
    assert ours.shape == conv.shape and ours.is_contiguous()
    torch.testing.assert_close(ours, conv, atol=1e-5, rtol=1e-5)
    grads = torch.autograd.grad(ours.square().sum(), [clips, embed.proj.weight])
    conv_grads = torch.autograd.grad(conv.square().sum(), [clips, embed.proj.weight])
    for a, b in zip(grads, conv_grads):
        torch.testing.assert_close(a, b, atol=1e-4, rtol=1e-4)
    with pytest.raises(ValueError, match="expected clips"):
        embed(torch.randn(2, 3, size, size))


def test_clips_leave_the_workers_as_uint8_and_normalise_on_the_device_as_before():
    frames = np.random.RandomState(0).randint(0, 255, (16, 40, 52, 3), dtype=np.uint8)
    seed_all(3)
    as_float = ClipTransform(32, IMAGENET, train=True)(frames)
    seed_all(3)   # the same multi-scale crop box
    as_bytes = ClipTransform(32, IMAGENET, train=True, as_uint8=True)(frames)
    assert as_bytes.dtype == torch.uint8 and as_bytes.shape == (3, 16, 32, 32)
    restored = normalise_clips(as_bytes.unsqueeze(0), IMAGENET)[0]
    std = torch.tensor(IMAGENET.std).view(3, 1, 1, 1)
    assert ((restored - as_float).abs() * std).max() <= 0.5 / 255 + 1e-6   # one rounding to uint8, no more
    # without resizing the bytes are the decoded frames themselves
    same = ClipTransform(40, IMAGENET, train=False, as_uint8=True)(frames[:, :40, :40])
    assert torch.equal(same, torch.from_numpy(frames[:, :40, :40]).permute(3, 0, 1, 2))


def test_pretraining_step_normalises_uint8_clips():
    import main_pretrain
    from engine_pretrain import build_student, check_pretrain_args
    args = main_pretrain.get_args_parser().parse_args(["--model", "videomae_vit_tiny_patch4"])
    check_pretrain_args(args)
    torch.manual_seed(0)
    student = build_student(args)
    clips = torch.randint(0, 256, (2, 3, 16, 32, 32), dtype=torch.uint8)
    values = []
    for batch in (clips, normalise_clips(clips, IMAGENET)):
        task = PretrainTask(student, args, torch.device("cpu"), None, 1, None, IMAGENET, None, steps_per_epoch=1)
        task.mask_generator.manual_seed(0)
        values.append(task.forward((batch, torch.zeros(2)), 0))
    assert torch.equal(values[0]["recon"], values[1]["recon"]) and torch.isfinite(values[0]["total"])


def test_loader_workers_follow_the_machine(monkeypatch):
    assert default_workers("cpu") == 2
    monkeypatch.setattr("os.cpu_count", lambda: 96)
    monkeypatch.setattr("os.sched_getaffinity", lambda pid: set(range(96)))
    monkeypatch.setenv("LOCAL_WORLD_SIZE", "8")
    assert default_workers("cuda") == 10            # 12 CPUs per GPU: MAE's 10
    monkeypatch.setenv("LOCAL_WORLD_SIZE", "16")
    assert default_workers("cuda") == 5             # 6 CPUs per process, one kept
    monkeypatch.setattr("os.sched_getaffinity", lambda pid: set(range(4)))   # SLURM's per-task cpuset
    assert default_workers("cuda") == 3


def test_a_clip_figure_shows_its_input_in_the_statistics_it_was_normalised_with():
    """visualize.py builds the network from the checkpoint (ImageNet's statistics inside it) and passes the
    run's own (--norm dataset, --mean/--std): the input row must come back in the input's own colours."""
    from engine_pretrain import clip_rows
    from util.normalization import Stats
    torch.manual_seed(0)
    student = models_hpm.create_pretrain_model("videomae_vit_tiny_patch4").eval()
    pixels = torch.rand(1, 3, 16, 32, 32)
    own = Stats((0.3, 0.3, 0.3), (0.35, 0.35, 0.35))
    clips = (pixels - torch.tensor(own.mean).view(1, 3, 1, 1, 1)) / torch.tensor(own.std).view(1, 3, 1, 1, 1)
    mask = student.random_mask(1, clips.device, torch.Generator().manual_seed(0))
    rows = clip_rows(student, clips, mask, None, own, every=4)
    torch.testing.assert_close(rows[0], pixels[0].permute(1, 0, 2, 3)[::4], atol=1e-6, rtol=0)
