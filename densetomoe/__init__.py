"""densetomoe: turn a dense transformer checkpoint into a sparse mixture-of-experts checkpoint."""

from ._version import __version__
from .conversion import Conversion
from .errors import UsageError
from .loading import load, register_configs
from .moe import MoEFeedForward, set_top_k
from .pipeline import convert, distill
from .recipe import Distill, Recipe

register_configs()  # AutoTokenizer.from_pretrained(folder) needs no trust_remote_code where densetomoe is imported

__all__ = ["Conversion", "Distill", "MoEFeedForward", "Recipe", "UsageError", "convert", "distill", "load", "set_top_k", "__version__"]
