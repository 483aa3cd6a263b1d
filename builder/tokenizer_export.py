"""Write a pipeline's CLIP tokenizer as a `tokenizers` JSON file for the torch-free runner."""

from __future__ import annotations

import os
import shutil
import tempfile
from pathlib import Path
from typing import Any

from turbo_trt.fsutil import public_dir


def export_tokenizer(tokenizer: Any, target: Path) -> dict[str, Any]:
    """Save `tokenizer` (slow or fast CLIP tokenizer) into `target/` with a `tokenizer.json`.

    Returns the special-token facts the runner needs to reproduce the pipeline's
    `tokenizer(prompt, padding="max_length", max_length=77, truncation=True)`.
    """
    from transformers import CLIPTokenizerFast  # type: ignore[attr-defined]  # lazy attribute

    staging = Path(tempfile.mkdtemp(prefix=f".{target.name}.", suffix=".tmp", dir=target.parent))
    try:
        tokenizer.save_pretrained(staging)
        if not (staging / "tokenizer.json").is_file():
            CLIPTokenizerFast.from_pretrained(staging).save_pretrained(staging)
        fast = CLIPTokenizerFast.from_pretrained(staging)
        info = {
            "max_length": int(tokenizer.model_max_length),
            "pad_token": str(fast.pad_token), "pad_id": int(fast.pad_token_id),
            "bos_id": int(fast.bos_token_id), "eos_id": int(fast.eos_token_id),
        }
        if target.exists():
            shutil.rmtree(target)
        public_dir(staging)
        os.replace(staging, target)
    finally:
        shutil.rmtree(staging, ignore_errors=True)
    return info
