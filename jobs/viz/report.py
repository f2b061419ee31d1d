"""`xs2t report`: one self-contained HTML page for a run (tables, figures as base64 PNG, the run
record, failures), readable offline and small enough to mail."""
from __future__ import annotations

import base64
import datetime as dt
import html
import math
from typing import Callable, Optional, Sequence


from jobs.viz import figures as F
from jobs.viz.data import RunData
from jobs.viz.heads import rank_heads, top_heads
from jobs.viz.summary import Summary, group_label
from jobs.viz.words import WordTimings

CSS = """
body{font-family:system-ui,-apple-system,Segoe UI,Helvetica,Arial,sans-serif;margin:2em auto;max-width:1200px;
color:#222;line-height:1.4;padding:0 1em}
h1{font-size:1.6em;margin-bottom:0}h2{border-bottom:1px solid #ccc;padding-bottom:.2em;margin-top:2em}
h3{margin-bottom:.3em}.sub{color:#666;margin-top:.2em}
table{border-collapse:collapse;margin:.5em 0 1em;font-size:.85em}
th,td{border:1px solid #ddd;padding:.25em .55em;text-align:right}th{background:#f4f4f4}
td.l,th.l{text-align:left}tr.avg td{border-top:2px solid #999;font-weight:600}
img{max-width:100%;height:auto;display:block;margin:.5em 0 1.5em}
.note{color:#555;font-size:.9em}.bad{color:#b00}
"""


def _e(x) -> str:
    return html.escape(str(x))


def _f(x, digits: int = 3) -> str:
    if x is None or (isinstance(x, float) and math.isnan(x)):
        return "–"
    return f"{x:.{digits}f}" if isinstance(x, float) else _e(x)


def _table(header: Sequence[str], rows: Sequence[Sequence], left: int = 1, avg_rows: Sequence[int] = ()) -> str:
    """HTML table; the first `left` columns are left-aligned text."""
    out = ["<table><tr>" + "".join(f'<th class="{"l" if i < left else ""}">{_e(h)}</th>' for i, h in enumerate(header))
           + "</tr>"]
    for k, row in enumerate(rows):
        cls = ' class="avg"' if k in avg_rows else ""
        out.append(f"<tr{cls}>" + "".join(f'<td class="{"l" if i < left else ""}">{v if isinstance(v, _Raw) else _f(v)}</td>'
                                          for i, v in enumerate(row)) + "</tr>")
    return "\n".join(out) + "</table>"


class _Raw(str):
    """Already-escaped HTML for a table cell."""


def _img(png: bytes, alt: str) -> str:
    return f'<img alt="{_e(alt)}" src="data:image/png;base64,{base64.b64encode(png).decode("ascii")}">'


def _kv(pairs: Sequence[tuple[str, object]]) -> str:
    rows = [(k, _Raw(_e(", ".join(map(str, v)) if isinstance(v, (list, tuple)) else v))) for k, v in pairs]
    return _table(["", "value"], rows, left=2)


