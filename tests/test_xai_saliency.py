"""SM^X / SM^H estimators: planted relevance, exactness of merging and batching, masks, KL."""
import math

import numpy as np
import pytest
import torch
from scipy.stats import rankdata

import xai_core
from xai_core.masks import _MASK64, _signed64

T, F, V = 96, 32, 11
# token i depends only on the frames x bins rectangle REGIONS[i]
REGIONS = [(slice(8, 30), slice(4, 14)), (slice(50, 80), slice(18, 30)), (slice(20, 44), slice(20, 32))]


def roc_auc(scores: np.ndarray, positive: np.ndarray) -> float:
    ranks = rankdata(scores)
    n_pos, n_neg = positive.sum(), (~positive).sum()
    return float((ranks[positive].sum() - n_pos * (n_pos + 1) / 2) / (n_pos * n_neg))


def toy_features(seed: int = 0) -> torch.Tensor:
    """Noise plus a distinct level inside each region (like energy in a spectrogram), so that
    superpixels can follow the region borders."""
    g = torch.Generator().manual_seed(seed)
    x = 0.5 * torch.randn(T, F, generator=g)
    for level, (ts, fs) in zip((3.0, -3.0, 6.0), REGIONS):
        x[ts, fs] += level
    return x


class RegionScorer:
    """log-softmax(base_i + w_i * mean squared change inside region i): token i sees only its region.
    Computed row by row with reductions only, so each mask's output does not depend on the batch."""

    def __init__(self, features: torch.Tensor):
        g = torch.Generator().manual_seed(1)
        self.features = features
        self.base = torch.randn(len(REGIONS), V, generator=g)
        self.w = 3.0 * torch.randn(len(REGIONS), V, generator=g)
        self.masks = torch.zeros(len(REGIONS), T, F)
        for i, (ts, fs) in enumerate(REGIONS):
            self.masks[i, ts, fs] = 1.0 / self.masks[i, ts, fs].numel()
        self.calls = 0

    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        self.calls += 1
        change = ((x - self.features) ** 2)
        d = torch.stack([(change * m).sum((1, 2)) for m in self.masks], 1)   # [B, I]
        return torch.log_softmax(self.base[None] + d[..., None] * self.w[None], -1)

    def planted(self) -> torch.Tensor:
        return self.masks > 0


def test_kl_reference_vector_and_zeros():
    p = torch.tensor([[.2, .2, .2, .1, .2, .1]])
    q = torch.full((1, 1, 6), .1)
    assert xai_core.kl_scores(p.log(), q.log()).item() == pytest.approx(0.5545, abs=1e-4)
    # P with exact zeros, Q with -inf where P is 0: no NaN, zero terms count 0
    p0 = torch.tensor([[0.5, 0.5, 0.0, 0.0]])
    q0 = torch.tensor([[[0.25, 0.75, 0.0, 0.0]]])
    kl = xai_core.kl_scores(p0.log(), q0.log())
    expected = 0.5 * math.log(0.5 / 0.25) + 0.5 * math.log(0.5 / 0.75)
    assert torch.isfinite(kl).all() and kl.item() == pytest.approx(expected, rel=1e-5)
    assert xai_core.kl_scores(p0.log(), p0.log()[None]).item() == 0.0


def test_masks_are_counter_based_and_have_rate_p():
    # the int64 tensor hash equals a plain-Python splitmix64 of the same counters
    def mix(z):
        z = ((z ^ (z >> 30)) * 0xBF58476D1CE4E5B9) & _MASK64
        z = ((z ^ (z >> 27)) * 0x94D049BB133111EB) & _MASK64
        return z ^ (z >> 31)
    key = xai_core.mask_key(7, "utt", "x1")
    bits = xai_core.uniform_bits(key, torch.tensor([0, 5, 123456789]), 4)
    for row, k in enumerate([0, 5, 123456789]):
        state = mix((k * 0x9E3779B97F4A7C15 + key) & _MASK64)
        for j in range(4):
            z = mix((state + (j + 1) * (0xD1B54A32D192ED03)) & _MASK64)
            assert int(bits[row, j]) == z >> 32
    # any subset of indices gives the same rows; the occlusion rate is p
    idx = torch.arange(1000, 1400)
    whole = xai_core.occlusion_masks(key, idx, 500, 0.7)
    assert torch.equal(whole[37:91], xai_core.occlusion_masks(key, idx[37:91], 500, 0.7))
    assert abs(whole.double().mean().item() - 0.7) < 0.01
    assert not torch.equal(whole, xai_core.occlusion_masks(xai_core.mask_key(7, "utt2", "x1"), idx, 500, 0.7))
    assert xai_core.mask_key(0, "a", "h") == xai_core.mask_key(0, "a", "h") != xai_core.mask_key(1, "a", "h")


