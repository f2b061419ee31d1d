"""The paper's tables from a run's committed results (METHOD.md sections 4-5).

Per model x task x language pair:
- grid_sm_x / grid_sm_h   Table 1: layer x head grid, per-layer head average (last column),
                          per-head layer average (last row), global average (corner)
- layers_sm_x             Table 2: CA per-layer head average vs SM^X, plus the layer-avg column
- layers_sm_h             Table 3: the same against SM^H
- gap                     context-mixing gap r(CA, SM^H) - r(CA, SM^X)
- pooling                 Table 4: one row per SM^X pooling, with deletion of aggregated SM^X
- p_sweep                 Table 6: one row per p_H, with deletion of SM^H
- quality                 Table 5: WER, deletion AUC per explanation and side, size
A correlation cell is the mean over utterances of that (layer, head) row (NaN-safe: NaN and NULL
correlations are left out, `n` counts the rest). Rows with layer NULL are averages over layers,
head NULL averages over heads (see docs/schema.md). Only committed units with status 'ok' count.
"""
from __future__ import annotations

import csv
import io
import os
from collections import Counter, defaultdict
from dataclasses import dataclass, field
from typing import Any, Optional

import numpy as np

from jobs.query import _arrow, connect
from jobs.schema import run_filesystem

try:  # the method's own metric definitions when available
    from xai_core import deletion_auc, wer_max
except ImportError:  # pragma: no cover - fallback for a partial checkout
    def wer_max(hypotheses, references) -> float:
        errors, words = _word_errors(hypotheses, references)
        return 0.0 if words == 0 else min(100.0, 100.0 * errors / words)

    def deletion_auc(percentages, wers) -> float:
        x, y = np.asarray(percentages, float), np.asarray(wers, float)
        return 100.0 * float(np.sum((x[1:] - x[:-1]) * (y[1:] + y[:-1]) / 2.0)) / (100.0 * 100.0)


@dataclass
class Report:
    name: str                 # file stem under RUN/tables/
    title: str
    columns: list[str]
    rows: list[list[Any]]
    digits: dict[str, int] = field(default_factory=dict)   # decimals per column (default 3)

    def cell(self, col: str, value: Any) -> str:
        if value is None or (isinstance(value, float) and np.isnan(value)):
            return ""
        if isinstance(value, float):
            return f"{value:.{self.digits.get(col, 3)}f}"
        return str(value)

    def text_rows(self) -> list[list[str]]:
        return [[self.cell(c, v) for c, v in zip(self.columns, row)] for row in self.rows]

    def to_csv(self) -> str:
        buf = io.StringIO()
        w = csv.writer(buf, lineterminator="\n")
        w.writerow(self.columns)
        w.writerows([["" if v is None else v for v in row] for row in self.rows])
        return buf.getvalue()

    def to_markdown(self) -> str:
        lines = [f"## {self.title}", "", "| " + " | ".join(self.columns) + " |",
                 "|" + "|".join("---" for _ in self.columns) + "|"]
        lines += ["| " + " | ".join(r) + " |" for r in self.text_rows()]
        return "\n".join(lines) + "\n"

    def to_latex(self) -> str:
        esc = lambda s: s.replace("\\", "\\textbackslash{}").replace("_", "\\_").replace("%", "\\%").replace("&", "\\&").replace("#", "\\#")  # noqa: E731
        lines = [f"% {self.title}", "\\begin{tabular}{" + "l" * len(self.columns) + "}", "\\toprule",
                 " & ".join(esc(c) for c in self.columns) + " \\\\", "\\midrule"]
        lines += [" & ".join(esc(c) for c in r) + " \\\\" for r in self.text_rows()]
        lines += ["\\bottomrule", "\\end{tabular}"]
        return "\n".join(lines) + "\n"


def _word_errors(hypotheses, references) -> tuple[int, int]:
    """(edit operations, reference words) over whitespace tokens, case-sensitive."""
    import jiwer

    errors, words, refs, hyps = 0, 0, [], []
    for h, r in zip(hypotheses, references):
        if r.split():
            refs.append(r)
            hyps.append(h)
        else:
            errors += len(h.split())
    if refs:
        out = jiwer.process_words(refs, hyps)
        errors += out.substitutions + out.deletions + out.insertions
        words += sum(len(r.split()) for r in refs)
    return errors, words


