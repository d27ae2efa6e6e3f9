"""Reference-guided defect localisation (DifferAD-R1): answer parsing, GRPO rewards, a training-free localiser.

* :mod:`.answers` reads the box out of ``<think>...</think><answer>(x1,y1),(x2,y2)</answer>`` and counts
  parse failures;
* :mod:`.rewards` holds the reward functions in TRL's signature and the difficulty-aware group weight;
* :mod:`.localizer` compares query and reference patch features (nearest neighbour within a window) and turns
  the difference map into boxes, with threshold calibration;
* :mod:`.pairs` builds and streams reference / query pairs repos (config ``pairs``) from ``*_ad`` splits;
* :mod:`.localize` runs the localiser on a pairs split, :mod:`.evaluate` scores predictions with DifferAD's
  protocol; :mod:`.command` is ``cadmtl reference build-pairs | localize | evaluate | grpo | zero-shot``;
* :mod:`.prompts` is DifferAD-R1's two-image prompt; :mod:`.grpo` trains a vision-language model on it with
  TRL's ``GRPOTrainer`` and answers pairs zero-shot (imported on demand: it needs the ``grpo`` extra).
"""

from .answers import ParseStats, completion_text, parse_box, parse_boxes
from .rewards import dclr_reward, difficulty_weights, format_reward, hungarian_reward, iou_reward

__all__ = [
    "ParseStats",
    "completion_text",
    "dclr_reward",
    "difficulty_weights",
    "format_reward",
    "hungarian_reward",
    "iou_reward",
    "parse_box",
    "parse_boxes",
]
