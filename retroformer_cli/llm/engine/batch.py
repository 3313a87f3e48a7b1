"""One forward pass being put together: the flattened rows of every scheduled sequence (a decoding sequence's
last token and draft, or a prompt chunk), their positions and adapters, the attention segments, which rows'
logits are read and by whom, and how many leading rows are decode rows (``--weights hybrid`` computes those on
the GGUF blocks and prompt rows on the fp32 weights).
"""

from __future__ import annotations

from typing import Any

from retroformer_cli.llm.engine.attention import Segment, StepContext, causal_mask
from retroformer_cli.llm.engine.requests import Seq


class StepBatch:
    def __init__(self, device: Any):
        self.device = device
        self.segments: list[Segment] = []
        self.ids: list[int] = []
        self.positions: list[int] = []
        self.names: list[str | None] = []  # the adapter of each row
        self.logit_rows: list[int] = []
        self.scheduled: list[tuple[Seq, int]] = []  # (sequence, tokens it computes this step)
        self.samplers: list[tuple[Seq, int, list[int]]] = []  # (sequence, its first logit row, draft tokens)
        self.decode_rows = 0  # rows 0..decode_rows-1 are decoding sequences' tokens and drafts; prompt rows follow

    def add(self, seq: Seq, tokens: list[int], logits: int = 0, draft: list[int] | None = None,
            decode: bool = False) -> None:
        """Schedule ``tokens`` of ``seq`` (after its computed positions); the last ``logits`` rows are read.
        ``decode``: a decoding sequence's last token and draft, which must come before any prompt chunk."""
        n = len(tokens)
        ids = self.ids
        if decode:
            if self.decode_rows != len(ids):
                raise ValueError("a decoding sequence's rows must come before every prompt chunk's")
            self.decode_rows += n
        self.segments.append(Segment(seq.kv, len(ids), n, seq.computed, causal_mask(n, seq.computed, None, self.device)))
        ids.extend(tokens)
        self.positions.extend(range(seq.computed, seq.computed + n))
        self.names.extend([seq.req.adapter] * n)
        self.scheduled.append((seq, n))
        if logits:
            self.samplers.append((seq, len(self.logit_rows), draft or []))
            self.logit_rows.extend(range(len(ids) - logits, len(ids)))

    def pad_to(self, rows: int) -> None:
        """Add rows that attend to nothing and whose logits are never read, up to ``rows`` rows."""
        pad = rows - len(self.ids)
        if pad <= 0:
            return
        self.segments.append(Segment(None, len(self.ids), pad, 0))
        self.ids.extend([0] * pad)
        self.positions.extend([0] * pad)
        self.names.extend([self.names[-1]] * pad)

    def context(self) -> StepContext:
        import torch

        rows = self.logit_rows
        return StepContext(self.segments, torch.tensor(rows, dtype=torch.long, device=self.device)
                           if len(rows) < len(self.ids) else None)

    def inputs(self) -> dict[str, Any]:
        """``input_ids`` and ``position_ids`` as ``[rows, 1]`` tensors."""
        import torch

        return {"input_ids": torch.tensor(self.ids, device=self.device).view(-1, 1),
                "position_ids": torch.tensor(self.positions, device=self.device).view(-1, 1)}
