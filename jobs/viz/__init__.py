"""What the user sees: figures (`xs2t plot`), the HTML report (`xs2t report`), saliency-chosen
alignment heads (`xs2t heads`) and word timestamps evaluated against known boundaries
(`xs2t timestamps`). Everything here reads a run directory; nothing here computes the method.

    data.py        read committed units and per-unit maps (CA, SM^X, SM^H) from RUN/results
    words.py       hypothesis tokens -> words; words.jsonl of a synthetic corpus
    align.py       DTW word timestamps from CA / SM^X / SM^H and their boundary errors
    heads.py       head x layer ranking by correlation with saliency; alignment-head export
    summary.py     the run's tables (means over utterances) from the raw result rows
    figures.py     matplotlib figures (Figure 2 per segment; Tables 1-3, deletion per run)
    report.py      one self-contained HTML page
"""
