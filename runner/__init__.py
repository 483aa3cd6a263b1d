"""Run stage: load a bundle, check it, and generate images. Imports no torch, diffusers or transformers.

    from turbo_trt.runner import TurboPipeline
    pipe = TurboPipeline.from_bundle("engines/sd-turbo")
    pipe("a photo of a cat", num_inference_steps=1, seed=0)[0].save("cat.png")
"""

from __future__ import annotations

from typing import Any

__all__ = ["TurboPipeline", "NonFiniteOutputError"]


def __getattr__(name: str) -> Any:  # lazy: `import turbo_trt.runner` stays cheap
    if name in __all__:
        from . import pipeline

        return getattr(pipeline, name)
    raise AttributeError(name)
