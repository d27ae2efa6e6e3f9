"""Task weighting behind one interface: import a method's module to register it under its name."""

from .base import WEIGHTINGS, TaskWeighting, build_weighting, check_task_names, register_weighting
from .coba import CoBa, CoBaScores, CoBaWeighting
from .equal import EqualWeighting

__all__ = [
    "WEIGHTINGS",
    "CoBa",
    "CoBaScores",
    "CoBaWeighting",
    "EqualWeighting",
    "TaskWeighting",
    "build_weighting",
    "check_task_names",
    "register_weighting",
]
