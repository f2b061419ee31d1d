"""Checkpoint loading without fairseq: restricted unpickling, formats, round trips, HF folders."""
import argparse
import json
import os
import shutil
import subprocess
from pathlib import Path

import pytest
import torch

from models.conformer import load_fbk_model, load_hf_fama, save_fbk_checkpoint
from models.conformer.checkpoint import config_from_checkpoint, load_conformer, load_fairseq_checkpoint
from models.conformer.model import ConformerConfig, ConformerModel
from models.conformer.text import Dictionary
from models.interface import ModelError

FIX = Path(__file__).resolve().parents[2] / "shared" / "fixtures" / "fbk_tiny"


class _RunsShell:
    def __init__(self, marker):
        self.marker = marker

    def __reduce__(self):
        return (os.system, (f"touch {self.marker}",))


class _Evals:
    def __reduce__(self):
        return (eval, ("__import__('os').getcwd()",))


class _Popen:
    def __init__(self, marker):
        self.marker = marker

    def __reduce__(self):
        return (subprocess.Popen, (["touch", str(self.marker)],))


@pytest.mark.parametrize("zip_format", [True, False])
def test_malicious_pickles_are_refused(tmp_path, zip_format):
    marker = tmp_path / "pwned"
    payloads = {"shell": _RunsShell(marker), "eval": _Evals(), "popen": _Popen(marker)}
    for name, payload in payloads.items():
        path = tmp_path / f"{name}.pt"
        torch.save({"model": {"w": torch.zeros(2)}, "extra_state": payload}, path,
                   _use_new_zipfile_serialization=zip_format)
        with pytest.raises(ModelError, match="not allowed"):
            load_fairseq_checkpoint(path)
        assert not marker.exists()
    # the same payload through the unrestricted loader really would run: the test can fail
    torch.load(tmp_path / "shell.pt", weights_only=False)
    assert marker.exists()


def test_real_fairseq_checkpoint_config(tmp_path):
    ckpt = load_fairseq_checkpoint(FIX / "checkpoint.pt")
    assert ckpt["cfg"]["model"]["_name"] == "conformer" and ckpt["cfg"]["task"]["_name"] == "speech_to_text_ctc"
    assert ckpt["cfg"]["criterion"]["_name"] == "ctc_multi_loss"
    assert ckpt["args"]["ctc_encoder_layer"] == 2 and ckpt["args"]["decoder_attention_heads"] == 4
    assert isinstance(ckpt["cfg"]["model"]["update_freq"], list)
    # optimizer state is dropped right after loading
    path = tmp_path / "with_opt.pt"
    torch.save({"model": {"w": torch.zeros(1)}, "args": argparse.Namespace(arch="conformer"),
                "last_optimizer_state": {"state": torch.zeros(10)}}, path)
    loaded = load_fairseq_checkpoint(path)
    assert "last_optimizer_state" not in loaded and loaded["args"]["arch"] == "conformer"


def _outputs(net, T=37):
    g = torch.Generator().manual_seed(3)
    feats = torch.randn(1, T, net.cfg.input_feat, generator=g)
    tokens = torch.tensor([[2, 5, 6, 7]])
    with torch.inference_mode():
        return net(feats, torch.tensor([T]), tokens)[0]


PAPER_BASE = dict(d_model=512, encoder_layers=12, decoder_layers=6, encoder_heads=8, decoder_heads=8, decoder_ffn=2048,
                  conv_channels=1024, vocab_size=8001, ctc_vocab_size=8001, ctc_layer=8)
FAMA_SMALL = dict(arch="conformer_joint_ctc", d_model=1024, encoder_layers=12, decoder_layers=6, encoder_heads=16,
                  decoder_heads=16, decoder_ffn=4096, conv_channels=1024, vocab_size=16005, ctc_vocab_size=16005,
                  ctc_layer=8, aux_lang_layernorm=True)


@pytest.mark.parametrize("name,kwargs,expected_m", [
    ("base conformer", dict(PAPER_BASE, arch="conformer"), 116.43),
    ("base conformer_joint_ctc", dict(PAPER_BASE, arch="conformer_joint_ctc"), 120.54),
    ("FAMA-small", FAMA_SMALL, 474.78),
])
def test_save_and_load_paper_shapes(tmp_path, name, kwargs, expected_m):
    torch.manual_seed(0)
    cfg = ConformerConfig(**kwargs)
    net = ConformerModel(cfg).eval()
    n = net.num_parameters()
    print(f"{name}: {n:,} parameters")
    assert abs(n / 1e6 - expected_m) < 0.01        # model_reference.md §4.4
    path = tmp_path / "model.pt"
    save_fbk_checkpoint(net, path)
    loaded, args = load_conformer(path)
    assert loaded.cfg == cfg and args["_name"] == cfg.arch
    for (k, a), (k2, b) in zip(net.state_dict().items(), loaded.state_dict().items()):
        assert k == k2 and torch.equal(a, b)
    if cfg.d_model == 512:
        assert torch.equal(_outputs(net), _outputs(loaded))


