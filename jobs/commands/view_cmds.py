"""CLI commands that show a run: plot, report, heads, timestamps (registered by jobs.cli).

All of them read only committed units (a `segments` row with status ok) and work on a run that is
still going: they show what is there.
"""
from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Iterable, Optional, Sequence

import typer

from jobs.errors import RunError

RUN = typer.Argument(..., help="Run directory (local path or URI such as s3://bucket/prefix).", show_default=False)
CORPUS = typer.Option(None, "--corpus", help="Corpus root holding <src>/<tgt>/<split>/words.jsonl (default: found "
                                              "from each segment's audio path).")
PROGRESS = typer.Option(True, "--progress/--no-progress", help="Show progress bars (on a terminal).")
TOP = typer.Option(6, "--top", "-k", min=1, help="How many heads to choose.")


def _progress(items: Sequence, label: str, enabled: bool) -> Iterable:
    """Iterate with a rich progress bar on a terminal (plain iteration otherwise)."""
    import sys

    if not enabled or not sys.stderr.isatty() or len(items) < 2:
        yield from items
        return
    from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeRemainingColumn

    with Progress(TextColumn(label), BarColumn(), MofNCompleteColumn(), TimeRemainingColumn(), transient=True) as bar:
        task = bar.add_task(label, total=len(items))
        for item in items:
            yield item
            bar.advance(task)


def _default_out(data, name: str) -> Path:
    if "://" in data.run:
        return Path(f"{os.path.basename(data.path.rstrip('/'))}-{name}")
    return Path(data.path) / "tables" / name


def _reflow(func):
    """Join the lines of each docstring paragraph (rich keeps single newlines, which reads ragged
    in narrow terminals); indented example lines stay as they are."""
    import inspect

    paragraphs = inspect.cleandoc(func.__doc__ or "").split("\n\n")
    func.__doc__ = "\n\n".join(p if p.startswith("    ") else " ".join(p.split()) for p in paragraphs)
    return func


def _one_based(value: Optional[int], what: str) -> Optional[int]:
    if value is None:
        return None
    if value < 1:
        raise RunError(f"--{what} counts from 1 (got {value})")
    return value - 1


def _group_filter(groups, model: Optional[str], task: Optional[str]):
    chosen = [g for g in groups if (model is None or g[0] == model) and (task is None or g[1] == task)]
    if not chosen:
        have = ", ".join("/".join(g) for g in groups) or "none"
        raise RunError(f"no correlation results for model={model or 'any'} task={task or 'any'} (the run has: {have})")
    return chosen


