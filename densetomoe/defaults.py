"""Model-dependent defaults: the one place where a recipe's open settings (None) are decided from the
dense model they convert. Every other default is a field default of :class:`~densetomoe.recipe.Recipe`."""

from __future__ import annotations

from .conversion import Dense
from .formats import FORMATS
from .recipe import Recipe
from .stages import load

SEQUENTIAL_FROM = 1_000_000_000  # parameters from which a decoder converts one block at a time by default
DECODER_BUDGET_EXPERTS = (64, 32)  # a decoder's experts under --ffn-budget when none are asked for: the first that splits its FFN
CALIB_TOKENS = 32768  # calibration tokens at least, when the recipe names none (twice the sample where that is more)
SAMPLE_TOKENS = (8192, 32768)  # a layer's sampled calibration tokens: everywhere, and at most for a decoder LM
SAMPLE_BYTES = 256 * 1024**2  # a decoder's sample grows while its activations (tokens x FFN, float32) fit in this


def with_model_defaults(recipe: Recipe) -> Recipe:
    """``recipe`` with the settings it leaves to the model (None) decided:

    * ``sequential``: one block at a time for decoders of :data:`SEQUENTIAL_FROM` parameters and more,
      from safetensors, when nothing asks for the whole model (distillation, a sensitivity budget).
      One block at a time gives the same folder in less memory, and was no slower on SmolLM2
      (docs/large-models.md);
    * ``refit``: on for decoder LMs, where training-free conversion loses most (docs/results.md);
    * ``routing``: the format's choice (:meth:`~densetomoe.formats.Format.routing`: dynamic top-k for
      decoder LMs in remote code, top-k otherwise);
    * ``sample_tokens`` (:func:`sample_tokens`: more for small decoder LMs) and ``calib_tokens``
      (twice the sample, at least :data:`CALIB_TOKENS`);
    * under ``ffn_budget``, for decoder LMs, unless the recipe names them: the first of
      :data:`DECODER_BUDGET_EXPERTS` that splits the FFN equally, and the ``uniform`` budget (SmolLM2
      at 50%: 64 experts lost less than 32, and the sensitivity budget more, with 8 experts and with
      32, than the same top-k everywhere; docs/results.md).

    What is decided is recorded as set, so a second call (the CLI's, then :func:`convert`'s) reads
    nothing again.
    """
    given = recipe.model_fields_set
    budget_defaults = recipe.ffn_budget is not None and not {"experts", "budget"} <= given
    open_settings = (recipe.sequential, recipe.refit, recipe.routing, recipe.sample_tokens, recipe.calib_tokens)
    if None not in open_settings and not budget_defaults:
        return recipe
    dense = Dense.describe(recipe.model, recipe.allow_pickle)
    decided = {}
    if budget_defaults:
        splitting = [n for n in DECODER_BUDGET_EXPERTS if dense.ffn_size % (n + recipe.shared_experts) == 0]
        if "experts" not in given:
            decided["experts"] = splitting[0] if dense.arch.decoder and splitting else recipe.experts
        if "budget" not in given:
            decided["budget"] = "uniform" if dense.arch.decoder else recipe.budget
    if recipe.sequential is None:
        big = dense.arch.decoder and not dense.source.gguf_file and load.parameter_count(dense.source.path) >= SEQUENTIAL_FROM
        decided["sequential"] = big and recipe.distill is None and recipe.ffn_budget is None
    if recipe.refit is None:
        decided["refit"] = dense.arch.decoder
    if recipe.routing is None:
        decided["routing"] = FORMATS[recipe.format].routing(dense.arch.decoder)
    if recipe.sample_tokens is None:
        decided["sample_tokens"] = sample_tokens(dense.arch.decoder, dense.ffn_size)
    if recipe.calib_tokens is None:
        decided["calib_tokens"] = max(CALIB_TOKENS, 2 * decided.get("sample_tokens", recipe.sample_tokens))
    return recipe.model_copy(update=decided)


def sample_tokens(decoder: bool, ffn_size: int) -> int:
    """A layer's sampled calibration tokens when the recipe names none: :data:`SAMPLE_TOKENS`'s first,
    and for a decoder LM the largest power of two up to its second whose activations (``tokens x
    ffn_size``, float32) fit in :data:`SAMPLE_BYTES`. SmolLM2 at half the FFN: 32,768 tokens of 65,536
    gave 1.93x dense perplexity, 8,192 of 32,768 gave 2.19x (docs/results.md); at LLaMA-3.2-1B's FFN
    (8,192) and above the sample stays 8,192 (a larger one would slow each layer's refit in proportion)."""
    low, high = SAMPLE_TOKENS
    tokens = low
    while decoder and tokens * 2 <= high and tokens * 2 * ffn_size * 4 <= SAMPLE_BYTES:
        tokens *= 2
    return tokens
