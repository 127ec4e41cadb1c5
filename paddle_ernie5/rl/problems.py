"""A verifiable problem: what the model is asked, the answer a verifier checks, a reference
solution."""

from __future__ import annotations

from dataclasses import dataclass, field


@dataclass(frozen=True)
class Problem:
    family: str
    prompt: str  # text given to the model
    answer: str  # the exact answer the verifier checks
    solution: str  # reference response (SFT target, AHRL hints)
    # judge/prompt inputs (labels, image)
    meta: dict = field(default_factory=dict, compare=False, hash=False)
    context: str = ""  # what the prompt refers to besides its text (an image's id); part of the key

    @property
    def key(self) -> str:
        return (
            f"{self.family}:{self.context}:{self.prompt}"
            if self.context
            else f"{self.family}:{self.prompt}"
        )
