import pytest
import torch

from models_hpm import PRETRAIN_MODELS, create_pretrain_model
from util.losses import absolute_loss_prediction
from util.masking import random_mask
from util.patches import gather_patches


def _tiny(**kwargs):
    torch.manual_seed(0)
    return create_pretrain_model("mae_vit_tiny_patch4", **kwargs)


@pytest.mark.parametrize("mode", ["pixel", "norm_pix"])
def test_reproduces_reference_vectors(reference, mode):
    vec = reference[mode]
    model = _tiny(norm_pix_loss=mode == "norm_pix").eval()
    model.load_state_dict(reference["pretrain_state_dict"], strict=True)
    with torch.no_grad():
        out = model(vec["imgs"], vec["mask"])
        losses = model.forward_loss(vec["imgs"], out)
        teacher = model.predict_losses(vec["imgs"])
    close = dict(atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(out.pred, vec["pred_masked"], **close)
    torch.testing.assert_close(out.loss_pred, vec["loss_pred_masked"], **close)
    torch.testing.assert_close(out.latent, vec["latent"], **close)
    torch.testing.assert_close(losses.recon, vec["recon_loss"], **close)
    torch.testing.assert_close(losses.recon_per_patch, vec["recon_loss_per_patch"], **close)
    torch.testing.assert_close(losses.loss_pred, vec["relative_loss"], **close)
    torch.testing.assert_close(absolute_loss_prediction(out.loss_pred, losses.recon_per_patch),
                               vec["absolute_loss"], **close)
    torch.testing.assert_close(teacher, vec["teacher_loss_pred_all"], **close)


def test_absolute_mode_uses_absolute_objective(reference):
    vec = reference["pixel"]
    model = _tiny(relative=False).eval()
    model.load_state_dict(reference["pretrain_state_dict"])
    with torch.no_grad():
        losses = model.forward_loss(vec["imgs"], model(vec["imgs"], vec["mask"]))
    torch.testing.assert_close(losses.loss_pred, vec["absolute_loss"], atol=1e-5, rtol=1e-5)


def test_initial_pos_embed_tables_equal_reference(reference):
    model = _tiny()
    ref = reference["pretrain_state_dict"]
    torch.testing.assert_close(model.pos_embed.data, ref["pos_embed"], atol=1e-6, rtol=0)
    torch.testing.assert_close(model.decoder_pos_embed.data, ref["decoder_pos_embed"], atol=1e-6, rtol=0)


def _expected_keys(depth: int, dec_depth: int, dim: int, dec_dim: int, p: int, hpm: bool) -> dict:
    L = (224 // p) ** 2

    def block(prefix, d):
        return {f"{prefix}.norm1.weight": (d,), f"{prefix}.norm1.bias": (d,),
                f"{prefix}.attn.qkv.weight": (3 * d, d), f"{prefix}.attn.qkv.bias": (3 * d,),
                f"{prefix}.attn.proj.weight": (d, d), f"{prefix}.attn.proj.bias": (d,),
                f"{prefix}.norm2.weight": (d,), f"{prefix}.norm2.bias": (d,),
                f"{prefix}.mlp.fc1.weight": (4 * d, d), f"{prefix}.mlp.fc1.bias": (4 * d,),
                f"{prefix}.mlp.fc2.weight": (d, 4 * d), f"{prefix}.mlp.fc2.bias": (d,)}

    keys = {"cls_token": (1, 1, dim), "pos_embed": (1, L + 1, dim), "mask_token": (1, 1, dec_dim),
            "decoder_pos_embed": (1, L + 1, dec_dim), "patch_embed.proj.weight": (dim, 3, p, p),
            "patch_embed.proj.bias": (dim,), "norm.weight": (dim,), "norm.bias": (dim,),
            "decoder_embed.weight": (dec_dim, dim), "decoder_embed.bias": (dec_dim,)}
    for i in range(depth):
        keys.update(block(f"blocks.{i}", dim))
    for suffix in ([""] + (["_losspred"] if hpm else [])):
        for i in range(dec_depth):
            keys.update(block(f"decoder_blocks{suffix}.{i}", dec_dim))
        keys.update({f"decoder_norm{suffix}.weight": (dec_dim,), f"decoder_norm{suffix}.bias": (dec_dim,),
                     f"decoder_pred{suffix}.weight": (p * p * 3, dec_dim), f"decoder_pred{suffix}.bias": (p * p * 3,)})
    return keys


@pytest.mark.parametrize("name,depth,dim,p", [("mae_vit_base_patch16_dec512d8b", 12, 768, 16),
                                              ("mae_vit_large_patch16_dec512d8b", 24, 1024, 16),
                                              ("mae_vit_huge_patch14_dec512d8b", 32, 1280, 14)])
@pytest.mark.parametrize("hpm", [True, False])
def test_state_dict_keys_match_spec(name, depth, dim, p, hpm):
    with torch.device("meta"):
        model = create_pretrain_model(name, learning_loss=hpm)
    got = {k: tuple(v.shape) for k, v in model.state_dict().items()}
    assert got == _expected_keys(depth, 8, dim, 512, p, hpm)


def test_registry_names_and_unknown_model_error():
    for name in ["mae_vit_base_patch16", "mae_vit_large_patch16", "mae_vit_huge_patch14",
                 "mae_vit_small_patch16", "mae_vit_tiny_patch4"]:
        assert name in PRETRAIN_MODELS.names()
    with pytest.raises(ValueError, match="did you mean mae_vit_base_patch16"):
        create_pretrain_model("mae_vit_bse_patch16")


def test_visible_first_decoder_equals_unshuffled_order():
    model = _tiny().eval()
    imgs = torch.randn(2, 3, 32, 32)
    mask = random_mask(2, 64, model.num_masked, generator=torch.Generator().manual_seed(3))
    with torch.no_grad():
        out = model(imgs, mask)
        # MAE's layout: tokens in patch order, mask tokens at masked positions.
        x = model.decoder_embed(out.latent)
        full = model.mask_token.expand(2, 64, -1).clone()
        ids_keep = model.mask_order(mask)[:, :64 - model.num_masked]
        full.scatter_(1, ids_keep.unsqueeze(-1).expand(-1, -1, full.shape[-1]), x[:, 1:])
        seq = torch.cat([x[:, :1], full], dim=1) + model.decoder_pos_embed
        rec, lp = seq, seq
        for blk in model.decoder_blocks:
            rec = blk(rec)
        for blk in model.decoder_blocks_losspred:
            lp = blk(lp)
        rec = model.decoder_pred(model.decoder_norm(rec))[:, 1:]
        lp = model.decoder_pred_losspred(model.decoder_norm_losspred(lp))[:, 1:].mean(-1)
    torch.testing.assert_close(out.pred, gather_patches(rec, out.ids_masked), atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(out.loss_pred, torch.gather(lp, 1, out.ids_masked), atol=1e-5, rtol=1e-5)
    assert torch.equal(out.ids_masked, torch.nonzero(mask)[:, 1].view(2, -1))


def test_teacher_path_equals_loss_predictor_branch_with_nothing_masked():
    model = _tiny().eval()
    imgs = torch.randn(3, 3, 32, 32)
    with torch.no_grad():
        ids = torch.arange(64).expand(3, -1)
        latent = model.forward_encoder(imgs, ids)
        branch = model.forward_loss_predictor(model.decoder_input(latent, ids, 64), 1)
        teacher = model.predict_losses(imgs)
    assert teacher.shape == (3, 64)
    torch.testing.assert_close(teacher, branch, atol=1e-6, rtol=1e-6)


@pytest.mark.parametrize("training", [True, False])
def test_vis_mask_ratio_also_applies_in_the_teachers_full_image_pass(training):
    """As in the reference: the teacher (eval mode, nothing masked) replaces int(L * ratio) of its
    tokens too; a student forward replaces them only in training."""
    model = _tiny(vis_mask_ratio=0.25).train(training)
    with torch.no_grad():
        model.vis_mask_token.fill_(1e3)
    seen = []
    model.blocks[0].register_forward_hook(lambda mod, inp, out: seen.append(inp[0][:, 1:]))
    imgs = torch.randn(2, 3, 32, 32)
    with torch.no_grad():
        model.predict_losses(imgs)
        model(imgs, random_mask(2, 64, model.num_masked))
    teacher_tokens, student_tokens = seen
    replaced = (teacher_tokens > 500).all(-1).sum(1)
    assert torch.equal(replaced, torch.full((2,), 64 - int(64 * 0.75)))
    assert torch.equal((student_tokens > 500).all(-1).sum(1), torch.full((2,), 16 - int(16 * 0.75) if training else 0))


@pytest.mark.parametrize("hpm", [True, False])
def test_forward_backward_tiny(hpm):
    model = _tiny(learning_loss=hpm, vis_mask_ratio=0.25 if hpm else 0.0)
    imgs = torch.randn(4, 3, 32, 32)
    mask = random_mask(4, 64, model.num_masked)
    out = model(imgs, mask)
    losses = model.forward_loss(imgs, out)
    losses.total.backward()
    assert torch.isfinite(losses.total)
    assert out.pred.shape == (4, 48, 48)
    names = [n for n, _ in model.named_parameters()]
    assert any("losspred" in n for n in names) == hpm
    assert (out.loss_pred is not None) == hpm
    for name, p in model.named_parameters():
        if p.requires_grad:
            assert p.grad is not None, f"{name} got no gradient"
    if not hpm:
        with pytest.raises(RuntimeError, match="no loss predictor"):
            model.predict_losses(imgs)


def test_input_size_not_divisible_by_patch():
    with pytest.raises(ValueError, match="not divisible by the patch size"):
        create_pretrain_model("mae_vit_tiny_patch4", img_size=30)
