"""`xs2t bench`: a quick run on the tiny FBK fixture gives every field, and the FLOP model agrees with
the FLOPs torch actually dispatches."""
from __future__ import annotations

import json
import math

import torch
from typer.testing import CliRunner

from bench.flops import counted_flops, whisper_flops
from jobs.cli import app

FIELDS = ("workload", "loop", "device", "dtype", "masks_per_s", "achieved_gflops", "matmul_fp32_gflops",
          "matmul_bf16_gflops", "ratio_to_peak", "naive_masks_per_s", "speedup_vs_naive", "paper_workload_hours",
          "batch_size", "gflop_per_mask", "counted_gflop_per_mask", "bytes_per_mask", "batch_fit_40gb", "batch_fit_80gb",
          "flop_model", "vocab_kl_ms_per_mask", "vocab_kl_fused_ms_per_mask")


def test_bench_json_smoke():
    result = CliRunner().invoke(app, ["bench", "--workload", "fbk-tiny", "--n-masks", "6", "--n-masks-encoder", "16",
                                      "--n-naive", "3", "--repeats", "1", "--json"])
    assert result.exit_code == 0, result.output
    records = [json.loads(line) for line in result.stdout.splitlines() if line.startswith("{")]
    assert [r["loop"] for r in records] == ["input", "encoder"]
    for r in records:
        missing = [k for k in FIELDS if k not in r]
        assert not missing, missing
        assert r["workload"] == "fbk-tiny" and r["dtype"] == "bfloat16"
        for k in ("masks_per_s", "achieved_gflops", "matmul_fp32_gflops", "matmul_bf16_gflops", "naive_masks_per_s",
                  "paper_workload_hours", "bytes_per_mask"):
            assert r[k] > 0 and math.isfinite(r[k]), (k, r[k])
        assert abs(r["achieved_gflops"] / (r["masks_per_s"] * r["gflop_per_mask"]) - 1) < 1e-9
        assert abs(r["ratio_to_peak"] - r["achieved_gflops"] / r["matmul_bf16_gflops"]) < 1e-9
        assert abs(r["speedup_vs_naive"] - r["masks_per_s"] / r["naive_masks_per_s"]) < 1e-9
        assert 1 <= r["batch_size"] <= (6 if r["loop"] == "input" else 16)
        # the analytic FLOP model matches what torch dispatches per mask (within 2 %)
        assert abs(r["counted_gflop_per_mask"] / r["gflop_per_mask"] - 1) < 0.02, r
    x, h = records
    assert x["flop_breakdown_gflop"]["encoder"] > 0 and h["flop_breakdown_gflop"]["encoder"] == 0
    assert h["gflop_per_mask"] < x["gflop_per_mask"]
    # 20,000 masks x 1,130 segments at the measured rate (+ SLIC per segment for SM^X)
    assert abs(h["paper_workload_hours"] - 1130 * 20000 / h["masks_per_s"] / 3600) < 1e-6


def test_whisper_flop_model_matches_dispatch():
    from models.whisper.model import Whisper, WhisperDims

    dims = WhisperDims(n_mels=80, n_audio_ctx=150, n_audio_state=64, n_audio_head=4, n_audio_layer=2,
                       n_vocab=500, n_text_ctx=32, n_text_state=64, n_text_head=4, n_text_layer=2)
    torch.manual_seed(0)
    model = Whisper(dims).eval()
    mel, tokens = torch.randn(1, 80, 300), torch.randint(0, 500, (1, 7))
    with torch.inference_mode():
        states = model.encoder(mel)
        kv = model.decoder.cross_kv(states)
        enc = counted_flops(lambda: model.encoder(mel))
        kv_counted = counted_flops(lambda: model.decoder.cross_kv(states))
        dec = counted_flops(lambda: model.decoder(tokens, kv))
        vocab = counted_flops(lambda: model.decoder.logits(torch.randn(1, 7, 64)))
    x, h = whisper_flops(dims, n_tokens=7)
    assert abs(enc / x.encoder - 1) < 0.01
    assert abs(kv_counted / x.kv_projection - 1) < 0.01
    assert abs(dec / x.decoder - 1) < 0.01
    assert abs(vocab / x.vocab_projection - 1) < 0.01
    assert h.total == x.decoder + x.vocab_projection


def test_fused_kl_equals_log_softmax_kl():
    from bench.fused import FusedKL, current_kl

    torch.manual_seed(0)
    weight = torch.randn(3000, 48) * 0.3
    ref = torch.log_softmax(torch.randn(6, 48) @ weight.T, -1)
    p = ref.exp()
    log_p = torch.where(p > 0, ref, torch.zeros_like(ref))
    hidden = torch.randn(5, 6, 48)
    direct = current_kl(hidden, weight, p, log_p, torch.float32)
    assert direct.min() > 0.1
    assert torch.allclose(FusedKL(weight, ref, torch.float32)(hidden), direct, atol=1e-4)