def corpus_wer(hypotheses, references) -> Optional[float]:
    """Corpus WER in percent (not clipped), None without reference words."""
    errors, words = _word_errors(hypotheses, references)
    return None if words == 0 else 100.0 * errors / words


def _pkey(p: Optional[float]) -> Optional[float]:
    return None if p is None or (isinstance(p, float) and np.isnan(p)) else round(float(p), 6)


def _fetch(con, sql: str) -> list[dict]:
    return _arrow(con.sql(sql)).to_pylist()


def _group_label(g: tuple) -> list[str]:
    model, task, src, tgt = g
    return [src, tgt, model, task]


GROUP_COLS = ["src", "tgt", "model", "task"]


def reduce_run(run: str | os.PathLike, write: bool = True) -> list[Report]:
    """Compute every table of the run; write CSV/Markdown/LaTeX under RUN/tables/ when `write`."""
    from jobs.spec import read_job_yaml

    spec = read_job_yaml(str(run))
    con = connect(run)
    try:
        # NaN-safe means are taken in Arrow: DuckDB's isnan() can be folded away by Parquet statistics
        corr = _mean_by(_arrow(con.sql("""
            SELECT s.model, s.task, s.src_lang AS src, s.tgt_lang AS tgt, c.target, c.layer, c.head, c.pooling, c.p,
                   c.pearson FROM correlations c JOIN segments s ON c.unit_id = s.unit_id AND c.shard = s.shard
            WHERE s.status = 'ok'""")), "pearson", "r")
        deletion = _fetch(con, """
            SELECT s.model, s.task, s.src_lang AS src, s.tgt_lang AS tgt, d.explanation, d.side, d.pooling, d.p,
                   d.percent, coalesce(d.hypothesis, '') AS hypothesis, coalesce(d.reference, s.reference, '') AS reference
            FROM deletion d JOIN segments s ON d.unit_id = s.unit_id AND d.shard = s.shard WHERE s.status = 'ok'""")
        size = _mean_by(_arrow(con.sql("""
            SELECT s.model, s.task, s.src_lang AS src, s.tgt_lang AS tgt, z.explanation, z.pooling, z.p, z.threshold,
                   z.share FROM size z JOIN segments s ON z.unit_id = s.unit_id AND z.shard = s.shard
            WHERE s.status = 'ok'""")), "share", "share")
        units = _fetch(con, """
            SELECT model, task, src_lang AS src, tgt_lang AS tgt, status, hypothesis, reference FROM segments""")
    finally:
        con.close()

    # headline settings: from the frozen spec, else the most common values in the data
    input_rows = [c for c in corr if c["target"] == "input"]
    enc_rows = [c for c in corr if c["target"] == "encoder"]
    poolings = sorted({c["pooling"] for c in input_rows if c["pooling"]})
    if spec is not None:
        head_pool, p_x, p_h = spec.method.headline_pooling, spec.method.p_input, spec.method.p_encoder
    else:
        head_pool = "2d_max" if "2d_max" in poolings else (poolings[0] if poolings else None)
        p_x = _most_common(c["p"] for c in input_rows)
        p_h = _most_common(c["p"] for c in enc_rows)
    p_x, p_h = _pkey(p_x), _pkey(p_h)

    # cells[(group, target, pooling, p, layer, head)] = (mean r, n)
    cells: dict[tuple, tuple[float, int]] = {}
    for c in corr:
        g = (c["model"], c["task"], c["src"], c["tgt"])
        pool = c["pooling"] if c["target"] == "input" else None
        cells[(g, c["target"], pool, _pkey(c["p"]), c["layer"], c["head"])] = (c["r"], c["n"])

    def get(g, target, layer, head, pooling=None, p=None) -> tuple[Optional[float], int]:
        """(mean r, n) of one cell; NULL pooling/p in the data stand for the headline setting."""
        main_pool, main_p = (head_pool, p_x) if target == "input" else (None, p_h)
        want_pool = (pooling or head_pool) if target == "input" else None
        want_p = _pkey(p) if p is not None else main_p
        pools = [want_pool] + ([None] if want_pool == main_pool and want_pool is not None else [])
        ps = [want_p] + ([None] if want_p == main_p and want_p is not None else [])
        for pool in pools:
            for pk in ps:
                hit = cells.get((g, target, pool, pk, layer, head))
                if hit is not None:
                    return hit
        return None, 0

    groups = sorted({k[0] for k in cells} | {(u["model"], u["task"], u["src"], u["tgt"]) for u in units},
                    key=lambda g: (g[2], g[3], g[0], g[1]))
    layers_of = lambda g, t: sorted({k[4] for k in cells if k[0] == g and k[1] == t and k[4] is not None})  # noqa: E731
    heads_of = lambda g, t: sorted({k[5] for k in cells if k[0] == g and k[1] == t and k[5] is not None})  # noqa: E731

    del_auc = _deletion_aucs(deletion, head_pool, p_x, p_h)
    size_area = _size_areas(size, head_pool, p_x, p_h)

    reports: list[Report] = []
    for target, tag, sal in (("input", "sm_x", "SM^X"), ("encoder", "sm_h", "SM^H")):
        reports.append(_grid_report(tag, sal, target, groups, layers_of, heads_of, get))
        reports.append(_layers_report(tag, sal, target, groups, layers_of, get))
    reports.append(_gap_report(groups, layers_of, get))
    reports.append(_pooling_report(groups, layers_of, get, poolings, head_pool, p_x, del_auc))
    reports.append(_sweep_report(groups, layers_of, get, cells, p_h, del_auc))
    reports.append(_quality_report(groups, units, del_auc, size_area, head_pool, p_x, p_h))
    if write:
        write_reports(run, reports)
    return reports


