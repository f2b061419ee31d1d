"""Beam search with fairseq's semantics, batched over utterances, for every model family.

Semantics (fairseq `SequenceGenerator` + `BeamSearch`, restated):
* max_len = min(int(max_len_a * T + max_len_b), max_decoder_positions - 1), T = longest input.
* Each step: float32 log-probs; NaN -> -inf; pad banned; unk penalised; at max_len only EOS is
  allowed; while a forced prefix lasts, only the prefix token survives *with its real log-prob*
  (it counts in the score); otherwise EOS is banned before min_len; then no-repeat-ngram blocking
  over the whole token row (BOS and prefix included).
* Step 0 expands beam 0 only; later steps take the top 2*beam of (cumulative score + log-prob)
  over beam x vocabulary. EOS candidates among the first `beam` ranks are finalised with score
  cumulative / (step + 1) ** len_penalty; the next beams are the first `beam` non-EOS candidates.
* A sentence ends once it has `beam` finalised hypotheses (no early "best possible" stop); the
  result is the best finalised hypothesis.
"""
from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Optional, Sequence

import torch

from models.interface import BeamOptions, EncoderOutput, IncrementalDecoder


@dataclass
class BeamResult:
    tokens: list[int]               # generated tokens: forced prefix + content + EOS (no BOS)
    positional_scores: list[float]  # natural log-prob of each token
    score: float                    # length-normalised score


def _banned_ngram_tokens(row: list[int], n: int) -> list[int]:
    """Tokens that would repeat an n-gram already in `row` (fairseq NGramRepeatBlock)."""
    if len(row) < n:
        return []
    key = tuple(row[len(row) - n + 1:])
    banned = []
    for i in range(len(row) - n + 1):
        if tuple(row[i:i + n - 1]) == key:
            banned.append(row[i + n - 1])
    return banned


