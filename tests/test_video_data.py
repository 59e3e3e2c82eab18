"""Clips from real video files the tests write with PyAV (short, odd-sized, grey, corrupt, H.264, VP9),
decoded by PyAV and by torchcodec (where the system's FFmpeg lets it load: .ci/run installs it),
VideoMAE's list files and sampling, the built-in moving digits, and video pretraining through
main_pretrain."""
import json
import sys

import numpy as np
import pytest
import torch

import main_pretrain
from tests.helpers import run_script, write_video
from util.data import SkipBadImages
from util.errors import UserError
from util.rng import seed_all
from util.video import (
    BadVideoError,
    ClipTransform,
    MovingDigitsClips,
    build_clip_dataset,
    decode_frames,
    multiscale_crop_box,
    resolve_video_decoder,
    sample_indices,
    torchcodec_error,
)

needs_torchcodec = pytest.mark.skipif(torchcodec_error() is not None,
                                      reason=f"torchcodec does not load here ({torchcodec_error()})")
DECODERS = ["pyav", pytest.param("torchcodec", marks=needs_torchcodec)]


@pytest.fixture(scope="module")
def videos(tmp_path_factory):
    root = tmp_path_factory.mktemp("videos")
    specs = {"long.mp4": (80, 48, 64, False), "short.mp4": (5, 40, 40, False), "odd.mp4": (40, 33, 47, False),
             "grey.mkv": (30, 36, 36, True), "tall.mp4": (64, 72, 40, False), "b.mp4": (50, 40, 56, False)}
    (root / "clips").mkdir()
    for name, (frames, h, w, grey) in specs.items():
        write_video(root / "clips" / name, frames, h, w, grey)
    for name, codec in (("h264.mp4", "libx264"), ("vp9.webm", "libvpx-vp9")):   # Kinetics' and SSv2's codecs
        write_video(root / "clips" / name, 70, 48, 64, codec=codec)
    (root / "clips" / "broken.mp4").write_bytes(b"\x00\x01 not a video" * 50)
    names = [n for n in specs]
    (root / "train.csv").write_text("".join(f"clips/{n} {i % 2}\n" for i, n in enumerate(names)))
    (root / "val.csv").write_text("clips/long.mp4 0\nclips/odd.mp4 1\n")
    (root / "with_broken").mkdir()
    (root / "with_broken" / "train.csv").write_text(
        "".join(f"{root}/clips/{n}\n" for n in (*names[:3], "broken.mp4", *names[3:])))
    return root


def test_sampling_takes_every_nth_frame_and_repeats_the_last_of_a_short_video():
    seed_all(0)
    for _ in range(50):
        idx = sample_indices(100, 16, 4)
        assert np.all(np.diff(idx) == 4) and 0 <= idx[0] <= 100 - 61
    assert sample_indices(20, 16, 2) == [0, 2, 4, 6, 8, 10, 12, 14, 16, 18] + [19] * 6
    assert sample_indices(5, 4, 4) == [0, 4, 4, 4]


@pytest.mark.parametrize("decoder", DECODERS)
@pytest.mark.parametrize("name, shape", [("long.mp4", (48, 64)), ("short.mp4", (40, 40)), ("odd.mp4", (33, 47)),
                                         ("grey.mkv", (36, 36)), ("tall.mp4", (72, 40)), ("vp9.webm", (48, 64))])
def test_any_video_decodes_to_the_sampled_rgb_frames(videos, name, shape, decoder):
    seed_all(1)
    frames = decode_frames(str(videos / "clips" / name), lambda total: sample_indices(total, 16, 4), decoder)
    assert frames.shape == (16, *shape, 3) and frames.dtype == np.uint8
    if name == "grey.mkv":
        assert np.array_equal(frames[..., 0], frames[..., 2])
    if name == "short.mp4":                                   # 5 frames: 0, 4, then the last one repeats
        assert np.array_equal(frames[1], frames[-1])
    clip = ClipTransform(32)(frames)
    assert clip.shape == (3, 16, 32, 32) and torch.isfinite(clip).all()


@pytest.mark.parametrize("decoder", DECODERS)
@pytest.mark.parametrize("name", ["long.mp4", "h264.mp4", "vp9.webm"])
def test_the_decode_matches_a_full_decode(videos, name, decoder):
    """Any order and repeats; H.264's B-frames (decode order is not display order) and VP9 included."""
    import av
    with av.open(str(videos / "clips" / name)) as container:
        every = [f.to_ndarray(format="rgb24") for f in container.decode(video=0)]
    picks = [sample_indices(len(every), 8, 4), [len(every) - 1, 3, 3, 0, 40, 39]]
    for pick in picks:
        assert np.array_equal(decode_frames(str(videos / "clips" / name), lambda total: pick, decoder),
                              np.stack([every[i] for i in pick]))


