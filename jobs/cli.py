"""The `xs2t` command line: a thin shell over `jobs` and `cluster`.

Each area registers its commands from `jobs/commands/*.py` (`register(app)`), so the modules stay
small and independent. Errors the user can fix are printed as one line (no traceback) unless
`--debug` is given.
"""
from __future__ import annotations

import os
import sys

import typer

from jobs.commands import bench_cmds, data_cmds, demo_cmds, model_cmds, run_cmds, view_cmds
from jobs.errors import USER_ERRORS

app = typer.Typer(
    name="xs2t",
    help=(
        "xs2t: what did my speech-to-text model listen to?\n\n"
        "Computes, for every utterance of a corpus, the beam hypothesis, the decoder cross-attention "
        "of every layer and head, SPES input saliency (SM^X) and encoder-output saliency (SM^H), their "
        "Pearson correlations and faithfulness metrics (Papi et al., 2025), on local Ray, a Ray "
        "cluster or Slurm, streamed to Parquet."
    ),
    no_args_is_help=True,
    pretty_exceptions_enable=False,
    add_completion=False,
)


@app.callback()
def _root(debug: bool = typer.Option(False, "--debug", help="Show full tracebacks on errors.")) -> None:
    if debug:
        os.environ["XS2T_DEBUG"] = "1"


for _module in (model_cmds, data_cmds, run_cmds, view_cmds, bench_cmds, demo_cmds):
    _module.register(app)


def main() -> None:
    debug = "--debug" in sys.argv or os.environ.get("XS2T_DEBUG") == "1"
    try:
        app()
    except USER_ERRORS as exc:
        if debug:
            raise
        typer.secho(f"error: {exc}", fg=typer.colors.RED, err=True)
        sys.exit(2)
    except KeyboardInterrupt:
        typer.secho("interrupted", err=True)
        sys.exit(130)


if __name__ == "__main__":
    main()
