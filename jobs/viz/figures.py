"""Matplotlib figures of a run (PNG and PDF), drawn headless (Agg).

Per segment, the paper's Figure 2: the time-frequency SM^X of one token (log-Hz axis), SM^X
aggregated over frequency (tokens x time), SM^H and cross-attention (tokens x encoder steps), all
on one time axis in seconds, with the hypothesis tokens as row labels. Maps are shown as they are
compared: saliency z-scored per token, CA normalised per encoder step over tokens.
Per run: the head x layer correlation grid (Table 1), layer curves with the context-mixing gap
shaded (Tables 2-3), deletion curves (WER vs % removed).
"""
from __future__ import annotations

import math
from pathlib import Path
from typing import Optional, Sequence

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402

from jobs.viz.align import zscore  # noqa: E402
from jobs.viz.data import FRAME_S, UnitMaps  # noqa: E402
from jobs.viz.summary import GroupKey, Summary, group_label  # noqa: E402
from jobs.viz.words import piece_labels  # noqa: E402

CMAP = "magma"
EXPLANATION_NAMES = {"sm_x_full": "SM^X (full resolution)", "sm_x_agg": "SM^X (aggregated)", "ca": "cross-attention",
                     "sm_h": "SM^H (encoder side)"}
EXPLANATION_COLOURS = {"sm_x_full": "tab:red", "sm_x_agg": "tab:orange", "ca": "tab:blue", "sm_h": "tab:green"}


def mel_bin_edges_hz(n_bins: int, low_hz: float = 20.0, high_hz: float = 8000.0) -> np.ndarray:
    """Approximate edges (n_bins + 1) in Hz of mel-spaced filterbank bins: bin b spans between the
    centres of its neighbours; the centres are equally spaced on the mel scale (1127 ln(1 + f/700))."""
    mel = lambda f: 1127.0 * np.log1p(f / 700.0)
    hz = lambda m: 700.0 * np.expm1(m / 1127.0)
    centres = hz(np.linspace(mel(low_hz), mel(high_hz), n_bins + 2)[1:-1])
    inner = np.sqrt(centres[1:] * centres[:-1])
    return np.concatenate([[centres[0] ** 2 / inner[0]], inner, [centres[-1] ** 2 / inner[-1]]])


def _clip(x: np.ndarray) -> tuple[float, float]:
    lo, hi = np.percentile(x, [1, 99.5]) if x.size else (0.0, 1.0)
    return float(lo), float(hi if hi > lo else lo + 1e-6)


def pick_token(u: UnitMaps) -> int:
    """The content row whose frequency-aggregated SM^X (or SM^H) has the sharpest peak."""
    rows = range(u.content.start, u.content.stop)
    source = u.smx.max(-1) if u.smx is not None else u.smh
    if source is None or not len(rows):
        return u.content.start
    z = zscore(source[u.content.start:u.content.stop], 1)
    return u.content.start + int(np.argmax(z.max(1)))


