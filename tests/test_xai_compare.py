"""Aggregation, pooling, normalisation, correlation and table helpers, on hand-made examples."""
import numpy as np
import pytest
import torch
from scipy.stats import pearsonr

import xai_core


def test_aggregate_attention_plain_means():
    ca = torch.arange(2 * 3 * 2 * 4, dtype=torch.float32).view(2, 3, 2, 4)
    assert torch.equal(xai_core.aggregate_attention(ca), ca.mean((0, 1)))
    assert torch.equal(xai_core.aggregate_attention(ca, layers=[1]), ca[1].mean(0))
    assert torch.equal(xai_core.aggregate_attention(ca, heads=[2]), ca[:, 2].mean(0))
    assert torch.equal(xai_core.aggregate_attention(ca, heads=[(0, 1), (1, 2)]), (ca[0, 1] + ca[1, 2]) / 2)
    assert torch.equal(xai_core.aggregate_attention(ca, layers=[0], heads=[0, 2]), (ca[0, 0] + ca[0, 2]) / 2)


def test_pool_input_saliency_hand_example():
    # 1 token, T=5 frames, F=2 bins, subsampling 2 -> 3 steps, the last window has one frame
    smx = torch.tensor([[[1., 2.], [3., 0.], [5., 6.], [0., 1.], [-1., 4.]]])
    assert xai_core.pool_input_saliency(smx, 2).tolist() == [[3., 6., 4.]]
    assert xai_core.pool_input_saliency(smx, 2, "2d_avg").tolist() == [[1.5, 3.0, 1.5]]
    assert xai_core.pool_input_saliency(smx, 2, "1d_max_1d_avg").tolist() == [[2.5, 3.5, 4.0]]
    assert xai_core.pool_input_saliency(smx, 2, n_steps=2).tolist() == [[3., 6.]]
    assert xai_core.pool_input_saliency(smx, 2, n_steps=4).tolist() == [[3., 6., 4., 0.]]
    with pytest.raises(ValueError):
        xai_core.pool_input_saliency(smx, 2, "mean")


def test_normalisations_and_constant_rows():
    ca = torch.tensor([[0.5, 1.0, 0.2], [0.5, 0.0, 0.4]])      # column 0 is constant over tokens
    out = xai_core.normalise_attention(ca)
    assert out[:, 0].tolist() == [0.0, 0.0]
    assert out[:, 1].tolist() == [1.0, -1.0] and torch.allclose(out[:, 2], torch.tensor([-1.0, 1.0], dtype=torch.float64))
    sm = torch.tensor([[1.0, 2.0, 3.0], [4.0, 4.0, 4.0]])
    z = xai_core.normalise_saliency(sm)
    assert torch.allclose(z[0], torch.tensor([-1.2247449, 0.0, 1.2247449], dtype=torch.float64))
    assert z[1].tolist() == [0.0, 0.0, 0.0]
    assert torch.isfinite(xai_core.normalise_attention(torch.zeros(3, 4))).all()


def test_spes_normaliser_reference_vectors():
    x = torch.tensor([[1., 2., 1., 3.]] * 3)[None]                 # one token, input map 3 x 4
    z = xai_core.single_mean_std(x)
    assert torch.allclose(z[0, 0], torch.tensor([-0.8660, 0.2887, -0.8660, 1.4434], dtype=torch.float64), atol=1e-4)
    tok = torch.tensor([[1., 2., 9.], [0., 1., 2.]])               # token map rows with valid j <= i + 1
    valid = torch.tensor([[True, True, False], [True, True, True]])
    zt = xai_core.single_mean_std(tok, valid)
    assert torch.allclose(zt, torch.tensor([[-0.7071, 0.7071, 0.0], [-1.0, 0.0, 1.0]], dtype=torch.float64), atol=1e-4)
    assert xai_core.single_mean_std(torch.tensor([[5.0]])).tolist() == [[0.0]]   # n = 1 -> 0, not NaN
    xi, yt = xai_core.paired_min_max(torch.tensor([[1., 2., 1., 3.]]), torch.tensor([[1.]]))
    assert xi.tolist() == [[0.0, 0.5, 0.0, 1.0]] and yt.tolist() == [[0.0]]
    const, _ = xai_core.paired_min_max(torch.full((2, 3), 7.0))
    assert const.tolist() == [[0.0] * 3] * 2


