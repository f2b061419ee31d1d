"""The per-segment pipeline: audio -> hypothesis -> cross-attention -> SM^X -> SM^H -> correlations
(-> deletion and size metrics) -> rows of every Parquet table.

`explain_segment` is the whole computation for one waveform and one model (tensors only);
`SegmentPipeline.process(unit)` adds the corpus, the model cache, timings and the reproducibility
record, and returns one `pyarrow.Table` per result table for the store to commit.
"""
from __future__ import annotations

import hashlib
import os
import time
from pathlib import Path
from dataclasses import dataclass, field
from typing import Any, Optional, Sequence

import torch

import xai_core
from models.beam_search import beam_search
from jobs.units import worker_name
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


def _reference(scorer, unperturbed: torch.Tensor, fp32_log_probs: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """P of the KL score. In float32 it is the teacher-forced pass; in reduced precision the
    scorer's own unperturbed output, so rounding alone adds no KL to every mask."""
    if dtype == torch.float32:
        return fp32_log_probs
    with torch.inference_mode():
        return scorer(unperturbed)[0].float()


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
        with model.perturbation_context(features):
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
        scorer = model.input_scorer(hyp, n_frames, dtype)
        est_x = xai_core.input_saliency(
            scorer, features, _reference(scorer, features[None], ref_log_probs, dtype), n_masks=params.n_input,
            p=params.p_input, segments_per_second=params.segments_per_second, threshold_frames=params.threshold_frames,
            compactness=params.compactness, sigma=params.sigma, occlusion=params.occlusion, seed=params.seed,
            segment_key=segment_key, target_reliability=params.target_reliability,
            reliability_rows=rows, reliability_subsampling=model.subsampling)
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
            scorer_h = model.encoder_scorer(states, hyp, dtype)
            keep_all = torch.ones(1, states.shape[0], dtype=torch.bool, device=states.device)
            est = xai_core.encoder_saliency(
                scorer_h, states, _reference(scorer_h, keep_all, ref_log_probs, dtype), n_masks=params.n_encoder, p=p,
                seed=params.seed, segment_key=segment_key, valid_length=n_steps,
                target_reliability=params.target_reliability, reliability_rows=rows)
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
        reliability_input=est_x.reliability(rows, subsampling=model.subsampling) if est_x is not None else None,
        reliability_encoder=est_h.reliability(rows) if est_h is not None else None)


def model_checksum(model: SpeechModel) -> Optional[str]:
    """sha256 of the model's weights, for the reproducibility record (first 16 hex digits)."""
    if hasattr(model, "checksum"):
        return model.checksum()[:16]
    path = getattr(model, "checkpoint_path", None)
    if not path:
        return None
    files = sorted(str(p) for p in Path(path).glob("*") if p.suffix in (".safetensors", ".bin", ".pt")) \
        if os.path.isdir(path) else [path]
    h = hashlib.sha256()
    for name in files:
        with open(name, "rb") as f:
            while chunk := f.read(1 << 22):
                h.update(chunk)
    return h.hexdigest()[:16]


_TASK_TOKENS = {"asr": "transcribe", "st": "translate"}