def _mean_by(table, value: str, name: str) -> list[dict]:
    """Mean of `value` over rows grouped by every other column, leaving out NULL and NaN; adds `n`."""
    import pyarrow.compute as pc

    col = table[value]
    keep = pc.fill_null(pc.invert(pc.is_nan(col)), False)
    table = table.filter(keep)
    keys = [c for c in table.column_names if c != value]
    out = table.group_by(keys, use_threads=False).aggregate([(value, "mean"), (value, "count")])
    return [{**{k: r[k] for k in keys}, name: r[f"{value}_mean"], "n": r[f"{value}_count"]} for r in out.to_pylist()]


def _most_common(values) -> Optional[float]:
    counts = Counter(_pkey(v) for v in values if _pkey(v) is not None)
    return counts.most_common(1)[0][0] if counts else None


def _deletion_aucs(rows: list[dict], head_pool, p_x, p_h) -> dict[tuple, float]:
    """{(group, explanation, side, pooling, p): AUC}; NULL pooling/p mean the headline setting."""
    curves: dict[tuple, dict[int, tuple[list, list]]] = defaultdict(lambda: defaultdict(lambda: ([], [])))
    for r in rows:
        g = (r["model"], r["task"], r["src"], r["tgt"])
        pool = r["pooling"] or (head_pool if r["explanation"] == "sm_x_agg" else None)
        p = _pkey(r["p"]) if r["p"] is not None else (p_h if r["side"] == "encoder" or r["explanation"] == "sm_h"
                                                      else (p_x if r["explanation"].startswith("sm_x") else None))
        hyps, refs = curves[(g, r["explanation"], r["side"], pool, p)][int(r["percent"])]
        hyps.append(r["hypothesis"])
        refs.append(r["reference"])
    out = {}
    for key, by_pct in curves.items():
        pcts = sorted(by_pct)
        if len(pcts) >= 2:
            out[key] = deletion_auc(pcts, [wer_max(*by_pct[q]) for q in pcts])
    return out


def _size_areas(rows: list[dict], head_pool, p_x, p_h) -> dict[tuple, float]:
    curves: dict[tuple, list[tuple[float, float]]] = defaultdict(list)
    for r in rows:
        if r["share"] is None:
            continue
        g = (r["model"], r["task"], r["src"], r["tgt"])
        curves[(g, r["explanation"], r["pooling"], _pkey(r["p"]))].append((r["threshold"], r["share"]))
    out = {}
    for key, pts in curves.items():
        pts.sort()
        x, y = np.array([a for a, _ in pts]), np.array([b for _, b in pts])
        if len(x) >= 2:
            out[key] = float(np.sum((x[1:] - x[:-1]) * (y[1:] + y[:-1]) / 2.0))
    return out


def _lcols(n: int) -> list[str]:
    return [f"l{i + 1}" for i in range(n)]


