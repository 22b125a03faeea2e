"""The ``densetomoe`` command: parse, call one library function, print.

Library errors (:class:`~densetomoe.errors.UsageError`) become one line on stderr and exit code 2;
Ctrl-C exits 130 with nothing written; anything unexpected exits 1 with a one-line summary (set
``DENSETOMOE_DEBUG=1`` for the traceback).
"""

from __future__ import annotations

import os
import sys
from pathlib import Path
from typing import Annotated, Literal, Optional

import typer
from rich.console import Console

from . import processes
from .console import stderr
from .folder import REPORT_DIR
from .formats import FORMATS
from .gguf import PERPLEXITY_TOKENS
from .gguf import TYPES as GGUF_TYPES
from .recipe import Distill, DType, Gates, MixedPrecision, Recipe, RoutingKind, Trainable, merge
from .registry import Registry
from .stages.budget import BUDGETS
from .stages.partition import PARTITIONS
from .stages.router import ROUTERS

app = typer.Typer(
    help="Turn a dense transformer checkpoint into a sparse mixture-of-experts checkpoint.",
    context_settings={"help_option_names": ["-h", "--help"]},
    no_args_is_help=True,
    add_completion=False,
    pretty_exceptions_enable=False,
)

EXIT_USAGE, EXIT_FAILURE, EXIT_INTERRUPTED = 2, 1, 130


def _default(name: str, settings: type = Recipe):
    """A setting's default, as the recipe (or its distill: section) defines it: the one place defaults live."""
    return settings.model_fields[name].default


def _entries(registry: Registry):
    """The choices of an option: ``registry``'s entries, as a ``Literal`` that Typer offers and checks."""
    return Literal[tuple(registry.names())]


def _explained(registry: Registry, what: str, *param_decls: str, **option) -> typer.models.OptionInfo:
    """An option whose help lists ``registry``'s entries with their summaries."""
    return typer.Option(*param_decls, help=f"{what} {registry.help()}", **option)


PartitionName, RouterName, BudgetName, FormatName = map(_entries, (PARTITIONS, ROUTERS, BUDGETS, FORMATS))


def _fail(message: str, code: int) -> None:
    from rich.markup import escape

    stderr.print(f"[bold red]error:[/] {escape(message)}", highlight=False, soft_wrap=True)  # "densetomoe[gguf]" is not markup
    raise typer.Exit(code)


def _run(action):
    """Call ``action`` and map what it raises to one line and an exit code."""
    from .errors import UsageError

    try:
        return action()
    except UsageError as e:
        _fail(str(e), EXIT_USAGE)
    except KeyboardInterrupt:
        _fail("interrupted; nothing was written", EXIT_INTERRUPTED)
    except Exception as e:  # a bug or an environment problem: one line unless debugging
        if os.environ.get("DENSETOMOE_DEBUG"):
            raise
        summary = str(e).strip().splitlines()[0] if str(e).strip() else ""
        _fail(f"{type(e).__name__}: {summary} (set DENSETOMOE_DEBUG=1 for the traceback)", EXIT_FAILURE)


def _quiet_transformers() -> None:
    import transformers

    transformers.utils.logging.set_verbosity_error()
    transformers.utils.logging.disable_progress_bar()


