import os
import sys
from pathlib import Path

import pytest

os.environ.setdefault("OMP_NUM_THREADS", "1")
REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

import torch  # noqa: E402

torch.set_num_threads(1)
REFERENCE_VECTORS = REPO.parent / "shared" / "reference-vectors" / "hpm_reference_vectors.pt"


@pytest.fixture(scope="session")
def reference() -> dict:
    if not REFERENCE_VECTORS.is_file():
        pytest.skip(f"reference vectors not found at {REFERENCE_VECTORS}")
    return torch.load(REFERENCE_VECTORS, weights_only=True)


@pytest.fixture(scope="session")
def pretrained_checkpoint(tmp_path_factory):
    """A real 1-epoch HPM pretraining run on the built-in digits, shared by the evaluation tests."""
    from tests.helpers import run_script
    out = tmp_path_factory.mktemp("pretrain")
    res = run_script("main_pretrain.py", "--epochs", "1", "--output_dir", str(out), "--batch_size", "64",
                     "--num_workers", "0")
    assert res.returncode == 0, res.stderr
    return out / "checkpoint-last.pth"
