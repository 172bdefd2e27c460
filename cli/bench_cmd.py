"""``molmoact-edge bench``: the decode-loop benchmark (benchmarks/decode_loop.py)."""


def add_arguments(p) -> None:
    from molmoact_edge.benchmarks.decode_loop import add_arguments as add

    add(p)


def run(args) -> int:
    from molmoact_edge.benchmarks.decode_loop import run_cli

    return run_cli(args)
