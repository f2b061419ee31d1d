"""make-corpus (espeak-ng synthesis, exact segment and word timings) and the corpus readers."""
from __future__ import annotations

import json
import shutil
from pathlib import Path

import numpy as np
import pytest

from jobs.corpus import (folder_segment, load_corpus, load_segment_audio, make_units, read_europarl, read_folder,
                         read_tsv)
from jobs.errors import CorpusError
from jobs.make_corpus import MARGIN_S, load_sentences, make_corpus
from jobs.spec import CorpusSpec
from models.audio import load_audio, write_wav

SHARED = Path(__file__).resolve().parents[2] / "shared"
FBK = SHARED / "fixtures" / "fbk_tiny"
PAIRS = ("en-en", "en-it", "it-en", "it-it")


@pytest.fixture(scope="module")
def corpus(tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("europarl")
    counts = make_corpus(root, ("en", "it"), segments=4, seed=3)
    assert counts == {p: 4 for p in PAIRS}
    return root


def test_sentences_are_parallel_and_plenty():
    rows = load_sentences()
    assert len(rows) >= 40
    assert all(r["en"].strip() and r["it"].strip() and r["en"] != r["it"] for r in rows)
    assert len({r["en"] for r in rows}) == len(rows) and len({r["it"] for r in rows}) == len(rows)


def test_layout_and_texts(corpus):
    by_en = {r["en"]: r["it"] for r in load_sentences()}
    for pair in PAIRS:
        src, tgt = pair.split("-")
        folder = corpus / src / tgt / "test"
        lst = (folder / "segments.lst").read_text().splitlines()
        assert len(lst) == 4
        assert len((folder / f"segments.{src}").read_text(encoding="utf-8").splitlines()) == 4
        assert len((folder / f"segments.{tgt}").read_text(encoding="utf-8").splitlines()) == 4
        assert len((folder / "words.jsonl").read_text().splitlines()) == 4
        talks = {line.split()[0] for line in lst}
        speakers = dict(line.split() for line in (folder / "speakers.lst").read_text().splitlines())
        assert set(speakers) == talks
        assert all((corpus / src / "audios" / f"{t}.m4a").is_file() for t in talks)
    en = (corpus / "en/it/test/segments.en").read_text(encoding="utf-8").splitlines()
    it = (corpus / "en/it/test/segments.it").read_text(encoding="utf-8").splitlines()
    assert [by_en[e] for e in en] == it  # the Italian side is the translation of each English line


def test_segments_cut_exactly_and_words_are_timed(corpus):
    for src in ("en", "it"):
        folder = corpus / src / src / "test"
        lst = [line.split() for line in (folder / "segments.lst").read_text().splitlines()]
        words = [json.loads(line) for line in (folder / "words.jsonl").read_text(encoding="utf-8").splitlines()]
        texts = (folder / f"segments.{src}").read_text(encoding="utf-8").splitlines()
        for (talk, start, end), entry, text in zip(lst, words, texts):
            start, end = float(start), float(end)
            wave = load_audio(corpus / src / "audios" / f"{talk}.m4a", start=start, end=end)
            assert abs(len(wave) / 16000 - (end - start)) < 0.01
            assert entry["audio_id"] == talk
            ws = entry["words"]
            # the words are the sentence's words, in order, inside the segment
            assert " ".join(w["word"] for w in ws) == " ".join(t.strip(".,;:!?") for t in text.split())
            assert abs(ws[0]["start"] - MARGIN_S) < 0.002 and ws[-1]["end"] <= end - start
            assert all(w["start"] < w["end"] for w in ws)
            assert all(a["end"] < b["start"] for a, b in zip(ws, ws[1:]))
            # timing is right to a few ms: speech inside the words, (near) silence in the gaps between
            rms = lambda a, b: float(np.sqrt(np.mean(wave[int(a * 16000): int(b * 16000)] ** 2)))  # noqa: E731
            speech = np.mean([rms(w["start"], w["end"]) for w in ws])
            gaps = [rms(a["end"] + 0.01, b["start"] - 0.01) for a, b in zip(ws, ws[1:])]
            assert max(gaps) < 0.1 * speech, (talk, max(gaps), speech)
            assert rms(0, ws[0]["start"] - 0.01) < 0.1 * speech  # the margin before the first word is silent


def test_europarl_reader(corpus):
    segs = read_europarl(corpus, "en-it", "test")
    assert len(segs) == 4 and all(s.error is None for s in segs)
    first = segs[0]
    talk = (corpus / "en/it/test/segments.lst").read_text().split()[0]
    assert first.segment_id == f"en-it.test.{talk}.0001"
    assert (first.src_lang, first.tgt_lang, first.task, first.split) == ("en", "it", "st", "test")
    assert first.reference == (corpus / "en/it/test/segments.it").read_text(encoding="utf-8").splitlines()[0]
    assert first.source_text == (corpus / "en/it/test/segments.en").read_text(encoding="utf-8").splitlines()[0]
    assert first.speaker.startswith("en_spk")
    assert first.duration_s == pytest.approx(first.end_s - first.start_s)
    wave = load_segment_audio(first)
    assert wave.dtype == np.float32 and abs(len(wave) / 16000 - first.duration_s) < 0.01

    spec = CorpusSpec(kind="europarl", root=str(corpus), pairs=list(PAIRS), max_segments=2)
    segs = load_corpus(spec)
    assert len(segs) == 8 and [s.task for s in segs].count("asr") == 4
    units = make_units(["fbk"], segs)
    assert units[0].unit_id == f"fbk.asr.en-en.test.{talk}.0001"
    assert {u.task for u in units} == {"asr", "st"}


def test_broken_lines_become_failed_segments(corpus, tmp_path):
    root = tmp_path / "broken"
    shutil.copytree(corpus, root)
    folder = root / "en" / "it" / "test"
    talks = sorted((root / "en" / "audios").glob("*.m4a"))
    # corrupt one talk, empty another (that also covers "all segments of a talk")
    talks[0].write_bytes(b"\x00\x01 not an mp4 file" * 200)
    lines = (folder / "segments.lst").read_text().splitlines()
    lines += ["ghost.talk 0.0 1.0", "only_two_fields 1.0", f"{talks[1].stem} 2.0 1.0", "", f"{talks[1].stem} abc 3.0"]
    (folder / "segments.lst").write_text("\n".join(lines) + "\n")
    refs = (folder / "segments.it").read_text(encoding="utf-8").splitlines() + ["r1", "r2", "r3", "", "r5"]
    (folder / "segments.it").write_text("\n".join(refs) + "\n", encoding="utf-8")
    empty = root / "en" / "audios" / "empty.talk.m4a"
    empty.write_bytes(b"")
    with open(folder / "segments.lst", "a") as f:
        f.write("empty.talk 0.0 1.0\n")  # and no reference line for it

    segs = read_europarl(root, "en-it", "test")
    assert len(segs) == 4 + 5
    bad = {s.segment_id: s.error for s in segs if s.error}
    assert any("ghost.talk.m4a not found" in e and "line 5" in e for e in bad.values())
    assert any("line 6" in e and "expected 'audio_id start end'" in e for e in bad.values())
    assert any("line 7" in e and "invalid times" in e for e in bad.values())
    assert any("line 9" in e and "invalid times" in e for e in bad.values())
    assert any("line 10" in e and ("empty (0 bytes)" in e or "no reference" in e) for e in bad.values())
    assert all("segments.lst line" in e for e in bad.values())
    assert len(bad) == 5
    ok = [s for s in segs if s.error is None]
    corrupt = [s for s in ok if s.audio_path == str(talks[0])]
    good = [s for s in ok if s.audio_path != str(talks[0])]
    assert corrupt and good
    for s in good:
        assert load_segment_audio(s).size > 0
    with pytest.raises(CorpusError) as info:
        load_segment_audio(corrupt[0])
    assert corrupt[0].segment_id in str(info.value) and str(talks[0]) in str(info.value)
    with pytest.raises(CorpusError, match="line 5"):
        load_segment_audio(next(s for s in segs if s.error and "ghost" in s.error))


def test_missing_corpus_folder_is_one_clear_error(tmp_path):
    with pytest.raises(CorpusError, match="segments.lst: not found"):
        read_europarl(tmp_path, "en-de")
    with pytest.raises(CorpusError, match="no segments"):
        (tmp_path / "en/en/test").mkdir(parents=True)
        (tmp_path / "en/en/test/segments.lst").write_text("")
        (tmp_path / "en/en/test/segments.en").write_text("")
        load_corpus(CorpusSpec(kind="europarl", root=str(tmp_path), pairs=["en-en"]))


def test_tsv_reader_fbank_manifest_is_rejected_per_row():
    segs = read_tsv(FBK / "test3.tsv", "en-en")
    assert len(segs) == 3
    assert all(s.error and "feature file" in s.error and "test3.tsv line" in s.error for s in segs)
    assert segs[0].segment_id == "test3.test_0"
    assert segs[0].reference == "The committee approved the proposal after a long debate."


def test_tsv_reader_with_audio(tmp_path):
    wav0, wav1 = FBK / "wav" / "test_0.wav", FBK / "wav" / "test_1.wav"
    n1 = len(load_audio(wav1))
    header = "id\taudio\tn_frames\ttgt_text\tspeaker\tsrc_text"
    rows = [f"a\t{wav0}\t308\tThe committee approved the proposal after a long debate.\tspk\tsrc a",
            f"b\t{wav1}:8000:16000\t100\tpart of test one\tspk\tsrc b",
            "c\tmissing.wav\t10\tnothing here\tspk\tsrc c",
            "d\ttoo\tfew",
            f"e\t{wav1}:{n1}:0\t1\tzero length\tspk\t-"]
    manifest = tmp_path / "mini.tsv"
    manifest.write_text("\n".join([header] + rows) + "\n", encoding="utf-8")
    segs = read_tsv(manifest, "en-en")
    assert [s.segment_id for s in segs] == ["mini.a", "mini.b", "mini.c", "mini.d", "mini.e"]
    a, b, c, d, e = segs
    assert a.error is None and a.start_s is None and a.duration_s == pytest.approx(len(load_audio(wav0)) / 16000, abs=0.01)
    assert b.error is None and (b.start_s, b.end_s, b.duration_s) == (0.5, 1.5, 1.0)
    assert np.allclose(load_segment_audio(b), load_audio(wav1)[8000:24000])
    assert "mini.tsv line 4" in c.error and "not found" in c.error
    assert "mini.tsv line 5" in d.error and "3 fields" in d.error
    assert "zero-length" in e.error
    assert a.reference.startswith("The committee") and b.source_text == "src b"


def test_folder_reader(tmp_path):
    folder = tmp_path / "clips"
    (folder / "sub").mkdir(parents=True)
    shutil.copy(FBK / "wav" / "test_0.wav", folder / "one.wav")
    shutil.copy(FBK / "wav" / "test_1.wav", folder / "sub" / "two.wav")
    (folder / "one.txt").write_text("The committee approved the proposal after a long debate.\n")
    write_wav(folder / "three.wav", np.zeros(0, np.float32))  # a header and no samples
    (folder / "notes.md").write_text("not audio")
    segs = read_folder(folder, "en-en")
    assert [s.segment_id for s in segs] == ["clips.one", "clips.sub.two", "clips.three"]
    assert segs[0].reference.startswith("The committee") and segs[1].reference is None
    assert segs[0].duration_s == pytest.approx(3.1, abs=0.3)
    assert load_segment_audio(segs[1]).size > 16000
    with pytest.raises(CorpusError, match="clips.three"):
        load_segment_audio(segs[2])
    one = folder_segment(folder / "one.wav", "en")
    assert one.segment_id == "clips.one" and one.task == "asr"


def test_make_corpus_cli(tmp_path):
    from typer.testing import CliRunner

    from jobs.cli import app

    result = CliRunner().invoke(app, ["make-corpus", "--out", str(tmp_path / "c"), "--langs", "it", "--segments", "2",
                                      "--seed", "1"])
    assert result.exit_code == 0, result.output
    assert "it-it: 2 segments" in result.output
    segs = load_corpus(CorpusSpec(kind="europarl", root=str(tmp_path / "c"), pairs=["it-it"]))
    assert len(segs) == 2 and all(s.error is None and s.reference for s in segs)
    bad = CliRunner().invoke(app, ["make-corpus", "--out", str(tmp_path / "d"), "--langs", "xx"])
    assert bad.exit_code != 0 and "unsupported language" in str(bad.exception or bad.output)
