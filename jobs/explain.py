"""In-process decoding and explanation of a few audio files (`xs2t transcribe`, `xs2t explain`)."""
from __future__ import annotations

from pathlib import Path
from typing import Iterable, Optional, Sequence

import torch

from models.audio import load_audio
from models.interface import BeamOptions, Hypothesis, ModelError, SpeechModel


def prepare_features(model: SpeechModel, wave, source: str) -> torch.Tensor:
    """Model features of a waveform, with clear errors for unusable audio."""
    wave = torch.as_tensor(wave, dtype=torch.float32)
    if wave.numel() < 400:
        raise ModelError(f"{source}: audio too short ({wave.numel()} samples at 16 kHz; need at least 25 ms)")
    feats = model.features(wave)
    if model.max_input_frames is not None and feats.shape[0] > model.max_input_frames:
        raise ModelError(f"{source}: audio is {feats.shape[0] * model.frame_shift_s:.1f} s long; "
                         f"{model.name} accepts at most {model.max_input_frames * model.frame_shift_s:.1f} s")
    return feats.to(model.device)


def task_prefix(model: SpeechModel, lang: Optional[str], tgt_lang: Optional[str], task: str) -> list[int]:
    """Forced prefix for a spoken language `lang`, output language `tgt_lang`, task transcribe/translate."""
    if task not in ("transcribe", "translate"):
        raise ModelError(f"task must be 'transcribe' or 'translate', not {task!r}")
    out_lang = tgt_lang or (("en" if model.family == "whisper" else lang) if task == "translate" else lang)
    return model.forced_prefix(lang=out_lang, task=task, src_lang=lang)


def decode_files(model: SpeechModel, paths: Sequence[Path], lang: Optional[str] = None, tgt_lang: Optional[str] = None,
                 task: str = "transcribe", beam: int = 5) -> Iterable[tuple[Path, Hypothesis]]:
    prefix = task_prefix(model, lang, tgt_lang, task)
    options = model.default_beam_options()
    options.beam_size = beam
    for path in paths:
        feats = prepare_features(model, load_audio(path), str(path))
        (hyp,) = model.generate([feats], [prefix], options)
        yield path, hyp


def explain_files(paths: Sequence[Path], out: Path, *, model: str, lang: Optional[str], tgt_lang: Optional[str],
                  task: str, n_input: int, n_encoder: int, p_input: float, p_encoder: float, seed: int,
                  skip: set, dtype: str, spm=None, dict_path=None, config_yaml=None,
                  print_table: bool = True) -> dict:
    """Explain each file with the in-process pipeline and write one Parquet file per table to `out`."""
    import pyarrow.parquet as pq

    from jobs.corpus import folder_segment
    from jobs.pipeline import MethodParams, SegmentPipeline
    from jobs.schema import concat_tables
    from jobs.units import WorkUnit

    model_cfg = {"key": "m", "name_or_path": model, "spm": str(spm) if spm else None,
                 "dict": str(dict_path) if dict_path else None,
                 "config_yaml": str(config_yaml) if config_yaml else None, "dtype": dtype}
    params = MethodParams(n_input=n_input, n_encoder=n_encoder, p_input=p_input, p_encoder=p_encoder, seed=seed,
                          skip=frozenset(skip), dtype=dtype)
    pipe = SegmentPipeline.standalone([model_cfg], params)
    src = lang or "en"
    out_lang = tgt_lang or ("en" if task == "translate" else src)
    results: dict[str, list] = {}
    for path in paths:
        seg = folder_segment(Path(path), src_lang=src, tgt_lang=out_lang)
        unit = WorkUnit.make("m", seg)
        tables = pipe.process(unit)
        for name, table in tables.items():
            results.setdefault(name, []).append(table)
    out.mkdir(parents=True, exist_ok=True)
    merged = {name: concat_tables(name, tables) for name, tables in results.items()}
    for name, table in merged.items():
        pq.write_table(table, out / f"{name}.parquet", compression="zstd")
    if print_table:
        _print_summary(merged)
    return merged


def _print_summary(tables: dict) -> None:
    from rich.console import Console
    from rich.table import Table

    seg = tables["segments"].to_pylist()
    corr = tables.get("correlations")
    corr_rows = corr.to_pylist() if corr is not None else []
    t = Table(title="xs2t explain")
    for col in ("segment", "hypothesis", "r(CA,SM^X)", "r(CA,SM^H)", "masks X/H", "reliability X/H"):
        t.add_column(col)
    for s in seg:
        def glob(target):
            vals = [r["pearson"] for r in corr_rows if r["unit_id"] == s["unit_id"] and r["target"] == target
                    and r["layer"] is None and r["head"] is None
                    and (target == "encoder" or r["pooling"] == "2d_max")]
            return f"{vals[0]:.3f}" if vals else "-"
        rel = lambda v: "-" if v is None else f"{v:.3f}"
        t.add_row(s["segment_id"], (s["hypothesis"] or s.get("error") or "")[:60], glob("input"), glob("encoder"),
                  f"{s['n_masks_input']}/{s['n_masks_encoder']}",
                  f"{rel(s['reliability_input'])}/{rel(s['reliability_encoder'])}")
    console = Console()
    if not console.is_terminal:  # piped or captured: keep one line per file
        console = Console(width=200)
    console.print(t)