@app.command()
def convert(
    ctx: typer.Context,
    model: Annotated[str, typer.Argument(help="Local folder, .gguf file, Hub id, or alias (bert-base, roberta-base, distilbert, all-minilm-l6-v2, gpt2, ...).")],
    experts: Annotated[int, typer.Option("--experts", "-e", help="Experts per FFN layer; they split its neurons equally.")] = _default("experts"),
    top_k: Annotated[int, typer.Option("--top-k", "-k", help="Experts each token uses (changeable at load time).")] = _default("top_k"),
    partition: Annotated[PartitionName, _explained(PARTITIONS, "How neurons are grouped into experts.")] = _default("partition"),
    router: Annotated[RouterName, _explained(ROUTERS, f"How each token's experts are chosen (default {_default('router')}; linear with --format native).", show_default=False)] = _default("router"),
    calib: Annotated[Optional[str], typer.Option(help="Calibration text: .txt (a document per line), .jsonl, .csv, or a datasets name NAME\\[:CONFIG]\\[@SPLIT]. Default: embedded Wikipedia sample.")] = None,
    calib_tokens: Annotated[
        int | None, typer.Option(help="Calibration tokens to run through the dense model. Default: 65,536 for decoder LMs with an FFN of up to 2,048 (of which 32,768 are sampled per layer for the routers and the refit), 32,768 otherwise.", show_default=False)
    ] = _default("calib_tokens"),
    compensate: Annotated[bool, typer.Option(help="Add each unselected expert's mean output (training-free correction).")] = _default("compensate"),
    refit: Annotated[Optional[bool], typer.Option("--refit/--no-refit", help="Refit the experts' down projections by least squares to the dense FFN's output on the calibration tokens, under the routing inference uses (training-free, closed form; the folder is then tuned for its top-k, and all experts no longer give the dense model exactly). Default: on for decoder LMs.", show_default=False)] = None,
    routing: Annotated[Optional[RoutingKind], typer.Option(help="top-k: every token takes --top-k experts. dynamic: a token takes experts by router probability until they cover a share of it, set per layer so that calibration tokens take --top-k on average (easy tokens take fewer, hard ones more; not with --format native, whose engines take a fixed top-k). dynamic-soft: dynamic with a soft boundary: experts near a token's threshold count in part (the recipe's ramp, 0.1 by default), so outputs move smoothly with the router and half precision flips fewer experts, at some cost in perplexity. Default: dynamic for decoder LMs in --format remote-code.", show_default=False)] = None,
    shared_experts: Annotated[int, typer.Option(help="Always-on experts made of the most important neurons; the FFN splits into experts + shared equal parts.")] = _default("shared_experts"),
    ffn_budget: Annotated[Optional[float], typer.Option(help="Average share of FFN neurons per token over all layers (e.g. 0.5); each layer's top-k, or dense, is then chosen. Replaces --top-k. For decoder LMs, unless given: --experts 64 (32 where 64 do not split the FFN equally) --budget uniform.")] = None,
    budget: Annotated[BudgetName, _explained(BUDGETS, "How --ffn-budget is shared out.")] = _default("budget"),
    layers: Annotated[Optional[str], typer.Option(help="Comma-separated indices of the FFN layers to convert (e.g. 0,1,5); the others stay dense. Default: all. An encoder-decoder's layers are numbered over both stacks: encoder 0..n-1, then decoder n..n+m-1.", show_default=False)] = None,
    prune: Annotated[float, typer.Option(help="Share of each expert's neurons to remove by activation x weight importance (0 keeps all).")] = _default("prune"),
    distill: Annotated[Optional[bool], typer.Option("--distill/--no-distill", help="Recover quality by distilling from the dense model (settings: --distill-* flags or the recipe's distill: section).", show_default=False)] = None,
    distill_steps: Annotated[Optional[int], typer.Option(help="Distillation steps (implies --distill).")] = None,
    distill_minutes: Annotated[Optional[float], typer.Option(help="Distillation wall-clock budget in minutes (implies --distill).")] = None,
    distill_data: Annotated[Optional[list[str]], typer.Option(metavar="<source>", help="Unlabelled text to distill on, as --calib (implies --distill); repeat it to read several sources, 'calibration' naming the calibration text (--distill-data calibration --distill-data more.txt.gz). Default: the calibration text.", show_default=False)] = None,
    resume: Annotated[bool, typer.Option(help="Continue an interrupted distillation from its checkpoints in OUT.checkpoints.")] = False,
    seed: Annotated[int, typer.Option(help="Seed for shuffling, clustering and router training.")] = _default("seed"),
    dtype: Annotated[DType, typer.Option(help="Load the model in float32, bfloat16 or float16.")] = _default("dtype"),
    format: Annotated[FormatName, _explained(FORMATS, "How the folder holds the model.", "--format")] = _default("format"),
    sequential: Annotated[Optional[bool], typer.Option("--sequential/--in-memory", help="Convert one block at a time, reading each block's weights from the safetensors files: peak memory is one block plus the calibration activations, whatever the depth (the same folder as in memory; not for GGUF sources, --ffn-budget or --distill). Default: one block at a time for decoders of 1B parameters and more.", show_default=False)] = None,
    device: Annotated[str, typer.Option(help="Where the stages compute (calibration, partition, routers, refit, evaluation): cpu, cuda, cuda:N, mps, or auto: this process's accelerator if it has one (under accelerate launch, each process's own), else the CPU. Weights are read and written on the CPU.")] = "auto",
    out: Annotated[Optional[Path], typer.Option("--out", "-o", help="Output folder. Default: ./<model>-moe-<experts>x<top-k>.")] = None,
    overwrite: Annotated[bool, typer.Option(help="Replace --out if it exists.")] = False,
    recipe: Annotated[Optional[Path], typer.Option(help="A recipe YAML; flags given on the command line win over its keys.")] = None,
    allow_pickle: Annotated[bool, typer.Option(help="Accept a checkpoint stored only as pickle (.bin); only for sources you trust.")] = False,
    progress: Annotated[bool, typer.Option(help="Show progress bars.")] = True,
    push_to_hub: Annotated[Optional[str], typer.Option(help="Then upload the folder to this Hub repo (NAME or ORG/NAME), as `densetomoe push` does.")] = None,
    gguf: Annotated[Optional[str], typer.Option(help=f"Then write GGUF files of these comma-separated types into the folder, for llama.cpp (--format native), as `densetomoe gguf` does: {', '.join(GGUF_TYPES)}.", show_default=False)] = None,
) -> None:
    """Convert a dense checkpoint into an MoE folder that loads with plain transformers."""
    def action():
        from .defaults import with_model_defaults
        from .pipeline import convert as run_conversion

        if push_to_hub:
            from .hub import preflight

            preflight(push_to_hub)  # a bad repo id or a missing token fails before the conversion
        settings = {
            "model": model, "experts": experts, "top_k": top_k, "partition": partition, "router": router,
            "calib": calib, "calib_tokens": calib_tokens, "compensate": compensate, "refit": refit, "routing": routing, "seed": seed,
            "dtype": dtype, "allow_pickle": allow_pickle, "shared_experts": shared_experts,
            "ffn_budget": ffn_budget, "budget": budget, "prune": prune, "format": format, "sequential": sequential,
            "layers": _indices(layers),
        }  # fmt: skip
        given = {k: v for k, v in settings.items() if _given(ctx, k) or k == "model"}
        distill_flags = {"steps": distill_steps, "minutes": distill_minutes, "data": _sources(distill_data)}
        plan = with_model_defaults(_recipe(given, recipe, distill, distill_flags))  # the folder's name shows what will run
        gguf_types = _gguf_ready(gguf, plan.format)
        name = Path(plan.model).stem if plan.model.lower().endswith(".gguf") else Path(plan.model).name
        shape = f"{plan.experts}x{plan.top_k}" if plan.ffn_budget is None else f"{plan.experts}-budget{plan.ffn_budget:g}"
        destination = out or Path(f"{name or 'model'}-moe-{shape}")
        _quiet_transformers()
        result = run_conversion(plan, destination, overwrite, show_progress=progress, log=_log, resume=resume, device=device)
        if processes.is_main_process():
            from . import tables

            Console().print(tables.conversion(result))
            _after_conversion(result.out, gguf_types, push_to_hub)

    _run(action)