@needs_torchcodec
def test_both_decoders_see_the_same_frame_count_and_frames(videos):
    """Equal frames, but for an odd frame size, where two FFmpeg builds' colour conversions differ slightly."""
    for path in sorted((videos / "clips").glob("*.*")):
        if path.name == "broken.mp4":
            continue
        totals = {}
        for decoder in ("pyav", "torchcodec"):
            frames = decode_frames(str(path), lambda total: totals.setdefault(decoder, [0, total - 1, total // 2]),
                                   decoder)
            totals[decoder + "_frames"] = frames
        assert totals["pyav"] == totals["torchcodec"], path.name
        a, b = totals["pyav_frames"].astype(int), totals["torchcodec_frames"].astype(int)
        if path.name == "odd.mp4":
            assert np.abs(a - b).mean() < 0.5, path.name
        else:
            assert np.array_equal(a, b), path.name


def test_the_decoder_choice(monkeypatch):
    assert resolve_video_decoder("pyav") == "pyav"
    assert resolve_video_decoder("auto") == ("pyav" if torchcodec_error() else "torchcodec")
    with pytest.raises(UserError, match="--video_decoder mp4: unknown"):
        resolve_video_decoder("mp4")
    for module in ("torchcodec", "torchcodec.decoders"):         # as where it is not installed
        monkeypatch.setitem(sys.modules, module, None)
    torchcodec_error.cache_clear()
    try:
        assert "Error: " in torchcodec_error() and resolve_video_decoder("auto") == "pyav"
        with pytest.raises(UserError) as err:
            resolve_video_decoder("torchcodec")
        message = str(err.value)
        assert "\n" not in message and "pip install torchcodec" in message and "--video_decoder pyav" in message
    finally:
        monkeypatch.undo()
        torchcodec_error.cache_clear()


@pytest.mark.parametrize("decoder", DECODERS)
def test_a_corrupt_video_stops_naming_it_or_is_skipped(videos, decoder):
    with pytest.raises(BadVideoError, match="broken.mp4: unreadable video \\([A-Za-z]+Error: [^\n]+\\); remove"):
        decode_frames(str(videos / "clips" / "broken.mp4"), lambda total: [0], decoder)
    data = SkipBadImages(build_clip_dataset(str(videos / "with_broken"), "train", ClipTransform(32), labelled=False,
                                            video_decoder=decoder))
    clip, _ = data[3]
    assert clip.shape == (3, 16, 32, 32) and data.skipped == 1


def test_list_files_and_their_errors(videos, tmp_path):
    data = build_clip_dataset(str(videos), "train", None)
    assert len(data) == 6 and data.num_classes == 2
    with pytest.raises(UserError, match="no val.csv|no train.csv"):
        build_clip_dataset(str(tmp_path), "train", None)
    (tmp_path / "train.csv").write_text("clips/missing.mp4 3\n")
    with pytest.raises(UserError, match="1 listed video\\(s\\) missing, first .*missing.mp4"):
        build_clip_dataset(str(tmp_path), "train", None)
    (tmp_path / "train.csv").write_text("clips/missing.mp4\n")
    with pytest.raises(UserError, match="expected 'relative/path label'"):
        build_clip_dataset(str(tmp_path), "train", None, labelled=True)


def test_multiscale_crop_boxes_are_videomaes():
    seed_all(3)
    boxes = {multiscale_crop_box(240, 320, 224) for _ in range(400)}
    sizes = {int(240 * s) for s in (1.0, 0.875, 0.75, 0.66)} | {224}
    for top, left, h, w in boxes:
        assert h in sizes and w in sizes and 0 <= top <= 240 - h and 0 <= left <= 320 - w
    assert len({(h, w) for _, _, h, w in boxes}) >= 8                  # pairs at most one scale step apart


def test_the_built_in_clips_need_time_to_tell_their_label():
    clips = MovingDigitsClips("train")
    assert len(clips) == 1438 and clips.num_classes == 8
    frames, label = clips[5]
    assert frames.shape == (16, 32, 32, 3) and label == 5
    assert np.array_equal(clips[5][0], frames)                       # fixed by the index
    first, last = np.argwhere(frames[0, ..., 0] > 0).mean(0), np.argwhere(frames[-1, ..., 0] > 0).mean(0)
    assert np.abs(first - last).max() > 3                             # it moves


def _pretrain(argv):
    main_pretrain.main(main_pretrain.get_args_parser().parse_args(argv))


@pytest.mark.parametrize("flags", [[], ["--no-learning_loss"], ["--no-learning_loss", "--mask_unit", "token"],
                                   ["--mask_unit", "token"], ["--no-relative"], ["--norm_pix_loss"],
                                   ["--target", "ema"], ["--num_frames", "8", "--sampling_rate", "2"],
                                   ["--norm", "dataset", "--bad_images", "skip"], ["--video_decoder", "pyav"],
                                   pytest.param(["--video_decoder", "torchcodec", "--bad_images", "skip"],
                                                marks=needs_torchcodec)],
                         ids=["hpm", "videomae", "videomae_random", "token", "absolute", "norm_pix", "ema", "frames",
                              "norm_skip", "pyav", "torchcodec_skip"])
def test_video_pretraining_on_list_files(videos, tmp_path, flags):
    data = videos / ("with_broken" if "--bad_images" in flags else "")
    out = tmp_path / "out"
    _pretrain(["--model", "videomae_vit_tiny_patch4", "--data_path", str(data), "--output_dir", str(out), "--epochs",
               "2", "--start_epoch", "1", "--batch_size", "2", "--num_workers", "0", "--print_freq", "1", *flags])
    record = json.loads((out / "log.txt").read_text())
    assert record["epoch"] == 1 and np.isfinite(record["train_total"])
    assert ("train_loss_pred" in record) == ("--no-learning_loss" not in flags)
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator
    assert len(EventAccumulator(str(out), size_guidance={"images": 0}).Reload().Images("reconstruction")) == 1


@pytest.mark.parametrize("argv, words", [
    (["--num_frames", "8"], "--num_frames is for clips"),
    (["--model", "videomae_vit_tiny_patch4", "--mask_regular", "--no-learning_loss"], "--mask_regular is for images"),
    (["--model", "videomae_vit_tiny_patch4", "--target", "clip"], "--target clip is an image model"),
    (["--model", "videomae_vit_tiny_patch4", "--num_frames", "7"], "multiple of --tubelet_size"),
    (["--model", "videomae_vit_tiny_patch4", "--data_path", "/nonexistent"], "no train.csv"),
])
def test_bad_video_flags_are_one_line_errors(tmp_path, argv, words):
    res = run_script("main_pretrain.py", *argv, "--output_dir", str(tmp_path / "out"))
    assert res.returncode == 2 and words in res.stderr and len(res.stderr.strip().splitlines()) == 1, res.stderr
    assert not (tmp_path / "out").exists() or not any((tmp_path / "out").iterdir())


@pytest.mark.slow
def test_video_run_resumes_mid_epoch_exactly(videos, tmp_path):
    common = ["--model", "videomae_vit_tiny_patch4", "--data_path", str(videos), "--epochs", "2", "--batch_size", "2",
              "--num_workers", "1", "--print_freq", "1", "--warmup_epochs", "1"]
    assert run_script("main_pretrain.py", *common, "--output_dir", str(tmp_path / "a")).returncode == 0
    stopped = run_script("main_pretrain.py", *common, "--output_dir", str(tmp_path / "b"),
                         env={"HPM_FAULT": "point=step,at=2,action=SIGTERM"})
    assert stopped.returncode == 75, stopped.stderr
    resumed = run_script("main_pretrain.py", *common, "--output_dir", str(tmp_path / "b"))
    assert resumed.returncode == 0 and "at epoch 0, step 2" in resumed.stdout, resumed.stderr
    from util.checkpoint import load_file
    a, b = load_file(tmp_path / "a" / "checkpoint-last.pth"), load_file(tmp_path / "b" / "checkpoint-last.pth")
    for part in ("model", "teacher"):
        for key in a[part]:
            assert torch.equal(a[part][key], b[part][key]), f"{part}.{key}"


@pytest.mark.slow
def test_the_built_in_video_default_trains_hpm_with_its_picture(tmp_path):
    out = tmp_path / "out"
    res = run_script("main_pretrain.py", "--model", "videomae_vit_tiny_patch4", "--epochs", "2", "--start_epoch", "1",
                     "--output_dir", str(out), "--num_workers", "1")
    assert res.returncode == 0, res.stderr
    assert "on 1438 clips" in res.stdout
    record = json.loads((out / "log.txt").read_text())
    assert record["train_alpha"] > 0 and np.isfinite(record["train_loss_pred"])
