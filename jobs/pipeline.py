"""The per-segment pipeline: audio -> hypothesis -> cross-attention -> SM^X -> SM^H -> correlations
(-> deletion and size metrics) -> rows of every Parquet table.

`explain_segment` is the whole computation for one waveform and one model (tensors only);
`SegmentPipeline.process(unit)` adds the corpus, the model cache, timings and the reproducibility
record, and returns one `pyarrow.Table` per result table for the store to commit.
"""
from __future__ import annotations

import hashlib
import os
import socket
import time
from dataclasses import dataclass, field
from typing import Any, Optional, Sequence

import numpy as np
import torch

import xai_core
from models.beam_search import beam_search
from models.interface import BeamOptions, EncoderOutput, Hypothesis, ModelError, SpeechModel

DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16}


@dataclass
class MethodParams:
    """The method parameters one segment needs (a view of the job spec's `method` section)."""

    n_input: int = 20000
    n_encoder: int = 20000
    p_input: float = 0.5
    p_encoder: float = 0.7
    seed: int = 0
    pooling: Sequence[str] = ("2d_max", "2d_avg", "1d_max_1d_avg")
    segments_per_second: Sequence[int] = (400, 500, 600)
    threshold_frames: int = 750
    compactness: float = 0.1
    sigma: float = 0.0
    occlusion: str = "bin_mean"
    p_encoder_sweep: Sequence[float] = ()
    deletion: bool = False
    size: bool = False
    target_reliability: Optional[float] = None
    dtype: str = "float32"
    beam: BeamOptions = field(default_factory=BeamOptions)
    skip: frozenset = frozenset()   # {'input', 'encoder'}

    @classmethod
    def from_spec(cls, method: Any, dtype: str = "float32") -> "MethodParams":
        fields = {f for f in cls.__dataclass_fields__} - {"beam", "skip", "dtype"}
        values = {k: getattr(method, k) for k in fields if hasattr(method, k) and getattr(method, k) is not None}
        beam = getattr(method, "beam", None)
        if beam is not None and not isinstance(beam, BeamOptions):
            beam = BeamOptions(**{k: v for k, v in dict(beam).items() if k in BeamOptions.__dataclass_fields__})
        return cls(**values, dtype=dtype, beam=beam or BeamOptions())


@dataclass
class SegmentExplanation:
    hypothesis: Hypothesis
    n_frames: int
    n_steps: int
    cross_attention: torch.Tensor                 # [L, H, I, T']
    saliency_input: Optional[torch.Tensor]        # [I, T, F]
    saliency_encoder: Optional[torch.Tensor]      # [I, T']
    correlations: list[dict]
    deletion: list[dict]
    size: list[dict]
    timings: dict
    n_masks_input: int = 0
    n_masks_encoder: int = 0
    reliability_input: Optional[float] = None
    reliability_encoder: Optional[float] = None


def _correlation_rows(ca: torch.Tensor, sm: torch.Tensor, rows: slice, target: str, pooling: Optional[str],
                      p: float) -> list[dict]:
    r = xai_core.correlate(ca, sm, rows)
    base = {"target": target, "pooling": pooling, "p": float(p)}
    out = []
    for layer, heads in enumerate(r["per_head"]):
        for head, value in enumerate(heads):
            out.append({**base, "layer": layer, "head": head, "pearson": value})
    out += [{**base, "layer": layer, "head": None, "pearson": v} for layer, v in enumerate(r["per_layer"])]
    out += [{**base, "layer": None, "head": head, "pearson": v} for head, v in enumerate(r["per_head_avg"])]
    out.append({**base, "layer": None, "head": None, "pearson": r["global"]})
    return out


def _decode_texts(model: SpeechModel, enc: EncoderOutput, prefix: list[int], beam: BeamOptions,
                  n_frames: int) -> list[str]:
    results = beam_search(model, enc, [prefix] * enc.states.shape[0], beam, n_frames=[n_frames] * enc.states.shape[0])
    texts = []
    for r in results:
        content = r.tokens[len(prefix):]
        if content and content[-1] == model.eos:
            content = content[:-1]
        texts.append(model.decode_text(content))
    return texts


def deletion_rows(model: SpeechModel, features: torch.Tensor, enc: EncoderOutput, hyp: Hypothesis,
                  prefix: list[int], maps: dict[str, torch.Tensor], encoder_maps: dict[str, torch.Tensor],
                  params: MethodParams, reference: str) -> list[dict]:
    """Deletion curves (METHOD.md §5): for each explanation, delete the top 0..100 % of frames
    (cells for full-resolution SM^X; encoder states on the encoder side) and decode again."""
    rows = []
    n_frames = features.shape[0]
    content = hyp.content_rows()
    for name, token_map in maps.items():
        m = token_map[content]
        if name == "sm_x_full":
            order = xai_core.deletion_order(xai_core.sentence_map(m))
        else:
            order = xai_core.frame_order(m, n_frames, model.subsampling)
        inputs = xai_core.deletion_inputs(features, order, occlusion=params.occlusion)
        texts = []
        for chunk in inputs.split(8):
            lengths = torch.full((chunk.shape[0],), n_frames, dtype=torch.long, device=chunk.device)
            texts += _decode_texts(model, model.encode(chunk, lengths), prefix, params.beam, n_frames)
        rows += [{"explanation": name, "side": "input", "percent": int(pct), "hypothesis": t, "reference": reference}
                 for pct, t in zip(xai_core.PERCENTAGES, texts)]
    valid = int(enc.lengths[0])
    for name, token_map in encoder_maps.items():
        order = xai_core.deletion_order(xai_core.sentence_map(token_map[content]))
        keep = xai_core.encoder_deletion_masks(order, valid_length=valid)       # [P, T'valid]
        states = enc.states[0, :valid]
        full = enc.states.expand(keep.shape[0], -1, -1).clone()
        full[:, :valid] = torch.where(keep[:, :, None], states, torch.zeros_like(states))
        texts = _decode_texts(model, EncoderOutput(full, enc.lengths.expand(keep.shape[0]).clone()), prefix,
                              params.beam, n_frames)
        rows += [{"explanation": name, "side": "encoder", "percent": int(pct), "hypothesis": t, "reference": reference}
                 for pct, t in zip(xai_core.PERCENTAGES, texts)]
    return rows