def _recipe(given: dict, recipe: Path | None, distill: bool | None, flags: dict) -> Recipe:
    """The recipe a ``convert`` runs: the recipe file's keys, overridden by the flags ``given`` on the
    command line; ``--distill`` and the ``--distill-*`` ``flags`` add to (or ``--no-distill`` removes)
    its ``distill:`` section."""
    from .errors import UsageError

    flags = {k: v for k, v in flags.items() if v is not None}
    if distill is False and flags:
        raise UsageError("--no-distill contradicts the --distill-* flags given")
    base = {}
    if recipe is not None:
        base = Recipe.from_yaml(recipe, model=given["model"]).model_dump(exclude_unset=True)
        if distill is False:
            base.pop("distill", None)
    if distill or flags:
        given = {**given, "distill": {**(base.get("distill") or {}), **flags}}
    return Recipe.build(**merge(base, given))


def _gguf_ready(gguf: str | None, format: str) -> list[str] | None:
    """``--gguf``'s types, checked before the conversion: a type or an engine missing fails now."""
    if gguf is None:
        return None
    from .gguf import check_ready, parse_types

    types = parse_types(gguf)
    check_ready(format)
    return types


def _after_conversion(out: Path, gguf_types: list[str] | None, push_to_hub: str | None) -> None:
    """``convert --gguf`` and ``--push-to-hub``: what runs on the written folder."""
    from .errors import UsageError

    if gguf_types is not None:
        try:
            _write_gguf(out, gguf_types)
        except UsageError as e:
            retry = f"densetomoe gguf {out} --type {','.join(gguf_types)}"
            raise UsageError(f"{e} (the converted folder is in {out}, without GGUF files: retry with `{retry}`)") from None
    if push_to_hub:
        _push_converted(out, push_to_hub)


