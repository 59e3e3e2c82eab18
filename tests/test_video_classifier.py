"""The video classifiers (video_vit_*): every video checkpoint kind loads (files the tests write from
random weights of transformers' classes and of ours), features equal transformers' VideoMAEModel,
the export round trip, VideoMAE's sampling and clip augmentation, multi-view testing checked by
hand, and fine-tuning / kNN / probing / the figure end to end on clips."""
import json

import numpy as np
import pytest
import torch
import torch.nn.functional as F

import models_vit
from models_hpm import create_pretrain_model
from tests.helpers import write_video
from util.checkpoint import load_pretrained, save_atomic
from util.data import ShardSampler
from util.distributed import DistInfo
from util.errors import UserError
from util.normalization import IMAGENET, Stats
from util.rng import seed_all
from util.video import (
    ClipSampling,
    ClipViews,
    FinetuneClipTransform,
    RepeatedAugment,
    clip_dataset,
    stacked_views_collate,
)

TINY = "video_vit_tiny_patch4"


def _jitter(model: torch.nn.Module, seed: int = 1) -> torch.nn.Module:
    torch.manual_seed(seed)
    with torch.no_grad():
        for p in model.parameters():
            if p.requires_grad:   # the fixed position tables stay what they are
                p.add_(torch.randn_like(p) * 0.05)
    return model


def _clips(n: int = 2, seed: int = 2) -> torch.Tensor:
    return torch.randn(n, 3, 16, 32, 32, generator=torch.Generator().manual_seed(seed))


def _ours(tmp_path, name: str = "ours.pth") -> tuple:
    """Our pretraining checkpoint of the tiny video HPM, student and teacher different."""
    torch.manual_seed(0)
    student = _jitter(create_pretrain_model("videomae_vit_tiny_patch4"), 1).eval()
    teacher = _jitter(create_pretrain_model("videomae_vit_tiny_patch4"), 2).eval()
    path = tmp_path / name
    save_atomic({"format": "hpm-pretrain", "version": 1, "model_name": "videomae_vit_tiny_patch4", "next_epoch": 1,
                 "model": student.state_dict(), "teacher": teacher.state_dict(),
                 "args": {"model": "videomae_vit_tiny_patch4", "num_frames": 16}}, path)
    return path, student, teacher


def _hf_config(**kwargs):
    from transformers import VideoMAEConfig
    return VideoMAEConfig(image_size=32, patch_size=4, num_frames=16, tubelet_size=2, hidden_size=64,
                          num_hidden_layers=2, num_attention_heads=4, intermediate_size=256, decoder_hidden_size=32,
                          decoder_num_hidden_layers=2, decoder_num_attention_heads=4, decoder_intermediate_size=128,
                          layer_norm_eps=1e-6, **kwargs)


def _videomae_layout(state: dict, prefix: bool) -> dict:
    """Our encoder keys in VideoMAE's own layout: q_bias / v_bias (and, for its pretraining file, the
    encoder./decoder. prefixes); no position table."""
    out = {}
    renames = (("blocks.", "encoder.blocks."), ("decoder_blocks.", "decoder.blocks."),
               ("decoder_norm.", "decoder.norm."),
               ("decoder_pred.", "decoder.head."), ("decoder_embed.", "encoder_to_decoder."),
               ("patch_embed.", "encoder.patch_embed."), ("norm.", "encoder.norm.")) if prefix else ()
    for key, value in state.items():
        if key.endswith("pos_embed") or "losspred" in key:
            continue
        key = next((theirs + key[len(mine):] for mine, theirs in renames if key.startswith(mine)), key)
        if key.endswith("attn.qkv.bias"):
            q, _, v = value.chunk(3)
            out[key.replace("qkv.bias", "q_bias")], out[key.replace("qkv.bias", "v_bias")] = q, v
        else:
            out[key] = value
    return out


def _features(path, teacher: bool = False, global_pool: bool = False) -> torch.Tensor:
    model = models_vit.create_classifier(TINY, num_classes=0, global_pool=global_pool, pretrained=str(path),
                                         teacher=teacher).eval()
    with torch.no_grad():
        return model.forward_features(_clips())


