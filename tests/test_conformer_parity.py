"""Parity of our FBK Conformer with the reference FBK-fairseq outputs of the tiny fixture model."""
from pathlib import Path

import numpy as np
import pytest
import torch

from models.audio import load_audio
from models.conformer import load_fbk_model
from models.interface import ModelError

FIX = Path(__file__).resolve().parents[2] / "shared" / "fixtures" / "fbk_tiny"
TOL = 1e-4


@pytest.fixture(scope="module")
def model():
    return load_fbk_model(FIX / "checkpoint.pt", config_yaml=FIX / "config.yaml")


@pytest.fixture(scope="module")
def golden():
    return [dict(np.load(FIX / "golden" / f"golden_{k}.npz")) for k in range(3)]


def test_loaded_architecture(model):
    cfg = model.cfg
    assert (cfg.arch, cfg.encoder_layers, cfg.decoder_layers, cfg.d_model) == ("conformer", 3, 2, 128)
    assert (cfg.encoder_heads, cfg.decoder_heads, cfg.ffn_expansion, cfg.decoder_ffn) == (4, 4, 2, 256)
    assert (cfg.ctc_vocab_size, cfg.ctc_layer, cfg.vocab_size) == (201, 2, 200)
    # the fixture README's 1,550,411 also counts fairseq's two 1-element dummies (decoder.version,
    # decoder.embed_positions._float_tensor), which carry no weights here
    assert model.net.num_parameters() + 2 == 1_550_411
    assert model.bos == model.eos == 2 and model.pad == 1 and model.unk == 3
    assert model.forced_prefix("en") == [] and model.max_input_frames == 6000


@pytest.mark.parametrize("k", [0, 1, 2])
def test_features_match(model, golden, k):
    feats = model.features(torch.from_numpy(load_audio(FIX / "wav" / f"test_{k}.wav")))
    assert np.abs(feats.numpy() - golden[k]["src_features_cmvn"]).max() <= TOL


@pytest.mark.parametrize("k", [0, 1, 2])
def test_encoder_decoder_cross_attention_match(model, golden, k):
    g = golden[k]
    feats = torch.from_numpy(g["src_features_cmvn"])
    hyp = model.make_hypothesis(g["hyp_token_ids"].tolist(), 0)
    assert hyp.decoder_input == g["prev_output_tokens"].tolist()
    with torch.inference_mode():
        out = model.net.encoder(feats[None], torch.tensor([feats.shape[0]]))
        enc = model.encode(feats[None], torch.tensor([feats.shape[0]]))
        log_probs = model.teacher_forced_log_probs(enc, hyp)
    cross = model.cross_attention(feats, hyp)
    assert np.abs(enc.states[0].numpy() - g["encoder_out"]).max() <= TOL
    assert np.abs(out["ctc_out"][0].numpy() - g["ctc_out"]).max() <= TOL
    assert np.abs(log_probs[0].exp().numpy() - g["decoder_probs"]).max() <= TOL
    assert cross.shape == g["cross_attn"].shape
    assert np.abs(cross.numpy() - g["cross_attn"]).max() <= TOL


def test_beam_search_hypotheses_match(model, golden):
    feats = [model.features(torch.from_numpy(load_audio(FIX / "wav" / f"test_{k}.wav"))) for k in range(3)]
    hyps = model.generate(feats, [[], [], []])        # batched and padded: exercises the safe shift
    for hyp, g in zip(hyps, golden):
        assert hyp.token_ids == g["hyp_token_ids"].tolist()
        assert hyp.tokens == g["hyp_pieces"].tolist()
        assert hyp.text == str(g["hyp_detok"])
        assert abs(hyp.score / np.log(2) - float(g["hyp_score_log2"])) < 1e-4
        # the fixture's positional scores are printed with 4 decimals
        assert np.abs(np.array(hyp.token_log_probs) / np.log(2) - g["hyp_positional_scores_log2"]).max() < 1e-4


def test_load_with_explicit_files_and_text(golden):
    m = load_fbk_model(FIX / "checkpoint.pt", spm=FIX / "spm_unigram200.model", dict=FIX / "spm_unigram200.txt",
                       config_yaml=FIX / "config_explain.yaml")
    g = golden[0]
    hyp = m.hypothesis_from_text(str(g["reference_text"]), [])
    assert hyp.token_ids == g["hyp_token_ids"].tolist() and hyp.text == str(g["reference_text"])
    m2 = load_fbk_model(FIX / "checkpoint.pt", spm=FIX / "spm_unigram200.model", dict=FIX / "spm_unigram200.txt")
    assert m2.data_cfg.utterance_cmvn and m2.decode_text(hyp.token_ids) == str(g["reference_text"])


def test_bad_inputs_give_clear_errors(tmp_path, model):
    with pytest.raises(ModelError, match="not found"):
        load_fbk_model(tmp_path / "missing.pt", config_yaml=FIX / "config.yaml")
    bad_dict = tmp_path / "dict.txt"
    bad_dict.write_text("".join(f"tok{i} 1\n" for i in range(10)))
    with pytest.raises(ModelError, match="dictionary has 14 entries"):
        load_fbk_model(FIX / "checkpoint.pt", dict=bad_dict, spm=FIX / "spm_unigram200.model")
    junk = tmp_path / "junk.pt"
    junk.write_bytes(b"not a checkpoint")
    with pytest.raises(ModelError, match="junk.pt"):
        load_fbk_model(junk, config_yaml=FIX / "config.yaml")
    with pytest.raises(ModelError, match="16000 Hz"):
        model.features(torch.zeros(8000), sample_rate=8000)
