"""Our Kaldi fbank against the reference fixture features and against kaldi-native-fbank."""
from pathlib import Path

import numpy as np
import pytest
import torch

from models.audio import load_audio
from models.fbank import kaldi_fbank, kaldi_mel_filters, utterance_cmvn
from models.interface import ModelError

FIX = Path(__file__).resolve().parents[2] / "shared" / "fixtures" / "fbk_tiny"


def knf_fbank(wave: np.ndarray) -> np.ndarray:
    import kaldi_native_fbank as knf
    opts = knf.FbankOptions()
    opts.frame_opts.dither = 0.0
    opts.frame_opts.samp_freq = 16000
    opts.mel_opts.num_bins = 80
    fb = knf.OnlineFbank(opts)
    fb.accept_waveform(16000, (wave * 32768.0).tolist())
    fb.input_finished()
    return np.stack([fb.get_frame(i) for i in range(fb.num_frames_ready)])


@pytest.mark.parametrize("k", [0, 1, 2])
def test_fbank_matches_reference_features(k):
    wave = load_audio(FIX / "wav" / f"test_{k}.wav")
    ours = kaldi_fbank(torch.from_numpy(wave)).numpy()
    ref = np.load(FIX / "fbank" / f"test_{k}.npy")
    assert ours.shape == ref.shape and ours.dtype == np.float32
    assert np.abs(ours - ref).max() <= 1e-3


def test_fbank_matches_kaldi_native_fbank():
    rng = np.random.default_rng(0)
    noise = (0.1 * rng.standard_normal(16000 + 123)).astype(np.float32)
    waves = [noise, load_audio(FIX / "wav" / "test_0.wav"), load_audio(FIX / "wav" / "test_2.wav")]
    for wave in waves:
        ours = kaldi_fbank(torch.from_numpy(wave)).numpy()
        ref = knf_fbank(wave)
        assert ours.shape == ref.shape
        assert np.abs(ours - ref).max() <= 1e-3
    # test_1 has a few cancellation-dominated low-mel cells where kaldi-native-fbank itself differs
    # from the reference features by ~3e-3; all but a handful of cells still agree to 1e-3.
    wave = load_audio(FIX / "wav" / "test_1.wav")
    diff = np.abs(kaldi_fbank(torch.from_numpy(wave)).numpy() - knf_fbank(wave))
    assert (diff > 1e-3).mean() < 1e-3 and diff.max() < 1e-2


def test_fbank_frame_count_and_filters():
    assert kaldi_fbank(torch.zeros(400)).shape == (1, 80)
    assert kaldi_fbank(torch.zeros(400 + 159)).shape == (1, 80)
    assert kaldi_fbank(torch.zeros(400 + 160)).shape == (2, 80)
    filters = kaldi_mel_filters(80, 512, 16000)
    assert filters.shape == (80, 257) and float(filters[:, -1].abs().sum()) == 0.0
    assert float(filters.min()) >= 0.0 and float(filters.max()) <= 1.0
    # silence hits the log floor exactly
    assert torch.allclose(kaldi_fbank(torch.zeros(1600)), torch.full((8, 80), float(np.log(np.float32(1.1920929e-07)))))
    with pytest.raises(ModelError):
        kaldi_fbank(torch.zeros(399))


@pytest.mark.parametrize("k", [0, 1, 2])
def test_utterance_cmvn_matches_reference(k):
    golden = np.load(FIX / "golden" / f"golden_{k}.npz")
    cmvn = utterance_cmvn(torch.from_numpy(np.load(FIX / "fbank" / f"test_{k}.npy"))).numpy()
    assert np.abs(cmvn - golden["src_features_cmvn"]).max() <= 1e-4
    assert np.abs(cmvn.mean(0)).max() < 1e-5 and np.abs(cmvn.std(0) - 1).max() < 1e-4