def test_the_video_classifier_is_videomaes_finetuning_network():
    model = models_vit.create_classifier(TINY, num_classes=8)
    assert model.cls_token is None and model.num_prefix_tokens == 0 and not model.pos_embed.requires_grad
    from util.pos_embed import get_1d_sinusoid_table
    torch.testing.assert_close(model.pos_embed.data.view(512, 64), get_1d_sinusoid_table(512, 64).view(512, 64))
    assert 0.5 * 2e-5 < model.head.weight.std() < 1.5 * 2e-5           # timm's std 0.02, x 0.001
    assert model.forward_features(_clips()).shape == (2, 512, 64)       # (N, L, D): no class token
    assert model(_clips()).shape == (2, 8)
    from util.optim import param_groups_lrd
    trained = {id(p) for g in param_groups_lrd(model, 0.05, model.no_weight_decay(), 0.75) for p in g["params"]}
    assert id(model.pos_embed) not in trained


@pytest.mark.parametrize("teacher", [False, True])
def test_our_pretraining_checkpoint_loads_student_or_teacher(tmp_path, teacher):
    path, student, teacher_net = _ours(tmp_path)
    with torch.no_grad():
        expected = (teacher_net if teacher else student).forward_encoder(_clips())
    torch.testing.assert_close(_features(path, teacher), expected, rtol=1e-5, atol=1e-5)