def test_shape_fallback_and_old_key_aliases(tmp_path):
    ckpt = load_fairseq_checkpoint(FIX / "checkpoint.pt")
    ref, _ = load_conformer(FIX / "checkpoint.pt")
    state = dict(ckpt["model"])
    # old fairseq names: layer_norms.{0,1,2} and embed_out
    for i in range(2):
        for j, name in enumerate(["self_attn_layer_norm", "encoder_attn_layer_norm", "final_layer_norm"]):
            for p in ("weight", "bias"):
                state[f"decoder.layers.{i}.layer_norms.{j}.{p}"] = state.pop(f"decoder.layers.{i}.{name}.{p}")
    state["decoder.embed_out"] = state.pop("decoder.output_projection.weight")
    for k in [k for k in state if k.endswith(".pe")]:     # stripped pe buffers are regenerated
        del state[k]
    path = tmp_path / "old.pt"
    torch.save({"args": argparse.Namespace(arch="conformer", decoder_attention_heads=4, ctc_encoder_layer=2),
                "model": state}, path)
    old, _ = load_conformer(path)
    assert old.cfg == ref.cfg
    assert torch.allclose(_outputs(old), _outputs(ref), atol=1e-5)
    # with no args at all, everything but the decoder heads comes from shapes
    cfg = config_from_checkpoint(ckpt["model"], {})
    assert (cfg.d_model, cfg.encoder_layers, cfg.encoder_heads, cfg.decoder_layers, cfg.vocab_size) == (128, 3, 4, 2, 200)
    assert cfg.decoder_heads == 8 and cfg.ctc_layer == 3


def test_mismatched_state_is_a_clear_error(tmp_path):
    ckpt = load_fairseq_checkpoint(FIX / "checkpoint.pt")
    state = dict(ckpt["model"])
    del state["decoder.layers.1.fc2.bias"]
    path = tmp_path / "broken.pt"
    torch.save({"args": argparse.Namespace(**ckpt["args"]), "model": state}, path)
    with pytest.raises(ModelError, match="fc2.bias"):
        load_conformer(path)


def test_hf_folder_mapped_by_structure(tmp_path):
    from safetensors.torch import save_file
    ckpt = load_fairseq_checkpoint(FIX / "checkpoint.pt")
    hf = {}
    for k, v in ckpt["model"].items():
        if k.endswith(".pe") or k.startswith("decoder.version") or "_float_tensor" in k:
            continue
        k = k.replace("encoder.conformer_layers.", "encoder.layers.").replace("decoder.output_projection.weight", "lm_head.weight")
        hf[k if k.startswith("lm_head") else "model." + k] = v.contiguous()
    hf["model.some_extra.scale"] = torch.ones(1)
    folder = tmp_path / "fama-hf"
    folder.mkdir()
    save_file(hf, str(folder / "model.safetensors"))
    (folder / "config.json").write_text(json.dumps({"decoder_attention_heads": 4, "ctc_encoder_layer": 2}))
    net, _, unmapped = load_hf_fama(folder)
    ref, _ = load_conformer(FIX / "checkpoint.pt")
    assert unmapped == ["model.some_extra.scale"]
    assert net.cfg == ref.cfg and torch.equal(_outputs(net), _outputs(ref))
    for name in ("spm_unigram200.model", "spm_unigram200.txt", "config.yaml"):
        shutil.copy(FIX / name, folder / name)
    model = load_fbk_model(folder)          # config.yaml found inside the folder
    assert model.vocab_size == 200


def test_multilingual_joint_ctc_model(tmp_path):
    """A FAMA-like layout: conformer_joint_ctc, <lang:xx> tags, <ctc_blank> appended, config-relative paths."""
    torch.manual_seed(0)
    lines = (FIX / "spm_unigram200.txt").read_text().splitlines() + ["<lang:en> 1", "<lang:it> 1", "▁the 1 #fairseq:overwrite"]
    data = tmp_path / "data"
    data.mkdir()
    (data / "dict.txt").write_text("\n".join(lines) + "\n")
    shutil.copy(FIX / "spm_unigram200.model", data / "spm.model")
    (data / "config.yaml").write_text("vocab_filename: dict.txt\nprepend_tgt_lang_tag: true\n"
                                      "bpe_tokenizer: {bpe: sentencepiece, sentencepiece_model: spm.model}\n"
                                      "transforms: {'*': [utterance_cmvn]}\n")
    d = Dictionary.load(data / "dict.txt")
    V = len(d) + 1
    assert len(d) == 4 + 196 + 2 + 1        # overwrite adds a new entry
    cfg = ConformerConfig(arch="conformer_joint_ctc", d_model=32, encoder_layers=2, encoder_heads=4, decoder_layers=2,
                          decoder_heads=4, decoder_ffn=64, conv_channels=64, ffn_expansion=2, vocab_size=V,
                          ctc_vocab_size=V, ctc_layer=1, aux_lang_layernorm=True)
    ckpt = tmp_path / "ckpt" / "fama_like.pt"
    ckpt.parent.mkdir()
    save_fbk_checkpoint(ConformerModel(cfg).eval(), ckpt)
    model = load_fbk_model(ckpt, config_yaml=data / "config.yaml")
    assert model.vocab_size == V and model.id_to_piece(V - 1) == "<ctc_blank>"
    it = model.forced_prefix("it")
    assert it == [d.indices["<lang:it>"]] and model.id_to_piece(it[0]) == "<lang:it>"
    assert model.forced_prefix(None, src_lang="en") == [d.indices["<lang:en>"]]
    with pytest.raises(ModelError, match="de"):
        model.forced_prefix("de")
    assert model.default_beam_options().unk_penalty == 10000.0
    hyp = model.hypothesis_from_text("the proposal", it)
    assert hyp.prefix_len == 1 and hyp.token_ids[0] == it[0] and hyp.token_ids[-1] == 2
    assert hyp.text == "the proposal" and model.decode_text(hyp.token_ids) == "the proposal"
    feats = torch.randn(50, 80)
    out = model.generate([feats], [it], model.default_beam_options().__class__(beam_size=2, max_len_b=5))
    assert out[0].token_ids[0] == it[0] and len(out[0].token_ids) <= 6
    with pytest.raises(ModelError, match="duplicate"):
        (tmp_path / "dup.txt").write_text("a 1\na 2\n")
        Dictionary.load(tmp_path / "dup.txt")