def _grid_report(tag, sal, target, groups, layers_of, heads_of, get) -> Report:
    n_heads = max([len(heads_of(g, target)) for g in groups] + [0])
    cols = GROUP_COLS + ["layer"] + [f"h{i + 1}" for i in range(n_heads)] + ["head-avg"]
    rows = []
    for g in groups:
        layers, heads = layers_of(g, target), heads_of(g, target)
        if not layers and not heads:
            continue
        for layer in layers:
            vals = [get(g, target, layer, h)[0] for h in heads]
            rows.append(_group_label(g) + [str(layer + 1)] + vals + [None] * (n_heads - len(heads)) + [get(g, target, layer, None)[0]])
        vals = [get(g, target, None, h)[0] for h in heads]
        rows.append(_group_label(g) + ["layer-avg"] + vals + [None] * (n_heads - len(heads)) + [get(g, target, None, None)[0]])
    return Report(f"grid_{tag}", f"Table 1: CA vs {sal}, layer x head (mean Pearson r over utterances)", cols, rows)


def _layer_row(g, target, layers, n_layers, get, **kw) -> list:
    return [get(g, target, layer, None, **kw)[0] for layer in layers] + [None] * (n_layers - len(layers)) + \
        [get(g, target, None, None, **kw)[0]]


def _layers_report(tag, sal, target, groups, layers_of, get) -> Report:
    n_layers = max([len(layers_of(g, target)) for g in groups] + [0])
    cols = GROUP_COLS + _lcols(n_layers) + ["layer-avg", "n"]
    rows = [_group_label(g) + _layer_row(g, target, layers_of(g, target), n_layers, get) + [get(g, target, None, None)[1]]
            for g in groups if layers_of(g, target) or get(g, target, None, None)[1]]
    number = "2" if target == "input" else "3"
    return Report(f"layers_{tag}", f"Table {number}: CA (per-layer head average) vs {sal}", cols, rows, {"n": 0})


def _gap_report(groups, layers_of, get) -> Report:
    n_layers = max([len(layers_of(g, "encoder")) for g in groups] + [0])
    cols = GROUP_COLS + _lcols(n_layers) + ["layer-avg"]
    rows = []
    for g in groups:
        layers = sorted(set(layers_of(g, "encoder")) & set(layers_of(g, "input")))
        if not layers and get(g, "encoder", None, None)[0] is None:
            continue
        diff = lambda a, b: None if a is None or b is None else a - b  # noqa: E731
        vals = [diff(get(g, "encoder", l, None)[0], get(g, "input", l, None)[0]) for l in layers]
        rows.append(_group_label(g) + vals + [None] * (n_layers - len(layers))
                    + [diff(get(g, "encoder", None, None)[0], get(g, "input", None, None)[0])])
    return Report("gap", "Context-mixing gap: r(CA, SM^H) - r(CA, SM^X)", cols, rows)


def _pooling_report(groups, layers_of, get, poolings, head_pool, p_x, del_auc) -> Report:
    n_layers = max([len(layers_of(g, "input")) for g in groups] + [0])
    cols = GROUP_COLS + ["pooling"] + _lcols(n_layers) + ["layer-avg", "deletion"]
    rows = []
    order = ([head_pool] if head_pool in poolings else []) + [p for p in poolings if p != head_pool]
    for g in groups:
        for pool in order:
            if get(g, "input", None, None, pooling=pool)[1] == 0 and not any(
                    get(g, "input", l, None, pooling=pool)[1] for l in layers_of(g, "input")):
                continue
            keys = sorted((k for k in del_auc if k[:4] == (g, "sm_x_agg", "input", pool)), key=lambda k: k[4] != p_x)
            d = del_auc[keys[0]] if keys else None
            rows.append(_group_label(g) + [pool] + _layer_row(g, "input", layers_of(g, "input"), n_layers, get, pooling=pool) + [d])
    return Report("pooling", "Table 4: aggregation of SM^X to the CA grid (deletion: aggregated SM^X, AUC %)",
                  cols, rows, {"deletion": 2})


