"""DTW, token -> word grouping, word matching and the word-timestamp evaluation of `xs2t timestamps`."""
import itertools

import numpy as np
import pytest

from jobs.viz.align import boundary_errors, dtw_path, prepare_map, summarise_errors, uniform_times, word_times
from jobs.viz.data import RunData
from jobs.viz.timestamps import evaluate
from jobs.viz.words import Word, WordTimings, group_words, match_words, piece_labels
from test_viz_synthetic import write_synthetic_run


@pytest.fixture(scope="module")
def synthetic(tmp_path_factory):
    return write_synthetic_run(tmp_path_factory.mktemp("viz_align"))


def brute_force_dtw(cost):
    """Cheapest monotonic path cost by enumerating every path (tiny matrices only)."""
    n, m = cost.shape
    best = np.inf

    def walk(i, j, acc):
        nonlocal best
        acc += cost[i, j]
        if (i, j) == (n - 1, m - 1):
            best = min(best, acc)
            return
        for di, dj in ((1, 1), (1, 0), (0, 1)):
            if i + di < n and j + dj < m:
                walk(i + di, j + dj, acc)

    walk(0, 0, 0.0)
    return best


def test_dtw_path_is_optimal_and_monotonic():
    rng = np.random.default_rng(3)
    for n, m in itertools.product((1, 2, 4), (1, 3, 6)):
        cost = rng.random((n, m))
        rows, steps = dtw_path(cost)
        assert (rows[0], steps[0]) == (0, 0) and (rows[-1], steps[-1]) == (n - 1, m - 1)
        moves = np.diff(np.stack([rows, steps]), axis=1)
        assert ((moves >= 0) & (moves <= 1)).all() and (moves.sum(0) >= 1).all()
        assert cost[rows, steps].sum() == pytest.approx(brute_force_dtw(cost))


def test_dtw_recovers_a_planted_alignment():
    # 4 tokens over 40 steps, token k owns steps [10k, 10k+10), plus noise and a sink column
    rng = np.random.default_rng(0)
    m = rng.normal(0, 0.3, (4, 40))
    for k in range(4):
        m[k, 10 * k: 10 * k + 10] += 2.0
    m[:, 0] += 5.0
    words = [Word(f"w{k}", [k]) for k in range(4)]
    times = word_times(m, [0, 1, 2, 3], words, step_s=0.04, norm="frame")
    # a vertical DTW move may share one step between neighbours: one step of slack
    assert np.abs(np.array([t.start / 0.04 for t in times]) - [0, 10, 20, 30]).max() <= 1
    assert np.abs(np.array([t.end / 0.04 for t in times]) - [10, 20, 30, 40]).max() <= 1
    with pytest.raises(ValueError, match="norm"):
        prepare_map(m, "rows")


def test_group_words_sentencepiece_and_byte_level():
    sp = ["<lang:en>", "▁the", "▁parlia", "ment", ",", "▁ok", "</s>"]
    assert [(w.text, w.tokens) for w in group_words(sp, slice(1, 6))] == [("the", [1]), ("parliament,", [2, 3, 4]),
                                                                         ("ok", [5])]
    # Whisper byte-level pieces: 'é' is split over two pieces (bytes C3 A9)
    bpe = ["<|en|>", "Ġperch", "Ã", "©", "Ġok", "<|endoftext|>"]
    assert [w.text for w in group_words(bpe, slice(1, 5))] == ["perché", "ok"]
    assert piece_labels(["Ġperch", "Ã", "©"]) == ["▁perch", "?", "?"]
    assert piece_labels(["▁è", "ment"]) == ["▁è", "ment"]     # SentencePiece text is not byte-decoded


def test_match_words_ignores_case_and_punctuation():
    assert match_words(["The", "parliament,", "is", "OPEN."], ["the", "parliament", "was", "open"]) == [(0, 0), (1, 1), (3, 3)]
    assert match_words([], ["a"]) == []


def test_boundary_errors_and_uniform_baseline():
    words = [Word("ab", [0]), Word("abcd", [1])]
    times = uniform_times(words, 0.8)
    assert times[0].start == 0 and times[-1].end == pytest.approx(0.8)
    assert times[0].end == pytest.approx(0.3)          # (2 + 1) / (3 + 5) of 0.8 s
    ref = [{"word": "ab", "start": 0.1, "end": 0.3}, {"word": "abcd", "start": 0.3, "end": 0.7}]
    err = boundary_errors(times, ref, [(0, 0), (1, 1)])
    assert np.allclose(err, [[0.1, 0.0], [0.0, 0.1]])
    s = summarise_errors(err, tolerance_s=0.05)
    assert s["words"] == 2 and s["mae"] == pytest.approx(0.05) and s["within"] == pytest.approx(50.0)


def test_word_timings_found_from_the_audio_path(synthetic):
    run, corpus = synthetic
    data = RunData(run)
    rows = data.unit_rows
    words = WordTimings().words(rows["fbk.asr.en-en.test.en.synth.000.001.0002"])
    assert [w["word"] for w in words] == ["we", "vote", "on", "this", "report"]
    moved = {**rows["fbk.asr.en-en.test.en.synth.000.001.0002"], "audio_path": "/nowhere/en/audios/en.synth.000.001.m4a"}
    assert WordTimings().words(moved) is None
    assert WordTimings(corpus).words(moved) == words


def test_timestamps_rank_good_heads_above_bad_ones(synthetic):
    run, corpus = synthetic
    results = evaluate(RunData(run), k=3, each_head=True)
    assert set(results) == {("fbk", "asr", "en", "en"), ("whisper", "asr", "en", "en")}   # ST is not scored
    for g, v in results.items():
        assert v["units"] == 2 and v["no_words"] == 0
        assert v["hyp_words"] == 10 and v["matched"] == 9      # 'his' vs 'this' is not scored
        by = {(r["method"], r["choice"].split(":")[0]): r for r in v["rows"]}
        top = by[("ca", "top-3 by r with SM^X+SM^H")]
        assert top["words"] == 9 and top["mae"] < 0.08
        assert by[("sm_h", "SM^H")]["mae"] < 0.08 and by[("sm_x", "SM^X (2d_max)")]["mae"] < 0.08
        # the head that attends one word late, and the weak first layer, are much worse
        assert by[("ca", "l2 h4")]["mae"] > 3 * top["mae"]
        assert by[("ca", "layer 1 (avg)")]["mae"] > 2 * top["mae"]
        assert top["mae"] < by[("uniform", "by word length")]["mae"]
        assert [r["mae"] for r in v["rows"]] == sorted(r["mae"] for r in v["rows"])