def segment_figure(u: UnitMaps, token: Optional[int] = None, layer: Optional[int] = None,
                   head: Optional[int] = None, words: Optional[Sequence[dict]] = None, all_rows: bool = False):
    """Figure 2 for one unit. `token`: hypothesis row of the time-frequency panel (default: the
    sharpest); `layer`/`head`: CA of one layer (all heads averaged) or one head (default: the
    average of everything); `words`: known word boundaries to mark; `all_rows`: keep the forced
    prefix and end-token rows."""
    rows = slice(0, u.n_tokens) if all_rows else u.content
    labels = piece_labels(u.tokens)[rows]
    n_rows = len(labels)
    if n_rows == 0:
        raise ValueError(f"unit {u.unit_id}: no content tokens to show")
    token = pick_token(u) if token is None else token
    if not 0 <= token < u.n_tokens:
        raise ValueError(f"unit {u.unit_id}: token {token} out of range (0..{u.n_tokens - 1})")
    panels = []
    if u.smx is not None:
        panels += ["tf", "smx"]
    if u.smh is not None:
        panels.append("smh")
    if u.ca is not None:
        panels.append("ca")
    if not panels:
        raise ValueError(f"unit {u.unit_id}: no maps were stored")
    n_frames = u.n_frames or u.n_steps * u.subsampling
    t_end = n_frames * FRAME_S
    heights = [2.2 if p == "tf" else 0.18 * n_rows + 0.6 for p in panels]
    fig, axes = plt.subplots(len(panels), 1, figsize=(11, sum(heights) + 1.2), sharex=True,
                             gridspec_kw={"height_ratios": heights}, squeeze=False)
    axes = axes[:, 0]
    step_s = u.step_s
    step_extent = (0, u.n_steps * step_s, n_rows - 0.5, -0.5)
    for ax, panel in zip(axes, panels):
        if panel == "tf":
            m = u.smx[token, :n_frames]                                      # [T, F]
            z = zscore(m.reshape(1, -1), 1).reshape(m.shape)
            edges = mel_bin_edges_hz(m.shape[1])
            lo, hi = _clip(z)
            mesh = ax.pcolormesh(np.arange(m.shape[0] + 1) * FRAME_S, edges, z.T, cmap=CMAP, vmin=lo, vmax=hi,
                                 shading="flat", rasterized=True)
            ax.set_yscale("log")
            ax.set_ylim(edges[0], edges[-1])
            ticks = [t for t in (100, 200, 500, 1000, 2000, 4000, 8000) if edges[0] <= t <= edges[-1]]
            ax.set_yticks(ticks, [f"{t // 1000}k" if t >= 1000 else str(t) for t in ticks])
            ax.set_ylabel("Hz")
            ax.set_title(f"SM^X of token {token} '{piece_labels(u.tokens)[token]}' (time x frequency)", fontsize=10,
                         loc="left")
        else:
            if panel == "smx":
                m = u.smx[rows, :n_frames].max(-1)
                z, extent, title = zscore(m, 1), (0, t_end, n_rows - 0.5, -0.5), "SM^X, max over frequency"
            elif panel == "smh":
                z, extent, title = zscore(u.smh[rows, :u.n_steps], 1), step_extent, "SM^H (encoder states)"
            else:
                ca, what = _attention(u, layer, head)
                z, extent, title = zscore(ca[rows, :u.n_steps], 0), step_extent, f"cross-attention, {what}"
            lo, hi = _clip(z)
            mesh = ax.imshow(z, aspect="auto", interpolation="nearest", cmap=CMAP, extent=extent, vmin=lo, vmax=hi)
            ax.set_yticks(range(n_rows), labels, fontsize=8 if n_rows <= 30 else 6)
            ax.set_title(title, fontsize=10, loc="left")
            if panel == "smx" and token in range(rows.start, rows.stop):
                ax.axhline(token - rows.start, color="cyan", lw=0.6, alpha=0.7)
        fig.colorbar(mesh, ax=ax, pad=0.01, fraction=0.025, label="z")
        for w in words or ():
            ax.axvline(float(w["start"]), color="white", lw=0.5, ls="--", alpha=0.6)
    if words:
        top = axes[0].secondary_xaxis("top")
        top.set_xticks([(float(w["start"]) + float(w["end"])) / 2 for w in words], [w["word"] for w in words],
                       fontsize=7)
    axes[-1].set_xlim(0, t_end)
    axes[-1].set_xlabel("time (s)")
    row = u.row
    fig.suptitle(f"{row.get('model')} {row.get('task')} {row.get('src_lang')}-{row.get('tgt_lang')}  "
                 f"{row.get('segment_id')}\nhyp: {_short(row.get('hypothesis') or '')}", fontsize=10, x=0.01,
                 ha="left")
    fig.tight_layout()
    return fig


