"""`xs2t bench`: throughput of the SM^X and SM^H loops against the device's own matmul rate.

Everything is measured in one process on one device, interleaved: each round measures the fp32
and bf16 matmul rates, the optimized SM^X loop, the optimized SM^H loop and (unless skipped) the
naive loops; the figures reported are medians over rounds (other jobs on a shared machine make
single timings noisy, and interleaving exposes the loops and the matmul reference to the same load).
"""
from __future__ import annotations

import math
import time
from dataclasses import dataclass
from typing import Callable, Iterable, Optional

import torch

from bench import hardware as hw
from bench.flops import counted_flops
from bench.fused import FusedKL, current_kl, output_weight
from bench.naive import naive_batch_size, naive_encoder_saliency, naive_input_saliency
from bench.workloads import Workload, build, input_scorer, paper_workload_hours
from xai_core import encoder_saliency, input_saliency, segment_counts, superpixels

FLOP_MODEL = ("2*m*n*k per matmul (attention score and context products included, causal ones over the full "
              "square) and per convolution (2*out_positions*in_channels/groups*kernel*out_channels); parts: encoder "
              "(SM^X only), cross-attention K/V projection of the T' states (SM^X only), decoder layers, vocabulary "
              "projection; elementwise work (norms, softmax, KL) not counted")
PAPER = dict(segments=1130, audio_hours=3.0, n_masks=20000)


@dataclass
class BenchConfig:
    n_masks: Optional[int] = None            # SM^X masks per timing (default: by device)
    n_masks_encoder: Optional[int] = None    # SM^H masks per timing (default: by device)
    n_naive: Optional[int] = None            # masks per naive timing
    dtype: str = "auto"
    device: str = "auto"
    repeats: int = 3
    skip_naive: bool = False
    batch_size: Optional[int] = None         # None: xai_core's memory-based choice
    budgets_gb: tuple[float, ...] = (40.0, 80.0)


def _defaults(cfg: BenchConfig, name: str, device: torch.device) -> tuple[int, int, int]:
    gpu = device.type == "cuda"
    heavy = name in ("whisper-base", "fama-small")
    # CPU defaults keep a run within minutes on a 2-core machine; GPUs get stable sample sizes
    n_x = cfg.n_masks or (1024 if gpu else (8 if name == "fama-small" else 16 if heavy else 32))
    n_h = cfg.n_masks_encoder or cfg.n_masks or (4096 if gpu else 128 if name == "fama-small" else 512)
    n_naive = cfg.n_naive or (64 if gpu else 4 if name == "fama-small" else 6 if heavy else 8)
    return n_x, n_h, n_naive


class _BatchProbe:
    """Wraps a scorer to record the largest batch it was called with."""

    def __init__(self, scorer: Callable):
        self.scorer, self.max_batch = scorer, 0

    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        self.max_batch = max(self.max_batch, int(x.shape[0]))
        return self.scorer(x)


def _per_mask_counted(scorer: Callable, one: torch.Tensor) -> float:
    """FLOPs dispatched per extra mask (a 2-mask call minus a 1-mask call; per-call constants cancel)."""
    with torch.inference_mode():
        f1 = counted_flops(lambda: scorer(one))
        f2 = counted_flops(lambda: scorer(torch.cat([one, one])))
    return f2 - f1


