"""`xs2t bench`: masks/s and achieved FLOP/s of the SM^X and SM^H loops on this device."""
from __future__ import annotations

import json
import sys

import typer

WORKLOAD_CHOICES = ("whisper-base", "conformer-base", "fama-small", "fbk-tiny", "all")


def bench(
    workload: str = typer.Option("all", "--workload", "-w", help="whisper-base | conformer-base | fama-small | fbk-tiny | "
                                 "all (all = the first three)."),
    n_masks: int = typer.Option(0, "--n-masks", help="Masks per timing of the optimized loops (0: by device and workload)."),
    n_masks_encoder: int = typer.Option(0, "--n-masks-encoder", help="Masks per SM^H timing (0: --n-masks or by device)."),
    n_naive: int = typer.Option(0, "--n-naive", help="Masks per timing of the naive baseline (0: by device and workload)."),
    dtype: str = typer.Option("auto", "--dtype", help="auto | float32 | bfloat16 (auto: bf16 where supported)."),
    device: str = typer.Option("auto", "--device", help="auto | cpu | cuda | cuda:N."),
    repeats: int = typer.Option(3, "--repeats", help="Interleaved rounds; medians are reported."),
    batch_size: int = typer.Option(0, "--batch-size", help="Masks per batch (0: xai_core's memory-based choice)."),
    skip_naive: bool = typer.Option(False, "--skip-naive", help="Do not time the naive baseline."),
    as_json: bool = typer.Option(False, "--json", help="One JSON object per workload and loop on stdout."),
) -> None:
    """Benchmark the perturbation loops: masks/s, achieved FLOP/s vs. the measured matmul rate, speed-up over
    a naive reimplementation of the reference, memory per mask and the paper workload's extrapolated time."""
    from bench.runner import BenchConfig, format_table, run

    if workload not in WORKLOAD_CHOICES:
        raise typer.BadParameter(f"--workload must be one of {', '.join(WORKLOAD_CHOICES)}, not {workload!r}")
    if dtype not in ("auto", "float32", "bfloat16"):
        raise typer.BadParameter(f"--dtype must be auto, float32 or bfloat16, not {dtype!r}")
    if repeats < 1:
        raise typer.BadParameter("--repeats must be at least 1")
    names = ["whisper-base", "conformer-base", "fama-small"] if workload == "all" else [workload]
    cfg = BenchConfig(n_masks=n_masks or None, n_masks_encoder=n_masks_encoder or None, n_naive=n_naive or None,
                      dtype=dtype, device=device, repeats=repeats, skip_naive=skip_naive, batch_size=batch_size or None)
    log = (lambda msg: print(msg, file=sys.stderr, flush=True))
    records = run(names, cfg, log=log)
    if as_json:
        for r in records:
            typer.echo(json.dumps(r))
    else:
        typer.echo(format_table(records))


def register(app: typer.Typer) -> None:
    app.command("bench")(bench)