def explain_segment(model: SpeechModel, features: torch.Tensor, prefix: list[int], params: MethodParams,
                    segment_key: str, reference: str = "") -> SegmentExplanation:
    """Everything the paper computes for one utterance (features [T, F] on the model's device)."""
    timings = {}
    t0 = time.perf_counter()
    n_frames = int(features.shape[0])
    with torch.inference_mode():
        (hyp,) = model.generate([features], [prefix], params.beam)
        lengths = torch.tensor([n_frames], device=features.device)
        enc = model.encode(features[None], lengths)
        ref_log_probs = model.teacher_forced_log_probs(enc, hyp)[0].float()
        ca = model.cross_attention(features, hyp).float()
    n_steps = int(enc.lengths[0])
    timings["decode"] = time.perf_counter() - t0
    rows = hyp.content_rows()
    if rows.stop - rows.start < 1:
        raise ModelError(f"segment {segment_key}: the hypothesis has no content token to explain "
                         f"(hypothesis {hyp.text!r})")
    dtype = DTYPES[params.dtype]
    correlations: list[dict] = []
    smx = smh = None
    est_x = est_h = None

    if "input" not in params.skip:
        t0 = time.perf_counter()
        est_x = xai_core.input_saliency(
            model.input_scorer(hyp, n_frames, dtype), features, ref_log_probs, n_masks=params.n_input,
            p=params.p_input, segments_per_second=params.segments_per_second, threshold_frames=params.threshold_frames,
            compactness=params.compactness, sigma=params.sigma, occlusion=params.occlusion, seed=params.seed,
            segment_key=segment_key, target_reliability=params.target_reliability)
        smx = est_x.saliency()
        timings["input"] = time.perf_counter() - t0
        for pooling in params.pooling:
            pooled = xai_core.pool_input_saliency(smx, model.subsampling, pooling, n_steps=n_steps)
            correlations += _correlation_rows(ca, pooled, rows, "input", pooling, params.p_input)

    encoder_estimates = {}
    if "encoder" not in params.skip:
        t0 = time.perf_counter()
        states = enc.states[0]
        for p in [params.p_encoder, *[q for q in params.p_encoder_sweep if q != params.p_encoder]]:
            est = xai_core.encoder_saliency(
                model.encoder_scorer(states, hyp, dtype), states, ref_log_probs, n_masks=params.n_encoder, p=p,
                seed=params.seed, segment_key=segment_key, valid_length=n_steps,
                target_reliability=params.target_reliability)
            encoder_estimates[p] = est
            sm = est.saliency()[:, :n_steps]
            correlations += _correlation_rows(ca, sm, rows, "encoder", None, p)
        est_h = encoder_estimates[params.p_encoder]
        smh = est_h.saliency()[:, :n_steps]
        timings["encoder"] = time.perf_counter() - t0

    deletion: list[dict] = []
    size: list[dict] = []
    if params.deletion or params.size:
        t0 = time.perf_counter()
        ca_global = xai_core.aggregate_attention(ca)
        maps, encoder_maps = {"ca": ca_global}, {}
        if smx is not None:
            maps["sm_x_full"] = smx
            maps["sm_x_agg"] = xai_core.pool_input_saliency(smx, model.subsampling, params.pooling[0], n_steps=n_steps)
        if smh is not None:
            encoder_maps["sm_h"] = smh
        if params.deletion:
            with torch.inference_mode():
                deletion = deletion_rows(model, features, enc, hyp, prefix, maps, encoder_maps, params, reference)
        if params.size:
            for name, m in {**maps, **encoder_maps}.items():
                curve = xai_core.size_curve(m[rows])
                size += [{"explanation": name, "threshold": float(t), "share": float(s)}
                         for t, s in zip(xai_core.SIZE_THRESHOLDS, curve)]
        timings["metrics"] = time.perf_counter() - t0

    return SegmentExplanation(
        hypothesis=hyp, n_frames=n_frames, n_steps=n_steps, cross_attention=ca, saliency_input=smx,
        saliency_encoder=smh, correlations=correlations, deletion=deletion, size=size, timings=timings,
        n_masks_input=est_x.n_masks_used if est_x is not None else 0,
        n_masks_encoder=est_h.n_masks_used if est_h is not None else 0,
        reliability_input=est_x.reliability(rows) if est_x is not None else None,
        reliability_encoder=est_h.reliability(rows) if est_h is not None else None)


def file_checksum(path: str, limit: int = 1 << 62) -> str:
    """sha256 of a file (first `limit` bytes) for the reproducibility record."""
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while chunk := f.read(1 << 20):
            h.update(chunk)
    return h.hexdigest()[:16]


def worker_name() -> str:
    return f"{socket.gethostname()}:{os.getpid()}"