def _memory(run_masks: Callable[[int], object], model) -> tuple[int, int, int]:
    """(bytes per mask, per-batch fixed bytes, weight bytes) of a loop, from the peak live tensor
    bytes of one 4-mask and one 12-mask batch (smaller batches can peak outside the per-mask part)."""
    peak1 = hw.peak_bytes(lambda: run_masks(4), model.device)
    peak3 = hw.peak_bytes(lambda: run_masks(12), model.device)
    per_mask = max(1, (peak3 - peak1) // 8)
    net = getattr(model, "net", None) or getattr(model, "model", None)
    weights = sum(p.numel() * p.element_size() for p in net.parameters()) if net is not None else 0
    return int(per_mask), int(max(0, peak1 - 4 * per_mask)), int(weights)


def _fits(budget_gb: float, per_mask: int, fixed: int, weights: int) -> int:
    return max(0, int((budget_gb * 1e9 * 0.9 - weights - fixed) // per_mask))   # 10 % for the allocator


def run_workload(w: Workload, cfg: BenchConfig, log: Callable[[str], None] = print) -> list[dict]:
    device, model = w.model.device, w.model
    dtype = hw.pick_dtype(cfg.dtype, device)
    n_x, n_h, n_naive = _defaults(cfg, w.name, device)
    n_frames = w.features.shape[0]
    features = w.features.to(device)

    t0 = time.perf_counter()
    label_maps = superpixels(features, segment_counts(n_frames), segment_key=w.name)
    slic_s = time.perf_counter() - t0

    sx = _BatchProbe(input_scorer(w, dtype))
    sh = _BatchProbe(model.encoder_scorer(w.states, w.hyp, dtype))

    def loop_x(n: int, batch_size=cfg.batch_size):
        return input_saliency(sx, features, w.ref_log_probs, n_masks=n, label_maps=label_maps,
                              batch_size=batch_size, segment_key=w.name)

    def loop_h(n: int, batch_size=cfg.batch_size):
        return encoder_saliency(sh, w.states, w.ref_log_probs, n_masks=n, valid_length=w.valid_steps,
                                batch_size=batch_size, segment_key=w.name)

    log(f"[{w.name}] FLOP cross-check and memory probe ...")
    counted_x = _per_mask_counted(sx, features[None])
    counted_h = _per_mask_counted(sh, torch.ones(1, w.valid_steps, dtype=torch.bool, device=device))
    mem_x = _memory(lambda b: loop_x(b, b), model)
    mem_h = _memory(lambda b: loop_h(b, b), model)

    log(f"[{w.name}] warm-up ...")
    loop_x(min(n_x, 8)), loop_h(min(n_h, 64))
    sx.max_batch = sh.max_batch = 0
    naive_batch = naive_batch_size(n_frames, n_naive)
    if not cfg.skip_naive:
        naive_input_saliency(model, features, w.hyp, w.ref_log_probs, label_maps, 1)

    # the vocabulary side alone (logits -> KL), current path vs the fused proposal (bench/fused.py)
    weight = output_weight(model).detach()
    vocab_b = 32
    hidden = torch.randn(vocab_b, w.hyp.num_tokens, weight.shape[1], generator=torch.Generator().manual_seed(0)).to(device)
    p_ref = w.ref_log_probs.float().exp()
    log_p_ref = torch.where(p_ref > 0, w.ref_log_probs.float(), torch.zeros_like(p_ref))
    fused = FusedKL(weight, w.ref_log_probs, dtype)

    rates: dict[str, list[float]] = {k: [] for k in ("mm32", "mm16", "x", "h", "nx", "nh", "kl", "klf")}
    for r in range(cfg.repeats):
        rates["mm32"].append(hw.matmul_gflops(device, torch.float32))
        rates["mm16"].append(hw.matmul_gflops(device, torch.bfloat16) if hw.bf16_supported(device) else float("nan"))
        rates["x"].append(n_x / hw.timed(lambda: loop_x(n_x), device))
        rates["h"].append(n_h / hw.timed(lambda: loop_h(n_h), device))
        if not cfg.skip_naive:
            rates["nx"].append(n_naive / hw.timed(lambda: naive_input_saliency(
                model, features, w.hyp, w.ref_log_probs, label_maps, n_naive), device))
            rates["nh"].append(n_naive / hw.timed(lambda: naive_encoder_saliency(
                model, features, w.hyp, w.ref_log_probs, w.valid_steps, n_naive), device))
        with torch.inference_mode():
            rates["kl"].append(1000 * hw.timed(lambda: current_kl(hidden, weight, p_ref, log_p_ref, dtype), device) / vocab_b)
            rates["klf"].append(1000 * hw.timed(lambda: fused(hidden), device) / vocab_b)
        log(f"[{w.name}] round {r + 1}/{cfg.repeats}: SM^X {rates['x'][-1]:.2f} masks/s, SM^H {rates['h'][-1]:.1f} masks/s, "
            f"matmul bf16 {rates['mm16'][-1]:.0f} GFLOP/s")
    med = {k: hw.median(v) for k, v in rates.items()}

    records = []
    for loop, key, nkey, flops, counted, mem, n, probe in (
            ("input", "x", "nx", w.flops_input, counted_x, mem_x, n_x, sx),
            ("encoder", "h", "nh", w.flops_encoder, counted_h, mem_h, n_h, sh)):
        mps = med[key]
        achieved = mps * flops.total / 1e9
        peak = med["mm16"] if dtype == torch.bfloat16 else med["mm32"]
        naive = med[nkey] if not cfg.skip_naive else None
        per_mask, fixed, weights = mem
        records.append(dict(
            workload=w.name, loop=loop, device=hw.device_name(device), device_type=device.type,
            dtype=str(dtype).replace("torch.", ""), n_masks=n, repeats=cfg.repeats, batch_size=probe.max_batch,
            masks_per_s=mps, masks_per_s_rounds=rates[key], ms_per_mask=1000.0 / mps if mps else None,
            gflop_per_mask=flops.total / 1e9, flop_breakdown_gflop=flops.gflops(), counted_gflop_per_mask=counted / 1e9,
            achieved_gflops=achieved, matmul_fp32_gflops=med["mm32"], matmul_bf16_gflops=med["mm16"],
            ratio_to_peak=achieved / peak if peak and not math.isnan(peak) else None,
            naive_masks_per_s=naive, naive_n_masks=None if naive is None else n_naive,
            naive_batch_size=None if naive is None else naive_batch,
            speedup_vs_naive=mps / naive if naive else None,
            slic_s=slic_s if loop == "input" else 0.0,
            paper_workload_hours=paper_workload_hours(mps, PAPER["n_masks"], PAPER["segments"],
                                                      slic_s if loop == "input" else 0.0),
            vocab_kl_ms_per_mask=med["kl"], vocab_kl_fused_ms_per_mask=med["klf"],
            bytes_per_mask=per_mask, fixed_bytes=fixed, weight_bytes=weights,
            **{f"batch_fit_{int(b)}gb": _fits(b, per_mask, fixed, weights) for b in cfg.budgets_gb},
            utterance_s=w.seconds, n_frames=n_frames, n_tokens=w.hyp.num_tokens, vocab=model.vocab_size,
            flop_model=FLOP_MODEL, notes=list(w.notes)))
    return records


def run(names: Iterable[str], cfg: BenchConfig, log: Callable[[str], None] = print) -> list[dict]:
    device = hw.pick_device(cfg.device)
    out = []
    for name in names:
        log(f"[{name}] building on {device} ...")
        out.extend(run_workload(build(name, device), cfg, log))
    return out


def format_table(records: list[dict]) -> str:
    """Human-readable summary of `run` records."""
    lines = []
    for r in records:
        if r["loop"] == "input":
            lines.append(f"\n== {r['workload']} on {r['device']} ({r['dtype']}) — " + "; ".join(r["notes"]))
            b = r["flop_breakdown_gflop"]
            lines.append(f"   FLOP model per SM^X mask: encoder {b['encoder']:.2f} + K/V proj {b['kv_projection']:.2f} "
                         f"+ decoder {b['decoder']:.2f} + vocab proj {b['vocab_projection']:.2f} = {b['total']:.2f} GFLOP "
                         f"(counted by torch: {r['counted_gflop_per_mask']:.2f})")
            lines.append(f"   matmul rate: fp32 {r['matmul_fp32_gflops']:.0f} GFLOP/s, bf16 {r['matmul_bf16_gflops']:.0f} GFLOP/s; "
                         f"SLIC {r['slic_s']:.2f} s per utterance")
        name = "SM^X (input)  " if r["loop"] == "input" else "SM^H (encoder)"
        ratio = f"{100 * r['ratio_to_peak']:.0f}%" if r["ratio_to_peak"] is not None else "n/a"
        naive = (f"naive {r['naive_masks_per_s']:.3g} masks/s -> x{r['speedup_vs_naive']:.1f}"
                 if r["naive_masks_per_s"] else "naive skipped")
        fits = ", ".join(f"{k[10:]}: {v}" for k, v in r.items() if k.startswith("batch_fit_"))
        lines.append(f"   {name} {r['masks_per_s']:8.2f} masks/s  {r['gflop_per_mask']:7.3f} GFLOP/mask  "
                     f"{r['achieved_gflops']:6.0f} GFLOP/s = {ratio} of {r['dtype']} matmul  batch {r['batch_size']}  {naive}")
        lines.append(f"   {'':14} paper workload (1,130 segments, 20,000 masks): {r['paper_workload_hours']:.1f} h;  "
                     f"{r['bytes_per_mask'] / 2**20:.1f} MiB/mask, batch that fits {fits}")
        if r["loop"] == "encoder":
            lines.append(f"   {'':14} vocab side (logits -> log-softmax -> KL) {r['vocab_kl_ms_per_mask']:.2f} ms/mask = "
                         f"{r['vocab_kl_ms_per_mask'] * r['masks_per_s'] / 10:.0f}% of the SM^H loop; fused proposal "
                         f"{r['vocab_kl_fused_ms_per_mask']:.2f} ms/mask")
    lines.append("\nFLOP model: " + FLOP_MODEL)
    return "\n".join(lines)
