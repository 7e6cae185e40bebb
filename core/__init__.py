"""specrun: speculative decoding with pluggable execution backends."""

from .errors import SpecrunError
from .hookspecs import hookimpl
from .interfaces import Availability, Backend, Draft, Drafter, ModelInfo, StepOutput, Target

__version__ = "0.1.0"
__all__ = [
    "Availability",
    "Backend",
    "Draft",
    "Drafter",
    "ModelInfo",
    "SpecrunError",
    "StepOutput",
    "Target",
    "hookimpl",
]