def test_level_split_and_segment_counts():
    assert xai_core.split_masks(20000, 3) == [6667, 6667, 6666]
    assert xai_core.level_ranges(20000, 3) == [(0, 6667), (6667, 13334), (13334, 20000)]
    assert xai_core.segment_counts(500) == [2000, 2500, 3000]
    assert xai_core.segment_counts(1000) == [3000, 3750, 4500]          # threshold 750 frames
    # reference test vectors (reference duration 10 frames): T=12, b=20 -> 24; threshold 20 -> 40; T=4, b=2 -> 1
    assert xai_core.segment_counts(12, (4,), threshold_frames=None, reference_frames=10) == [24]
    assert xai_core.segment_counts(24, (4,), threshold_frames=20, reference_frames=10) == [40]
    assert xai_core.segment_counts(4, (0.4,), threshold_frames=None, reference_frames=10) == [1]


def test_input_saliency_finds_planted_regions():
    feats = toy_features()
    scorer = RegionScorer(feats)
    est = xai_core.input_saliency(scorer, feats, scorer(feats[None])[0], n_masks=1500, segment_key="toy", batch_size=256)
    assert est.n_masks_used == 1500 and [int(c.sum()) for c in est.counts] and est.map_shape == (T, F)
    smx = est.saliency()
    assert smx.shape == (len(REGIONS), T, F) and torch.isfinite(smx).all()
    z = xai_core.normalise_saliency(smx)
    for i, planted in enumerate(scorer.planted()):
        auc = roc_auc(smx[i].flatten().numpy(), planted.flatten().numpy())
        assert auc >= 0.95, (i, auc)
        assert z[i][planted].mean() > 1.5 and z[i][~planted].mean() < 0.2
    # three SLIC levels with about 4 / 5 / 6 superpixels per frame
    assert est.meta["n_segments"] == [4 * T, 5 * T, 6 * T]
    assert all(0.5 * n < k < 1.5 * n for n, k in zip(est.meta["n_segments"], est.meta["units"]))


def test_input_saliency_exact_for_any_batch_size_and_split():
    feats = toy_features(3)
    scorer = RegionScorer(feats)
    ref = scorer(feats[None])[0]
    kw = dict(n_masks=300, segment_key="utt-7", seed=11, sigma=1.0, occlusion="zero")
    whole = xai_core.input_saliency(scorer, feats, ref, batch_size=64, **kw)
    other_batch = xai_core.input_saliency(scorer, feats, ref, batch_size=17, **kw)
    parts = [xai_core.input_saliency(scorer, feats, ref, batch_size=50, mask_range=r, **kw)
             for r in [(0, 120), (120, 121), (121, 300)]]
    merged = parts[2].merge(xai_core.SaliencyEstimate.from_state(parts[0].to_state())).merge(parts[1])
    assert merged.n_masks_used == 300 and merged.mask_intervals == [(0, 300)]
    for other in (other_batch, merged):
        assert torch.equal(whole.saliency(), other.saliency())
        assert all(torch.equal(a, b) for a, b in zip(whole.numerators, other.numerators))
        assert all(torch.equal(a, b) for a, b in zip(whole.counts, other.counts))
    with pytest.raises(ValueError, match="overlapping"):
        parts[0].merge(parts[0])
    different_seed = xai_core.input_saliency(scorer, feats, ref, batch_size=64, mask_range=(0, 10), **{**kw, "seed": 12})
    with pytest.raises(ValueError, match="different runs"):
        parts[0].merge(different_seed)


def test_accumulator_counts_example():
    # cells occluded [2, 1, 0, 1, 2] times; mask A (score 1) occludes {0, 1, 3, 4}, mask B (score 0)
    # occludes {0, 4}: mean score over the occluding masks is [0.5, 1, 0, 1, 0.5], never-occluded -> 0
    occluded = torch.tensor([[1, 1, 0, 1, 1], [1, 0, 0, 0, 1]], dtype=torch.bool)
    est = xai_core.saliency._empty_estimate(1, [5], [torch.arange(5)], 2, {}, torch.device("cpu"))
    xai_core.saliency._accumulate(est, 0, torch.arange(2), occluded, torch.tensor([[1.0], [0.0]]))
    assert est.counts[0].sum(0).tolist() == [2, 1, 0, 1, 2]
    assert est.saliency()[0].tolist() == [0.5, 1.0, 0.0, 1.0, 0.5]
    assert est.saliency(half=0)[0].tolist() == [1.0, 1.0, 0.0, 1.0, 1.0]   # even masks only (A)


