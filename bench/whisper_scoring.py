"""Teacher-forced scoring throughput of Whisper (the inner loop of SM^X and SM^H).

    python -m bench.whisper_scoring [--model whisper-base] [--batch 16] [--input-batch 4] [--wav FILE] [--threads N]

Prints sequences/s for the encoder scorer (decoder only: SM^H) and the input scorer (encoder +
decoder: SM^X) in float32 and bfloat16, and the bf16-vs-fp32 log-prob differences.
"""
from __future__ import annotations

import argparse
import subprocess
import tempfile
import time
from pathlib import Path

import torch

SENTENCE = "The committee approved the report on the common agricultural policy yesterday evening."


def _clip(wav: str | None) -> torch.Tensor:
    from models.audio import load_audio
    if wav:
        return torch.from_numpy(load_audio(wav))
    with tempfile.TemporaryDirectory() as tmp:
        path = Path(tmp) / "clip.wav"
        subprocess.run(["espeak-ng", "-v", "en", "-w", str(path), SENTENCE], check=True, capture_output=True)
        return torch.from_numpy(load_audio(path))


def _rate(fn, arg, repeats: int) -> float:
    fn(arg[:1])  # warm-up
    start = time.perf_counter()
    for _ in range(repeats):
        fn(arg)
    return repeats * arg.shape[0] / (time.perf_counter() - start)


def main(argv: list[str] | None = None) -> dict:
    from models.registry import load_model
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default="whisper-base")
    parser.add_argument("--batch", type=int, default=16, help="keep masks per encoder-scorer call")
    parser.add_argument("--input-batch", type=int, default=4, help="perturbed inputs per input-scorer call")
    parser.add_argument("--repeats", type=int, default=2)
    parser.add_argument("--wav", default=None, help="audio to use (default: an espeak-ng sentence)")
    parser.add_argument("--threads", type=int, default=None, help="torch intra-op threads (default: torch's)")
    args = parser.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)

    model = load_model(args.model)
    wave = _clip(args.wav)
    hyp = model.transcribe(wave, "en")
    feats = model.features(wave)
    n = feats.shape[0]
    enc = model.encode(feats[None], torch.tensor([n]))
    steps = int(enc.lengths[0])
    gen = torch.Generator().manual_seed(0)
    keep = torch.rand(args.batch, steps, generator=gen) > 0.7
    occluded = torch.where(torch.rand(args.input_batch, *feats.shape, generator=gen) < 0.5, feats.mean(0), feats)
    print(f"{args.model}: {n} frames ({n / 100:.2f} s), {hyp.num_tokens} tokens, text {hyp.text!r}, "
          f"torch threads {torch.get_num_threads()}")

    results = {}
    outputs = {}
    for dtype in (torch.float32, torch.bfloat16):
        name = str(dtype).replace("torch.", "")
        enc_scorer = model.encoder_scorer(enc.states[0], hyp, dtype)
        in_scorer = model.input_scorer(hyp, n, dtype)
        results[f"encoder_scorer_{name}"] = _rate(enc_scorer, keep, args.repeats)
        results[f"input_scorer_{name}"] = _rate(in_scorer, occluded, 1)
        outputs[name] = (enc_scorer(keep), in_scorer(occluded))
        print(f"  {name:9s} encoder scorer (SM^H) {results[f'encoder_scorer_{name}']:7.2f} seq/s (batch {args.batch})   "
              f"input scorer (SM^X) {results[f'input_scorer_{name}']:6.2f} seq/s (batch {args.input_batch})")

    rows, ids = torch.arange(hyp.num_tokens), torch.tensor(hyp.token_ids)
    for i, kind in enumerate(("encoder_scorer", "input_scorer")):
        a, b = outputs["float32"][i], outputs["bfloat16"][i]
        full = (a - b).abs().max().item()
        on_hyp = (a[:, rows, ids] - b[:, rows, ids]).abs().max().item()
        kl = (a.exp() * (a - b)).sum(-1)            # KL(fp32 || bf16) per token, nats
        results[f"{kind}_bf16_max_abs_logp"] = full
        results[f"{kind}_bf16_max_abs_logp_hyp"] = on_hyp
        results[f"{kind}_bf16_mean_kl"] = kl.mean().item()
        print(f"  bf16 vs fp32, {kind}: max |dlogp| {full:.4f} (full vocabulary), {on_hyp:.4f} (hypothesis tokens); "
              f"KL(fp32||bf16) mean {kl.mean().item():.2e}, max {kl.max().item():.2e} nats")
    return results


if __name__ == "__main__":
    main()
