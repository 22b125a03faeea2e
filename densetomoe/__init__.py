"""densetomoe: turn a dense transformer checkpoint into a sparse mixture-of-experts checkpoint."""

__version__ = "0.1.0"

from .errors import UsageError  # noqa: E402
from .loading import load  # noqa: E402
from .moe import MoEFeedForward, set_top_k  # noqa: E402
from .pipeline import Conversion, convert, distill  # noqa: E402
from .recipe import Distill, Recipe  # noqa: E402

__all__ = ["Conversion", "Distill", "MoEFeedForward", "Recipe", "UsageError", "convert", "distill", "load", "set_top_k", "__version__"]
