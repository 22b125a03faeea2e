"""Output formats: how a converted model is held in its folder, one module each, registered in
:data:`FORMATS` (:mod:`.base` says what a format decides)."""

from . import (
    native,  # noqa: F401, I001
    remote_code,  # noqa: F401  (registers the default format first)
)
from .base import FORMATS, BlockContext, Builder, Format, Layers, format_of, of

__all__ = ["FORMATS", "BlockContext", "Builder", "Format", "Layers", "format_of", "of"]