def test_videomaes_own_pretraining_and_finetuned_files_load(tmp_path):
    path, student, _ = _ours(tmp_path)
    save_atomic({"model": _videomae_layout(student.state_dict(), prefix=True)}, tmp_path / "videomae_pretrain.pth")
    with torch.no_grad():
        expected = student.forward_encoder(_clips())
    torch.testing.assert_close(_features(tmp_path / "videomae_pretrain.pth"), expected, rtol=1e-5, atol=1e-5)

    finetuned = _jitter(models_vit.create_classifier(TINY, num_classes=8), 3).eval()
    save_atomic({"module": _videomae_layout(finetuned.state_dict(), prefix=False)}, tmp_path / "videomae_ft.pth")
    loaded = models_vit.create_classifier(TINY, num_classes=8, pretrained=str(tmp_path / "videomae_ft.pth")).eval()
    with torch.no_grad():
        torch.testing.assert_close(loaded(_clips()), finetuned(_clips()), rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("kind", ["VideoMAEModel", "VideoMAEForPreTraining", "VideoMAEForVideoClassification"])
def test_transformers_folders_load_with_equal_features(tmp_path, kind):
    import transformers
    mean_pooling = kind == "VideoMAEForVideoClassification"
    config = _hf_config(use_mean_pooling=mean_pooling, num_labels=8)
    torch.manual_seed(0)
    theirs = _jitter(getattr(transformers, kind)(config)).eval()
    theirs.save_pretrained(str(tmp_path / "hf"))
    encoder = theirs if kind == "VideoMAEModel" else theirs.videomae
    with torch.no_grad():
        their_tokens = encoder(_clips().transpose(1, 2)).last_hidden_state     # theirs: (N, T, 3, H, W)
    ours = _features(tmp_path / "hf", global_pool=mean_pooling)
    torch.testing.assert_close(ours, their_tokens, rtol=1e-5, atol=1e-5)
    if mean_pooling:   # the head too; transformers' fc_norm keeps torch's eps 1e-5 (ours: 1e-6, VideoMAE's)
        classifier = models_vit.create_classifier(TINY, num_classes=8, pretrained=str(tmp_path / "hf")).eval()
        with torch.no_grad():
            torch.testing.assert_close(classifier(_clips()), theirs(_clips().transpose(1, 2)).logits,
                                       rtol=1e-4, atol=1e-4)


def test_a_checkpoint_of_the_wrong_kind_is_a_one_line_error(tmp_path):
    path, _, _ = _ours(tmp_path)
    image = create_pretrain_model("mae_vit_tiny_patch4")
    save_atomic({"format": "hpm-pretrain", "version": 1, "model_name": "mae_vit_tiny_patch4",
                 "model": image.state_dict()}, tmp_path / "image.pth")
    with pytest.raises(UserError, match=r"an image checkpoint, but the model takes clips.*video_vit|video checkpoint"):
        models_vit.create_classifier(TINY, pretrained=str(tmp_path / "image.pth"))
    with pytest.raises(UserError, match="a video checkpoint, but the model takes images.*--model video_vit_"):
        models_vit.create_classifier("vit_tiny_patch4", pretrained=str(path))
    import main_finetune
    for model, weights in ((TINY, tmp_path / "image.pth"), ("vit_tiny_patch4", path)):
        args = main_finetune.get_args_parser().parse_args(["--model", model, "--finetune", str(weights), "--eval"])
        with pytest.raises(UserError) as caught:
            main_finetune.main(args)
        assert "\n" not in str(caught.value) and "checkpoint, but the model takes" in str(caught.value)
    import main_knn
    for script, flag in ((main_finetune, ["--num_frames", "8"]), (main_finetune, ["--test_clips", "5"]),
                         (main_finetune, ["--no_flip"]), (main_knn, ["--single_frame"])):
        with pytest.raises(UserError, match=f"{flag[0]} is for clips, but --model vit_tiny_patch4 takes images"):
            script.main(script.get_args_parser().parse_args(flag + ["--output_dir", str(tmp_path / "x")]))
    with pytest.raises(UserError, match="--num_sample 2: repeated augmentation is for clips"):
        main_finetune.main(main_finetune.get_args_parser().parse_args(["--num_sample", "2"]))


def test_export_hf_loads_in_transformers_with_equal_tokens_and_videomae_round_trips(tmp_path):
    from transformers import VideoMAEModel

    from export import export
    path, student, _ = _ours(tmp_path)
    assert export(str(path), "hf", str(tmp_path / "hf")) == []
    theirs, info = VideoMAEModel.from_pretrained(str(tmp_path / "hf"), output_loading_info=True)
    assert not info["missing_keys"] and not info["unexpected_keys"] and not info["mismatched_keys"]
    config = json.loads((tmp_path / "hf" / "config.json").read_text())
    assert config["num_frames"] == 16 and config["tubelet_size"] == 2 and config["use_mean_pooling"] is False
    with torch.no_grad():
        their_tokens = theirs.eval()(_clips().transpose(1, 2)).last_hidden_state
    ours = _features(path)
    torch.testing.assert_close(ours, their_tokens, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(_features(tmp_path / "hf"), ours, rtol=1e-5, atol=1e-5)   # and back

    export(str(path), "videomae", str(tmp_path / "videomae.pth"))
    written = torch.load(tmp_path / "videomae.pth", weights_only=True)["model"]
    assert "blocks.0.attn.q_bias" in written and "blocks.0.attn.qkv.bias" not in written and "pos_embed" not in written
    torch.testing.assert_close(_features(tmp_path / "videomae.pth"), ours, rtol=1e-5, atol=1e-5)

    finetuned = models_vit.create_classifier(TINY, num_classes=8)
    save_atomic({"format": "hpm-finetune", "version": 1, "model": finetuned.state_dict(), "args": {}},
                tmp_path / "ft.pth")
    notes = export(str(tmp_path / "ft.pth"), "hf", str(tmp_path / "hf_ft"))
    assert any("fc_norm" in n for n in notes) and any("head" in n for n in notes)
    assert json.loads((tmp_path / "hf_ft" / "config.json").read_text())["use_mean_pooling"] is True
    VideoMAEModel.from_pretrained(str(tmp_path / "hf_ft"))
    with pytest.raises(UserError, match="--format mae: .* is a video encoder; export it as hf"):
        export(str(path), "mae", str(tmp_path / "x.pth"))
    image = create_pretrain_model("mae_vit_tiny_patch4")
    save_atomic({"format": "hpm-pretrain", "model_name": "mae_vit_tiny_patch4", "model": image.state_dict()},
                tmp_path / "image.pth")
    with pytest.raises(UserError, match="--format videomae: .* is an image encoder"):
        export(str(tmp_path / "image.pth"), "videomae", str(tmp_path / "y.pth"))
    assert not (tmp_path / "x.pth").exists() and not (tmp_path / "y.pth").exists()


def test_hub_entries_build_video_encoders(tmp_path):
    path, student, _ = _ours(tmp_path)
    from tests.helpers import REPO
    model = torch.hub.load(str(REPO), "hpm_video_vit_tiny_patch4", source="local", checkpoint=str(path)).eval()
    with torch.no_grad():
        assert model(_clips()).shape == (2, 64)
        torch.testing.assert_close(model.forward_features(_clips()), student.forward_encoder(_clips()),
                                   rtol=1e-5, atol=1e-5)


def test_dense_and_segment_sampling_are_videomaes():
    seed_all(0)
    dense = ClipSampling("dense", 4, 3, train=True)
    for _ in range(20):
        (view,) = dense(50)
        assert np.all(np.diff(view) == 3) and 0 <= view[0] <= 50 - 10
    assert ClipSampling("dense", 4, 3, train=False, views=3)(50) == [[0, 3, 6, 9], [20, 23, 26, 29], [40, 43, 46, 49]]
    assert ClipSampling("dense", 4, 3, train=False, views=1)(50) == [[20, 23, 26, 29]]
    assert ClipSampling("dense", 4, 3, train=False, views=2)(5) == [[0, 3, 4, 4], [0, 3, 4, 4]]   # short: repeats
    segment = ClipSampling("segment", 4, 1, train=True)
    for _ in range(20):
        (view,) = segment(40)
        assert [f // 10 for f in view] == [0, 1, 2, 3]                    # one frame of each segment
    assert ClipSampling("segment", 4, 1, train=False, views=2)(40) == [[2, 12, 22, 32], [7, 17, 27, 37]]
    assert ClipSampling("segment", 4, 1, train=False, views=1)(3) == [[0, 1, 1, 2]]


def test_the_clip_augmentation_draws_once_per_clip_and_erases_per_frame():
    frame = np.random.RandomState(0).randint(0, 255, (40, 48, 3), dtype=np.uint8)
    frames = np.stack([frame] * 6)
    stats = IMAGENET
    seed_all(1)
    same = FinetuneClipTransform(32, stats, "rand-m9-n4-mstd0.5-inc1", (0.3, 1.0), 0.5)(frames)
    assert same.shape == (3, 6, 32, 32)
    for t in range(1, 6):   # the same RandAugment ops and magnitudes, crop and flip on every frame
        torch.testing.assert_close(same[:, t], same[:, 0])
    seed_all(2)
    other = FinetuneClipTransform(32, stats, "rand-m9-n4-mstd0.5-inc1", (0.3, 1.0), 0.5)(frames)
    assert not torch.allclose(other, same)                              # another clip, another draw
    seed_all(3)
    erased = FinetuneClipTransform(32, stats, None, (1.0, 1.0), 0.0, reprob=1.0)(frames)
    assert not torch.allclose(erased[:, 0], erased[:, 1])               # VideoMAE erases frame by frame
    seed_all(4)
    flipped = FinetuneClipTransform(32, stats, None, (1.0, 1.0), 1.0)(frames[:, :40, :40])
    plain = FinetuneClipTransform(32, stats, None, (1.0, 1.0), 0.0)(frames[:, :40, :40])
    torch.testing.assert_close(flipped, plain.flip(-1))
    single = FinetuneClipTransform(32, stats, None, (1.0, 1.0), 0.0, single_frame=True)(
        np.random.RandomState(5).randint(0, 255, (6, 32, 32, 3), dtype=np.uint8))
    for t in range(6):
        torch.testing.assert_close(single[:, t], single[:, 3])

    stacked = RepeatedAugment(FinetuneClipTransform(32, stats, None, (0.3, 1.0), 0.5), 3)(frames)
    assert stacked.shape == (3, 3, 6, 32, 32) and not torch.allclose(stacked[0], stacked[1])
    inputs, labels = stacked_views_collate([(stacked, 4), (stacked, 7)])
    assert inputs.shape == (6, 3, 6, 32, 32) and labels.tolist() == [4, 4, 4, 7, 7, 7]


def test_test_views_are_three_crops_along_the_long_side():
    frames = np.random.RandomState(0).randint(0, 255, (2, 4, 16, 24, 3), dtype=np.uint8)   # 2 temporal views
    views = ClipViews(16, Stats((0, 0, 0), (1, 1, 1)), crops=3)(frames)
    assert views.shape == (6, 3, 4, 16, 16)
    pixels = torch.from_numpy(frames).permute(0, 4, 1, 2, 3).float() / 255
    for v in range(2):
        for c, left in enumerate((0, 4, 8)):
            torch.testing.assert_close(views[v * 3 + c], pixels[v, :, :, :, left:left + 16])


@pytest.fixture(scope="module")
def video_data(tmp_path_factory):
    """Six labelled training videos and three validation videos (short, odd-sized, long)."""
    root = tmp_path_factory.mktemp("video_data")
    (root / "v").mkdir()
    specs = [(40, 36, 44), (12, 32, 32), (70, 40, 52), (30, 33, 47), (50, 48, 40), (20, 32, 40), (90, 40, 60),
             (9, 34, 34), (45, 40, 50)]
    for i, (frames, h, w) in enumerate(specs):
        write_video(root / "v" / f"{i}.mp4", frames, h, w)
    (root / "train.csv").write_text("".join(f"v/{i}.mp4 {i % 2}\n" for i in range(6)))
    (root / "val.csv").write_text("".join(f"v/{i}.mp4 {i % 2}\n" for i in range(6, 9)))
    return root


def test_multi_view_testing_averages_every_view_of_each_video_once(video_data):
    """evaluate() on --test_clips 2 --test_crops 3 against the views cut and scored by hand."""
    import av

    from engine_finetune import evaluate
    from util.data import eval_loader
    torch.manual_seed(0)
    model = _jitter(models_vit.create_classifier(TINY, num_classes=2, num_frames=8)).eval()
    args = __import__("argparse").Namespace(sampling="dense", sampling_rate=4, test_clips=2, data_path=str(video_data),
                                            bad_images="stop", video_decoder="auto")
    dataset = clip_dataset(args, "val", ClipViews(32, IMAGENET, 3), 8, train=False)
    assert dataset[0][0].shape == (6, 3, 8, 32, 32)
    single = DistInfo(rank=0, world_size=1, local_rank=0)
    stats = evaluate(model, eval_loader(dataset, single, 2, 0, False), torch.device("cpu"))

    mean, std = torch.tensor(IMAGENET.mean).view(3, 1, 1, 1), torch.tensor(IMAGENET.std).view(3, 1, 1, 1)
    hits, nll = 0, 0.0
    for i in range(6, 9):
        with av.open(str(video_data / "v" / f"{i}.mp4")) as container:
            every = np.stack([f.to_ndarray(format="rgb24") for f in container.decode(video=0)])
        total = len(every)
        room = max(total - 29, 0)                                        # span of 8 frames 4 apart
        probs = []
        for start in (0, room):
            idx = [min(start + 4 * k, total - 1) for k in range(8)]
            clip = torch.from_numpy(every[idx]).permute(3, 0, 1, 2).float() / 255
            h, w = clip.shape[-2:]
            size = (32, round(w * 32 / h)) if h <= w else (round(h * 32 / w), 32)
            clip = F.interpolate(clip, size=size, mode="bilinear", align_corners=False)
            for where in (0.0, 0.5, 1.0):
                top = round((size[0] - 32) * (where if h > w else 0.5))
                left = round((size[1] - 32) * (where if h <= w else 0.5))
                view = (clip[:, :, top:top + 32, left:left + 32] - mean) / std
                with torch.no_grad():
                    probs.append(model(view[None]).softmax(-1)[0])
        mean_prob = torch.stack(probs).mean(0)
        label = i % 2
        hits += int(mean_prob.argmax() == label)
        nll -= float(mean_prob[label].log())
    assert stats["count"] == 3
    assert stats["acc1"] == pytest.approx(100 * hits / 3)
    assert stats["loss"] == pytest.approx(nll / 3, rel=1e-4)

    shards = [ShardSampler(len(dataset), DistInfo(rank=r, world_size=2, local_rank=r)) for r in range(2)]
    assert sorted(i for s in shards for i in s) == [0, 1, 2]          # each video once across the processes


FLAGS = [[], ["--sampling", "segment", "--test_clips", "2", "--test_crops", "3"],
         ["--num_sample", "2", "--mixup", "0.8", "--cutmix", "1.0", "--model_ema"],
         ["--no_flip", "--single_frame", "--aa", "", "--num_frames", "8", "--sampling_rate", "2"],
         ["--global_pool", "--smoothing", "0", "--reprob", "0", "--layer_decay", "0.65"]]


@pytest.mark.parametrize("flags", FLAGS, ids=lambda f: " ".join(f) or "defaults")
def test_video_finetuning_on_list_files_then_eval(video_data, tmp_path, flags):
    import main_finetune
    path, _, _ = _ours(tmp_path)
    out = tmp_path / "ft"
    common = ["--model", TINY, "--data_path", str(video_data), "--batch_size", "2", "--num_workers", "0",
              "--print_freq", "1"]
    main_finetune.main(main_finetune.get_args_parser().parse_args(
        common + ["--finetune", str(path), "--epochs", "2", "--warmup_epochs", "1", "--output_dir", str(out), *flags]))
    records = [json.loads(line) for line in (out / "log.txt").read_text().splitlines()]
    assert [r["epoch"] for r in records] == [0, 1] and all(np.isfinite(r["train_loss"]) for r in records)
    assert all(r["test_count"] == 3 for r in records)
    ckpt = torch.load(out / "checkpoint-last.pth", weights_only=False)
    for flag in flags:
        if flag.startswith("--") and flag not in ("--global_pool",):
            assert flag[2:] in ckpt["args"], flag
    model = models_vit.build_classifier(main_finetune.get_args_parser().parse_args(common + flags), 2).eval()
    load_pretrained(model, out / "checkpoint-last.pth", what="--resume", allowed_missing=())
    assert model.patch_embed.num_frames == (8 if "--num_frames" in flags else 16)
    main_finetune.main(main_finetune.get_args_parser().parse_args(
        common + ["--eval", "--resume", str(out / "checkpoint-last.pth"), "--output_dir", str(tmp_path / "eval"),
                  *flags]))


def test_knn_and_linear_probe_take_video_checkpoints(video_data, tmp_path):
    import main_knn
    import main_linprobe
    path, _, _ = _ours(tmp_path)
    common = ["--model", TINY, "--finetune", str(path), "--data_path", str(video_data), "--num_workers", "0"]
    main_knn.main(main_knn.get_args_parser().parse_args(
        common + ["--nb_knn", "1", "3", "--output_dir", str(tmp_path / "knn"), "--test_clips", "2", "--teacher"]))
    record = json.loads((tmp_path / "knn" / "log_knn.txt").read_text().splitlines()[-1])
    assert 0 <= record["k3_acc1"] <= 100 and record["teacher"]
    main_linprobe.main(main_linprobe.get_args_parser().parse_args(
        common + ["--epochs", "2", "--batch_size", "2", "--output_dir", str(tmp_path / "probe"), "--print_freq", "1",
                  "--sampling", "segment", "--test_crops", "3"]))
    records = [json.loads(line) for line in (tmp_path / "probe" / "log.txt").read_text().splitlines()]
    assert len(records) == 2 and records[-1]["test_count"] == 3
    frozen = torch.load(tmp_path / "probe" / "checkpoint-last.pth", weights_only=True)["model"]
    _, student, _ = _ours(tmp_path, "again.pth")
    torch.testing.assert_close(frozen["blocks.0.attn.qkv.weight"], student.state_dict()["blocks.0.attn.qkv.weight"])


def test_the_figure_of_clips_and_its_animation(tmp_path, video_data):
    from PIL import Image

    import visualize
    path, _, _ = _ours(tmp_path)
    out = visualize.main(visualize.get_args_parser().parse_args(
        ["--checkpoint", str(path), "--output", str(tmp_path / "files.png"), "--videos", str(video_data / "v"),
         "--num_images", "3", "--frame_step", "8", "--sampling_rate", "2"]))
    with Image.open(out) as fig:   # 2 frames a row, 3 clips of 4 rows
        assert fig.size == (int((visualize.INCHES_PER_IMAGE * 2 + 1.0) * visualize.DPI),
                            int(visualize.INCHES_PER_IMAGE * 12 * visualize.DPI))
    out = visualize.main(visualize.get_args_parser().parse_args(
        ["--checkpoint", str(path), "--output", str(tmp_path / "fig.png"), "--num_images", "2",
         "--gif", str(tmp_path / "clips.gif")]))
    with Image.open(out) as fig:   # 16 / 4 frames a row, 4 rows (input, mask, reconstruction, loss) per clip
        assert fig.size == (int((visualize.INCHES_PER_IMAGE * 4 + 1.0) * visualize.DPI),
                            int(visualize.INCHES_PER_IMAGE * 8 * visualize.DPI))
    with Image.open(tmp_path / "clips.gif") as gif:
        assert gif.n_frames == 16 and gif.size == (4 * 32 * 4, 2 * 32 * 4)
    with pytest.raises(UserError, match="--images: .* is a video checkpoint; pass --videos"):
        visualize.main(visualize.get_args_parser().parse_args(
            ["--checkpoint", str(path), "--images", str(tmp_path), "--output", str(tmp_path / "f2.png")]))


@pytest.mark.slow
def test_fine_tuning_a_pretrained_video_encoder_beats_a_single_frame(tmp_path):
    """The built-in clips' labels (directions) need motion: the same recipe on every clip's middle frame
    repeated stays near chance (12.5 %), on the clips it learns. Both numbers are printed. (8-frame
    clips, which bounce off the edges less often than 16, learn within a few epochs.)"""
    from tests.helpers import run_script
    pre = tmp_path / "pre"
    res = run_script("main_pretrain.py", "--model", "videomae_vit_tiny_patch4", "--num_frames", "8", "--epochs", "1",
                     "--num_workers", "0", "--output_dir", str(pre))
    assert res.returncode == 0, res.stderr[-2000:]
    top1 = {}
    for name, extra in (("clips", []), ("single frame", ["--single_frame"])):
        out = tmp_path / name.replace(" ", "_")
        res = run_script("main_finetune.py", "--model", TINY, "--finetune", str(pre / "checkpoint-last.pth"),
                         "--num_frames", "8", "--epochs", "3", "--warmup_epochs", "0.5", "--lr", "1e-3",
                         "--batch_size", "16", "--num_workers", "0", "--output_dir", str(out), *extra)
        assert res.returncode == 0, res.stderr[-2000:]
        top1[name] = json.loads((out / "log.txt").read_text().splitlines()[-1])["test_acc1"]
    print(f"fine-tuned top-1 on the built-in clips: {top1}")
    assert top1["single frame"] < 20.0
    assert top1["clips"] > top1["single frame"] + 20.0
    res = run_script("main_finetune.py", "--model", TINY, "--num_frames", "8", "--eval", "--resume",
                     str(tmp_path / "clips" / "checkpoint-last.pth"), "--num_workers", "0")
    assert res.returncode == 0 and f"top-1 {top1['clips']:.2f}%" in res.stdout, res.stdout[-1000:] + res.stderr[-1000:]
    res = run_script("main_knn.py", "--model", TINY, "--num_frames", "8",
                     "--finetune", str(pre / "checkpoint-last.pth"),
                     "--num_workers", "0", "--nb_knn", "20", "--output_dir", str(tmp_path / "knn"))
    assert res.returncode == 0, res.stderr[-2000:]
    knn = json.loads((tmp_path / "knn" / "log_knn.txt").read_text())["k20_acc1"]
    print(f"20-NN top-1 of the pretrained encoder: {knn:.2f}")
    assert knn > 20.0


def test_cutmix_cuts_the_same_box_out_of_every_frame():
    from timm.data import Mixup

    from engine_finetune import ClassifierTask
    model = models_vit.create_classifier(TINY, num_classes=8)
    seen = []
    model.register_forward_pre_hook(lambda module, inputs: seen.append(inputs[0].detach().clone()))
    mixup = Mixup(mixup_alpha=0.0, cutmix_alpha=1.0, prob=1.0, switch_prob=0.0, num_classes=8)
    task = ClassifierTask(model, model, torch.nn.CrossEntropyLoss(), None, torch.device("cpu"), None, 1, mixup)
    clips = _clips(4, seed=7)
    torch.manual_seed(0)
    np.random.seed(0)
    task.forward((clips.clone(), torch.arange(4)), epoch=0)
    mixed = seen[0]
    assert mixed.shape == clips.shape
    replaced = (mixed != clips)[0, 0]                                   # (T, H, W): where clip 0 took clip 3's pixels
    assert replaced.any() and not replaced.all()
    for t in range(1, 16):
        assert torch.equal(replaced[t], replaced[0])                   # the same box at every frame
    torch.testing.assert_close(mixed[0][:, replaced], clips[3][:, replaced])
