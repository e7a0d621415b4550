"""What a run leaves on disk, one concern per file; the round loop calls each callback's
hooks (``base.Callback``) and knows nothing of files."""

from .base import Callback
from .checkpoint import Checkpoints, CheckpointError
from .metrics_files import MetricsFiles
from .plots import Plots
from .summary import Summary
from .tensorboard import TensorBoard

__all__ = ["Callback", "Checkpoints", "CheckpointError", "MetricsFiles", "Plots", "Summary", "TensorBoard"]
