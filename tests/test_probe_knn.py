import json

import pytest
import torch

from tests.helpers import run_script
from util.checkpoint import load_file
from util.knn import knn_classify
from util.lars import LARS


def test_lars_reproduces_reference(reference):
    vec = reference["lars"]
    w, b = torch.nn.Parameter(vec["w0"].clone()), torch.nn.Parameter(vec["b0"].clone())
    opt = LARS([w, b], lr=vec["lr"], weight_decay=vec["weight_decay"], momentum=vec["momentum"],
               trust_coefficient=vec["trust_coefficient"])
    for step in range(3):
        w.grad, b.grad = vec["grads_w"][step].clone(), vec["grads_b"][step].clone()
        opt.step()
    torch.testing.assert_close(w.data, vec["w3"], atol=1e-6, rtol=1e-6)
    torch.testing.assert_close(b.data, vec["b3"], atol=1e-6, rtol=1e-6)


def _knn_brute_force(train_f, train_l, test_f, test_l, k, t, num_classes):
    train_f = torch.nn.functional.normalize(train_f, dim=1)
    test_f = torch.nn.functional.normalize(test_f, dim=1)
    top1 = top5 = 0
    for i in range(test_f.shape[0]):
        sims = [(float(test_f[i] @ train_f[j]), j) for j in range(train_f.shape[0])]
        sims.sort(key=lambda s: -s[0])
        scores = [0.0] * num_classes
        for sim, j in sims[:k]:
            scores[int(train_l[j])] += float(torch.exp(torch.tensor(sim / t)))
        ranked = sorted(range(num_classes), key=lambda c: -scores[c])
        top1 += ranked[0] == int(test_l[i])
        top5 += int(test_l[i]) in ranked[:5] and scores[int(test_l[i])] > 0
    n = test_f.shape[0]
    return 100.0 * top1 / n, 100.0 * top5 / n


def test_knn_equals_brute_force():
    g = torch.Generator().manual_seed(0)
    centers = torch.randn(8, 16, generator=g)
    train_l = torch.randint(0, 8, (120,), generator=g)
    test_l = torch.randint(0, 8, (40,), generator=g)
    train_f = centers[train_l] + 0.8 * torch.randn(120, 16, generator=g)
    test_f = centers[test_l] + 0.8 * torch.randn(40, 16, generator=g)
    results = knn_classify(train_f, train_l, test_f, test_l, [1, 5, 20], 0.07, num_classes=8, chunk_size=7)
    for k in (1, 5, 20):
        expect = _knn_brute_force(train_f, train_l, test_f, test_l, k, 0.07, 8)
        assert results[k] == pytest.approx(expect)


def test_linprobe_end_to_end_keeps_encoder_frozen(tmp_path, pretrained_checkpoint):
    out = tmp_path / "probe"
    res = run_script("main_linprobe.py", "--finetune", str(pretrained_checkpoint), "--epochs", "2",
                     "--warmup_epochs", "1", "--batch_size", "128", "--num_workers", "0", "--output_dir", str(out))
    assert res.returncode == 0, res.stderr
    assert "epoch 1: top-1" in res.stdout and "on 359 samples" in res.stdout
    log = [json.loads(line) for line in (out / "log.txt").read_text().splitlines()]
    assert [r["epoch"] for r in log] == [0, 1] and all(r["test_count"] == 359 for r in log)
    probed = load_file(out / "checkpoint-last.pth")["model"]
    pretrained = load_file(pretrained_checkpoint)["model"]
    encoder_keys = [k for k in probed if not k.startswith("head.")]
    assert encoder_keys and "head.1.weight" in probed and "head.0.running_mean" in probed
    for key in encoder_keys:
        assert torch.equal(probed[key], pretrained[key]), f"{key} changed during linear probing"
    res = run_script("main_linprobe.py", "--eval", "--resume", str(out / "checkpoint-last.pth"), "--num_workers", "0")
    assert res.returncode == 0, res.stderr
    assert f"top-1 {log[-1]['test_acc1']:.2f}%" in res.stdout


def test_knn_end_to_end_and_feature_round_trip(tmp_path, pretrained_checkpoint):
    out, feats = tmp_path / "knn", tmp_path / "feats"
    res = run_script("main_knn.py", "--finetune", str(pretrained_checkpoint), "--num_workers", "0",
                     "--output_dir", str(out), "--dump_features", str(feats), "--nb_knn", "10", "20")
    assert res.returncode == 0, res.stderr
    assert "20-NN classifier: top-1" in res.stdout
    res2 = run_script("main_knn.py", "--load_features", str(feats), "--output_dir", str(out), "--nb_knn", "10", "20")
    assert res2.returncode == 0, res2.stderr
    first, second = [json.loads(line) for line in (out / "log_knn.txt").read_text().splitlines()]
    assert first["k20_acc1"] == second["k20_acc1"] and first["k10_acc5"] == second["k10_acc5"]
    assert first["k20_acc1"] > 20.0   # well above chance (10%) after one epoch of pretraining
