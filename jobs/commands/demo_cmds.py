"""`xs2t demo`: the whole chain on the embedded default, one command."""
from __future__ import annotations

import shutil
from pathlib import Path
from typing import Optional

import typer

BUNDLED_CORPUS = Path(__file__).resolve().parents[1] / "data" / "demo_corpus"


def demo(
    out: Path = typer.Option(Path("xs2t-demo"), "--out", help="Folder for the corpus copy, job file and run directory."),
    model: str = typer.Option("whisper-base", "--model", help="Model name or checkpoint path."),
    pairs: str = typer.Option("en-en,it-en", "--pairs", help="Language pairs to run (src == tgt: ASR, else ST)."),
    n_input: int = typer.Option(128, "--n-input", help="N_X masks per segment (the paper uses 20,000)."),
    n_encoder: int = typer.Option(1024, "--n-encoder", help="N_H masks per segment (the paper uses 20,000)."),
    dtype: str = typer.Option("bfloat16", "--dtype", help="Precision of the perturbed passes (float32 | bfloat16)."),
    workers: Optional[int] = typer.Option(None, "--workers", help="Model actors (default: one per CPU core)."),
    synthesize: bool = typer.Option(False, "--synthesize", help="Synthesize a fresh corpus with espeak-ng "
                                    "instead of using the bundled one."),
    segments: int = typer.Option(2, "--segments", help="With --synthesize: segments per language."),
) -> None:
    """make-corpus -> run (local Ray) -> reduce -> plot -> report, on the bundled demo corpus.

    Prints the paper's tables for the demo run and where the HTML report is. Small N keeps it to a
    few minutes on a laptop CPU; the maps are noisier than with the paper's 20,000 masks.
    """
    from jobs.cli import app
    from jobs.spec import init_job

    command = typer.main.get_command(app)

    def step(*args: str) -> None:
        typer.secho(f"\n$ xs2t {' '.join(args)}", bold=True)
        command.main(list(args), prog_name="xs2t", standalone_mode=False)

    out.mkdir(parents=True, exist_ok=True)
    corpus = out / "corpus"
    if synthesize:
        step("make-corpus", "--out", str(corpus), "--langs", "en,it", "--segments", str(segments))
    elif not corpus.exists():
        shutil.copytree(BUNDLED_CORPUS, corpus)
    job = out / "job.yaml"
    run = (out / "run").resolve()   # job-file paths are relative to the job file; keep this one absolute
    if run.exists():
        shutil.rmtree(run)
    init_job(str(corpus), model, job, [p.strip() for p in pairs.split(",") if p.strip()], n_input, n_encoder, str(run))
    text = job.read_text().replace("dtype: float32", f"dtype: {dtype}")
    job.write_text(text)
    typer.secho(f"job file: {job}", bold=True)
    run_args = ["run", str(job)] + (["--workers", str(workers)] if workers else [])
    step(*run_args)
    step("reduce", str(run))
    step("plot", str(run))
    step("report", str(run))
    typer.secho(f"\ndemo finished: run directory {run}, report {run / 'report.html'}", fg=typer.colors.GREEN, bold=True)


def register(app: typer.Typer) -> None:
    app.command("demo")(demo)
