"""The pure pieces of video masked modeling, unit by unit: tubelets, tube masks and HPM's two hard
units, VideoMAE's target and position table, the per-tube and the memory-bounded per-token
ranking objectives."""
import math

import pytest
import torch

from util.losses import relative_loss_prediction, relative_loss_prediction_chunked, tubelet_normalised_target
from util.masking import hard_patch_mask, hard_tube_mask, num_masked_per_frame, tube_mask, tube_means
from util.patches import tubelet_patchify, tubelet_unpatchify
from util.pos_embed import get_1d_sinusoid_table

CLIPS = torch.rand(2, 3, 8, 12, 16, generator=torch.Generator().manual_seed(0))   # T 8, 12 x 16 pixels


def test_tubelets_round_trip_and_follow_conv3d_token_order():
    t, p = 2, 4
    tokens = tubelet_patchify(CLIPS, t, p)
    assert tokens.shape == (2, 4 * 3 * 4, t * p * p * 3)
    assert torch.equal(tubelet_unpatchify(tokens, t, p, (4, 3, 4)), CLIPS)
    # a Conv3d with kernel = stride = (t, p, p) whose output channel k reads value k of the tubelet in
    # (time, row, column, channel) order: its flattened output is the tubelets, token for token
    conv = torch.nn.Conv3d(3, t * p * p * 3, (t, p, p), stride=(t, p, p), bias=False)
    with torch.no_grad():
        conv.weight.zero_()
        for k in range(t * p * p * 3):
            s, rest = divmod(k, p * p * 3)
            row, rest = divmod(rest, p * 3)
            col, c = divmod(rest, 3)
            conv.weight[k, c, s, row, col] = 1.0
        out = conv(CLIPS).flatten(2).transpose(1, 2)                    # (N, T'*H'*W', D): time slowest
    torch.testing.assert_close(out, tokens, rtol=0, atol=1e-6)
    # token index t * (gh * gw) + h * gw + w
    assert torch.equal(tokens[1, 1 * 12 + 2 * 4 + 3], CLIPS[1, :, 2:4, 8:12, 12:16].permute(1, 2, 3, 0).flatten())


def test_videomae_masked_counts_floor_the_masked_share():
    assert num_masked_per_frame(196, 0.9) == 176 and 8 * num_masked_per_frame(196, 0.9) == 1408
    with pytest.raises(ValueError, match="--mask_ratio"):
        num_masked_per_frame(196, 1.0)


def test_tube_masks_repeat_over_time_with_exact_counts():
    gen = torch.Generator().manual_seed(1)
    mask = tube_mask(64, 8, 196, 176, generator=gen)
    assert mask.shape == (64, 8 * 196) and mask.dtype == torch.bool
    frames = mask.view(64, 8, 196)
    assert torch.equal(frames, frames[:, :1].expand_as(frames))             # the same positions at every t
    assert (frames[:, 0].sum(1) == 176).all()
    assert not torch.equal(frames[0, 0], frames[1, 0])                     # a new draw per clip


def test_hard_tube_mask_masks_the_hardest_positions_by_their_mean_over_time():
    n, frames, spatial, m, alpha = 4000, 2, 10, 6, 0.5                     # K = 3 hard, 3 of the other 7
    scores = torch.rand(1, frames, spatial, generator=torch.Generator().manual_seed(2)).expand(n, -1, -1)
    mean = scores[0].mean(0)
    hard = set(torch.topk(mean, 3).indices.tolist())
    assert hard != set(torch.topk(scores[0, 0], 3).indices.tolist())      # the mean over time decides
    mask = hard_tube_mask(scores.reshape(n, -1), frames, m, alpha, generator=torch.Generator().manual_seed(3))
    per_frame = mask.view(n, frames, spatial)
    assert torch.equal(per_frame[:, 0], per_frame[:, 1]) and (per_frame[:, 0].sum(1) == m).all()
    rate = per_frame[:, 0].float().mean(0)
    for position in range(spatial):                                        # unit by unit
        if position in hard:
            assert rate[position] == 1.0
        else:
            assert abs(rate[position] - 3 / 7) < 0.03, (position, rate[position])


