"""Command line: ``python -m lora_ops inspect FILE`` and ``python -m lora_ops resize IN -o OUT --rank R`` (several
inputs: ``resize A B … -o DIR``, all at one rank, see :mod:`lora_ops.sets`), and ``python -m lora_ops merge A:0.8 B:0.5
-o OUT`` (the weighted sum of LoRAs, see :mod:`lora_ops.merge`).

User errors print one line ``error: ...`` on stderr and exit with status 2; nothing is written. SIGINT and
SIGTERM stop a run with one line and the status 128 + the signal's number (130, 143), leaving no temporary file.
torch is imported only once the arguments are read and the input's hashing has started (see :func:`main`).
"""

from __future__ import annotations

import argparse
import json
import os
import signal
import sys
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path

from tqdm import tqdm

from . import __version__
from .atomic import same_file, write_json
from .digest import hash_ahead
from .errors import LoraError
from .merge_inputs import parse_weighted
from .options import METHODS, OUTPUT_DTYPE_NAMES, ResizeOptions
from .sizes import format_size, parse_size

EXIT_USER_ERROR = 2
STOP_SIGNALS = (signal.SIGINT, signal.SIGTERM)


class Stopped(BaseException):
    """Raised in the main thread by SIGINT or SIGTERM, so that every ``finally`` and cleanup runs."""

    def __init__(self, signum: int) -> None:
        super().__init__(signum)
        self.signum = signum


def _stop(signum: int, frame: object) -> None:
    raise Stopped(signum)


class _Parser(argparse.ArgumentParser):
    """argparse that reports a usage error as one ``error: ...`` line."""

    def error(self, message: str) -> None:
        raise LoraError(message)


def _size(text: str) -> int:
    try:
        return parse_size(text)
    except LoraError as error:
        raise argparse.ArgumentTypeError(str(error)) from None


def _weighted(text: str) -> tuple[Path, float]:
    try:
        return parse_weighted(text)
    except LoraError as error:
        raise argparse.ArgumentTypeError(str(error)) from None


def _parser() -> argparse.ArgumentParser:
    parser = _Parser(prog="python -m lora_ops", description="Change the rank of LoRA checkpoints.")
    parser.add_argument("--version", action="version", version=f"lora-resizer {__version__}")
    commands = parser.add_subparsers(dest="command", required=True, parser_class=_Parser)

    inspect = commands.add_parser("inspect", help="describe a LoRA file: layout, ranks, spectra")
    inspect.add_argument("file", type=Path)
    inspect.add_argument("--json", action="store_true", help="print the full report as JSON")
    inspect.add_argument("--config", type=Path, help="PEFT adapter_config.json of the file")

    resize = commands.add_parser(
        "resize",
        help="write a copy of a LoRA at another rank, or of several LoRAs at one rank",
        description="Write a copy of a LoRA at another rank. Give at least one of --rank, --energy, --target-size"
        " (or a rank rule of sd-scripts: --sv-ratio, --sv-cumulative, --sv-fro). With several inputs, -o is a"
        " folder, each output takes its input's name, and the default rank is the set's largest (lossless); all or"
        " nothing: when one file fails, no output is written.",
    )
    resize.add_argument("inputs", type=Path, nargs="+", metavar="input")
    resize.add_argument(
        "-o",
        "--output",
        type=Path,
        required=True,
        help="the .safetensors file to write (several inputs: the folder to write into); its folder must exist",
    )
    resize.add_argument("--rank", type=int, help="every layer gets this rank (caps the rank rules and --target-size)")
    resize.add_argument("--method", choices=METHODS, default="svd")
    resize.add_argument("--niter", type=int, default=2, help="power iterations (randomized_svd)")
    resize.add_argument("--oversample", type=int, default=8, help="extra sketch columns (randomized_svd)")
    resize.add_argument("--density", type=float, help="non-zero share of R (sparse_random_projection)")
    resize.add_argument("--seed", type=int, default=0)
    resize.add_argument(
        "--energy", type=float, help="per layer, keep at least this share of the energy (= --sv-fro sqrt(share))"
    )
    resize.add_argument("--sv-ratio", type=float, help="per layer, keep singular values >= the largest / this")
    resize.add_argument("--sv-cumulative", type=float, help="per layer, keep at least this share of sum(s)")
    resize.add_argument("--sv-fro", type=float, help="per layer, keep at least this share of the Frobenius norm")
    resize.add_argument("--target-size", type=_size, help="output size, e.g. 40MB")
    resize.add_argument(
        "--scale", type=float, default=1.0, help="strength baked into the delta (the weight you would load it at)"
    )
    resize.add_argument("--dtype", choices=OUTPUT_DTYPE_NAMES, default="keep")
    resize.add_argument("--config", type=Path, help="PEFT adapter_config.json of the input")
    resize.add_argument("--report", type=Path, help="write the JSON report here (not the input or the output)")
    resize.add_argument("--device", choices=("cpu", "cuda"), default="cpu")

    merge = commands.add_parser(
        "merge",
        help="merge LoRAs into one: the weighted sum of their deltas",
        description="Merge LoRAs of one model and layout into one file: each module is the weighted sum of the"
        " inputs' deltas, kept exactly at the summed rank, or at --rank the best approximation of the sum there is"
        " (exact SVD from the factors).",
    )
    merge.add_argument(
        "inputs",
        type=_weighted,
        nargs="+",
        metavar="FILE[:WEIGHT]",
        help="a LoRA file and its weight (default 1; split at the last ':' only when a number follows)",
    )
    merge.add_argument(
        "-o", "--output", type=Path, required=True, help="the .safetensors file to write; its folder must exist"
    )
    merge.add_argument("--rank", type=int, help="every layer gets this rank (default: the summed ranks, lossless)")
    merge.add_argument("--method", choices=METHODS, default="svd")
    merge.add_argument("--seed", type=int, default=0)
    merge.add_argument("--dtype", choices=OUTPUT_DTYPE_NAMES, default="keep")
    merge.add_argument("--report", type=Path, help="write the JSON report here (not an input or the output)")
    merge.add_argument("--device", choices=("cpu", "cuda"), default="cpu")
    return parser