def _write_gguf(out: Path, types: list[str], perplexity_tokens: int = PERPLEXITY_TOKENS) -> None:
    """GGUF files into the converted folder ``out``, and a table of what they measured."""
    from . import tables
    from .gguf import write

    files = write(out, types, perplexity_tokens, log=_log)
    Console().print(tables.gguf_files(out, files))
    for f in files:
        for line in f.fallbacks:
            stderr.print(f"note: {f.type.upper()} does not fit {line}", highlight=False, soft_wrap=True)


def _log(message: str) -> None:
    if processes.is_main_process():
        stderr.print(message)


def _push_converted(out: Path, repo_id: str) -> None:
    from .errors import UsageError
    from .hub import push as upload

    try:
        print(upload(out, repo_id))
    except UsageError as e:
        retry = f"densetomoe push {out} --repo-id {repo_id}"
        raise UsageError(f"{e} (the converted folder is in {out}: retry with `{retry}`)") from None


def _indices(text: str | None) -> list[int] | None:
    """``--layers 0,1,5`` as ``[0, 1, 5]``."""
    from .errors import UsageError

    if text is None:
        return None
    try:
        return [int(part) for part in text.split(",") if part.strip()]
    except ValueError:
        raise UsageError(f"--layers takes comma-separated layer indices (e.g. 0,1,5), got {text!r}") from None


def _sources(given: list[str] | None) -> str | list[str] | None:
    """A repeated ``--distill-data`` / ``--data``: one source as itself, several as a list (``Distill.data``)."""
    return given[0] if given and len(given) == 1 else given or None


def _given(ctx: typer.Context, name: str) -> bool:
    """Whether option ``name`` was typed on the command line (not a default)."""
    source = ctx.get_parameter_source(name)
    return source is not None and source.name == "COMMANDLINE"


@app.command("eval")
def evaluate(
    moe_dir: Annotated[Path, typer.Argument(help="A folder written by densetomoe convert.")],
    base: Annotated[Optional[str], typer.Option(help="Dense model to compare with. Default: the one recorded in the folder.")] = None,
    suite: Annotated[Optional[list[str]], typer.Option("--suite", "-s", help="A suite by name (shipped: wiki-prose, wiki-perplexity, rotten-tomatoes-sentiment; also ./evals/suites/NAME.yaml) or a YAML file of your own; repeatable. Default: wiki-prose.")] = None,
    top_k: Annotated[Optional[str], typer.Option("--top-k", "-k", help="Comma-separated top-k values to sweep, e.g. 1,2,4. Default: the folder's own.")] = None,
    out: Annotated[Optional[Path], typer.Option("--out", "-o", help="Report folder (report.json, report.md, figures): new, empty, or an earlier report, which is replaced. Default: MOE_DIR/eval, where `densetomoe push` looks for it.")] = None,
    threads: Annotated[Optional[int], typer.Option(help="CPU threads for the timings. Default: torch's.")] = None,
    repeats: Annotated[int, typer.Option(help="Interleaved timing rounds; medians are reported.")] = 5,
    speed: Annotated[bool, typer.Option(help="Measure throughput, latency and (decoders) greedy decoding (slower).")] = True,
    engine: Annotated[Optional[Literal["transformers", "llamacpp"]], typer.Option(help="llamacpp: also serve a native folder and its dense model in llama.cpp (GGUF files of the same type) for served perplexity and decode speed-up. Default: llamacpp when the folder holds a GGUF file, else transformers only.", show_default=False)] = None,
    gguf: Annotated[Optional[Path], typer.Option(help="The GGUF file llama.cpp serves (implies --engine llamacpp). Default: the folder's f16 file, else one made for the run.", show_default=False)] = None,
    new_tokens: Annotated[int, typer.Option(help="Greedy tokens timed after the prompt when decoding.")] = 64,
    progress: Annotated[bool, typer.Option(help="Show progress bars.")] = True,
) -> None:
    """Measure quality, speed and routing of an MoE folder (remote code or native) against its dense model.

    A native folder can also be measured as llama.cpp serves it (--engine llamacpp): the folder and
    its dense model as GGUF files of the same type, perplexity on held-out text and decode speed."""

    def action():
        from . import tables
        from .errors import UsageError
        from .evaluation import report as reports
        from .evaluation.command import Settings
        from .evaluation.command import evaluate as run_evaluation

        try:
            ks = [int(k) for k in top_k.split(",")] if top_k else None
        except ValueError:
            raise UsageError(f"--top-k takes comma-separated integers, got {top_k!r}") from None
        if not (moe_dir / "config.json").is_file():
            raise UsageError(f"{moe_dir} is not a model folder (no config.json in it)")
        destination = out or moe_dir / REPORT_DIR
        reports.check_destination(destination)  # before the work: a report never replaces a model
        settings = Settings(top_ks=ks, base=base, threads=threads, repeats=repeats, speed=speed, engine=engine, gguf=gguf, new_tokens=new_tokens)
        if suite:
            settings.suites = list(suite)
        _quiet_transformers()
        result = run_evaluation(moe_dir, settings, show_progress=progress, log=_log)
        folder = reports.write(result, destination)
        Console().print(tables.evaluation(moe_dir, result))
        served = result.get("llama_cpp")
        if served and "none" in served:
            stderr.print(f"no llama.cpp row: {served['none']}", soft_wrap=True)
        elif served:
            Console().print(tables.served(served))
        stderr.print(f"report: {folder / reports.MARKDOWN_FILE}")

    _run(action)


