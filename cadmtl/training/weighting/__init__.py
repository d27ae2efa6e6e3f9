"""Task weighting behind one interface: import a method's module to register it under its name."""

from .aligned_mtl import AlignedMTL
from .base import WEIGHTINGS, TaskWeighting, build_weighting, check_task_names, register_weighting
from .cagrad import CAGrad
from .coba import CoBa, CoBaScores, CoBaWeighting
from .equal import EqualWeighting
from .famo import FAMO
from .gradients import all_reduce_mean, task_gradients, write_gradient
from .pcgrad import PCGrad

__all__ = [
    "FAMO",
    "WEIGHTINGS",
    "AlignedMTL",
    "CAGrad",
    "CoBa",
    "CoBaScores",
    "CoBaWeighting",
    "EqualWeighting",
    "PCGrad",
    "TaskWeighting",
    "all_reduce_mean",
    "build_weighting",
    "check_task_names",
    "register_weighting",
    "task_gradients",
    "write_gradient",
]
