import os
import sys
from pathlib import Path

import pytest

os.environ.setdefault("OMP_NUM_THREADS", "1")
REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

try:
    import torch  # noqa: E402
except ModuleNotFoundError:   # one line instead of a collection traceback
    pytest.exit("torch is not installed in this Python: run pip install -r requirements.txt -r requirements-dev.txt "
                "first (README, Quick start)", returncode=4)

torch.set_num_threads(1)
REFERENCE_VECTORS = REPO / "tests" / "data" / "hpm_reference_vectors.pt"


def pytest_addoption(parser) -> None:
    parser.addoption("--full", action="store_true", help="also run the slow end-to-end tests (the full tier)")


def pytest_collection_modifyitems(config, items) -> None:
    if config.getoption("--full"):
        return
    skip = pytest.mark.skip(reason="full tier: run with --full")
    for item in items:
        if "slow" in item.keywords:
            item.add_marker(skip)


@pytest.fixture(scope="session")
def reference() -> dict:
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
