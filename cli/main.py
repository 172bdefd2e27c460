"""The `molmoact-edge` command.

Each subcommand lives in its own module with ``add_arguments(parser)`` and ``run(args) -> int``.
Modules are imported only when their subcommand runs, so that robot-side commands never pay for
(or require) torch. Every expected failure ends here as one `error:` line (molmoact_edge.errors).
"""

from __future__ import annotations

import argparse
import importlib
import sys

from molmoact_edge.errors import EXIT_STATUS_HELP, USAGE, describe, report

# name -> (module, one-line help)
COMMANDS: dict[str, tuple[str, str]] = {
    "demo": ("molmoact_edge.demo_cmd", "offline demo: the trained demo policy moves the simulated arm to the named object (rendered scene)"),
    "generate": ("molmoact_edge.generate_cmd", "run one MolmoAct step on images + an instruction"),
    "bench": ("molmoact_edge.bench_cmd", "benchmark one step: our onnxruntime loop vs torch vs transformers "
                                         "(minutes, 4-5 GB RAM)"),
    "export": ("molmoact_edge.export_cmd", "export a checkpoint to a bundle of ONNX graphs for the runtime"),
    "build": ("molmoact_edge.build_cmd", "build TensorRT engines into a bundle, or --check-only its graphs without TensorRT"),
    "quantize": ("molmoact_edge.quantize_cmd", "write a quantised bundle (fp16 / int8-wo / int4-rtn / fp8) with its recipe"),
    "study": ("molmoact_edge.study_cmd", "compare quantised bundles with a reference: tokens, depth, trace, actions, "
                                         "cost; per-layer sensitivity (report.md/json + plots)"),
    "run": ("molmoact_edge.run_cmd", "close the loop: cameras -> policy -> safety -> Franka arm (or franky-sim)"),
    "eval": ("molmoact_edge.eval_cmd", "task success over seeded episodes in the rendered franky-sim tabletop"),
    "train-demo": ("molmoact_edge.train_cmd", "train the demo policy on expert data rendered in the franky-sim tabletop"),
    "demo-policy": ("molmoact_edge.demo_policy_cmd", "write the demo policy's checkpoint (official layout) from its compact weights"),
    "record": ("molmoact_edge.record_cmd", "record a RealSense camera to a .db3 file or an image folder"),
}


class HelpFormatter(argparse.ArgumentDefaultsHelpFormatter):
    """Shows defaults, except the empty ones (None, False) that would only say 'default: None'."""

    def _get_help_string(self, action):
        if action.default is None or action.default is False:
            return action.help or ""
        return super()._get_help_string(action)


class Parser(argparse.ArgumentParser):
    """argparse, with its usage errors as one `error:` line (exit 2) like every other failure."""

    def error(self, message: str):
        report(USAGE, f"{self.prog}: {message} (see `{self.prog} --help`)")
        raise SystemExit(USAGE)


def version() -> str:
    from importlib.metadata import PackageNotFoundError
    from importlib.metadata import version as dist_version

    try:
        return dist_version("molmoact-edge")
    except PackageNotFoundError:  # running from a source tree that was never installed
        from molmoact_edge import __version__

        return __version__


def _peek_command(argv: list[str]) -> str | None:
    for a in argv:
        if not a.startswith("-"):
            return a
    return None


def build_parser(load: str | None = None) -> argparse.ArgumentParser:
    parser = Parser(prog="molmoact-edge", description="Run MolmoAct on a robot.", epilog=EXIT_STATUS_HELP,
                    formatter_class=HelpFormatter)
    parser.add_argument("--version", action="version", version=f"molmoact-edge {version()}")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND", required=True)
    for name, (module, help_text) in COMMANDS.items():
        p = sub.add_parser(name, help=help_text, description=help_text, epilog=EXIT_STATUS_HELP,
                           formatter_class=HelpFormatter)
        if name == load:
            importlib.import_module(module).add_arguments(p)
    return parser


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    name = _peek_command(argv)
    load = name if name in COMMANDS else None
    try:
        args = build_parser(load).parse_args(argv)
        module = importlib.import_module(COMMANDS[args.command][0])
        return int(module.run(args) or 0)
    except (Exception, KeyboardInterrupt) as e:
        failure = describe(e, load)
        if failure is None:
            raise
        return report(*failure)


if __name__ == "__main__":
    raise SystemExit(main())
