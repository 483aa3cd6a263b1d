"""CLIP tokenization with the `tokenizers` library, reproducing the pipelines'
`tokenizer(prompt, padding="max_length", max_length=77, truncation=True)`."""

from __future__ import annotations

import warnings
from pathlib import Path
from typing import Any

import numpy as np


class PromptTruncated(UserWarning):
    """A prompt was longer than the text encoder's 77 tokens; the warning names the dropped words."""


class PromptTokenizer:
    def __init__(self, path: Path, info: dict[str, Any]) -> None:
        from tokenizers import Tokenizer

        self.tokenizer = Tokenizer.from_file(str(path))
        self.tokenizer.no_padding()
        self.tokenizer.no_truncation()
        self.max_length = int(info["max_length"])
        self.pad_id = int(info["pad_id"])
        self.eos_id = int(info["eos_id"])

    def encode(self, prompt: str) -> np.ndarray:
        """int32 ids of length max_length: BOS, tokens, EOS, then padding; a long prompt keeps its first
        max_length - 2 tokens (like the pipelines) and a PromptTruncated warning names the rest."""
        ids, dropped = self.encode_checked(prompt)
        if dropped is not None:
            warnings.warn(
                f"prompt is longer than {self.max_length} tokens; dropped: {dropped!r}",
                PromptTruncated, stacklevel=3,
            )
        return ids

    def encode_checked(self, prompt: str) -> tuple[np.ndarray, str | None]:
        """`encode` without the warning: (ids, the dropped words, or None when the prompt fits)."""
        encoding = self.tokenizer.encode(prompt)
        ids = list(encoding.ids)
        dropped = None
        if len(ids) > self.max_length:
            cut = self.max_length - 1  # position of the EOS that replaces the dropped tail
            start = encoding.offsets[cut][0]
            dropped = prompt[start:].strip()
            ids = ids[:cut] + [self.eos_id]
        ids += [self.pad_id] * (self.max_length - len(ids))
        return np.asarray(ids, dtype=np.int32), dropped
