"""Faithfulness metrics: deletion orders and inputs, wer_max, deletion AUC, size."""
import numpy as np
import pytest
import torch

import xai_core


def test_wer_max_corpus_level_and_clipped():
    refs = [" ".join(f"w{i}" for i in range(20))]
    assert xai_core.wer_max(["w0 w1 w2"], refs) == pytest.approx(85.0)            # 17 deletions / 20
    hyp3 = refs[0].replace("w3", "x").replace("w7", "y").replace("w9", "z")
    assert xai_core.wer_max([hyp3], refs) == pytest.approx(15.0)                    # 3 / 20
    hyp100 = " ".join(["a"] * 100)                                                   # 20 subs + 80 insertions
    assert xai_core.wer_max([hyp100], refs) == 100.0                                 # 100 / 20 clipped to 100
    # case-sensitive, plain whitespace tokens, corpus-level (sum of errors / sum of words)
    assert xai_core.wer_max(["Hello world,", "a b"], ["hello world", "a b c d"]) == pytest.approx(100 * 4 / 6)
    assert xai_core.wer_max(["", ""], ["a b", "c"]) == 100.0
    assert xai_core.wer_max(["x"], [""]) == 0.0                                      # no reference words


def test_deletion_auc():
    pct = list(range(0, 101, 5))
    assert xai_core.deletion_auc(pct, [100.0] * 21) == pytest.approx(100.0)
    assert xai_core.deletion_auc(pct, [float(p) for p in pct]) == pytest.approx(50.0)
    assert xai_core.deletion_auc([0, 50, 100], [0, 100, 100]) == pytest.approx(75.0)
    assert xai_core.deletion_auc(pct, np.zeros(21)) == 0.0


def test_deletion_orders_and_inputs():
    features = torch.arange(1.0, 21.0).view(10, 2)                                   # T=10, F=2
    # I x T' map with subsampling 4 -> T'=3; frame t takes step t // 4
    step_map = torch.tensor([[0.1, 0.9, 0.5], [0.3, 0.7, 0.5]])
    up = xai_core.upsample_steps(xai_core.sentence_map(step_map), 4, 10)
    assert up.tolist() == pytest.approx([0.2] * 4 + [0.8] * 4 + [0.5] * 2)
    order = xai_core.frame_order(step_map, 10, subsampling=4)
    assert order.tolist() == [4, 5, 6, 7, 8, 9, 0, 1, 2, 3]                            # stable ties
    inputs = xai_core.deletion_inputs(features, order, [0, 20, 50, 100], occlusion="zero")
    assert inputs.shape == (4, 10, 2) and torch.equal(inputs[0], features)
    assert (inputs[1, 4:6] == 0).all() and torch.equal(inputs[1, :4], features[:4]) and torch.equal(inputs[1, 6:], features[6:])
    assert (inputs[2, 4:9] == 0).all() and (inputs[2, 9] != 0).all() and (inputs[3] == 0).all()
    filled = xai_core.deletion_inputs(features, order, [20])                         # bin_mean: 10 / 11 per bin
    assert filled[0, 4].tolist() == [10.0, 11.0]
    # full-resolution cell order from an I x T x F map
    cell_map = torch.zeros(1, 10, 2)
    cell_map[0, 3, 1], cell_map[0, 0, 0] = 5.0, 4.0
    cells = xai_core.deletion_order(xai_core.sentence_map(cell_map))
    assert cells[:2].tolist() == [7, 0]
    out = xai_core.deletion_inputs(features, cells, [10], occlusion="zero")[0]       # 2 of 20 cells
    assert (out == 0).sum() == 2 and out[3, 1] == 0 and out[0, 0] == 0
    # encoder side: zero the top states by SM^H rank, padding never zeroed
    keep = xai_core.encoder_deletion_masks(torch.tensor([5, 2, 0, 1, 4, 3]), [0, 50, 100], valid_length=4)
    assert keep.tolist() == [[True] * 6, [False, True, False, True, True, True], [False] * 4 + [True] * 2]


def test_size_metric():
    flat = torch.zeros(2, 4, 5)
    flat[0, 0, 0] = 1.0                                                               # one hot cell per token row
    flat[1, 3, 4] = 2.0
    curve = xai_core.size_curve(flat)
    assert curve[0] == 100.0 and curve[-1] == pytest.approx(100 * 2 / 40) and len(curve) == 21
    curve2, area = xai_core.size_score([flat, flat])
    assert np.allclose(curve2, curve)
    x = np.linspace(0, 1, 21)
    assert area == pytest.approx(float(np.sum((x[1:] - x[:-1]) * (curve[1:] + curve[:-1]) / 2)))
    # a z-score-then-min-max chain is invariant to a per-row affine change
    assert np.allclose(xai_core.size_curve(3 * flat + 1), curve)
