"""`molmoact-edge demo-policy --out DIR`: expand the demo policy's compact weights into a checkpoint.

The compact form keeps every weight except the two vocabulary tables, of which only the rows this
policy uses are stored (float16); the written checkpoint has the official MolmoAct layout (config.json
with norm_stats['franka_tabletop_demo'], tokenizer, processor files, model.safetensors), so
`molmoact-edge export` and the loader treat it like a released checkpoint.
"""

from __future__ import annotations

import argparse
from importlib import resources
from pathlib import Path

from molmoact_edge.errors import CommandError

PACKAGED = "demo-policy.npz"  # shipped in molmoact_edge/assets (cli/assets/README.md)


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--out", type=Path, required=True, help="checkpoint folder to write")
    p.add_argument("--weights", type=Path, default=None,
                   help="compact weights (.npz from train-demo); default: the ones shipped with the package")


def packaged_weights() -> Path:
    """The compact weights shipped in the package, or a CommandError saying how to make some."""
    packaged = resources.files("molmoact_edge").joinpath("assets", PACKAGED)
    if not packaged.is_file():
        raise CommandError("this installation ships no trained demo-policy weights; train them with "
                           "`molmoact-edge train-demo --out DIR` and pass --weights DIR/demo-policy.npz")
    return Path(str(packaged))


def run(args: argparse.Namespace) -> int:
    weights = packaged_weights() if args.weights is None else args.weights
    if not Path(weights).is_file():
        raise CommandError(f"--weights {weights} does not exist; `molmoact-edge train-demo --out DIR` writes DIR/demo-policy.npz")
    from molmoact_edge.export.train_demo import expand_compact

    print(expand_compact(Path(weights), args.out))
    return 0