def _attention(u: UnitMaps, layer: Optional[int], head: Optional[int]) -> tuple[np.ndarray, str]:
    n_layers, n_heads = u.ca.shape[:2]
    if layer is not None and not 0 <= layer < n_layers:
        raise ValueError(f"layer {layer + 1} out of range: the model has {n_layers} decoder layers")
    if head is not None and not 0 <= head < n_heads:
        raise ValueError(f"head {head + 1} out of range: the model has {n_heads} heads")
    if layer is None and head is None:
        return u.ca.mean((0, 1)), "average of all layers and heads"
    if head is None:
        return u.ca[layer].mean(0), f"layer {layer + 1}, heads averaged"
    if layer is None:
        return u.ca[:, head].mean(0), f"head {head + 1}, layers averaged"
    return u.ca[layer, head], f"layer {layer + 1} head {head + 1}"


def _short(text: str, n: int = 110) -> str:
    return text if len(text) <= n else text[: n - 3] + "..."


# ---- run-level figures --------------------------------------------------------------------------
def grid_figure(summary: Summary, g: GroupKey):
    """Table 1 as heat maps: r per decoder layer (rows) and head (columns), with the per-layer head
    average as the last column, the per-head layer average as the last row and the global average
    in the corner; one panel per explanation (SM^X, SM^H)."""
    grids = [(t, summary.grid(g, t)) for t in ("input", "encoder")]
    grids = [(t, gr) for t, gr in grids if gr is not None]
    if not grids:
        raise ValueError(f"{group_label(g)}: no correlation rows")
    n_layers, n_heads = grids[0][1].r.shape
    fig, axes = plt.subplots(1, len(grids), figsize=(0.75 * (n_heads + 1) * len(grids) + 2.5, 0.45 * (n_layers + 1) + 1.8),
                             squeeze=False)
    for ax, (target, gr) in zip(axes[0], grids):
        full = np.full((n_layers + 1, n_heads + 1), np.nan)
        full[:n_layers, :n_heads] = gr.r
        full[:n_layers, n_heads] = gr.head_avg
        full[n_layers, :n_heads] = gr.layer_avg
        full[n_layers, n_heads] = gr.overall
        im = ax.imshow(full, cmap="viridis", vmin=min(0.0, np.nanmin(full)), vmax=max(0.5, np.nanmax(full)),
                       aspect="auto")
        for (i, j), v in np.ndenumerate(full):
            if not math.isnan(v):
                ax.text(j, i, f"{v:.2f}", ha="center", va="center", fontsize=7,
                        color="black" if v > 0.6 * np.nanmax(full) else "white")
        ax.axhline(n_layers - 0.5, color="white", lw=2)
        ax.axvline(n_heads - 0.5, color="white", lw=2)
        ax.set_xticks(range(n_heads + 1), [f"h{h + 1}" for h in range(n_heads)] + ["avg"], fontsize=8)
        ax.set_yticks(range(n_layers + 1), [f"l{l + 1}" for l in range(n_layers)] + ["avg"], fontsize=8)
        setting = summary.headline(g, target)
        name = f"SM^X ({setting})" if target == "input" else f"SM^H (p={setting})"
        ax.set_title(f"r(CA, {name}), n={gr.n}", fontsize=10)
        ax.set_xlabel("head")
        ax.set_ylabel("decoder layer")
        fig.colorbar(im, ax=ax, fraction=0.04, pad=0.02)
    fig.suptitle(group_label(g), fontsize=11)
    fig.tight_layout()
    return fig


