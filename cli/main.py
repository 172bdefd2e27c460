"""The `molmoact-edge` command.

Each subcommand lives in its own module with ``add_arguments(parser)`` and ``run(args) -> int``.
Modules are imported only when their subcommand runs, so that robot-side commands never pay for
(or require) torch.
"""

from __future__ import annotations

import argparse
import importlib
import sys

# name -> (module, one-line help)
COMMANDS: dict[str, tuple[str, str]] = {
    "demo": ("molmoact_edge.demo_cmd", "offline demo: build a tiny random checkpoint and run generate on it"),
    "generate": ("molmoact_edge.generate_cmd", "run one MolmoAct step on images + an instruction"),
    "bench": ("molmoact_edge.bench_cmd", "benchmark one step: our onnxruntime loop vs torch vs transformers"),
    "export": ("molmoact_edge.export_cmd", "export a checkpoint to a bundle of ONNX graphs for the runtime"),
    "quantize": ("molmoact_edge.quantize_cmd", "write a quantised bundle (fp16 / int8-wo / int4-rtn / fp8) with its recipe"),
    "run": ("molmoact_edge.run_cmd", "close the loop: cameras -> policy -> safety -> Franka arm (or franky-sim)"),
    "record": ("molmoact_edge.record_cmd", "record a RealSense camera to a .db3 file or an image folder"),
}


def _peek_command(argv: list[str]) -> str | None:
    for a in argv:
        if not a.startswith("-"):
            return a
    return None


def build_parser(load: str | None = None) -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="molmoact-edge", description="Run MolmoAct on a robot.")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND", required=True)
    for name, (module, help_text) in COMMANDS.items():
        p = sub.add_parser(name, help=help_text, description=help_text)
        if name == load:
            importlib.import_module(module).add_arguments(p)
    return parser


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    name = _peek_command(argv)
    load = name if name in COMMANDS else None
    args = build_parser(load).parse_args(argv)
    module = importlib.import_module(COMMANDS[args.command][0])
    return int(module.run(args) or 0)


if __name__ == "__main__":
    raise SystemExit(main())
