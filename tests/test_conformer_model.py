"""Unit tests of the Conformer computation (model_reference.md §8) and of the fast scorers."""
from pathlib import Path

import numpy as np
import pytest
import torch

from models.conformer import load_fbk_model
from models.conformer.model import (ConformerConfig, ConformerModel, ctc_compress, ctc_segments, rel_shift_safe,
                                    rel_shift_unsafe)
from models.interface import pad_features

FIX = Path(__file__).resolve().parents[2] / "shared" / "fixtures" / "fbk_tiny"


@pytest.fixture(scope="module")
def model():
    return load_fbk_model(FIX / "checkpoint.pt", config_yaml=FIX / "config.yaml")


@pytest.fixture(scope="module")
def data():
    gs = [np.load(FIX / "golden" / f"golden_{k}.npz") for k in range(3)]
    return [torch.from_numpy(g["src_features_cmvn"]) for g in gs], [g["hyp_token_ids"].tolist() for g in gs]


def test_rel_shift_closed_form():
    T = 7
    raw = torch.randn(2, T, T)
    pos = rel_shift_unsafe(raw)
    for i in range(T):
        for j in range(T):
            if j <= i:
                expected = raw[:, i, T - 1 - (i - j)]
            elif j == i + 1:
                expected = torch.zeros(2)
            else:
                expected = raw[:, i + 1, j - i - 2]
            assert torch.equal(pos[:, i, j], expected)


def test_rel_shift_safe_vs_unsafe():
    raw = torch.randn(3, 2, 6, 6)
    assert torch.equal(rel_shift_safe(raw, torch.tensor([6, 6, 6])), rel_shift_unsafe(raw))
    lengths = torch.tensor([6, 4, 2])
    safe = rel_shift_safe(raw, lengths)
    for b, n in enumerate(lengths.tolist()):
        assert torch.equal(safe[b, :, :n, :n], rel_shift_unsafe(raw[b, :, :n, :n].contiguous()))
        assert float(safe[b, :, n:].abs().sum() + safe[b, :, :, n:].abs().sum()) == 0.0


