"""The video network against transformers' VideoMAE (and the image network against ViTMAE) with
random weights: the same reconstruction loss on the same clips and masks, the same encoder tokens;
the pretraining loader for every format; HPM's objectives on clips."""
import pytest
import torch

from models_hpm import create_pretrain_model, load_pretrain_model
from util.checkpoint import save_atomic
from util.masking import random_mask, tube_mask


def _jitter(model: torch.nn.Module) -> None:
    """Random weights everywhere (transformers initialises biases and norms to constants)."""
    torch.manual_seed(1)
    with torch.no_grad():
        for p in model.parameters():
            p.add_(torch.randn_like(p) * 0.05)


def _videomae(tmp_path, norm_pix: bool):
    from transformers import VideoMAEConfig, VideoMAEForPreTraining
    config = VideoMAEConfig(image_size=32, patch_size=4, num_frames=8, tubelet_size=2, hidden_size=32,
                            num_hidden_layers=2, num_attention_heads=4, intermediate_size=128, decoder_hidden_size=16,
                            decoder_num_hidden_layers=2, decoder_num_attention_heads=2, decoder_intermediate_size=64,
                            norm_pix_loss=norm_pix, use_mean_pooling=False, layer_norm_eps=1e-6)
    torch.manual_seed(0)
    theirs = VideoMAEForPreTraining(config).eval()
    _jitter(theirs)
    theirs.save_pretrained(str(tmp_path / "videomae"))
    return theirs, load_pretrain_model(str(tmp_path / "videomae")).eval()


