"""`xs2t transcribe` and `xs2t explain`: one model, a few audio files, no cluster."""
from __future__ import annotations

import json
from pathlib import Path
from typing import List, Optional

import typer

MODEL_HELP = ("Model: `whisper-base`, `whisper-tiny.en` (bundled weights), or a path: Hugging Face "
              "Whisper folder, openai-whisper .pt, CTranslate2 folder, or a fairseq FBK Conformer .pt "
              "(with --config-yaml, or --spm and --dict).")


def _load(model: str, spm: Optional[Path], dict_: Optional[Path], config_yaml: Optional[Path], dtype: str):
    from models.registry import load_model

    kwargs = {}
    if spm:
        kwargs["spm"] = str(spm)
    if dict_:
        kwargs["dict"] = str(dict_)
    if config_yaml:
        kwargs["config_yaml"] = str(config_yaml)
    return load_model(model, **kwargs)


def transcribe(
    audio: List[Path] = typer.Argument(..., help="Audio files (wav, flac, mp3, m4a, ...; any sample rate)."),
    model: str = typer.Option("whisper-base", "--model", "-m", help=MODEL_HELP),
    lang: Optional[str] = typer.Option(None, "--lang", help="Spoken language (e.g. en, it)."),
    tgt_lang: Optional[str] = typer.Option(None, "--tgt-lang", help="Output language for speech translation "
                                           "(FBK multilingual models); defaults to --lang."),
    task: str = typer.Option("transcribe", "--task", help="transcribe | translate (Whisper: translate = into English)."),
    beam: int = typer.Option(5, "--beam", help="Beam size."),
    as_json: bool = typer.Option(False, "--json", help="Print one JSON object per file: text, tokens, token ids, "
                                 "per-token log-probs."),
    spm: Optional[Path] = typer.Option(None, "--spm", help="SentencePiece model (fairseq checkpoints)."),
    dict_: Optional[Path] = typer.Option(None, "--dict", help="fairseq dictionary txt (fairseq checkpoints)."),
    config_yaml: Optional[Path] = typer.Option(None, "--config-yaml", help="fairseq-S2T config.yaml (fairseq checkpoints)."),
) -> None:
    """Decode audio files with beam search and print the hypotheses."""
    from jobs.explain import decode_files

    m = _load(model, spm, dict_, config_yaml, "float32")
    for path, hyp in decode_files(m, audio, lang=lang, tgt_lang=tgt_lang, task=task, beam=beam):
        if as_json:
            typer.echo(json.dumps({"file": str(path), **hyp.to_dict()}, ensure_ascii=False))
        else:
            typer.echo(f"{path}\t{hyp.text}")


def explain(
    audio: List[Path] = typer.Argument(..., help="Audio files to explain."),
    out: Path = typer.Option(..., "--out", "-o", help="Output folder for the Parquet tables."),
    model: str = typer.Option("whisper-base", "--model", "-m", help=MODEL_HELP),
    lang: Optional[str] = typer.Option(None, "--lang", help="Spoken language."),
    tgt_lang: Optional[str] = typer.Option(None, "--tgt-lang", help="Output language (speech translation)."),
    task: str = typer.Option("transcribe", "--task", help="transcribe | translate."),
    n_input: int = typer.Option(20000, "--n-input", help="Masks for SM^X (input saliency, SPES)."),
    n_encoder: int = typer.Option(20000, "--n-encoder", help="Masks for SM^H (encoder-output saliency)."),
    p_input: float = typer.Option(0.5, "--p-input", help="Probability of occluding a superpixel."),
    p_encoder: float = typer.Option(0.7, "--p-encoder", help="Probability of zeroing an encoder state."),
    seed: int = typer.Option(0, "--seed", help="Mask seed (masks are a pure function of seed, segment, level, index)."),
    skip: List[str] = typer.Option([], "--skip", help="Skip `input` (SM^X) and/or `encoder` (SM^H)."),
    dtype: str = typer.Option("float32", "--dtype", help="Precision of the perturbed passes: float32 | bfloat16."),
    spm: Optional[Path] = typer.Option(None, "--spm", help="SentencePiece model (fairseq checkpoints)."),
    dict_: Optional[Path] = typer.Option(None, "--dict", help="fairseq dictionary txt (fairseq checkpoints)."),
    config_yaml: Optional[Path] = typer.Option(None, "--config-yaml", help="fairseq-S2T config.yaml."),
) -> None:
    """Explain audio files: hypothesis, cross-attention, SM^X, SM^H and their correlations, as Parquet."""
    from jobs.explain import explain_files

    bad = set(skip) - {"input", "encoder"}
    if bad:
        raise typer.BadParameter(f"--skip takes 'input' or 'encoder', not {sorted(bad)}")
    explain_files(audio, out, model=model, lang=lang, tgt_lang=tgt_lang, task=task, n_input=n_input,
                  n_encoder=n_encoder, p_input=p_input, p_encoder=p_encoder, seed=seed, skip=set(skip),
                  dtype=dtype, spm=spm, dict_path=dict_, config_yaml=config_yaml)


def register(app: typer.Typer) -> None:
    app.command("transcribe")(transcribe)
    app.command("explain")(explain)
