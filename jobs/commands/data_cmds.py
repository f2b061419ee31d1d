"""Data-side commands: make-corpus, init-job, reduce, query (registered by jobs.cli)."""
from __future__ import annotations

from pathlib import Path
from typing import Optional

import typer


def _split_list(value: Optional[str]) -> Optional[list[str]]:
    return [v.strip() for v in value.split(",") if v.strip()] if value else None


def make_corpus_cmd(
    out: Path = typer.Option(..., "--out", help="Folder to write the corpus into (created if needed)."),
    langs: str = typer.Option("en,it", "--langs", help="Comma-separated spoken languages (en, it). Every pair "
                              "among them is written: en-en, en-it, it-it, it-en."),
    segments: int = typer.Option(6, "--segments", min=1, help="Segments (sentences) per language."),
    seed: int = typer.Option(0, "--seed", help="Seed for the choice and order of the sentences."),
) -> None:
    """Synthesise a small EuroParl-ST-shaped demo corpus with espeak-ng.

    Writes <out>/<src>/audios/*.m4a (talks of three sentences with 0.4 s pauses, 16 kHz AAC) and,
    per pair, <out>/<src>/<tgt>/test/ with segments.lst (talk start end, in seconds),
    segments.<src>, segments.<tgt>, speakers.lst and words.jsonl (exact word timings relative to
    each segment's start). Use it with corpus kind 'europarl'. Needs espeak-ng installed.
    """
    from jobs.make_corpus import make_corpus

    counts = make_corpus(out, tuple(_split_list(langs) or ["en", "it"]), segments, seed)
    for pair, n in counts.items():
        typer.echo(f"{pair}: {n} segments")
    typer.echo(f"corpus written to {out}  (next: xs2t init-job --corpus {out} --model whisper-base --out job.yaml)")


def init_job_cmd(
    corpus: str = typer.Option(..., "--corpus", help="EuroParl-ST root folder, a fairseq-S2T .tsv manifest, "
                               "or a folder of audio files (kind is detected; edit the file to change it)."),
    model: str = typer.Option("whisper-base", "--model", help="Model name or checkpoint path."),
    out: Path = typer.Option(..., "--out", help="Job file to write (YAML, with comments on every field)."),
    pairs: Optional[str] = typer.Option(None, "--pairs", help="Comma-separated language pairs, e.g. en-en,it-en "
                                        "(src == tgt: ASR, else ST). Default: every pair found in a EuroParl-ST "
                                        "root, else en-en."),
    n_input: int = typer.Option(20000, "--n-input", min=0, help="N_X: SPES masks over the input features."),
    n_encoder: int = typer.Option(20000, "--n-encoder", min=0, help="N_H: masks over the encoder states."),
    run_dir: Optional[str] = typer.Option(None, "--run-dir", help="Where results go: a folder or a URI "
                                          "(s3://bucket/prefix). Default: runs/<job name> beside the job file."),
) -> None:
    """Write a commented job file to start from.

    The file lists every setting with its default and a comment; it is validated before this
    command returns. Run it with `xs2t run JOB.yaml`.
    """
    from jobs.spec import init_job, load_job

    path = init_job(corpus, model, out, _split_list(pairs), n_input, n_encoder, run_dir)
    spec = load_job(path)
    typer.echo(f"wrote {path}: {spec.corpus.kind} corpus, pairs {', '.join(spec.corpus.pairs)}, "
               f"model {spec.models[0].key}, run dir {spec.output.run_dir}")


def reduce_cmd(
    run: str = typer.Argument(..., help="Run directory (folder or URI such as s3://bucket/prefix)."),
    quiet: bool = typer.Option(False, "--quiet", "-q", help="Only write the files, do not print the tables."),
) -> None:
    """Compute the paper's tables from the committed results of a run.

    Per model x task x language pair: the layer x head grid (Table 1) for CA vs SM^X and vs SM^H,
    layer rows (Tables 2-3) and the context-mixing gap, the pooling comparison (Table 4), the p_H
    sweep (Table 6), and WER, deletion AUC and size (Table 5). A cell is the mean over utterances
    (NaN-safe). Only units whose segments row says status 'ok' count. Writes CSV, Markdown and
    LaTeX to RUN/tables/ (one file per table plus tables.md and tables.tex).
    """
    from jobs.reducer import print_reports, reduce_run

    reports = reduce_run(run)
    if not quiet:
        print_reports(reports)
    typer.echo(f"tables written to {run.rstrip('/')}/tables/")


def query_cmd(
    run: str = typer.Argument(..., help="Run directory (folder or URI such as s3://bucket/prefix)."),
    sql: str = typer.Argument(..., help="SQL (DuckDB dialect) over the views segments, cross_attention, "
                              "saliency_input, saliency_encoder, correlations, deletion, size, plan."),
    fmt: str = typer.Option("table", "--format", "-f", help="Output format: table, csv or json."),
) -> None:
    """Run SQL over a run's results.

    Every table is a view named after it; only committed units are visible (other tables only for
    units with status 'ok'). Columns are documented in docs/schema.md. Examples:

      xs2t query RUN "SELECT status, count(*) FROM segments GROUP BY status"

      xs2t query RUN "SELECT layer, avg(pearson) FROM correlations WHERE target='input' AND head IS NULL GROUP BY layer ORDER BY layer"
    """
    from jobs.query import query, write_result

    if fmt not in ("table", "csv", "json"):
        raise typer.BadParameter("use table, csv or json", param_hint="--format")
    write_result(query(run, sql), fmt)


def register(app: typer.Typer) -> None:
    app.command("make-corpus")(make_corpus_cmd)
    app.command("init-job")(init_job_cmd)
    app.command("reduce")(reduce_cmd)
    app.command("query")(query_cmd)
