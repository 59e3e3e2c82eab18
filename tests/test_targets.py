"""Feature targets (--target ema|clip|dino): the loss, the shapes, where gradients go, the ema
target, the frozen models from local files, the errors and exact resume."""
import argparse

import pytest
import timm
import torch

from engine_pretrain import PretrainTask, build_student, build_target, pretrain_parents
from models_hpm import create_pretrain_model
from models_vit import create_classifier
from tests.helpers import TINY, make_image_folder, run_script
from util.args import make_parser
from util.checkpoint import load_file, load_pretrained
from util.errors import UserError
from util.losses import feature_loss, relative_loss_prediction
from util.masking import random_mask
from util.targets import FrozenTarget

IMGS = torch.randn(4, 3, 32, 32, generator=torch.Generator().manual_seed(0))


def _args(*argv: str) -> argparse.Namespace:
    return make_parser("test", pretrain_parents()).parse_args(list(argv))


@pytest.fixture(scope="module")
def external(tmp_path_factory):
    """Tiny random 'external' ViTs (patch 4, width 64) saved as a DINO-like and a CLIP-like file
    (the latter with a 48-d projection head), both made at 64 px so that loading at 32 px resamples
    their position embeddings."""
    root = tmp_path_factory.mktemp("external")
    torch.manual_seed(0)
    kw = dict(img_size=64, patch_size=4, embed_dim=64, depth=2, num_heads=1)
    dino = timm.create_model("vit_base_patch16_224", num_classes=0, **kw)
    clip = timm.create_model("vit_base_patch16_clip_224", num_classes=48, **kw)
    torch.save(dino.state_dict(), root / "dino.pth")
    torch.save({"state_dict": clip.state_dict()}, root / "clip.pth")
    torch.save({"conv.weight": torch.zeros(3, 3)}, root / "notvit.pth")
    return root, dino.eval(), clip.eval()