def test_hard_token_unit_ranks_every_token_on_its_own():
    n, tokens, masked, alpha = 4000, 20, 12, 0.5                           # K = 6 hard, 6 of the other 14
    scores = torch.rand(1, tokens, generator=torch.Generator().manual_seed(4)).expand(n, -1)
    mask = hard_patch_mask(scores, masked, alpha, generator=torch.Generator().manual_seed(5))
    hard = set(torch.topk(scores[0], 6).indices.tolist())
    rate = mask.float().mean(0)
    assert (mask.sum(1) == masked).all()
    for token in range(tokens):
        assert rate[token] == 1.0 if token in hard else abs(rate[token] - 6 / 14) < 0.03


def test_tube_means_average_each_tube_over_time():
    values = torch.tensor([[1.0, 2.0, 3.0, 5.0, 6.0, 7.0]])                # 2 frames x 3 masked tubes
    assert torch.equal(tube_means(values, 2), torch.tensor([[3.0, 4.0, 5.0]]))


def test_videomae_target_standardises_each_channel_of_each_tubelet():
    tokens = tubelet_patchify(CLIPS, 2, 4)
    target = tubelet_normalised_target(tokens)
    values = CLIPS[0, 1, 0:2, 0:4, 0:4].flatten()                          # channel 1 of token 0
    expected = (values - values.mean()) / (values.std(unbiased=True) + 1e-6)
    torch.testing.assert_close(target[0, 0, 1::3], expected)


def test_1d_position_table_is_the_transformer_table_and_transformers_videomae_one():
    table = get_1d_sinusoid_table(50, 16)
    x, j = 7, 5
    assert table[x, j] == pytest.approx(math.cos(x / 10000 ** (2 * (j // 2) / 16)), abs=1e-6)
    assert table[x, j - 1] == pytest.approx(math.sin(x / 10000 ** (2 * ((j - 1) // 2) / 16)), abs=1e-6)
    from transformers.models.videomae.modeling_videomae import get_sinusoid_encoding_table
    torch.testing.assert_close(table, get_sinusoid_encoding_table(50, 16)[0].float(), rtol=0, atol=1e-6)


@pytest.mark.parametrize("rows", [1, 7, 64, 1000])
def test_chunked_ranking_objective_equals_the_full_one_with_gradients(rows):
    gen = torch.Generator().manual_seed(6)
    pred = torch.randn(3, 64, generator=gen, requires_grad=True)
    target = torch.randn(3, 64, generator=gen)
    target[:, :4] = target[:, 4:8]                                          # ties count as no pair
    full = relative_loss_prediction(pred, target)
    (grad_full,) = torch.autograd.grad(full, pred)
    chunked = relative_loss_prediction_chunked(pred, target, rows=rows)
    (grad_chunked,) = torch.autograd.grad(chunked, pred)
    torch.testing.assert_close(chunked, full, rtol=1e-6, atol=1e-6)
    torch.testing.assert_close(grad_chunked, grad_full, rtol=1e-5, atol=1e-7)


def test_ranking_objective_by_hand():
    pred, target = torch.tensor([[0.0, 1.0, 3.0]]), torch.tensor([[1.0, 2.0, 2.0]])
    sig = torch.sigmoid
    # ordered pairs (i, j) with l_j != l_i: (0,1) (0,2) l_j > l_i; (1,0) (2,0) l_j < l_i; (1,2) (2,1) tied
    terms = [-torch.log(sig(torch.tensor(1.0)) + 1e-6), -torch.log(sig(torch.tensor(3.0)) + 1e-6),
             -torch.log(1 - sig(torch.tensor(-1.0)) + 1e-6), -torch.log(1 - sig(torch.tensor(-3.0)) + 1e-6)]
    expected = sum(terms) / 4
    torch.testing.assert_close(relative_loss_prediction(pred, target), expected)
    torch.testing.assert_close(relative_loss_prediction_chunked(pred, target, rows=2), expected)
