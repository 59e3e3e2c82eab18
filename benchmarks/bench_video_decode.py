"""Milliseconds per training clip of each video decoder (--video_decoder), on videos shaped like the
two datasets' files: Kinetics-400's (H.264 .mp4, 340 x 256, 30 fps, 10 s) with VideoMAE's dense 16 x 4
clip, and Something-Something V2's (VP9 .webm, 427 x 240, 12 fps, 4 s) with its 16-frame segment
clip. Both decoders take the same clips of the same files, one thread each (as in a loader worker),
and their frames are compared.

    python benchmarks/bench_video_decode.py --json benchmarks/results/cpu_video_decode.json
"""
import argparse
import json
import random
import statistics
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from util.video import ClipSampling, decode_frames, torchcodec_error  # noqa: E402

# name: (codec, width, height, fps, seconds, sampling)
DATASETS = {
    "k400_h264": ("libx264", 340, 256, 30, 10, ("dense", 16, 4)),
    "ssv2_vp9": ("libvpx-vp9", 428, 240, 12, 4, ("segment", 16, 1)),
}


def write_test_video(path: Path, codec: str, width: int, height: int, fps: int, seconds: float) -> None:
    """Moving structure over a gradient (a codec's work depends on the motion, not on the pixels'
    meaning), encoded with the codec's defaults, as a dataset's files usually are."""
    import av
    yy, xx = np.mgrid[:height, :width]
    with av.open(str(path), "w") as container:
        stream = container.add_stream(codec, rate=fps)
        stream.width, stream.height, stream.pix_fmt = width, height, "yuv420p"
        for t in range(round(fps * seconds)):
            pixels = np.stack([(xx + 3 * t) % 256, (yy + 2 * t) % 256, ((xx + yy) // 2 + t) % 256], -1)
            pixels[(yy // 24 + xx // 24 + t // 6) % 2 == 0] //= 2
            for packet in stream.encode(av.VideoFrame.from_ndarray(pixels.astype(np.uint8), format="rgb24")):
                container.mux(packet)
        for packet in stream.encode():
            container.mux(packet)


def parse_args() -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--clips", type=int, default=40, help="clips timed per decoder and dataset (each opens its file)")
    p.add_argument("--rounds", type=int, default=3, help="rounds of all decoders in turn (the median is reported)")
    p.add_argument("--seconds", type=float, default=None, help="length of the written videos (default: the dataset's)")
    p.add_argument("--json", default=None, help="write the results to this file")
    return p.parse_args()


def main() -> None:
    args = parse_args()
    torch.set_num_threads(1)
    decoders = ["pyav"] + (["torchcodec"] if torchcodec_error() is None else [])
    result = {"torch": torch.__version__, "torchcodec_error": torchcodec_error(), "clips": args.clips, "datasets": {}}
    with tempfile.TemporaryDirectory() as tmp:
        for name, (codec, width, height, fps, seconds, (mode, frames, rate)) in DATASETS.items():
            path = Path(tmp) / f"{name}.{'webm' if 'vpx' in codec else 'mp4'}"
            write_test_video(path, codec, width, height, fps, args.seconds or seconds)
            sampling = ClipSampling(mode, frames, rate, train=True)
            random.seed(0)
            total = len(decode_frames(str(path), lambda n: list(range(n)), "pyav"))
            picks = [sampling(total)[0] for _ in range(args.clips)]
            times: dict[str, list[float]] = {d: [] for d in decoders}
            outputs: dict[str, list[np.ndarray]] = {}
            for _ in range(args.rounds):
                for decoder in decoders:
                    start = time.perf_counter()
                    clips = [decode_frames(str(path), lambda n, pick=pick: pick, decoder) for pick in picks]
                    times[decoder].append((time.perf_counter() - start) / len(picks) * 1e3)
                    outputs.setdefault(decoder, clips)
            entry = {"codec": codec, "size": [width, height], "fps": fps, "frames": total,
                     "sampling": {"mode": mode, "frames": frames, "rate": rate},
                     "ms_per_clip": {d: statistics.median(t) for d, t in times.items()},
                     "ms_per_clip_rounds": times}
            if "torchcodec" in outputs:
                entry["torchcodec_speedup"] = entry["ms_per_clip"]["pyav"] / entry["ms_per_clip"]["torchcodec"]
                entry["max_abs_frame_difference"] = max(int(np.abs(a.astype(int) - b.astype(int)).max())
                                                        for a, b in zip(outputs["pyav"], outputs["torchcodec"]))
            result["datasets"][name] = entry
    print(json.dumps(result, indent=2))
    if args.json:
        Path(args.json).write_text(json.dumps(result, indent=2) + "\n")


if __name__ == "__main__":
    main()
