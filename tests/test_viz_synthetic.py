"""A synthetic but schema-correct run directory for the viz tests (and a check of it).

Two models: 'fbk' (SentencePiece pieces, language-tag prefix, 4 frames per encoder step) with two
ASR units and one ST unit, and 'whisper' (byte-level pieces, three forced prefix tokens, 2 frames
per step) with the same two ASR segments; plus one failed unit. Every map is built from the known
word boundaries: layer-2 heads attend to the right words, layer-1 heads barely, and head l2h4
attends one word late, so rankings and timestamps have a known best answer. Correlation rows are
computed with xai_core from the maps, as the pipeline does.
"""
from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import torch
import yaml

import xai_core
from cluster.store import RunStore
from jobs.schema import segments_row, table_from_rows

T_FRAMES, N_BINS, L, H = 300, 80, 2, 4
TALK = "en.synth.000.001"
SENTENCES = [  # (reference words, hypothesis words: one recognition error in the second)
    (["the", "parliament", "is", "now", "open"], ["the", "parliament", "is", "now", "open."]),
    (["we", "vote", "on", "this", "report"], ["we", "vote", "on", "his", "report"]),
]
ST_TEXT = "il parlamento è aperto"
GOOD = {(1, 0): 0.9, (1, 1): 0.8, (1, 2): 0.7}   # l2h4 (1, 3) is shifted by one word


def word_spans(words: list[str], rng: np.random.Generator, total_s: float = T_FRAMES / 100) -> list[dict]:
    """Word boundaries inside [0.05, total - 0.05] s, lengths proportional to the letters."""
    sizes = np.array([len(w) + 2 + rng.uniform(0, 1) for w in words])
    gap, margin = 0.06, 0.05
    scale = (total_s - 2 * margin - gap * (len(words) - 1)) / sizes.sum()
    out, t = [], margin
    for w, s in zip(words, sizes):
        out.append({"word": w, "start": round(t, 4), "end": round(t + s * scale, 4)})
        t += s * scale + gap
    return out


