"""Work units: one (model, task, segment) triple, the unit of scheduling, retry and commit."""
from __future__ import annotations

import os
import re
import socket
from dataclasses import asdict, dataclass
from typing import Any, Optional

_UNSAFE = re.compile(r"[^A-Za-z0-9._-]+")


def safe_name(text: str) -> str:
    """A file-name-safe version of an id (stable: the same id always gives the same name)."""
    return _UNSAFE.sub("_", text).strip("_") or "_"


def worker_name() -> str:
    """`host:pid` of this process, as recorded in the segments table."""
    return f"{socket.gethostname()}:{os.getpid()}"


def task_of_pair(src_lang: str, tgt_lang: str) -> str:
    """EuroParl-ST convention: en-en is ASR, en-it is speech translation."""
    return "asr" if src_lang == tgt_lang else "st"


@dataclass
class WorkUnit:
    unit_id: str
    model_key: str
    task: str            # 'asr' | 'st'
    segment: Any         # jobs.corpus.Segment
    shard: int = 0
    attempts: int = 0
    mask_range: Optional[tuple[int, int]] = None

    @classmethod
    def make(cls, model_key: str, segment: Any, shard: int = 0) -> "WorkUnit":
        task = task_of_pair(segment.src_lang, segment.tgt_lang)
        return cls(unit_id=safe_name(f"{model_key}.{task}.{segment.segment_id}"), model_key=model_key,
                   task=task, segment=segment, shard=shard)

    @property
    def out_lang(self) -> str:
        return self.segment.tgt_lang if self.task == "st" else self.segment.src_lang

    def to_dict(self) -> dict:
        d = asdict(self)
        return d