def _sweep_report(groups, layers_of, get, cells, p_h, del_auc) -> Report:
    n_layers = max([len(layers_of(g, "encoder")) for g in groups] + [0])
    cols = GROUP_COLS + ["p_H"] + _lcols(n_layers) + ["layer-avg", "deletion"]
    rows = []
    for g in groups:
        ps = sorted({k[3] if k[3] is not None else p_h for k in cells if k[0] == g and k[1] == "encoder"},
                    key=lambda v: -1 if v is None else -v)
        for p in ps:
            d = next((v for k, v in del_auc.items() if k[:3] == (g, "sm_h", "encoder") and k[4] == p), None)
            rows.append(_group_label(g) + [p] + _layer_row(g, "encoder", layers_of(g, "encoder"), n_layers, get, p=p) + [d])
    return Report("p_sweep", "Table 6: occlusion probability p_H for SM^H (deletion: SM^H, encoder side, AUC %)",
                  cols, rows, {"p_H": 2, "deletion": 2})


def _quality_report(groups, units, del_auc, size_area, head_pool, p_x, p_h) -> Report:
    del_cols = sorted({(k[1], k[2]) for k in del_auc}, key=lambda e: (e[1] != "input", e[0]))
    size_cols = sorted({k[1] for k in size_area})
    cols = GROUP_COLS + ["ok", "failed", "WER"] + [f"del {e} {s}" for e, s in del_cols] + [f"size {e}" for e in size_cols]
    digits = {c: 2 for c in cols}

    def headline(keys, expl, pool_at, p_at):
        """The key of the job's headline variant (headline pooling, main p) among `keys`."""
        main_p = p_h if expl == "sm_h" else (p_x if expl.startswith("sm_x") else None)
        rank = lambda k: (k[pool_at] not in (None, head_pool), k[p_at] not in (None, main_p), str(k))  # noqa: E731
        return min(keys, key=rank) if keys else None

    rows = []
    for g in groups:
        mine = [u for u in units if (u["model"], u["task"], u["src"], u["tgt"]) == g]
        ok = [u for u in mine if u["status"] == "ok"]
        scored = [u for u in ok if u["reference"] is not None]
        wer = corpus_wer([u["hypothesis"] or "" for u in scored], [u["reference"] for u in scored]) if scored else None
        dels = []
        for e, side in del_cols:
            k = headline([k for k in del_auc if k[:3] == (g, e, side)], e, 3, 4)
            dels.append(del_auc[k] if k else None)
        sizes = []
        for e in size_cols:
            k = headline([k for k in size_area if k[:2] == (g, e)], e, 2, 3)
            sizes.append(size_area[k] if k else None)
        rows.append(_group_label(g) + [len(ok), len(mine) - len(ok), wer] + dels + sizes)
    return Report("quality", "Table 5: model and explanation quality (WER %, deletion AUC %, size %)", cols, rows, digits)


def write_reports(run: str | os.PathLike, reports: list[Report]) -> str:
    """Write <name>.csv/.md/.tex and all-in-one tables.md/tables.tex under RUN/tables/."""
    fs, path = run_filesystem(run)
    folder = f"{path.rstrip('/')}/tables"
    fs.create_dir(folder, recursive=True)

    def put(name: str, text: str) -> None:
        with fs.open_output_stream(f"{folder}/{name}") as f:
            f.write(text.encode("utf-8"))

    for r in reports:
        put(f"{r.name}.csv", r.to_csv())
        put(f"{r.name}.md", r.to_markdown())
        put(f"{r.name}.tex", r.to_latex())
    put("tables.md", "\n".join(r.to_markdown() for r in reports))
    put("tables.tex", "\n".join(r.to_latex() for r in reports))
    return folder


def print_reports(reports: list[Report], console=None) -> None:
    from rich.console import Console
    from rich.table import Table

    if console is None:
        console = Console()
        if not console.is_terminal:  # piped or captured: do not squeeze tables into 80 columns
            console = Console(width=200)
    for r in reports:
        if not r.rows:
            continue
        table = Table(title=r.title, title_justify="left")
        if len(r.columns) > 10 and len(r.rows) <= 8:  # wide and short (quality): one column per group
            table.add_column("")
            for row in r.rows:
                table.add_column(" ".join(str(v) for v in row[:len(GROUP_COLS)]), justify="right")
            for i, c in enumerate(r.columns[len(GROUP_COLS):], start=len(GROUP_COLS)):
                table.add_row(c, *[t[i] for t in r.text_rows()])
        else:
            for c in r.columns:
                table.add_column(c, justify="left" if c in GROUP_COLS + ["layer", "pooling"] else "right")
            for row in r.text_rows():
                table.add_row(*row)
        console.print(table)