def pieces(words: list[str], style: str) -> list[list[str]]:
    """Sub-word pieces of each word (words of 6+ letters are split in two)."""
    mark = "▁" if style == "sp" else "Ġ"
    out = []
    for i, w in enumerate(words):
        first = mark + w if style == "sp" or i > 0 else w.capitalize()  # Whisper: first word has no space
        if style == "bpe" and i == 0:
            first = "Ġ" + w
        out.append([first[: len(first) // 2 + 1], first[len(first) // 2 + 1:]] if len(w) >= 6 else [first])
    return out


def token_truth(spans: list[dict], word_pieces: list[list[str]], n_frames: int) -> np.ndarray:
    """[I_content, T] 1 inside each token's share of its word."""
    g = np.zeros((sum(len(p) for p in word_pieces), n_frames), np.float32)
    i = 0
    for span, ps in zip(spans, word_pieces):
        edges = np.linspace(span["start"], span["end"], len(ps) + 1)
        for a, b in zip(edges[:-1], edges[1:]):
            g[i, int(a * 100): max(int(a * 100) + 1, int(b * 100))] = 1.0
            i += 1
    return g


def to_steps(x: np.ndarray, s: int) -> np.ndarray:
    n = -(-x.shape[1] // s)
    pad = np.concatenate([x, np.zeros((x.shape[0], n * s - x.shape[1]), x.dtype)], 1)
    return pad.reshape(x.shape[0], n, s).mean(-1)


def unit_maps(truth: np.ndarray, prefix_len: int, s: int, rng: np.random.Generator):
    """CA [L, H, I, T'], SM^X [I, T, F], SM^H [I, T'] for content truth [I_c, T] plus prefix and end rows."""
    n_c, n_frames = truth.shape
    n_steps = -(-n_frames // s)
    full = np.zeros((prefix_len + n_c + 1, n_frames), np.float32)
    full[prefix_len: prefix_len + n_c] = truth
    full[:prefix_len, :5] = 1.0                     # prefix rows: the leading silence
    full[-1, -5:] = 1.0                             # end token: the trailing silence
    steps = to_steps(full, s)
    n_tok = full.shape[0]
    shifted = np.concatenate([steps[:1] * 0, steps[:-1]], 0)   # one token late
    ca = np.zeros((L, H, n_tok, n_steps), np.float32)
    for l in range(L):
        for h in range(H):
            quality = GOOD.get((l, h), 0.03)
            target = shifted if (l, h) == (1, 3) else steps
            logits = 6 * quality * target + rng.normal(0, 0.6, (n_tok, n_steps))
            logits[:, 0] += 3.0                     # attention sink on the first step
            e = np.exp(logits - logits.max(1, keepdims=True))
            ca[l, h] = e / e.sum(1, keepdims=True)
    profile = np.exp(-0.5 * ((np.arange(N_BINS)[None] - rng.uniform(10, 60, (n_tok, 1))) / 12) ** 2)
    smx = 1.0 + full[:, :, None] * profile[:, None, :] * 2.0 + rng.normal(0, 0.4, (n_tok, n_frames, N_BINS))
    smh = 1.0 + 2.0 * steps + rng.normal(0, 0.3, (n_tok, n_steps))
    return ca, smx.astype(np.float32), smh.astype(np.float32)


def correlation_rows(ca, smx, smh, rows: slice, s: int, base: dict) -> list[dict]:
    out = []
    ca_t = torch.from_numpy(ca)

    def add(r: dict, target: str, pooling, p: float):
        b = {**base, "target": target, "pooling": pooling, "p": p}
        out.extend({**b, "layer": l, "head": h, "pearson": r["per_head"][l][h]} for l in range(L) for h in range(H))
        out.extend({**b, "layer": l, "head": None, "pearson": r["per_layer"][l]} for l in range(L))
        out.extend({**b, "layer": None, "head": h, "pearson": r["per_head_avg"][h]} for h in range(H))
        out.append({**b, "layer": None, "head": None, "pearson": r["global"]})

    for pooling in xai_core.POOLING_METHODS:
        pooled = xai_core.pool_input_saliency(torch.from_numpy(smx), s, pooling, n_steps=ca.shape[-1])
        add(xai_core.correlate(ca_t, pooled, rows), "input", pooling, 0.5)
    add(xai_core.correlate(ca_t, torch.from_numpy(smh), rows), "encoder", None, 0.7)
    blurred = torch.from_numpy(smh + np.random.default_rng(1).normal(0, 1.0, smh.shape).astype(np.float32))
    add(xai_core.correlate(ca_t, blurred, rows), "encoder", None, 0.3)     # a p_H sweep value
    return out


def deletion_rows(reference: str) -> list[dict]:
    """WER rises fastest for full-resolution SM^X, slowest for CA (as in the paper)."""
    words = reference.split()
    rows = []
    for explanation, side, speed in (("sm_x_full", "input", 3.0), ("sm_x_agg", "input", 1.5), ("ca", "input", 1.0),
                                     ("sm_h", "encoder", 2.0)):
        for pct in range(0, 101, 5):
            gone = min(len(words), int(len(words) * speed * pct / 100))
            hyp = " ".join(["x"] * gone + words[gone:])
            rows.append({"explanation": explanation, "side": side, "percent": pct, "hypothesis": hyp,
                         "reference": reference, "pooling": "2d_max" if explanation == "sm_x_agg" else None})
    return rows


def write_synthetic_run(tmp: Path) -> tuple[Path, Path]:
    """Write corpus + run under `tmp`; returns (run dir, corpus root)."""
    rng = np.random.default_rng(0)
    corpus, run = tmp / "corpus", tmp / "run"
    spans = [word_spans(ref, rng) for ref, _ in SENTENCES]
    starts = [10.0, 14.0]
    for tgt in ("en", "it"):
        folder = corpus / "en" / tgt / "test"
        folder.mkdir(parents=True, exist_ok=True)
        (folder / "segments.lst").write_text("".join(f"{TALK} {a:.3f} {a + 3:.3f}\n" for a in starts))
        (folder / "segments.en").write_text("".join(" ".join(r) + "\n" for r, _ in SENTENCES))
        (folder / "words.jsonl").write_text("".join(json.dumps({"line": i + 1, "audio_id": TALK, "words": w}) + "\n"
                                                    for i, w in enumerate(spans)))
        if tgt == "it":
            (folder / "segments.it").write_text(ST_TEXT + "\n" + ST_TEXT + "\n")
    store = RunStore(str(run))
    run.mkdir(parents=True)
    (run / "job.yaml").write_text(yaml.safe_dump({"name": "synthetic", "models": [{"key": "fbk"}, {"key": "whisper"}],
                                                  "method": {"n_input": 2000, "n_encoder": 2000, "seed": 7}}))
    models = {"fbk": ("sp", 1, 4, ["<lang:en>"], "</s>"),
              "whisper": ("bpe", 3, 2, ["<|en|>", "<|transcribe|>", "<|notimestamps|>"], "<|endoftext|>")}
    shard = 0
    for model, (style, prefix_len, s, prefix, eos) in models.items():
        units = [("asr", "en", k) for k in range(2)] + ([("st", "it", 0)] if model == "fbk" else [])
        for task, tgt, k in units:
            ref_words, hyp_words = SENTENCES[k]
            if task == "st":
                hyp_words = ref_words = ST_TEXT.split()
                span = word_spans(hyp_words, rng)
            else:
                span = [{**sp, "word": w} for sp, w in zip(spans[k], hyp_words)]
            wp = pieces(hyp_words, style)
            tokens = prefix + [p for ps in wp for p in ps] + [eos]
            truth = token_truth(span, wp, T_FRAMES)
            ca, smx, smh = unit_maps(truth, prefix_len, s, rng)
            n_tok, n_steps = ca.shape[2], ca.shape[3]
            segment_id = f"en-{tgt}.test.{TALK}.{k + 1:04d}"
            unit_id = f"{model}.{task}.{segment_id}"
            shard = (shard + 1) % 2
            rows = slice(prefix_len, n_tok - 1)
            base = {"unit_id": unit_id, "segment_id": segment_id, "model": model, "task": task,
                    "src_lang": "en", "tgt_lang": tgt}
            tables = {
                "cross_attention": table_from_rows("cross_attention", [
                    {"unit_id": unit_id, "layer": l, "head": h, "n_tokens": n_tok, "n_steps": n_steps,
                     "weights": ca[l, h].ravel().tolist()} for l in range(L) for h in range(H)]),
                "saliency_input": table_from_rows("saliency_input", [
                    {"unit_id": unit_id, "token_index": i, "token": tokens[i], "n_frames": T_FRAMES, "n_bins": N_BINS,
                     "values": smx[i].ravel().tolist()} for i in range(n_tok)]),
                "saliency_encoder": table_from_rows("saliency_encoder", [
                    {"unit_id": unit_id, "token_index": i, "token": tokens[i], "n_steps": n_steps,
                     "values": smh[i].tolist()} for i in range(n_tok)]),
                "correlations": table_from_rows("correlations", correlation_rows(ca, smx, smh, rows, s, base)),
                "deletion": table_from_rows("deletion", [{"unit_id": unit_id, **r}
                                                          for r in deletion_rows(" ".join(ref_words))]),
                "size": table_from_rows("size", [{"unit_id": unit_id, "explanation": e, "threshold": t / 20,
                                                  "share": 100 * (1 - t / 20) ** (3 if e == "sm_x_full" else 1.5)}
                                                 for e in ("sm_x_full", "ca", "sm_h") for t in range(21)]),
                "segments": table_from_rows("segments", [segments_row(
                    unit_id=unit_id, segment_id=segment_id, model=model, task=task, corpus="europarl-st",
                    split="test", src_lang="en", tgt_lang=tgt, shard=shard,
                    audio_path=str(corpus / "en" / "audios" / f"{TALK}.m4a"), start_s=starts[k], end_s=starts[k] + 3,
                    duration_s=3.0, n_frames=T_FRAMES, n_steps=n_steps, reference=" ".join(ref_words),
                    source_text=" ".join(SENTENCES[k][0]), hypothesis=" ".join(hyp_words), hyp_tokens=tokens,
                    hyp_token_ids=list(range(n_tok)), hyp_token_log_probs=[-0.1] * n_tok, prefix_len=prefix_len,
                    worker="test:1", t_decode_s=0.5, t_input_s=30.0, t_encoder_s=8.0, t_total_s=39.0,
                    n_masks_input=2000, n_masks_encoder=2000, reliability_input=0.95, reliability_encoder=0.97,
                    seed=7, p_input=0.5, p_encoder=0.7, level_split="667,667,666", occlusion="bin_mean",
                    pooling="2d_max", dtype="float32", device="cpu", model_checksum=f"{model}-abc123",
                    code_version="0.1.0+test", torch_version=torch.__version__, skimage_version="0.25")]),
            }
            store.commit_unit(unit_id, shard, tables)
    failed = "fbk.asr.en-en.test.broken.0001"
    store.commit_unit(failed, 1, {"segments": table_from_rows("segments", [segments_row(
        unit_id=failed, segment_id="en-en.test.broken.0001", model="fbk", task="asr", src_lang="en", tgt_lang="en",
        shard=1, status="failed", error="broken.m4a: cannot decode audio", attempts=3)])})
    # a unit still being written: tables without a segments row must be ignored
    store.write_table(store.result_path("correlations", 0, "fbk.asr.partial"), table_from_rows("correlations", [
        {"unit_id": "fbk.asr.partial", "model": "fbk", "task": "asr", "src_lang": "en", "tgt_lang": "en",
         "target": "input", "pooling": "2d_max", "p": 0.5, "layer": None, "head": None, "pearson": -1.0}]))
    return run, corpus


def test_synthetic_run_is_schema_correct(tmp_path):
    from jobs.schema import SCHEMAS, read_results
    from jobs.viz.data import RunData

    run, _ = write_synthetic_run(tmp_path)
    for name in SCHEMAS:
        t = read_results(str(run), name)
        assert t.num_rows > 0, name
    data = RunData(run)
    assert len(data.ok_units) == 5 and len(data.failures) == 1
    assert "fbk.asr.partial" not in set(data.table("correlations")["unit_id"].to_pylist())
    u = data.unit("fbk.asr.en-en.test.en.synth.000.001.0001")
    assert u.ca.shape == (L, H, 8, 75) and u.smx.shape == (8, T_FRAMES, N_BINS) and u.smh.shape == (8, 75)
    assert u.subsampling == 4 and abs(u.step_s - 0.04) < 1e-9 and u.content == slice(1, 7)
    w = data.unit(data.find_unit("whisper.asr.en-en.test.en.synth.000.001.0002"), input_map=False)
    assert w.smx is None and w.subsampling == 2 and w.prefix_len == 3