class SegmentPipeline:
    """Per-worker processor: loads each model once, then turns work units into result tables."""

    def __init__(self, spec: Any, device: str = "cpu", threads: Optional[int] = None):
        self.spec = spec
        self.device = device
        if threads:
            torch.set_num_threads(max(1, int(threads)))
        self._models: dict[str, tuple[SpeechModel, Optional[str]]] = {}
        self._model_specs = {m.key: m for m in spec.models}
        self._params = {m.key: MethodParams.from_spec(spec.method, dtype=m.dtype) for m in spec.models}
        from jobs.spec import code_version
        import skimage

        self._record = {"code_version": code_version(), "torch_version": torch.__version__,
                        "skimage_version": skimage.__version__}

    @classmethod
    def standalone(cls, models: list[dict], params: MethodParams, device: str = "cpu") -> "SegmentPipeline":
        """A pipeline without a job file (xs2t explain): model dicts and method parameters given directly."""
        from types import SimpleNamespace

        self = cls.__new__(cls)
        self.spec, self.device = None, device
        self._models = {}
        self._model_specs = {m["key"]: SimpleNamespace(**{**m, "dict_path": m.get("dict"), "lang": None, "task": None})
                             for m in models}
        self._params = {m["key"]: params for m in models}
        import skimage
        from jobs.spec import code_version

        self._record = {"code_version": code_version(), "torch_version": torch.__version__,
                        "skimage_version": skimage.__version__}
        return self

    def model(self, key: str) -> tuple[SpeechModel, Optional[str]]:
        if key not in self._models:
            from models.registry import load_model

            m = self._model_specs[key]
            kwargs = {k: v for k, v in (("spm", m.spm), ("dict", m.dict_path), ("config_yaml", m.config_yaml)) if v}
            model = load_model(m.name_or_path, device=self.device, **kwargs)
            self._models[key] = (model, model_checksum(model))
        return self._models[key]

    def process(self, unit: Any) -> dict:
        """All result tables of one unit (raises with a message naming segment, file and reason)."""
        from jobs import schema
        from jobs.corpus import load_segment_audio
        from jobs.explain import prepare_features

        t_start = time.perf_counter()
        seg = unit.segment
        mspec = self._model_specs[unit.model_key]
        params = self._params[unit.model_key]
        model, checksum = self.model(unit.model_key)
        wave = load_segment_audio(seg)
        source = f"segment {seg.segment_id} ({seg.audio_path})"
        try:
            features = prepare_features(model, wave, source)
        except ModelError as exc:
            raise ModelError(str(exc) if str(exc).startswith(source) else f"{source}: {exc}") from None
        task = mspec.task or _TASK_TOKENS[unit.task]
        out_lang = mspec.lang or unit.out_lang
        prefix = model.forced_prefix(lang=out_lang, task=task, src_lang=seg.src_lang)
        ex = explain_segment(model, features, prefix, params, segment_key=seg.segment_id,
                             reference=seg.reference or "")
        hyp = ex.hypothesis
        uid = unit.unit_id
        levels = xai_core.split_masks(params.n_input, len(params.segments_per_second)) if params.n_input else []
        seg_row = schema.segments_row(
            unit_id=uid, segment_id=seg.segment_id, model=unit.model_key, task=unit.task, corpus=seg.corpus,
            split=seg.split, src_lang=seg.src_lang, tgt_lang=seg.tgt_lang, shard=unit.shard,
            audio_path=seg.audio_path, start_s=seg.start_s, end_s=seg.end_s, duration_s=len(wave) / 16000.0,
            n_frames=ex.n_frames, n_steps=ex.n_steps, reference=seg.reference, source_text=seg.source_text,
            hypothesis=hyp.text, hyp_tokens=hyp.tokens, hyp_token_ids=hyp.token_ids,
            hyp_token_log_probs=hyp.token_log_probs, prefix_len=hyp.prefix_len, attempts=max(1, unit.attempts),
            worker=worker_name(), t_decode_s=ex.timings.get("decode"), t_input_s=ex.timings.get("input"),
            t_encoder_s=ex.timings.get("encoder"), t_total_s=time.perf_counter() - t_start,
            n_masks_input=ex.n_masks_input, n_masks_encoder=ex.n_masks_encoder,
            reliability_input=ex.reliability_input, reliability_encoder=ex.reliability_encoder,
            seed=params.seed, p_input=params.p_input, p_encoder=params.p_encoder,
            level_split=",".join(str(n) for n in levels), occlusion=params.occlusion,
            pooling=params.pooling[0], dtype=params.dtype, device=str(model.device), model_checksum=checksum,
            **self._record)
        ca = ex.cross_attention
        n_layers, n_heads, n_tokens, n_steps = ca.shape
        tables = {
            "segments": schema.table_from_rows("segments", [seg_row]),
            "cross_attention": schema.table_from_rows("cross_attention", [
                {"unit_id": uid, "layer": l, "head": h, "n_tokens": n_tokens, "n_steps": n_steps,
                 "weights": ca[l, h].reshape(-1).tolist()} for l in range(n_layers) for h in range(n_heads)]),
        }
        tokens = hyp.tokens
        if ex.saliency_input is not None:
            smx = ex.saliency_input.float().cpu().numpy()
            tables["saliency_input"] = schema.table_from_rows("saliency_input", [
                {"unit_id": uid, "token_index": i, "token": tokens[i], "n_frames": smx.shape[1],
                 "n_bins": smx.shape[2], "values": smx[i].reshape(-1)} for i in range(smx.shape[0])])
        if ex.saliency_encoder is not None:
            smh = ex.saliency_encoder.float().cpu().numpy()
            tables["saliency_encoder"] = schema.table_from_rows("saliency_encoder", [
                {"unit_id": uid, "token_index": i, "token": tokens[i], "n_steps": smh.shape[1],
                 "values": smh[i]} for i in range(smh.shape[0])])
        common = {"unit_id": uid, "segment_id": seg.segment_id, "model": unit.model_key, "task": unit.task,
                  "src_lang": seg.src_lang, "tgt_lang": seg.tgt_lang}
        tables["correlations"] = schema.table_from_rows("correlations", [{**common, **r} for r in ex.correlations])
        if ex.deletion:
            tables["deletion"] = schema.table_from_rows("deletion", [{"unit_id": uid, **r} for r in ex.deletion])
        if ex.size:
            tables["size"] = schema.table_from_rows("size", [{"unit_id": uid, **r} for r in ex.size])
        return tables