def _panels(n: int):
    """A figure with n small panels, three per row (unused cells hidden)."""
    cols = min(3, n)
    rows = -(-n // cols)
    fig, axes = plt.subplots(rows, cols, figsize=(4.2 * cols, 3.2 * rows), squeeze=False)
    for ax in axes.flat[n:]:
        ax.set_visible(False)
    return fig, list(axes.flat[:n])


def layer_curves_figure(summary: Summary, groups: Optional[Sequence[GroupKey]] = None):
    """Tables 2-3 as curves: r(CA layer average, SM^X) and r(CA layer average, SM^H) per decoder
    layer, one panel per model x task x pair; the context-mixing gap between them is shaded and
    the global (all-heads) averages are dashed lines."""
    groups = [g for g in (groups or summary.groups) if summary.grid(g, "input") or summary.grid(g, "encoder")]
    if not groups:
        raise ValueError("no correlation rows to plot")
    fig, axes = _panels(len(groups))
    for ax, g in zip(axes, groups):
        gx, gh = summary.grid(g, "input"), summary.grid(g, "encoder")
        for gr, name, colour in ((gx, "SM^X", "tab:orange"), (gh, "SM^H", "tab:green")):
            if gr is None:
                continue
            x = np.arange(1, len(gr.head_avg) + 1)
            ax.plot(x, gr.head_avg, "o-", color=colour, label=f"CA vs {name}")
            ax.axhline(gr.overall, color=colour, ls="--", lw=0.8, label=f"all heads vs {name}: {gr.overall:.3f}")
        if gx is not None and gh is not None:
            x = np.arange(1, len(gx.head_avg) + 1)
            ax.fill_between(x, gx.head_avg, gh.head_avg, color="grey", alpha=0.25,
                            label=f"context-mixing gap {gh.overall - gx.overall:+.3f}")
        ax.set_title(f"{group_label(g)} (n={(gx or gh).n})", fontsize=10)
        ax.set_xlabel("decoder layer")
        ax.set_ylabel("Pearson r")
        ax.set_xticks(np.arange(1, len((gx or gh).head_avg) + 1))
        ax.grid(alpha=0.3)
        ax.legend(fontsize=7, loc="lower right")
    fig.tight_layout()
    return fig


def deletion_figure(summary: Summary, groups: Optional[Sequence[GroupKey]] = None, deletion: Optional[dict] = None):
    """WER (clipped at 100) vs % of frames (cells, encoder states) removed, per explanation type;
    the legend gives the area under each curve (higher = more faithful)."""
    deletion = summary.deletion() if deletion is None else deletion
    groups = [g for g in (groups or sorted({k[0] for k in deletion})) if any(k[0] == g for k in deletion)]
    if not groups:
        raise ValueError("no deletion rows to plot")
    fig, axes = _panels(len(groups))
    for ax, g in zip(axes, groups):
        for key in sorted((k for k in deletion if k[0] == g), key=lambda k: list(EXPLANATION_NAMES).index(k[1])
                          if k[1] in EXPLANATION_NAMES else 99):
            _, explanation, side, pooling, p = key
            curve = deletion[key]
            name = EXPLANATION_NAMES.get(explanation, explanation)
            extra = ", ".join(str(v) for v in (pooling, p) if v is not None and explanation != "sm_x_agg")
            ax.plot(curve["percent"], curve["wer"], "o-", ms=3, color=EXPLANATION_COLOURS.get(explanation),
                    label=f"{name}{' ' + extra if extra else ''}: {curve['auc']:.1f}")
        ax.set_title(f"{group_label(g)} deletion", fontsize=10)
        ax.set_xlabel("% removed (most relevant first)")
        ax.set_ylabel("WER (%)")
        ax.set_xlim(0, 100)
        ax.set_ylim(0, 105)
        ax.grid(alpha=0.3)
        ax.legend(fontsize=7, loc="lower right", title="area", title_fontsize=7)
    fig.tight_layout()
    return fig


def save(fig, out_dir: Path, stem: str, formats: Sequence[str] = ("png", "pdf"), dpi: int = 130) -> list[Path]:
    """Write the figure once per format; returns the paths."""
    out_dir.mkdir(parents=True, exist_ok=True)
    paths = []
    for fmt in formats:
        path = out_dir / f"{stem}.{fmt}"
        fig.savefig(path, dpi=dpi, bbox_inches="tight")
        paths.append(path)
    plt.close(fig)
    return paths


def png_bytes(fig, dpi: int = 110) -> bytes:
    import io

    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=dpi, bbox_inches="tight")
    plt.close(fig)
    return buf.getvalue()