@app.command("distill")
def distill_command(
    ctx: typer.Context,
    moe_dir: Annotated[Path, typer.Argument(help="A folder written by densetomoe convert.")],
    steps: Annotated[Optional[int], typer.Option(help="Optimisation steps.")] = _default("steps", Distill),
    minutes: Annotated[Optional[float], typer.Option(help="Wall-clock budget; training stops at whichever of steps and minutes comes first.")] = None,
    data: Annotated[Optional[list[str]], typer.Option(metavar="<source>", help="Unlabelled text (.txt, .jsonl, .csv, datasets name); repeat it to read several sources, 'calibration' naming the folder's calibration text. Default: the folder's calibration text.", show_default=False)] = None,
    lr: Annotated[float, typer.Option(help="Peak learning rate (AdamW, warm-up, cosine decay).")] = _default("lr", Distill),
    batch_size: Annotated[int, typer.Option(help="Texts per step (split between the processes under accelerate launch).")] = _default("batch_size", Distill),
    seq_len: Annotated[int, typer.Option(help="Tokens per text; longer ones are cut.")] = _default("seq_len", Distill),
    expert_dropout: Annotated[float, typer.Option(help="Probability of dropping each selected expert per token while training.")] = _default("expert_dropout", Distill),
    train: Annotated[Trainable, typer.Option(help="moe: only experts, routers and corrections learn. blocks: also attention and norms (embeddings and output layer frozen). all: every weight.")] = _default("train", Distill),
    gates: Annotated[Gates, typer.Option(help="A native folder's routers. frozen: they keep the conversion's choice of experts. learn: they train under the engines' softmax routing, each at its experts' rate relative to its size.")] = _default("gates", Distill),
    mixed_precision: Annotated[MixedPrecision, typer.Option(help="accelerate mixed precision: no, bf16 or fp16.")] = _default("mixed_precision", Distill),
    recipe: Annotated[Optional[Path], typer.Option(help="A recipe YAML whose distill: section sets the defaults; flags win.")] = None,
    base: Annotated[Optional[str], typer.Option(help="Dense teacher. Default: the base model recorded in the folder.")] = None,
    format: Annotated[Optional[FormatName], _explained(FORMATS, "Write (and train) the folder in this format; remote code becomes native only with a linear router. Default: the folder's own.", "--format", show_default=False)] = None,
    out: Annotated[Optional[Path], typer.Option("--out", "-o", help="Output folder. Default: MOE_DIR, replaced when training has finished.")] = None,
    overwrite: Annotated[bool, typer.Option(help="Replace --out if it exists.")] = False,
    resume: Annotated[bool, typer.Option(help="Continue from the checkpoints in OUT.checkpoints.")] = False,
    progress: Annotated[bool, typer.Option(help="Show progress bars.")] = True,
) -> None:
    """Recover quality: distill a converted folder from its dense model (runs under `accelerate launch` too)."""

    def action():
        from .errors import UsageError
        from .pipeline import distill as run_distillation

        flags = {
            "steps": steps, "minutes": minutes, "data": _sources(data), "lr": lr, "batch_size": batch_size, "seq_len": seq_len,
            "expert_dropout": expert_dropout, "train": train, "gates": gates, "mixed_precision": mixed_precision,
        }  # fmt: skip
        given = {k: v for k, v in flags.items() if _given(ctx, k)}
        if recipe is not None:
            section = Recipe.from_yaml(recipe, model="-").distill
            if section is None:
                raise UsageError(f"recipe {recipe} has no distill: section")
            settings = Distill.build(**{**section.model_dump(exclude_unset=True), **given})
        else:
            settings = Distill.build(**flags)
        _quiet_transformers()
        result = run_distillation(moe_dir, settings, out, overwrite, base, resume, show_progress=progress, log=_log, format=format)
        if processes.is_main_process():
            from . import tables

            Console().print(tables.conversion(result))

    _run(action)