def test_encoder_saliency_finds_planted_positions_and_respects_padding():
    n_steps, valid = 40, 34
    planted = [[3, 4, 5], [10, 20], [30, 31, 32, 33]]
    g = torch.Generator().manual_seed(2)
    base, w = torch.randn(3, V, generator=g), 2.0 * torch.randn(3, V, generator=g)
    sel = torch.zeros(3, n_steps)
    for i, pos in enumerate(planted):
        sel[i, pos] = 1.0
    seen = []

    def scorer_h(keep: torch.Tensor) -> torch.Tensor:
        seen.append(keep.clone())
        dropped = ((~keep).float()[:, None, :] * sel[None]).sum(-1)     # [B, I]
        return torch.log_softmax(base[None] + dropped[..., None] * w[None], -1)

    states = torch.randn(n_steps, 8)
    ref = scorer_h(torch.ones(1, n_steps, dtype=torch.bool))[0]
    est = xai_core.encoder_saliency(scorer_h, states, ref, n_masks=1500, valid_length=valid, batch_size=200, segment_key="e")
    smh = est.saliency()
    assert smh.shape == (3, n_steps)
    keeps = torch.cat(seen[1:])
    assert keeps[:, valid:].all()                                   # padding never occluded
    assert abs((~keeps[:, :valid]).double().mean().item() - 0.7) < 0.01
    assert (smh[:, valid:] == 0).all()
    for i, pos in enumerate(planted):
        positive = np.zeros(valid, dtype=bool)
        positive[pos] = True
        assert roc_auc(smh[i, :valid].numpy(), positive) >= 0.95
    # exact under batch size and split
    kw = dict(n_masks=500, valid_length=valid, segment_key="e", seed=4)
    a = xai_core.encoder_saliency(scorer_h, states, ref, batch_size=500, **kw)
    b = xai_core.encoder_saliency(scorer_h, states, ref, batch_size=33, mask_range=(0, 250), **kw).merge(
        xai_core.encoder_saliency(scorer_h, states, ref, batch_size=7, mask_range=(250, 500), **kw))
    assert torch.equal(a.saliency(), b.saliency())


def test_split_half_reliability_grows_and_adaptive_stop():
    feats = toy_features(5)
    scorer = RegionScorer(feats)
    ref = scorer(feats[None])[0]
    rel = [xai_core.input_saliency(scorer, feats, ref, n_masks=n, segment_key="r", batch_size=300).reliability()
           for n in (60, 600, 3000)]
    assert rel[0] < rel[1] < rel[2] and rel[2] > 0.8
    est = xai_core.input_saliency(scorer, feats, ref, n_masks=600, segment_key="r", batch_size=300)
    # pooling to the encoder grid averages noise out; raw maps also correlate through token baselines
    assert est.reliability(subsampling=4) > est.reliability() and est.reliability(normalise=False) > est.reliability()
    assert est.reliability(rows=slice(0, 1)) != est.reliability(rows=slice(1, 2))
    est = xai_core.input_saliency(scorer, feats, ref, n_masks=6000, segment_key="r", batch_size=300,
                                  target_reliability=0.85, check_every=300, min_masks=300)
    assert 1500 < est.n_masks_used < 6000 and est.reliability() >= 0.85
    # adaptive mode uses the first masks of every level, and they are the same masks as a full run
    assert len(est.mask_intervals) == 3 and all(a == lo for (a, _), (lo, _) in zip(est.mask_intervals, xai_core.level_ranges(6000, 3)))


def test_bad_inputs_raise_clear_errors():
    feats = toy_features()
    scorer = RegionScorer(feats)
    ref = scorer(feats[None])[0]
    with pytest.raises(ValueError, match="constant"):
        xai_core.input_saliency(scorer, torch.ones(T, F), ref, n_masks=10, segment_key="flat")
    with pytest.raises(ValueError, match="mask_range"):
        xai_core.input_saliency(scorer, feats, ref, n_masks=10, mask_range=(5, 20))
    with pytest.raises(ValueError, match="scorer returned"):
        xai_core.input_saliency(lambda x: torch.zeros(x.shape[0], 2, V), feats, ref, n_masks=4, segment_key="s")
    with pytest.raises(ValueError, match="non-finite"):
        xai_core.input_saliency(lambda x: torch.full((x.shape[0], 3, V), math.nan), feats, ref, n_masks=4)