def test_feature_loss_is_the_squared_distance_of_normalised_vectors():
    pred, target = torch.randn(2, 5, 7), torch.randn(2, 5, 7)
    mean, per_patch = feature_loss(pred, target)
    by_hand = torch.tensor([[sum((pred[n, m, c] / pred[n, m].norm() - target[n, m, c] / target[n, m].norm()) ** 2
                                 for c in range(7)) for m in range(5)] for n in range(2)])
    torch.testing.assert_close(per_patch, by_hand, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(mean, by_hand.mean())
    assert float(feature_loss(target * 3.0, target)[0]) < 1e-6        # scale does not matter


@pytest.mark.parametrize("kind", ["dino", "clip"])
def test_frozen_targets_have_the_student_grid_and_their_width(external, kind):
    root, dino, clip = external
    frozen = FrozenTarget(kind, None, str(root / f"{kind}.pth"), img_size=32, patch_size=4)
    feats = frozen(IMGS)
    assert feats.shape == ((4, 64, 64) if kind == "dino" else (4, 64, 48)) and frozen.dim == feats.shape[-1]
    model = frozen.model
    assert model.pos_embed.shape[1] == 1 + 64           # resampled from the 16 x 16 grid of the file
    with torch.no_grad():
        tokens = model.forward_features(IMGS)[:, 1:]
    torch.testing.assert_close(feats, tokens if kind == "dino" else model.head(tokens))
    assert not any(p.requires_grad for p in frozen.parameters())


def test_gradients_reach_the_reconstructor_not_the_frozen_model_nor_the_teacher(external):
    root = external[0]
    args = _args("--target", "clip", "--target_checkpoint", str(root / "clip.pth"), "--epochs", "2")
    frozen, dim = build_target(args)
    assert dim == 48 and len(args.target_checkpoint_sha256) == 64
    student = build_student(args, dim)
    assert student.decoder_pred.out_features == 48
    task = PretrainTask(student, args, torch.device("cpu"), None, frozen_target=frozen)
    values = task.forward((IMGS, None), epoch=1)         # epoch 1 of 2: hard patches from the teacher
    values["total"].backward()
    assert student.decoder_pred.weight.grad is not None and student.decoder_pred_losspred.weight.grad is not None
    assert all(p.grad is None for p in frozen.parameters())
    assert all(p.grad is None for p in task.teacher.model.parameters())


def test_loss_predictor_ranks_the_feature_loss():
    student = create_pretrain_model("mae_vit_tiny_patch4", target_dim=24)
    feats = torch.randn(4, 64, 24)
    out = student(IMGS, random_mask(4, 64, student.num_masked))
    losses = student.forward_loss(IMGS, out, feats)
    per_patch = feature_loss(out.pred, torch.gather(feats, 1, out.ids_masked.unsqueeze(-1).expand(-1, -1, 24)))[1]
    torch.testing.assert_close(losses.recon_per_patch, per_patch)
    torch.testing.assert_close(losses.loss_pred, relative_loss_prediction(out.loss_pred, per_patch))


@pytest.mark.parametrize("hpm", [True, False])
def test_ema_target_is_the_teachers_encoder_output(hpm):
    args = _args("--target", "ema", "--epochs", "2", *([] if hpm else ["--no-learning_loss"]))
    frozen, dim = build_target(args)
    torch.manual_seed(0)
    task = PretrainTask(build_student(args, dim), args, torch.device("cpu"), None)
    assert task.teacher is not None and (task.teacher.has_loss_predictor == hpm)
    with torch.no_grad():
        task.teacher.model.blocks[0].mlp.fc1.weight.add_(0.1)        # the teacher differs from the student
        features, pred_loss = task.targets(IMGS, epoch=1)
        expected = task.teacher.model.forward_encoder(IMGS)[:, 1:]
    torch.testing.assert_close(features, expected)
    assert (pred_loss is not None) == hpm
    assert task.name == ("HPM" if hpm else "MAE") + " with ema targets"


def test_missing_file_and_wrong_architecture_are_one_line_errors(external, tmp_path):
    root = external[0]
    with pytest.raises(UserError, match="--target_checkpoint .*no such file"):
        FrozenTarget("dino", None, str(tmp_path / "none.pth"), 32, 4)
    with pytest.raises(UserError, match="--target clip needs --target_checkpoint"):
        FrozenTarget("clip", None, None, 32, 4)
    with pytest.raises(UserError, match="does not fit --target_model") as exc:
        FrozenTarget("dino", None, str(root / "notvit.pth"), 32, 4)
    assert "\n" not in str(exc.value)
    with pytest.raises(UserError, match="patches of 4 px but the student's are 16 px"):
        FrozenTarget("dino", None, str(root / "dino.pth"), 32, 16)


@pytest.mark.slow
@pytest.mark.parametrize("target", ["ema", "clip"])   # dino loads like clip (the unit tests above cover both files)
def test_pretraining_with_each_target_resumes_exactly_and_fine_tunes(external, tmp_path, target):
    root = external[0]
    make_image_folder(tmp_path / "data", classes=2, per_class=16, size=36)      # 4 steps of 8 per epoch
    extra = [] if target == "ema" else ["--target_checkpoint", str(root / f"{target}.pth")]
    common = ["--target", target, *extra, *TINY, "--epochs", "2", "--warmup_epochs", "1", "--batch_size", "8",
              "--print_freq", "1", "--data_path", str(tmp_path / "data")]
    straight = run_script("main_pretrain.py", *common, "--output_dir", str(tmp_path / "a"))
    assert straight.returncode == 0, straight.stderr
    stopped = run_script("main_pretrain.py", *common, "--output_dir", str(tmp_path / "b"),
                         env={"HPM_FAULT": "point=step,at=6,action=SIGTERM"})    # epoch 1, hard patches on
    assert stopped.returncode == 75, stopped.stderr
    resumed = run_script("main_pretrain.py", *common, "--output_dir", str(tmp_path / "b"))
    assert resumed.returncode == 0 and "at epoch 1, step 2" in resumed.stdout, resumed.stderr
    a, b = load_file(tmp_path / "a" / "checkpoint-last.pth"), load_file(tmp_path / "b" / "checkpoint-last.pth")
    assert a["args"]["target"] == target and not any("target" in k for k in a if k not in ("args",))
    for part in ("model", "teacher"):
        for key in a[part]:
            assert torch.equal(a[part][key], b[part][key]), f"{part}.{key}"
    pixels = common[2 + len(extra):]   # the same run with pixel targets is another run
    switched = run_script("main_pretrain.py", *pixels, "--epochs", "3", "--output_dir", str(tmp_path / "b"))
    assert switched.returncode == 2 and f"--target {target} there, pixel now" in switched.stderr, switched.stderr
    classifier = create_classifier("vit_tiny_patch4", num_classes=10)
    assert set(load_pretrained(classifier, tmp_path / "a" / "checkpoint-last.pth")) == {
        "head.weight", "head.bias", "fc_norm.weight", "fc_norm.bias"}
