"""Beam search corner cases on a small Markov decoder whose probabilities we know exactly."""
from __future__ import annotations

import itertools
import math

import torch

from models.beam_search import beam_search, _banned_ngram_tokens
from models.interface import BeamOptions, EncoderOutput, IncrementalDecoder

PAD, EOS, UNK, BOS = 1, 2, 3, 0


class MarkovDecoder(IncrementalDecoder):
    """log P(next | last token, utterance) = log_softmax(table[last] + utterance bias)."""

    eos, pad, unk, bos = EOS, PAD, UNK, BOS
    max_decoder_positions = 1024

    def __init__(self, vocab: int = 8, seed: int = 0):
        g = torch.Generator().manual_seed(seed)
        self.table = torch.randn(vocab, vocab, generator=g) * 2.0
        self.calls = 0

    def init_decoder_state(self, enc):
        return {"bias": enc.states[:, 0, :].clone()}

    def decoder_step(self, tokens, state):
        self.calls += 1
        logits = self.table[tokens[:, -1]] + state["bias"]
        return torch.log_softmax(logits, -1), state

    def reorder_decoder_state(self, state, index):
        return {"bias": state["bias"].index_select(0, index)}

    def seq_log_prob(self, bias: torch.Tensor, toks: list[int]) -> list[float]:
        prev, out = BOS, []
        for t in toks:
            out.append(float(torch.log_softmax(self.table[prev] + bias, -1)[t]))
            prev = t
        return out


def make_enc(biases: list[torch.Tensor]) -> EncoderOutput:
    states = torch.stack(biases)[:, None, :]
    return EncoderOutput(states, torch.ones(len(biases), dtype=torch.long))


def test_positional_scores_are_real_log_probs_and_score_is_their_mean():
    dec = MarkovDecoder()
    bias = torch.randn(8, generator=torch.Generator().manual_seed(1))
    (res,) = beam_search(dec, make_enc([bias]), [[]], BeamOptions(beam_size=3, max_len_b=6, no_repeat_ngram_size=0))
    assert res.tokens[-1] == EOS and PAD not in res.tokens
    expected = dec.seq_log_prob(bias, res.tokens)
    assert torch.allclose(torch.tensor(res.positional_scores), torch.tensor(expected), atol=1e-5)
    assert math.isclose(res.score, sum(expected) / len(expected), rel_tol=1e-5)


def test_prefix_is_forced_with_its_real_log_prob():
    dec = MarkovDecoder()
    bias = torch.zeros(8)
    bias[5] = -20.0  # token 5 is nearly impossible, yet forced
    (res,) = beam_search(dec, make_enc([bias]), [[5, 6]], BeamOptions(beam_size=4, max_len_b=8))
    assert res.tokens[:2] == [5, 6]
    expected = dec.seq_log_prob(bias, res.tokens)
    assert res.positional_scores[0] < -15  # the forced token's real (tiny) probability counts
    assert torch.allclose(torch.tensor(res.positional_scores), torch.tensor(expected), atol=1e-4)


def test_min_len_bans_eos_at_first_step_and_max_len_forces_termination():
    dec = MarkovDecoder()
    bias = torch.zeros(8)
    bias[EOS] = 30.0  # EOS would win everywhere
    (res,) = beam_search(dec, make_enc([bias]), [[]], BeamOptions(beam_size=2, max_len_b=5))
    assert len(res.tokens) == 2 and res.tokens[-1] == EOS  # one token (min_len 1), then EOS
    bias = torch.zeros(8)
    bias[EOS] = -30.0  # EOS never wanted: stops at max_len
    (res,) = beam_search(dec, make_enc([bias]), [[]], BeamOptions(beam_size=2, max_len_b=5, no_repeat_ngram_size=0))
    assert len(res.tokens) == 6 and res.tokens[-1] == EOS  # max_len tokens + forced EOS


def test_no_repeat_ngram_blocks_including_bos():
    assert _banned_ngram_tokens([0, 4, 5, 4, 5], 3) == [4]
    assert _banned_ngram_tokens([4, 4, 4], 3) == [4]
    assert _banned_ngram_tokens([0, 4, 5, 6], 3) == []
    dec = MarkovDecoder()
    dec.table[:] = -5.0
    dec.table[4, 5] = 5.0
    dec.table[5, 4] = 5.0
    dec.table[BOS, 4] = 5.0
    bias = torch.zeros(8)
    bias[EOS] = -3.0
    (res,) = beam_search(dec, make_enc([bias]), [[]], BeamOptions(beam_size=3, max_len_b=12, no_repeat_ngram_size=2))
    row = [BOS] + res.tokens
    bigrams = list(zip(row, row[1:]))
    assert len(bigrams) == len(set(bigrams)), row


def test_exhaustive_agreement_when_beam_covers_everything():
    # Two live content tokens (0 and 4; pad/unk banned, 5..7 impossible), max_len 2: a beam of 7
    # explores every sequence, so its winner must be the best length-normalised one.
    dec = MarkovDecoder(vocab=8, seed=3)
    dec.table[:, 5:] = -math.inf
    dec.table[:, UNK] = -math.inf
    dec.vocab_size = 8
    bias = torch.randn(8, generator=torch.Generator().manual_seed(4))
    opts = BeamOptions(beam_size=7, max_len_b=2, no_repeat_ngram_size=0)
    (res,) = beam_search(dec, make_enc([bias]), [[]], opts)
    best = None
    for n in range(1, 3):  # content lengths 1..2 (min_len 1), then EOS
        for seq in itertools.product([0, 4], repeat=n):
            toks = list(seq) + [EOS]
            score = sum(dec.seq_log_prob(bias, toks)) / len(toks)
            if best is None or score > best[0]:
                best = (score, toks)
    assert res.tokens == best[1]
    assert math.isclose(res.score, best[0], rel_tol=1e-5)


def test_batched_equals_one_by_one():
    dec = MarkovDecoder(seed=7)
    g = torch.Generator().manual_seed(9)
    biases = [torch.randn(8, generator=g) for _ in range(3)]
    prefixes = [[6], [], [4, 5]]
    opts = BeamOptions(beam_size=5, max_len_b=10)
    batched = beam_search(dec, make_enc(biases), prefixes, opts)
    for b, p, r in zip(biases, prefixes, batched):
        (single,) = beam_search(dec, make_enc([b]), [p], opts)
        assert single.tokens == r.tokens
        assert math.isclose(single.score, r.score, rel_tol=1e-6)