def build_report(data: RunData, segments: int = 3, top_k: int = 6, timestamps: bool = True,
                 corpus_root: Optional[str] = None, progress: Optional[Callable[[str], None]] = None) -> str:
    """The whole page as a string. `segments`: how many example segments get a Figure 2;
    `timestamps`: score word timestamps when the corpus has words.jsonl."""
    step = progress or (lambda _msg: None)
    step("reading tables")
    summary = Summary(data)
    rec = summary.record()
    parts = [f"<!DOCTYPE html><html lang=en><head><meta charset=utf-8><title>xs2t report: {_e(data.name)}</title>"
             f"<style>{CSS}</style></head><body>",
             f"<h1>xs2t report: {_e(data.name)}</h1>",
             f'<p class=sub>{_e(data.run)} · generated {dt.datetime.now().strftime("%Y-%m-%d %H:%M")} · '
             f'{rec["units_ok"]} units ok, {rec["units_failed"]} failed · {rec["audio_hours"] * 60:.1f} min of audio</p>',
             "<p class=note>Pearson r between cross-attention (CA) and saliency, mean over utterances (Papi et al., "
             "2025): SM^X is input saliency pooled to the encoder grid, SM^H encoder-output saliency. Layers and heads "
             "are numbered from 1. The context-mixing gap is r(CA, SM^H) − r(CA, SM^X).</p>"]

    # ---- run record ------------------------------------------------------------------------------
    job = data.job
    parts.append("<h2>Run record</h2>")
    timing = rec["timing"]
    parts.append(_kv([
        ("models", rec["models"]), ("tasks / pairs", rec["tasks"] + rec["pairs"]),
        ("units (ok / failed)", f'{rec["units_ok"]} / {rec["units_failed"]}'),
        ("N masks SM^X / SM^H", f'{", ".join(rec["n_masks_input"])} / {", ".join(rec["n_masks_encoder"])}'),
        ("seed", rec["seed"]), ("p_X / p_H", f'{", ".join(rec["p_input"])} / {", ".join(rec["p_encoder"])}'),
        ("level split", rec["level_split"]), ("occlusion", rec["occlusion"]), ("pooling", rec["pooling"]),
        ("dtype / device", rec["dtype"] + rec["device"]), ("model checksum", rec["model_checksum"]),
        ("code / torch / scikit-image", rec["code_version"] + rec["torch_version"] + rec["skimage_version"]),
        ("finished", f'{rec["first_finished"]} … {rec["last_finished"]}'),
        *[(f"time {k[2:-2]} per unit (mean / max / total s)", f'{v["mean"]:.1f} / {v["max"]:.1f} / {v["total"]:.0f}')
          for k, v in timing.items()],
        *([("job name", job.get("name"))] if job.get("name") else []),
    ]))
    if data.failures:
        parts.append(f"<h3 class=bad>Failed units ({len(data.failures)})</h3>")
        parts.append(_table(["unit", "attempts", "error"],
                            [(f["unit_id"], f["attempts"], _Raw(_e(f["error"] or ""))) for f in data.failures[:200]],
                            left=3))

    # ---- correlations ---------------------------------------------------------------------------
    groups = summary.groups
    if groups:
        step("correlation tables")
        parts.append("<h2>Layer-wise correlation (paper Tables 2–3)</h2>")
        n_max = max(summary.shape(g)[0] for g in groups)
        header = ["model", "task", "pair", "saliency", *[f"l{l + 1}" for l in range(n_max)], "layer-avg", "n"]
        rows = []
        for g in groups:
            for target, name in (("input", "SM^X"), ("encoder", "SM^H")):
                gr = summary.grid(g, target)
                if gr is not None:
                    layers = list(gr.head_avg) + [float("nan")] * (n_max - len(gr.head_avg))
                    rows.append([g[0], g[1], f"{g[2]}-{g[3]}", name, *layers, gr.overall, gr.n])
            gap = summary.gap(g)
            if gap is not None:
                layers = list(gap[0]) + [float("nan")] * (n_max - len(gap[0]))
                rows.append([g[0], g[1], f"{g[2]}-{g[3]}", "gap (H − X)", *layers, gap[1], ""])
        parts.append(_table(header, rows, left=4))
        parts.append(_img(F.png_bytes(F.layer_curves_figure(summary)), "layer curves"))

        parts.append("<h2>Head × layer correlation (paper Table 1)</h2>")
        for g in groups:
            step(f"grid {group_label(g)}")
            parts.append(f"<h3>{_e(group_label(g))}</h3>")
            for target in ("input", "encoder"):
                gr = summary.grid(g, target)
                if gr is None:
                    continue
                setting = summary.headline(g, target)
                parts.append(f"<p class=note>r(CA, {'SM^X, pooling ' + str(setting) if target == 'input' else 'SM^H, p_H=' + str(setting)}),"
                             f" {gr.n} utterances</p>")
                n_layers, n_heads = gr.r.shape
                rows = [[f"l{l + 1}", *gr.r[l], gr.head_avg[l]] for l in range(n_layers)]
                rows.append(["layer-avg", *gr.layer_avg, gr.overall])
                parts.append(_table(["layer", *[f"h{h + 1}" for h in range(n_heads)], "head-avg"], rows,
                                    avg_rows=[n_layers]))
            parts.append(_img(F.png_bytes(F.grid_figure(summary, g)), f"correlation grid {group_label(g)}"))
            for target, title, label in (("input", "SM^X aggregation (paper Table 4)", "pooling"),
                                         ("encoder", "SM^H occlusion probability (paper Table 6)", "p_H")):
                settings = summary.settings(g, target)
                if len(settings) > 1:
                    n_layers = summary.shape(g)[0]
                    rows = []
                    for s in settings:
                        gr = summary.grid(g, target, s)
                        if gr is not None:
                            rows.append([s, *gr.head_avg, gr.overall, gr.n])
                    parts.append(f"<p class=note>{title}</p>")
                    parts.append(_table([label, *[f"l{l + 1}" for l in range(n_layers)], "layer-avg", "n"], rows))

    # ---- faithfulness -----------------------------------------------------------------------------
    step("deletion")
    deletion = summary.deletion()
    if deletion:
        parts.append("<h2>Deletion (paper Table 5, Appendix A/D)</h2>")
        parts.append("<p class=note>Area under the WER-vs-%-removed curve (WER clipped at 100; higher = the explanation "
                     "found what the model needs).</p>")
        rows = [[group_label(k[0]), F.EXPLANATION_NAMES.get(k[1], k[1]), k[2], k[3] or "", "" if k[4] is None else k[4],
                 v["auc"], v["n"]] for k, v in sorted(deletion.items(), key=lambda kv: (kv[0][0], kv[0][1], kv[0][2]))]
        parts.append(_table(["group", "explanation", "side", "pooling", "p", "deletion", "n"], rows, left=5))
        parts.append(_img(F.png_bytes(F.deletion_figure(summary, deletion=deletion)), "deletion curves"))
    size = summary.size()
    if size:
        parts.append("<h2>Size (SPES)</h2><p class=note>Area of the share of cells above each threshold after per-token "
                     "normalisation (lower = more compact).</p>")
        parts.append(_table(["group", "explanation", "size", "n"],
                            [[group_label(k[0]), F.EXPLANATION_NAMES.get(k[1], k[1]), v["area"], v["n"]]
                             for k, v in sorted(size.items())], left=2))

    # ---- heads and timestamps ---------------------------------------------------------------------
    if groups:
        parts.append(f"<h2>Saliency-chosen alignment heads (top {top_k})</h2>")
        parts.append("<p class=note>Decoder heads ranked by the mean of r(CA, SM^X) and r(CA, SM^H); the list is "
                     "0-based [layer, head], as Whisper tools expect (<code>xs2t heads RUN</code> exports it).</p>")
        rows = []
        for g in groups:
            ranked, avgs = rank_heads(summary, g, "both")
            best = [r for r in ranked if not math.isnan(r.score)][:top_k]
            rows.append([group_label(g), _Raw(", ".join(f"{_e(r.label)} ({r.score:.2f})" for r in best)),
                         _Raw(_e(str(top_heads(ranked, top_k)))),
                         _Raw(", ".join(f"{_e(r.label)} ({r.score:.2f})" for r in avgs[:2]))])
        parts.append(_table(["group", "best heads (score)", "alignment_heads", "best averages"], rows, left=4))
    if timestamps and any(r["task"] == "asr" for r in data.segments.to_pylist()):
        from jobs.viz.timestamps import evaluate

        step("word timestamps")
        results = evaluate(data, k=top_k, corpus_root=corpus_root)
        scored = {g: v for g, v in results.items() if v["units"]}
        if scored:
            parts.append("<h2>Word timestamps vs known boundaries</h2>")
            for g, v in scored.items():
                parts.append(f"<p class=note>{_e(group_label(g))}: {v['units']} utterances, {v['matched']} of "
                             f"{v['hyp_words']} hypothesis words matched to reference words; mean absolute error "
                             f"in seconds; share of boundaries within {v['tolerance_s']:.2f} s.</p>")
                parts.append(_table(["method", "heads / map", "words", "MAE start", "MAE end", "MAE", "within %"],
                                    [[r["method"], r["choice"], r["words"], r["mae_start"], r["mae_end"], r["mae"],
                                      _Raw(_f(r["within"], 1))] for r in v["rows"]], left=2))

    # ---- example segments -------------------------------------------------------------------------
    units = data.segments["unit_id"].to_pylist()[:segments]
    if units:
        parts.append("<h2>Example segments (paper Figure 2)</h2>")
        words = WordTimings(corpus_root)
        for unit_id in units:
            step(f"segment {unit_id}")
            u = data.unit(unit_id)
            ref = words.words(u.row) if u.row.get("task") == "asr" else None
            parts.append(f"<p class=note>{_e(unit_id)} · ref: {_e(u.row.get('reference') or '')}</p>")
            try:
                fig = F.segment_figure(u, words=ref)
            except ValueError as exc:   # e.g. a unit without stored maps
                parts.append(f"<p class=note>no figure: {_e(exc)}</p>")
                continue
            parts.append(_img(F.png_bytes(fig, dpi=90), f"segment {unit_id}"))
    parts.append("</body></html>")
    return "\n".join(parts)
