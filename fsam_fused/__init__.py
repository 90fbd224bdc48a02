"""fsam_fused: a fused Friendly-SAM (F-SAM, CVPR 2024) and SAM optimizer for PyTorch."""

from .accumulation import accumulated_step
from .backends import available_backends
from .batchnorm import disable_running_stats, enable_running_stats, running_stats_frozen
from .optimizer import SAM, FriendlySAM

__all__ = [
    "SAM",
    "FriendlySAM",
    "accumulated_step",
    "available_backends",
    "disable_running_stats",
    "enable_running_stats",
    "running_stats_frozen",
]
__version__ = "0.1.0"