def _print_inspection(report: dict) -> None:
    print(
        f"{report['file']}: {report['flavour']} (layout {report['layout']}) for {report['family']},"
        f" {format_size(report['bytes'])}"
    )
    print(
        f"  {report['modules']} modules, ranks {report['ranks']}, {report['dtype']}, scale from {report['scale_source']}"
    )
    print(f"  {'layer':<64} {'shape':>18} {'rank':>5} {'top-4 energy':>13}")
    for layer in report["layers"]:
        squares = [s * s for s in layer["singular_values"]]
        share = sum(squares[:4]) / sum(squares) if sum(squares) else 1.0
        shape = "x".join(map(str, layer["shape"]))
        print(f"  {layer['name']:<64} {shape:>18} {layer['rank']:>5} {share:>13.4f}")


def _inspect(args: argparse.Namespace) -> None:
    from .resize import inspect_file

    report = inspect_file(args.file, config=args.config)
    _print_warnings(report)
    print(json.dumps(report, indent=2)) if args.json else _print_inspection(report)


def _print_warnings(report: dict, prefix: str = "") -> None:
    """One ``warning: …`` line on stderr per consumer that reads the input differently from its format's owner
    (``prefix``: the file's name, in a set)."""
    for line in report["warnings"]:
        print(f"warning: {prefix}{line}", file=sys.stderr)


@contextmanager
def _progress_bar(desc: str) -> Iterator[Callable[[int, int], None]]:
    """A ``progress(done, total)`` callback drawing a bar of layers on stderr (none when stderr is not a terminal)."""
    with tqdm(desc=desc, unit="layer", file=sys.stderr, disable=None) as bar:

        def progress(done: int, total: int) -> None:
            bar.total = total
            bar.update(done - bar.n)

        yield progress


def _resize_options(args: argparse.Namespace) -> ResizeOptions:
    return ResizeOptions(
        rank=args.rank,
        method=args.method,
        niter=args.niter,
        oversample=args.oversample,
        density=args.density,
        seed=args.seed,
        energy=args.energy,
        target_size=args.target_size,
        dtype=args.dtype,
        device=args.device,
        sv_ratio=args.sv_ratio,
        sv_cumulative=args.sv_cumulative,
        sv_fro=args.sv_fro,
        strength=args.scale,
    )


def _wrote(output: Path, report: dict) -> str:
    """The line that sums up one resized file."""
    return (
        f"wrote {output} ({format_size(report['bytes_in'])} -> {format_size(report['bytes_out'])}),"
        f" ranks {report['rank_in']} -> {report['rank_out']}, {report['method']}:"
        f" relative error median {report['median_error']:.4g}, worst {report['worst_error']:.4g}"
        f" ({report['worst_layer']}), {report['seconds']:.1f} s"
    )


def _resize(args: argparse.Namespace) -> None:
    options = _resize_options(args)
    if len(args.inputs) > 1:
        _resize_set(args, options)
        return
    from .resize import resize_file

    (source,) = args.inputs
    if args.report:
        _check_report_path(args.report, source, args.output)
    with _progress_bar("resizing") as progress:
        report = resize_file(source, args.output, options, config=args.config, progress=progress)
    if args.report:
        write_json(args.report, report)
    print(_wrote(args.output, report))
    _print_warnings(report)