def test_encoder_batch_invariance(model, data):
    feats, _ = data
    x, lengths = pad_features(feats)
    with torch.inference_mode():
        batch = model.encode(x, lengths)
        for b, f in enumerate(feats):
            one = model.encode(f[None], torch.tensor([f.shape[0]]))
            n = int(one.lengths[0])
            assert int(batch.lengths[b]) == n == -(-f.shape[0] // 4) == model.encoder_length(f.shape[0])
            assert torch.allclose(batch.states[b, :n], one.states[0], atol=1e-4)


def test_decoder_batch_invariance(model, data):
    feats, hyps = data
    x, lengths = pad_features(feats)
    hyp = model.make_hypothesis(hyps[0], 0)
    with torch.inference_mode():
        batch = model.teacher_forced_log_probs(model.encode(x, lengths), hyp)
        for b, f in enumerate(feats):
            one = model.teacher_forced_log_probs(model.encode(f[None], torch.tensor([f.shape[0]])), hyp)
            assert torch.allclose(batch[b], one[0], atol=1e-4)


def test_incremental_equals_teacher_forced(model, data):
    feats, hyps = data
    f, hyp = feats[1], model.make_hypothesis(hyps[1], 0)
    dec = model.net.decoder
    tokens = torch.tensor([hyp.decoder_input])
    with torch.inference_mode():
        enc = model.encode(f[None], torch.tensor([f.shape[0]]))
        full_logits, full_probs = dec(tokens, dec.cross_kv(enc.states), None, need_probs=True)
        full = torch.log_softmax(full_logits.float(), -1)[0]
        # via the beam-search interface (with a no-op reorder in between)
        state = model.init_decoder_state(enc)
        steps = []
        for t in range(1, tokens.shape[1] + 1):
            lp, state = model.decoder_step(tokens[:, :t], state)
            state = model.reorder_decoder_state(state, torch.tensor([0]))
            steps.append(lp[0])
        assert torch.allclose(torch.stack(steps), full, atol=1e-5)
        # per-step cross-attention equals the teacher-forced rows
        caches, cross = [{} for _ in dec.layers], dec.cross_kv(enc.states)
        for t in range(tokens.shape[1]):
            _, probs = dec(tokens[:, t:t + 1], cross, None, need_probs=True, caches=caches, start=t)
            for layer in range(len(dec.layers)):
                assert torch.allclose(probs[layer][0, :, 0], full_probs[layer][0, :, t], atol=1e-6)


def test_input_scorer_matches_teacher_forcing(model, data):
    feats, hyps = data
    f, hyp = feats[2], model.make_hypothesis(hyps[2], 0)
    g = torch.Generator().manual_seed(0)
    batch = f[None].repeat(4, 1, 1)
    batch[1:] *= (torch.rand(3, f.shape[0], 80, generator=g) > 0.5)
    scorer = model.input_scorer(hyp, f.shape[0])
    got = scorer(batch)
    assert got.shape == (4, hyp.num_tokens, model.vocab_size) and got.dtype == torch.float32
    with torch.inference_mode():
        for b in range(4):
            ref = model.teacher_forced_log_probs(model.encode(batch[b:b + 1], torch.tensor([f.shape[0]])), hyp)[0]
            assert torch.allclose(got[b], ref, atol=1e-4)
    bf16 = model.input_scorer(hyp, f.shape[0], dtype=torch.bfloat16)(batch)
    assert bf16.dtype == torch.float32
    assert (bf16.exp() - got.exp()).abs().max() < 0.05


def test_encoder_scorer_equals_zero_and_rerun(model, data):
    feats, hyps = data
    f, hyp = feats[0], model.make_hypothesis(hyps[0], 0)
    with torch.inference_mode():
        states = model.encode(f[None], torch.tensor([f.shape[0]])).states[0]
    T = states.shape[0]
    keep = torch.rand(6, T, generator=torch.Generator().manual_seed(1)) > 0.7
    keep[0] = True
    got = model.encoder_scorer(states, hyp)(keep)
    dec = model.net.decoder
    tokens = torch.tensor([hyp.decoder_input])
    with torch.inference_mode():
        for b in range(keep.shape[0]):
            h = states * keep[b, :, None]
            logits, _ = dec(tokens, dec.cross_kv(h[None]), None)
            assert torch.allclose(got[b], torch.log_softmax(logits.float(), -1)[0], atol=1e-5)
    bf16 = model.encoder_scorer(states, hyp, dtype=torch.bfloat16)(keep)
    assert (bf16.exp() - got.exp()).abs().max() < 0.05


def test_ctc_segments_and_compression():
    assert ctc_segments([5, 5, 0, 0, 0, 7, 5], -1) == [(5, 2), (0, 3), (7, 1), (5, 1)]
    # groups of ceil(4/2) = 2 segments; label = most frequent by frames, first wins ties
    assert ctc_segments([5, 5, 0, 0, 0, 7, 5], 2) == [(0, 5), (7, 2)]
    cfg = ConformerConfig(d_model=4, ctc_compress_strategy="avg")
    x = torch.arange(2 * 5 * 4, dtype=torch.float32).view(2, 5, 4)
    logits = torch.full((2, 5, 3), -10.0)
    for b, labels in enumerate([[1, 1, 2, 2, 2], [0, 1, 1, 0, 0]]):
        logits[b, torch.arange(5), torch.tensor(labels)] = 10.0
    out, lengths = ctc_compress(x, logits, torch.tensor([5, 4]), cfg)
    assert lengths.tolist() == [2, 3]
    assert torch.allclose(out[0, 0], x[0, :2].mean(0)) and torch.allclose(out[0, 1], x[0, 2:].mean(0))
    assert torch.allclose(out[1, 2], x[1, 3]) and float(out[0, 2:].abs().sum()) == 0.0
    for strategy in ("weighted", "softmax"):
        w_out, _ = ctc_compress(x, logits, torch.tensor([5, 4]), ConformerConfig(d_model=4, ctc_compress_strategy=strategy))
        assert torch.allclose(w_out[0, 0], x[0, :2].mean(0), atol=1e-4)      # equal probs -> plain mean
    fixed, flen = ctc_compress(x, logits, torch.tensor([5, 4]), ConformerConfig(d_model=4, ctc_compress_strategy="fixed", ctc_compress_fixed_ratio=2))
    assert flen.tolist() == [3, 2] and torch.allclose(fixed[0, 2], x[0, 4])


def test_compressed_model_runs_and_is_batch_invariant():
    torch.manual_seed(0)
    cfg = ConformerConfig(d_model=32, encoder_layers=2, encoder_heads=4, decoder_layers=1, decoder_heads=4,
                          decoder_ffn=64, conv_channels=64, ffn_expansion=2, vocab_size=20, ctc_vocab_size=21,
                          ctc_layer=1, ctc_compress_strategy="avg", arch="conformer_joint_ctc")
    net = ConformerModel(cfg).eval()
    feats = [torch.randn(40, 80), torch.randn(27, 80)]
    x, lengths = pad_features(feats)
    with torch.inference_mode():
        batch = net.encode(x, lengths)
        for b, f in enumerate(feats):
            one = net.encode(f[None], torch.tensor([f.shape[0]]))
            n = int(one["lengths"][0])
            assert int(batch["lengths"][b]) == n <= -(-f.shape[0] // 4)
            assert torch.allclose(batch["states"][b, :n], one["states"][0], atol=1e-4)
        aux = net.auxiliary_decoder(batch["states"], batch["lengths"])
        assert aux.shape == (2, batch["states"].shape[1], 20)
