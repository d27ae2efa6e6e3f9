"""The reference-guided localisation prompt, as DifferAD-R1 asks it (our wording, same structure and rules).

One user turn: the reference image first, then the query (DifferAD-R1's "test image"), then the text:

1. an expert framing (two images: a defect-free reference, then the image to inspect);
2. the answer rules: reasoning in ``<think></think>``, only ``(x1,y1),(x2,y2)`` in ``<answer></answer>``,
   ``(0,0),(0,0)`` when nothing is abnormal;
3. one instruction drawn from :data:`INSTRUCTIONS` (DifferAD-R1 draws one of 20 paraphrases at random per
   sample; here the draw is a hash of the ``pair_id``, so a pair always gets the same wording and runs are
   reproducible);
4. optionally (``coordinate_hint=True``, off by default as in DifferAD-R1) a line naming the coordinate
   convention of :mod:`cadmtl.reference.grpo`'s ``coordinates`` option.

The answer format is the one :mod:`cadmtl.reference.answers` parses and :mod:`cadmtl.reference.rewards`
scores.
"""

from __future__ import annotations

import hashlib
from typing import Any

FRAMING = (
    "You are an expert visual inspector of car parts. You are given two images: the first is a reference image "
    "of a normal part without defects, the second is a test image to inspect. Compare the test image with the "
    "reference and decide whether the test image shows any anomaly; use the reference as the baseline of what is "
    "normal."
)

RULES = """
Answer rules:
1. Write your full reasoning inside <think></think>.
2. Write ONLY the final bounding box inside <answer></answer>, formatted as (x1,y1),(x2,y2): the top-left and
   bottom-right corners of the abnormal region in the test image.
3. If the test image has no abnormal region, answer (0,0),(0,0).
4. Write nothing outside these two tags.
"""

INSTRUCTIONS = (
    "Compare the two images and localise the abnormal region of the test image: a dent, scratch, crack, missing "
    "or extra part, or anything that breaks the reference's structure. Differences due only to lighting or "
    "viewpoint are not anomalies.",
    "Inspect the test image against the reference and find the region that deviates from it in shape, surface "
    "or content. Ignore changes of illumination, reflections and small shifts of the camera.",
    "Decide whether the test image contains a defect that the reference does not have. Describe the test image "
    "briefly, then localise the defect. Brightness and viewing-angle differences do not count.",
    "Look for structural, surface or logical inconsistencies between the reference and the test image, such as "
    "deformations, foreign objects or missing components, and localise the most significant one. Photometric "
    "differences are not defects.",
    "Using the reference as the normal appearance, identify any unexpected region of the test image (damage, "
    "contamination, misplaced or missing elements). Do not report differences caused by lighting or pose.",
    "Examine the image pair carefully. If the test image departs from the reference in a meaningful way, "
    "localise that region; variations of exposure, shading or camera angle are normal and must be ignored.",
    "Summarise what the test image shows, then determine whether any part of it is abnormal compared with the "
    "reference and give its location. Lighting and viewpoint changes are not anomalies.",
    "Find the area where the test image differs from the defect-free reference because of a real anomaly "
    "(broken, bent, scratched, stained, missing or added). Ignore purely photometric or geometric imaging "
    "differences.",
)

COORDINATE_HINTS = {
    "qwen2.5": "Coordinates are absolute pixels of the test image as you see it.",
    "qwen2": "Coordinates are normalised to a 0-1000 scale of the test image's width and height.",
}


def instruction_index(pair_id: str, count: int = len(INSTRUCTIONS)) -> int:
    """A stable index into :data:`INSTRUCTIONS` for a pair (a hash, the same in every process and run)."""
    return int.from_bytes(hashlib.sha256(str(pair_id).encode()).digest()[:4], "big") % count


def prompt_text(
    pair_id: str | None = None,
    instruction: int | str | None = None,
    coordinates: str = "qwen2.5",
    coordinate_hint: bool = False,
) -> str:
    """The text of the prompt.

    Args:
        pair_id: picks the instruction by hash when ``instruction`` is None (index 0 without a pair id).
        instruction: an index into :data:`INSTRUCTIONS` or the instruction text itself.
        coordinates: ``"qwen2.5"`` (absolute pixels) or ``"qwen2"`` (0-1000), only used by the hint.
        coordinate_hint: add the line naming the coordinate convention.
    """
    if isinstance(instruction, str):
        chosen = instruction
    else:
        index = instruction if instruction is not None else instruction_index(pair_id) if pair_id else 0
        chosen = INSTRUCTIONS[index % len(INSTRUCTIONS)]
    parts = [FRAMING, RULES.strip(), chosen]
    if coordinate_hint:
        parts.append(COORDINATE_HINTS[coordinates])
    return "\n".join(parts)


def prompt_messages(text: str) -> list[dict[str, Any]]:
    """TRL's conversational multimodal prompt: one user turn, two image placeholders (reference, query), the
    text last. TRL fills the placeholders in order from the sample's ``images`` column; for generation outside
    the trainer the processor takes the images beside the templated text."""
    content = [{"type": "image"}, {"type": "image"}, {"type": "text", "text": text}]
    return [{"role": "user", "content": content}]