@torch.inference_mode()
def beam_search(model: IncrementalDecoder, enc: EncoderOutput, prefixes: Sequence[Sequence[int]],
                options: BeamOptions, n_frames: Optional[Sequence[int]] = None,
                bos: Optional[int] = None) -> list[BeamResult]:
    bsz = enc.states.shape[0]
    eos, pad, unk = model.eos, model.pad, getattr(model, "unk", None)
    bos = model.bos if bos is None else bos
    device = enc.states.device
    vocab_size = int(getattr(model, "vocab_size", 0) or 0)
    beam = min(options.beam_size, vocab_size - 1) if vocab_size > 1 else options.beam_size
    src_len = max(n_frames) if n_frames else int(enc.lengths.max())
    max_positions = int(getattr(model, "max_decoder_positions", 1024))
    max_len = min(int(options.max_len_a * src_len + options.max_len_b), max_positions - 1)
    prefix_lens = [len(p) for p in prefixes]
    max_prefix = max(prefix_lens) if prefix_lens else 0
    prefix_tokens = torch.full((bsz, max(max_prefix, 1)), pad, dtype=torch.long, device=device)
    for i, p in enumerate(prefixes):
        if p:
            prefix_tokens[i, : len(p)] = torch.tensor(list(p), dtype=torch.long, device=device)

    n = bsz * beam
    order = torch.arange(bsz, device=device).repeat_interleave(beam)
    state = model.init_decoder_state(enc.select(order))
    tokens = torch.full((n, max_len + 2), pad, dtype=torch.long, device=device)
    tokens[:, 0] = bos
    scores = torch.zeros(n, max_len + 1, dtype=torch.float32, device=device)
    bbsz_offsets = (torch.arange(bsz, device=device) * beam).unsqueeze(1)
    cand_size = 2 * beam
    cand_offsets = torch.arange(cand_size, device=device)
    cands_to_ignore = torch.zeros(bsz, beam, dtype=torch.bool, device=device)
    finalized: list[list[BeamResult]] = [[] for _ in range(bsz)]
    finished = [False] * bsz

    for step in range(max_len + 1):
        lprobs, state = model.decoder_step(tokens[:, : step + 1], state)
        lprobs = lprobs.float().clone()
        lprobs = model.adjust_log_probs(lprobs, step, max_prefix)
        lprobs[lprobs != lprobs] = -math.inf
        lprobs[:, pad] = -math.inf
        if unk is not None and options.unk_penalty:
            lprobs[:, unk] -= options.unk_penalty
        if step >= max_len:
            keep = lprobs[:, eos].clone()
            lprobs[:] = -math.inf
            lprobs[:, eos] = keep
        # Rows still inside their own prefix are forced; the others obey min_len (per row, so a
        # batch of mixed prefix lengths decodes exactly like its utterances one by one).
        forced = torch.zeros(n, dtype=torch.bool, device=device)
        if step < max_prefix and step < max_len:
            prefix_toks = prefix_tokens[:, step].repeat_interleave(beam)
            forced = prefix_toks.ne(pad)
            prefix_lp = lprobs.gather(-1, prefix_toks.unsqueeze(-1)).squeeze(-1)
            rows = forced.nonzero().squeeze(-1)
            lprobs[rows] = -math.inf
            lprobs[rows, prefix_toks[rows]] = prefix_lp[rows]
        if step < options.min_len:
            free = (~forced) & torch.tensor([step >= p for p in prefix_lens], device=device).repeat_interleave(beam)
            lprobs[free, eos] = -math.inf
        if options.no_repeat_ngram_size > 0 and step + 2 - options.no_repeat_ngram_size >= 0:
            rows = tokens[:, : step + 1].tolist()
            for r, row in enumerate(rows):
                banned = _banned_ngram_tokens(row, options.no_repeat_ngram_size)
                if banned:
                    lprobs[r, banned] = -math.inf

        vocab = lprobs.shape[-1]
        lp = lprobs.view(bsz, beam, vocab)
        if step == 0:
            lp = lp[:, :1, :]
        else:
            lp = lp + scores.view(bsz, beam, -1)[:, :, step - 1].unsqueeze(-1)
        flat = lp.reshape(bsz, -1)
        k = min(cand_size, flat.shape[1] - 1)
        cand_scores, cand_idx = torch.topk(flat, k)
        cand_beams = torch.div(cand_idx, vocab, rounding_mode="floor")
        cand_tokens = cand_idx.fmod(vocab)
        cand_bbsz = cand_beams + bbsz_offsets

        eos_mask = cand_tokens.eq(eos) & cand_scores.ne(-math.inf)
        eos_mask[:, :beam][cands_to_ignore] = False
        for s in range(bsz):
            if finished[s]:
                continue
            for c in range(beam):
                if not eos_mask[s, c]:
                    continue
                if len(finalized[s]) >= beam:
                    break
                src = int(cand_bbsz[s, c])
                toks = tokens[src, 1: step + 1].tolist() + [eos]
                cum = scores[src, :step].tolist() + [float(cand_scores[s, c])]
                pos = [cum[0]] + [cum[j] - cum[j - 1] for j in range(1, len(cum))]
                norm = float(cand_scores[s, c]) / (step + 1) ** options.len_penalty
                finalized[s].append(BeamResult(toks, pos, norm))
            if len(finalized[s]) >= beam or step >= max_len:
                finished[s] = True
        if all(finished):
            break

        # Next beams: the first `beam` non-EOS candidates in rank order.
        active_mask = eos_mask[:, : cand_offsets[:k].numel()].long() * cand_size + cand_offsets[:k]
        new_ignore, active_hypos = torch.topk(active_mask, k=beam, dim=1, largest=False)
        cands_to_ignore = new_ignore.ge(cand_size)[:, :beam]
        active_bbsz = torch.gather(cand_bbsz, 1, active_hypos).view(-1)
        active_scores = torch.gather(cand_scores, 1, active_hypos).view(-1)
        tokens[:, : step + 1] = tokens[active_bbsz, : step + 1]
        tokens[:, step + 1] = torch.gather(cand_tokens, 1, active_hypos).view(-1)
        if step > 0:
            scores[:, :step] = scores[active_bbsz, :step]
        scores[:, step] = active_scores
        state = model.reorder_decoder_state(state, active_bbsz)

    results = []
    for s in range(bsz):
        hyps = sorted(finalized[s], key=lambda h: h.score, reverse=True)
        if not hyps:  # cannot happen with finite scores; keep a clear failure mode
            raise RuntimeError(f"beam search produced no hypothesis for batch item {s}")
        results.append(hyps[0])
    return results