@app.command("gguf")
def gguf_command(
    folder: Annotated[Path, typer.Argument(help="A --format native folder written by densetomoe convert.")],
    type: Annotated[str, typer.Option("--type", "-t", help=f"Comma-separated GGUF types: {', '.join(GGUF_TYPES)}. f32/f16/bf16/q8_0 come from llama.cpp's converter, the rest from its quantizer.")] = "f16",
    perplexity_tokens: Annotated[int, typer.Option(help="Held-out Wikipedia tokens each file is scored on in llama.cpp (0: not scored).")] = PERPLEXITY_TOKENS,
) -> None:
    """Write GGUF files of a native folder into it, for llama.cpp, Ollama and LM Studio, each scored in llama.cpp."""

    def action():
        from .gguf import parse_types

        if not (folder / "config.json").is_file():
            from .errors import UsageError

            raise UsageError(f"{folder} is not a model folder (no config.json in it)")
        _quiet_transformers()
        _write_gguf(folder, parse_types(type), perplexity_tokens)

    _run(action)


@app.command()
def push(
    folder: Annotated[Path, typer.Argument(help="A folder written by `densetomoe convert`.")],
    repo_id: Annotated[str, typer.Option("--repo-id", help="Hub repository, NAME or ORG/NAME; created if missing.")],
    private: Annotated[bool, typer.Option("--private", help="Create the repository as private.")] = False,
    token: Annotated[Optional[str], typer.Option(help="Hub token with write access. Default: HF_TOKEN, else the `hf auth login` cache (both safer than a flag).", show_default=False)] = None,
    base_model: Annotated[Optional[str], typer.Option(help="Hub id of the dense model, for the card, when it was converted from a local folder.")] = None,
    gguf: Annotated[Optional[str], typer.Option(help="Comma-separated types of the folder's GGUF files (densetomoe gguf) to upload beside the weights, listed in the card. Default: every one there.", show_default=False)] = None,
) -> None:
    """Upload a converted folder to the Hugging Face Hub (HF_ENDPOINT is honoured), with a model card for the Hub."""
    def action():
        from .hub import push as upload

        print(upload(folder, repo_id, private=private, token=token, base_model=base_model, gguf=None if gguf is None else [gguf]))

    _run(action)


@app.command()
def version() -> None:
    """Print the densetomoe version (as `densetomoe --version` does)."""
    from ._version import __version__

    print(__version__)


def _print_version(value: bool) -> None:
    if value:
        version()
        raise typer.Exit()


@app.callback()
def _options(
    show_version: Annotated[bool, typer.Option("--version", "-V", help="Print the version and exit.", callback=_print_version, is_eager=True)] = False,
) -> None:
    """Turn a dense transformer checkpoint into a sparse mixture-of-experts checkpoint."""


def main() -> None:  # pragma: no cover - console entry point for python -m
    app(prog_name="densetomoe")


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