def register(app: typer.Typer) -> None:
    @app.command("plot")
    @_reflow
    def plot(run: str = RUN,
             segment: Optional[list[str]] = typer.Option(None, "--segment", "-s", help="Unit or segment id (or a unique "
                                                         "part of one) to draw; repeat for several."),
             first: int = typer.Option(3, "--first", min=0, help="Without --segment: draw the first N committed units."),
             token: Optional[int] = typer.Option(None, "--token", min=0, help="Hypothesis row (0-based, prefix included) of "
                                                 "the time-frequency SM^X panel; default: the token with the sharpest map."),
             layer: Optional[int] = typer.Option(None, "--layer", help="CA panel: decoder layer (from 1); default: all layers averaged."),
             head: Optional[int] = typer.Option(None, "--head", help="CA panel: head (from 1); with --layer one head, alone the "
                                                "head averaged over layers."),
             all_rows: bool = typer.Option(False, "--all-rows", help="Also show forced prefix and end-token rows."),
             run_figures: bool = typer.Option(True, "--run-figures/--no-run-figures", help="Also draw the run-level figures "
                                              "(correlation grids, layer curves, deletion curves)."),
             formats: str = typer.Option("png,pdf", "--format", help="Comma-separated output formats (png, pdf, svg)."),
             out: Optional[Path] = typer.Option(None, "--out", "-o", help="Output folder (default: RUN/tables/figures)."),
             corpus: Optional[str] = CORPUS, progress: bool = PROGRESS) -> None:
        """Draw figures of a run (matplotlib, PNG and PDF).

        Per segment, the paper's Figure 2: SM^X of one token over time and frequency (log-Hz axis),
        SM^X aggregated over frequency, SM^H and cross-attention, tokens as rows on one time axis in
        seconds (known word boundaries dashed when the corpus has words.jsonl). Per run: the head x
        layer correlation grid of each model/task/pair (Table 1), layer curves with the
        context-mixing gap shaded (Tables 2-3) and deletion curves (WER vs % removed).

        Examples:

            xs2t plot runs/demo                                  # run figures + first 3 segments

            xs2t plot runs/demo -s en-en.test.talk1.0003 --layer 4 --head 2 --token 5
        """
        from jobs.viz import figures as F
        from jobs.viz.data import RunData
        from jobs.viz.summary import Summary
        from jobs.units import safe_name as stem_of
        from jobs.viz.words import WordTimings

        fmts = [f.strip().lower() for f in formats.split(",") if f.strip()]
        bad = [f for f in fmts if f not in ("png", "pdf", "svg")]
        if bad or not fmts:
            raise RunError(f"--format: unsupported {bad or formats!r}; use png, pdf and/or svg")
        data = RunData(run)
        if not data.ok_units:
            raise RunError(f"{run}: no committed units with status ok yet")
        out = out or _default_out(data, "figures")
        # resolve every argument before drawing anything
        units = [data.find_unit(s) for s in segment] if segment else data.segments["unit_id"].to_pylist()[:first]
        lay, hd = _one_based(layer, "layer"), _one_based(head, "head")
        written: list[Path] = []
        if run_figures:
            summary = Summary(data)
            groups = summary.groups
            for g in groups:
                written += F.save(F.grid_figure(summary, g), out, f"grid_{stem_of('_'.join(g))}", fmts)
            if groups:
                written += F.save(F.layer_curves_figure(summary), out, "layers", fmts)
            deletion = summary.deletion()
            if deletion:
                written += F.save(F.deletion_figure(summary, deletion=deletion), out, "deletion", fmts)
        words = WordTimings(corpus)
        for unit_id in _progress(units, "segment figures", progress):
            u = data.unit(unit_id)
            ref = words.words(u.row) if u.row.get("task") == "asr" else None
            try:
                fig = F.segment_figure(u, token=token, layer=lay, head=hd, words=ref, all_rows=all_rows)
            except ValueError as exc:
                raise RunError(str(exc)) from None
            written += F.save(fig, out, f"segment_{stem_of(unit_id)}", fmts)
        typer.echo(f"{len(written)} files in {out}")

    @app.command("report")
    @_reflow
    def report(run: str = RUN,
               out: Optional[Path] = typer.Option(None, "--out", "-o", help="HTML file to write (default: RUN/report.html)."),
               segments: int = typer.Option(3, "--segments", min=0, help="Example segments with a Figure 2."),
               top: int = TOP,
               timestamps: bool = typer.Option(True, "--timestamps/--no-timestamps", help="Score word timestamps when "
                                               "the corpus has words.jsonl."),
               corpus: Optional[str] = CORPUS, progress: bool = PROGRESS) -> None:
        """Write one self-contained HTML page about a run.

        The page holds the run record (models, versions, N masks, seeds, p, timings), failed
        units with their errors, the paper's tables (layer-wise correlations with the
        context-mixing gap, the head x layer grids, pooling and p_H comparisons, deletion and size
        scores), saliency-chosen alignment heads, word-timestamp errors (synthetic corpora) and
        example segments. Figures are embedded as base64 PNG, so the file can be mailed as is.
        """
        import sys

        from jobs.viz.data import RunData
        from jobs.viz.report import build_report

        data = RunData(run)
        if not data.all_segments.num_rows:
            raise RunError(f"{run}: no committed units yet")
        show = progress and sys.stderr.isatty()
        html = build_report(data, segments=segments, top_k=top, timestamps=timestamps, corpus_root=corpus,
                            progress=(lambda msg: typer.echo(f"  {msg}", err=True)) if show else None)
        if out is None:
            out = Path(data.path) / "report.html" if "://" not in data.run else Path(f"{data.name}-report.html")
        out.parent.mkdir(parents=True, exist_ok=True)
        out.write_text(html, encoding="utf-8")
        typer.echo(f"wrote {out} ({len(html) / 1e6:.1f} MB)")

    @app.command("heads")
    @_reflow
    def heads(run: str = RUN,
              model: Optional[str] = typer.Option(None, "--model", help="Only this model key."),
              task: Optional[str] = typer.Option(None, "--task", help="Only this task (asr or st)."),
              by: str = typer.Option("both", "--by", help="Rank by r with SM^X ('input'), SM^H ('encoder') or their mean ('both')."),
              top: int = TOP,
              out: Optional[Path] = typer.Option(None, "--out", "-o", help="Write the export (JSON) here."),
              fmt: str = typer.Option("json", "--format", help="What --out holds: 'json' (everything, per model/task/pair), "
                                      "'list' (only \\[\\[layer, head], ...] of the single selected group) or 'whisper' (the "
                                      "openai-whisper base85 mask of that group)."),
              show: int = typer.Option(10, "--show", min=0, help="Rows of the ranking to print per group.")) -> None:
        """Rank decoder heads by their agreement with saliency and export the best as alignment heads.

        Each cross-attention head (and each layer average) is scored by its mean Pearson r with
        SM^X and SM^H over the run's utterances. The top-k heads are printed and exported in the
        formats Whisper word-timestamp tools take: a list of 0-based \\[layer, head] pairs (Hugging
        Face generation_config.alignment_heads) and the base85 mask string of openai-whisper's
        model.set_alignment_heads(). `xs2t timestamps RUN --heads FILE` scores them.

        Example:

            xs2t heads runs/demo --model whisper --task asr --top 6 -o heads.json
        """
        from jobs.viz.heads import BY, export, rank_heads
        from jobs.viz.data import RunData
        from jobs.viz.summary import Summary, group_label

        if by not in BY:
            raise RunError(f"--by must be one of {', '.join(BY)}, not {by!r}")
        if fmt not in ("json", "list", "whisper"):
            raise RunError(f"--format must be json, list or whisper, not {fmt!r}")
        summary = Summary(RunData(run))
        groups = _group_filter(summary.groups, model, task)
        exported = export(summary, groups, top, by)
        for g in groups:
            ranked, avgs = rank_heads(summary, g, by)
            typer.secho(f"{group_label(g)} (ranked by {by}; n={(summary.grid(g, 'input') or summary.grid(g, 'encoder')).n})",
                        bold=True)
            typer.echo(f"  {'head':<24}{'r SM^X':>8}{'r SM^H':>8}{'score':>8}")
            for r in ranked[:show] + avgs:
                typer.echo(f"  {r.label:<24}{_num(r.r_input)}{_num(r.r_encoder)}{_num(r.score)}")
            entry = exported.get("/".join(g))
            if entry:
                typer.echo(f"  alignment_heads = {json.dumps(entry['alignment_heads'])}")
                typer.echo(f"  whisper dump    = {entry['whisper_dump']}")
        if out is not None:
            if fmt != "json" and len(exported) != 1:
                raise RunError(f"--format {fmt} writes one group; choose one with --model/--task "
                               f"(found {', '.join(exported)})")
            entry = next(iter(exported.values())) if exported else None
            text = (json.dumps(exported, indent=2) if fmt == "json"
                    else json.dumps(entry["alignment_heads"]) if fmt == "list" else entry["whisper_dump"])
            out.write_text(text + "\n", encoding="utf-8")
            typer.echo(f"wrote {out}")

    @app.command("timestamps")
    @_reflow
    def timestamps(run: str = RUN, top: int = TOP,
                   heads_file: Optional[Path] = typer.Option(None, "--heads", help="Also score these heads: a JSON list of "
                                                             "\\[layer, head] (0-based) or an `xs2t heads` export."),
                   each_head: bool = typer.Option(False, "--each-head", help="Also score every single head."),
                   tolerance: float = typer.Option(0.2, "--tolerance", min=0.0, help="Seconds for the 'within' column."),
                   filter_width: int = typer.Option(7, "--filter", min=1, help="Median filter width (encoder steps) before DTW."),
                   corpus: Optional[str] = CORPUS,
                   json_out: Optional[Path] = typer.Option(None, "--json", help="Also write the results as JSON."),
                   progress: bool = PROGRESS) -> None:
        """Score word timestamps from cross-attention and saliency against known word boundaries.

        For every ASR unit whose corpus has words.jsonl (`xs2t make-corpus` writes it), the
        hypothesis pieces are grouped into words and timed by DTW (Whisper-style: normalised map,
        median filter, monotonic path) over: CA averaged over all heads, over each layer, over the
        top-k heads chosen by correlation with SM^X, with SM^H and with both (and --heads), and
        over SM^X (pooled) and SM^H maps; a no-map baseline shares the time out by word length.
        Hypothesis words are matched to reference words (equal words on an edit alignment); the
        table gives the mean absolute error of word starts, ends and both, in seconds.

        Example:

            xs2t heads runs/demo --model whisper -o heads.json && xs2t timestamps runs/demo --heads heads.json
        """
        from jobs.viz.data import RunData
        from jobs.viz.summary import group_label
        from jobs.viz.timestamps import evaluate

        data = RunData(run)
        try:
            results = evaluate(data, k=top, heads_file=str(heads_file) if heads_file else None, corpus_root=corpus,
                               each_head=each_head, tolerance_s=tolerance, filter_width=filter_width,
                               progress=lambda units: _progress(units, "timing words", progress))
        except (ValueError, json.JSONDecodeError) as exc:
            raise RunError(str(exc)) from None
        if not results:
            raise RunError(f"{run}: no committed ASR units to score")
        for g, v in results.items():
            typer.secho(f"{group_label(g)}: {v['units']} units scored, {v['no_words']} without known word timings; "
                        f"{v['matched']}/{v['hyp_words']} hypothesis words matched", bold=True)
            if not v["rows"]:
                continue
            typer.echo(f"  {'method':<8}{'heads / map':<58}{'words':>6}{'start':>8}{'end':>8}{'MAE':>8}"
                       f"{'<=' + format(tolerance, 'g') + 's':>8}")
            for r in v["rows"]:
                typer.echo(f"  {r['method']:<8}{r['choice'][:57]:<58}{r['words']:>6}{_num(r['mae_start'])}"
                           f"{_num(r['mae_end'])}{_num(r['mae'])}{r['within']:>7.1f}%")
        if json_out is not None:
            json_out.write_text(json.dumps({"/".join(g): v for g, v in results.items()}, indent=2), encoding="utf-8")
            typer.echo(f"wrote {json_out}")
        if not any(v["units"] for v in results.values()):
            raise RunError("no unit could be scored: no words.jsonl found (give the corpus root with --corpus)")


def _num(x: float, width: int = 8) -> str:
    import math

    return f"{'–':>{width}}" if x is None or math.isnan(x) else f"{x:>{width}.3f}"
