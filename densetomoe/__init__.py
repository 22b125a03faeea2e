"""densetomoe: turn a dense transformer checkpoint into a sparse mixture-of-experts checkpoint."""

from ._version import __version__
from .errors import UsageError
from .loading import load
from .moe import MoEFeedForward, set_top_k
from .pipeline import Conversion, convert, distill
from .recipe import Distill, Recipe

__all__ = ["Conversion", "Distill", "MoEFeedForward", "Recipe", "UsageError", "convert", "distill", "load", "set_top_k", "__version__"]