@pytest.mark.parametrize("norm_pix", [False, True])
def test_video_loss_and_tokens_equal_transformers_videomae(tmp_path, norm_pix):
    theirs, ours = _videomae(tmp_path, norm_pix)
    assert ours.video and not ours.learning_loss and ours.norm_pix_loss == norm_pix
    clips = torch.randn(2, 3, 8, 32, 32, generator=torch.Generator().manual_seed(2))     # (N, 3, T, H, W)
    mask = tube_mask(2, 4, 64, ours.masked_per_frame, generator=torch.Generator().manual_seed(3))
    with torch.no_grad():
        expected = theirs(clips.transpose(1, 2), bool_masked_pos=mask).loss                 # theirs: (N, T, 3, H, W)
        out = ours(clips, mask)
        loss = ours.forward_loss(clips, out).recon
        tokens = ours.forward_encoder(clips)
        their_tokens = theirs.videomae(clips.transpose(1, 2)).last_hidden_state
    torch.testing.assert_close(loss, expected, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(tokens, their_tokens, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("norm_pix", [False, True])
def test_image_loss_and_tokens_equal_transformers_vitmae(tmp_path, norm_pix):
    """ViTMAE shuffles by `noise`: noise low on our visible patches (ascending) keeps exactly them."""
    from transformers import ViTMAEConfig, ViTMAEForPreTraining
    config = ViTMAEConfig(image_size=32, patch_size=4, hidden_size=32, num_hidden_layers=2, num_attention_heads=4,
                          intermediate_size=128, decoder_hidden_size=16, decoder_num_hidden_layers=2,
                          decoder_num_attention_heads=2, decoder_intermediate_size=64, mask_ratio=0.75,
                          norm_pix_loss=norm_pix, layer_norm_eps=1e-6)
    torch.manual_seed(0)
    theirs = ViTMAEForPreTraining(config).eval()
    _jitter(theirs)
    theirs.save_pretrained(str(tmp_path / "vitmae"))
    ours = load_pretrain_model(str(tmp_path / "vitmae")).eval()
    imgs = torch.randn(2, 3, 32, 32, generator=torch.Generator().manual_seed(2))
    mask = random_mask(2, 64, ours.num_masked, generator=torch.Generator().manual_seed(3))
    noise = mask.float() + torch.arange(64) / 128
    with torch.no_grad():
        result = theirs(imgs, noise=noise)
        assert torch.equal(result.mask.bool(), mask)
        loss = ours.forward_loss(imgs, ours(imgs, mask)).recon
        visible = ours.forward_encoder(imgs, torch.argsort(mask.to(torch.int8), dim=1, stable=True)[:, :16],
                                       vis_mask=False)
        their_visible = theirs.vit(imgs, noise=noise).last_hidden_state
    torch.testing.assert_close(loss, result.loss, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(visible, their_visible, rtol=1e-5, atol=1e-5)


def test_videomae_own_file_and_ours_load(tmp_path):
    """VideoMAE's own pretraining file layout (encoder./decoder. prefixes, q_bias / v_bias, no position
    tables) and our checkpoint format load into the same network, with equal outputs."""
    from util.formats import from_videomae
    theirs, reference = _videomae(tmp_path, True)
    state = reference.state_dict()
    own = {}
    for key, value in state.items():
        if key.endswith("pos_embed"):
            continue
        for mine, their in (("blocks.", "encoder.blocks."), ("decoder_blocks.", "decoder.blocks."),
                            ("decoder_norm.", "decoder.norm."), ("decoder_pred.", "decoder.head."),
                            ("decoder_embed.", "encoder_to_decoder."), ("patch_embed.", "encoder.patch_embed."),
                            ("norm.", "encoder.norm.")):
            if key.startswith(mine):
                key = their + key[len(mine):]
                break
        if key.endswith("attn.qkv.bias"):
            q, k, v = value.chunk(3)
            assert torch.equal(k, torch.zeros_like(k))
            own[key.replace("qkv.bias", "q_bias")], own[key.replace("qkv.bias", "v_bias")] = q, v
        else:
            own[key] = value
    assert {k: v for k, v in from_videomae(own).items()}.keys() == {k for k in state if not k.endswith("pos_embed")}
    save_atomic({"model": own}, tmp_path / "videomae_own.pth")
    loaded = load_pretrain_model(str(tmp_path / "videomae_own.pth"), num_frames=8, img_size=32, decoder_norm_eps=1e-5,
                                 num_heads=4, decoder_num_heads=2, norm_pix_loss=True).eval()
    clips = torch.randn(1, 3, 8, 32, 32)
    torch.testing.assert_close(loaded.forward_encoder(clips), reference.forward_encoder(clips))


@pytest.mark.parametrize("hard_unit", ["tube", "token"])
@pytest.mark.parametrize("relative", [True, False])
def test_hpm_on_clips_trains_both_units_and_objectives(hard_unit, relative):
    """One step of video HPM: the teacher's hard mask (tube: the same positions at every time), the
    reconstruction and the objective on tubes or tokens, gradients into the loss predictor."""
    from models_hpm import HPMTeacher
    model = create_pretrain_model("videomae_vit_tiny_patch4", hard_unit=hard_unit, relative=relative)
    teacher = HPMTeacher(model, epochs=10)
    clips = torch.randn(2, 3, 16, 32, 32)
    mask = teacher.mask(clips, epoch=9)
    assert mask.shape == (2, 512) and (mask.sum(1) == model.num_masked).all() and model.num_masked == 8 * 57
    frames = mask.view(2, 8, 64)
    assert torch.equal(frames[:, 0], frames[:, 7]) == (hard_unit == "tube")
    losses = model.forward_loss(clips, model(clips, mask))
    losses.total.backward()
    assert torch.isfinite(losses.total) and model.decoder_pred_losspred.weight.grad.abs().sum() > 0
    teacher.update(9)


@pytest.mark.parametrize("name, shape", [("mae_vit_tiny_patch4", (2, 3, 32, 32)),
                                         ("videomae_vit_tiny_patch4", (2, 3, 16, 32, 32))])
def test_activation_checkpointing_changes_no_loss_and_no_gradient(name, shape):
    """--grad_checkpointing recomputes the blocks in the backward pass: the same losses and gradients,
    and far fewer activations kept for the backward pass (counted as autograd saves them)."""
    from models_hpm import HPMTeacher
    inputs = torch.randn(*shape, generator=torch.Generator().manual_seed(0))
    results = []
    for checkpointed in (False, True):
        torch.manual_seed(0)
        model = create_pretrain_model(name, grad_checkpointing=checkpointed)
        mask = HPMTeacher(model, epochs=4).mask(inputs, 3, generator=torch.Generator().manual_seed(1))
        saved = []

        def keep(tensor):
            saved.append(tensor.numel() * tensor.element_size())
            return tensor

        with torch.autograd.graph.saved_tensors_hooks(keep, lambda tensor: tensor):
            losses = model.forward_loss(inputs, model(inputs, mask))
        losses.total.backward()
        results.append((losses.total.detach(), [p.grad.clone() for p in model.parameters() if p.grad is not None],
                        sum(saved)))
    (plain, plain_grads, plain_bytes), (ckpt, ckpt_grads, ckpt_bytes) = results
    assert ckpt_bytes < 0.5 * plain_bytes, (ckpt_bytes, plain_bytes)
    torch.testing.assert_close(ckpt, plain)
    assert len(plain_grads) == len(ckpt_grads) > 0
    for a, b in zip(plain_grads, ckpt_grads):
        torch.testing.assert_close(b, a, rtol=1e-5, atol=1e-7)


def test_our_video_checkpoints_load_student_and_teacher_and_visualize_wants_videos(tmp_path):
    import visualize
    from util.errors import UserError
    torch.manual_seed(0)
    student = create_pretrain_model("videomae_vit_tiny_patch4", hard_unit="token")
    torch.manual_seed(1)
    teacher = create_pretrain_model("videomae_vit_tiny_patch4", hard_unit="token")
    path = tmp_path / "ours.pth"
    save_atomic({"format": "hpm-pretrain", "version": 1, "model_name": "videomae_vit_tiny_patch4", "next_epoch": 1,
                 "model": student.state_dict(), "teacher": teacher.state_dict(),
                 "args": {"model": "videomae_vit_tiny_patch4", "hard_unit": "token", "mask_ratio": 0.9}}, path)
    for want, source in ((False, student), (True, teacher)):
        loaded = load_pretrain_model(str(path), teacher=want)
        assert loaded.video and loaded.hard_unit == "token" and loaded.patch_embed.img_size == (32, 32)
        for key, value in source.state_dict().items():
            assert torch.equal(loaded.state_dict()[key], value), key
    (tmp_path / "img.png").write_bytes(b"")
    with pytest.raises(UserError, match="is a video checkpoint; pass --videos"):
        visualize.main(visualize.get_args_parser().parse_args(
            ["--checkpoint", str(path), "--images", str(tmp_path), "--output", str(tmp_path / "fig.png")]))