# The summary table of a set: column title, alignment and width, the cell's text from a lora_ops.sets summary row.
SUMMARY_COLUMNS = (
    ("file", "<40", lambda row: row["file"]),
    ("layout", "<16", lambda row: row["layout"]),
    ("ranks in -> out", "<18", lambda row: f"{','.join(row['rank_in'])} -> {','.join(row['rank_out'])}"),
    ("worst error", ">12", lambda row: f"{row['worst_error']:.4g}"),
    ("median error", ">12", lambda row: f"{row['median_error']:.4g}"),
    ("bytes in -> out", ">22", lambda row: f"{format_size(row['bytes_in'])} -> {format_size(row['bytes_out'])}"),
)


def _print_summary(rows: list[dict]) -> None:
    """The set's summary table: a title line, then one line per file."""
    print("  ".join(f"{title:{align}}" for title, align, _ in SUMMARY_COLUMNS))
    for row in rows:
        print("  ".join(f"{cell(row):{align}}" for _, align, cell in SUMMARY_COLUMNS))


def _resize_set(args: argparse.Namespace, options: ResizeOptions) -> None:
    """``resize A B … -o DIR``: every input into ``DIR`` under its own name, all or nothing (:mod:`lora_ops.sets`)."""
    from .sets import resize_files

    if args.config:
        raise LoraError("--config gives the adapter_config.json of one input; with several, keep each beside its file")
    if args.report:
        for source in args.inputs:
            _check_report_path(args.report, source, args.output / source.name)
    with _progress_bar("resizing the set") as progress:
        result = resize_files(args.inputs, args.output, options, progress=progress)
    if args.report:
        write_json(args.report, result)
    for report in result["reports"]:
        print(_wrote(args.output / report["output"]["file"], report))
        _print_warnings(report, f"{report['source']['file']}: ")
    _print_summary(result["summary"])


def _merge(args: argparse.Namespace) -> None:
    """``merge A[:w] B[:w] … -o OUT``: the weighted sum of the inputs' deltas in one file (:mod:`lora_ops.merge`)."""
    from .merge import merge_files

    if args.report:
        for source, _ in args.inputs:
            _check_report_path(args.report, source, args.output)
    with _progress_bar("merging") as progress:
        report = merge_files(
            args.inputs,
            args.output,
            rank=args.rank,
            method=args.method,
            dtype=args.dtype,
            seed=args.seed,
            device=args.device,
            progress=progress,
        )
    if args.report:
        write_json(args.report, report)
    print(_wrote(args.output, report))
    _print_warnings(report)


def _check_report_path(report: Path, source: Path, output: Path) -> None:
    """Refuse, before anything is written, a report path that is the input or the output (also through links) or
    that cannot be written."""
    for path, what in ((source, "input"), (output, "output")):
        if same_file(report, path):
            raise LoraError(f"--report {report} is the {what} file; choose another path")
    if report.is_dir():
        raise LoraError(f"--report {report} is a folder; give a file name")
    if not report.parent.is_dir():
        raise LoraError(f"report folder does not exist: {report.parent} (it is not created; make it first)")


def main(argv: list[str] | None = None) -> int:
    """Run the CLI; return the exit status."""
    previous = {signum: signal.signal(signum, _stop) for signum in STOP_SIGNALS}
    try:
        args = _parser().parse_args(argv)
        if args.command == "resize":
            # The output's provenance holds the input's sha256: hash it on the second core while torch loads.
            hash_ahead(args.inputs[0])
        if args.command == "merge":
            hash_ahead(*(source for source, _ in args.inputs))
        import torch  # only now, so that the hashing above overlaps torch's one-second import

        # Per layer the work is small (r x r eigenproblems, thin products): several batches of layers on
        # one BLAS thread each use the cores better than one batch on several (see lora_ops.threads).
        torch.set_num_threads(1)
        if args.command == "inspect":
            _inspect(args)
        elif args.command == "merge":
            _merge(args)
        else:
            _resize(args)
    except LoraError as error:
        print(f"error: {error}", file=sys.stderr)
        return EXIT_USER_ERROR
    except BrokenPipeError:
        # The reader went away (`... inspect FILE | head`): stop quietly, like other command-line tools.
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
        return 1
    except OSError as error:
        print(f"error: {error.strerror or error}: {error.filename or ''}".rstrip(": "), file=sys.stderr)
        return EXIT_USER_ERROR
    except Stopped as stopped:
        print(f"error: stopped by {signal.Signals(stopped.signum).name}; nothing was written", file=sys.stderr)
        return 128 + stopped.signum
    finally:
        for signum, handler in previous.items():
            signal.signal(signum, handler)
    return 0