def test_pearson_matches_scipy_and_is_nan_free():
    g = np.random.default_rng(0)
    a, b = g.normal(size=(4, 7)), g.normal(size=(4, 7))
    assert xai_core.pearson(torch.tensor(a), torch.tensor(b)) == pytest.approx(pearsonr(a.ravel(), b.ravel())[0], abs=1e-12)
    assert xai_core.pearson(a, 2 * a + 1) == pytest.approx(1.0)
    assert xai_core.pearson(np.ones(5), np.arange(5.0)) == 0.0


def test_correlate_hand_example():
    g = torch.Generator().manual_seed(0)
    L, H, I, Tp = 2, 3, 6, 9
    ca = torch.rand(L, H, I, Tp, generator=g, dtype=torch.float64).softmax(-1)
    sm = torch.rand(I, Tp, generator=g)
    rows = slice(1, 5)
    out = xai_core.correlate(ca, sm, rows)

    def expected(m):  # by hand with numpy + scipy: frame-wise CA z-score, row z-score of SM, pearsonr
        m = m[rows].numpy().astype(np.float64)
        m = (m - m.mean(0)) / m.std(0)
        s = sm[rows].numpy().astype(np.float64)
        s = (s - s.mean(1, keepdims=True)) / s.std(1, keepdims=True)
        return pearsonr(m.ravel(), s.ravel())[0]

    assert np.allclose(out["per_head"], [[expected(ca[l, h]) for h in range(H)] for l in range(L)], atol=1e-10)
    assert np.allclose(out["per_layer"], [expected(ca[l].mean(0)) for l in range(L)], atol=1e-10)
    assert np.allclose(out["per_head_avg"], [expected(ca[:, h].mean(0)) for h in range(H)], atol=1e-10)
    assert out["global"] == pytest.approx(expected(ca.mean((0, 1))), abs=1e-10)
    with pytest.raises(ValueError):
        xai_core.correlate(ca, sm[:, :-1], rows)


def test_tables_from_per_utterance_results():
    r1 = {"per_head": [[0.1, 0.3], [0.5, 0.7]], "per_layer": [0.2, 0.6], "per_head_avg": [0.4, 0.5], "global": 0.45}
    r2 = {"per_head": [[0.3, 0.5], [0.7, 0.9]], "per_layer": [0.4, 0.8], "per_head_avg": [0.6, 0.7], "global": 0.65}
    t1 = xai_core.table_grid([r1, r2])
    assert np.allclose(t1["grid"], [[0.2, 0.4], [0.6, 0.8]]) and np.allclose(t1["head_avg"], [0.3, 0.7])
    assert np.allclose(t1["layer_avg"], [0.5, 0.6]) and t1["global"] == pytest.approx(0.55) and t1["n"] == 2
    rows = xai_core.table_layers([r1, r2])
    assert np.allclose(rows["layers"], [0.3, 0.7]) and rows["layer_avg"] == pytest.approx(0.55)
    sweep = xai_core.table_p_sweep({0.5: [r1], 0.9: [r2]}, deletion={0.9: 58.2})
    assert list(sweep) == [0.9, 0.5] and sweep[0.9]["deletion"] == 58.2
    gap = xai_core.context_mixing_gap([r2], [r1])
    assert np.allclose(gap["layers"], [0.2, 0.2]) and gap["layer_avg"] == pytest.approx(0.2)
    agg = xai_core.table_aggregation({"2d_max": [r1], "2d_avg": [r2]})
    assert agg["2d_avg"]["layer_avg"] == pytest.approx(0.65)
    full = xai_core.paper_tables([r1, r2], [r2])
    assert full["gap"]["layer_avg"] == pytest.approx(0.1) and full["x"]["grid"]["n"] == 2
