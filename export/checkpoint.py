"""Load a released MolmoAct checkpoint (Hugging Face layout, safetensors) into the reference model.

The model is built on the meta device and each tensor is read from disk straight into its final
dtype and device, so a 7B checkpoint never needs twice its size in RAM. Every problem is reported
in one error that lists the missing keys, the unexpected keys and the shape mismatches.
"""

from __future__ import annotations

import json
import os
import stat
from dataclasses import dataclass
from pathlib import Path

import torch
from molmoact_edge.export.model import MolmoAct
from molmoact_edge.runtime.engine.config import ConfigError, ModelConfig

SINGLE_FILE = "model.safetensors"
INDEX_FILE = "model.safetensors.index.json"


class CheckpointError(ValueError):
    """The weights on disk do not match the model the config describes; the message lists every problem."""


@dataclass(frozen=True)
class WeightFiles:
    """Which safetensors file holds each tensor."""

    key_to_file: dict[str, Path]

    @classmethod
    def find(cls, checkpoint_dir: str | Path) -> WeightFiles:
        from safetensors import safe_open

        d = Path(checkpoint_dir)
        if (d / INDEX_FILE).exists():
            try:
                index = json.loads((d / INDEX_FILE).read_text())
                weight_map = index["weight_map"]
            except (json.JSONDecodeError, KeyError, TypeError) as e:
                raise CheckpointError(f"{d / INDEX_FILE} is not a valid safetensors index ({e}); re-download it") from e
            if not isinstance(weight_map, dict):
                raise CheckpointError(f"{d / INDEX_FILE}: weight_map must map tensor names to shard file names")
            files = {k: d / _shard_name(v, d) for k, v in weight_map.items()}
            absent = sorted({str(p) for p in files.values() if not p.exists()})
            if absent:
                raise CheckpointError(f"shard(s) named in {INDEX_FILE} are missing: {absent}; "
                                      "download every model-*.safetensors file of the checkpoint")
            for p in set(files.values()):
                _regular(p)
            return cls(files)
        if (d / SINGLE_FILE).exists():
            path = d / SINGLE_FILE
            _regular(path)
            try:
                with safe_open(str(path), framework="pt") as f:
                    keys = list(f.keys())
            except Exception as e:  # safetensors raises its own error type for a bad header
                raise CheckpointError(f"{path} is not a readable safetensors file ({e}); "
                                      "it is probably truncated or corrupt: re-download it") from e
            return cls({k: path for k in keys})
        raise CheckpointError(f"no weights in {d}: expected {SINGLE_FILE} or {INDEX_FILE} "
                              "(a MolmoAct checkpoint folder as released on Hugging Face)")


def _listed(items: list[str], most: int = 20) -> str:
    """At most ``most`` items: a config with thousands of layers must not produce a megabyte error."""
    return str(items[:most])[:-1] + f", ... and {len(items) - most} more]" if len(items) > most else str(items)


def _shard_name(name, d: Path) -> str:
    """A shard named by the index: a plain file name in the checkpoint folder, as Hugging Face writes
    them (``model-00001-of-00004.safetensors``); a path elsewhere is never followed."""
    if (not isinstance(name, str) or not name.endswith(".safetensors") or "/" in name or "\\" in name
            or "\0" in name or name.startswith(".")):
        raise CheckpointError(f"{d / INDEX_FILE} names the shard {name!r}: a shard must be a *.safetensors file "
                              "name in the checkpoint folder (no path); re-download the index")
    return name


def _regular(path: Path) -> None:
    # Following a link is fine (the Hugging Face cache links into its blobs); a device or FIFO is not.
    if not stat.S_ISREG(os.stat(path).st_mode):
        raise CheckpointError(f"{path} is not a regular file; re-download the checkpoint")


def _problems(expected: dict[str, torch.Size], found: dict[str, tuple[int, ...]]) -> list[str]:
    missing = sorted(set(expected) - set(found))
    unexpected = sorted(set(found) - set(expected))
    mismatched = [f"{k}: checkpoint {list(found[k])} vs model {list(expected[k])}"
                  for k in sorted(set(expected) & set(found)) if tuple(expected[k]) != tuple(found[k])]
    out = []
    if missing:
        out.append(f"missing keys ({len(missing)}): {_listed(missing)}")
    if unexpected:
        out.append(f"unexpected keys ({len(unexpected)}): {_listed(unexpected)}")
    if mismatched:
        out.append(f"shape mismatches ({len(mismatched)}): {_listed(mismatched)}")
    return out


# safetensors dtype names of the floating-point formats a MolmoAct checkpoint is saved in, and the
# config.json ``torch_dtype`` (``dtype`` in newer transformers) names that map to them.
FLOAT_DTYPES = ("F32", "BF16", "F16")
_CONFIG_DTYPES = {"float32": "F32", "bfloat16": "BF16", "float16": "F16"}


def _declared_dtype(d: Path) -> str | None:
    """The safetensors dtype config.json says the weights were saved in, or None if it says nothing."""
    raw = json.loads((d / "config.json").read_text())  # already parsed once by ModelConfig.load
    name = raw.get("torch_dtype", raw.get("dtype"))
    if name is None:
        return None
    if not isinstance(name, str) or name not in _CONFIG_DTYPES:
        raise CheckpointError(f"{d / 'config.json'}: torch_dtype {name!r} is not one of {sorted(_CONFIG_DTYPES)}")
    return _CONFIG_DTYPES[name]


def _dtype_problems(dtypes: dict[str, str], declared: str | None, where: dict[str, Path]) -> list[str]:
    """A header dtype other than the one the weights were saved in makes the same bytes read as other
    numbers (BF16 relabelled F16 or I16 loads without error, as garbage): refuse it by tensor name.
    The saved dtype is config.json's torch_dtype, or else the one all other tensors share; F32 is
    also accepted where BF16/F16 is declared, since it holds their values exactly (an upcast copy)."""
    out = []
    wrong = sorted(k for k, t in dtypes.items() if t not in FLOAT_DTYPES)
    if wrong:
        out.append(f"non-floating-point tensors ({len(wrong)}; MolmoAct weights are {'/'.join(FLOAT_DTYPES)}, "
                   f"so the header was altered or this is not a MolmoAct checkpoint): "
                   f"{_listed([f'{k}: {dtypes[k]} in {where[k].name}' for k in wrong])}")
    floats = {k: t for k, t in dtypes.items() if t in FLOAT_DTYPES}
    if declared is not None:
        odd = sorted(k for k, t in floats.items() if t not in (declared, "F32"))
        why = f"config.json torch_dtype says {declared}"
    else:
        counts = {t: sum(1 for v in floats.values() if v == t) for t in set(floats.values())}
        majority = max(sorted(counts), key=counts.get) if counts else None
        odd = sorted(k for k, t in floats.items() if t != majority)
        why = f"every other tensor is {majority}"
    if odd:
        out.append(f"tensors in another dtype than the checkpoint's ({len(odd)}; {why}; their bytes would be "
                   f"read as other numbers): {_listed([f'{k}: {dtypes[k]} in {where[k].name}' for k in odd])}")
    return out


def load_model(checkpoint_dir: str | Path, dtype: torch.dtype = torch.float32,
               device: str | torch.device = "cpu") -> MolmoAct:
    """Read ``config.json`` and the safetensors weights of a MolmoAct checkpoint."""
    from safetensors import safe_open

    d = Path(checkpoint_dir)
    if not d.is_dir():
        raise CheckpointError(f"checkpoint directory {d} does not exist")
    cfg = ModelConfig.load(d)
    files = WeightFiles.find(d)
    with torch.device("meta"):
        model = MolmoAct(cfg)
    expected = {k: v.shape for k, v in model.state_dict().items()}

    shapes: dict[str, tuple[int, ...]] = {}
    dtypes: dict[str, str] = {}
    by_file: dict[Path, list[str]] = {}
    for k, p in files.key_to_file.items():
        by_file.setdefault(p, []).append(k)
    tensors: dict[str, torch.Tensor] = {}
    for path, keys in by_file.items():
        try:
            with safe_open(str(path), framework="pt", device="cpu") as f:
                present = set(f.keys())
                for k in keys:
                    if k not in present:
                        raise CheckpointError(f"{path} does not contain {k!r} although the index says so; "
                                              "re-download the shard")
                    header = f.get_slice(k)
                    shapes[k], dtypes[k] = tuple(header.get_shape()), header.get_dtype()
                    if k in expected and shapes[k] == tuple(expected[k]) and dtypes[k] in FLOAT_DTYPES:
                        # copy=True: never keep views into a memory-mapped file that may change underneath
                        tensors[k] = f.get_tensor(k).to(device=device, dtype=dtype, copy=True)
        except CheckpointError:
            raise
        except Exception as e:
            raise CheckpointError(f"{path} could not be read ({e}); it is probably truncated or corrupt: "
                                  "re-download it") from e
    problems = _problems(expected, shapes) + _dtype_problems(dtypes, _declared_dtype(d), files.key_to_file)
    if problems:
        raise CheckpointError(f"{d} does not match its config.json:\n  " + "\n  ".join(problems))
    for k, t in tensors.items():
        if not torch.isfinite(t).all():
            raise CheckpointError(f"{k} in {files.key_to_file[k]} holds NaN or Inf values; the checkpoint is corrupt")
    model.load_state_dict(tensors, strict=True, assign=True)
    return model.eval()


def parse_dtype(name: str) -> torch.dtype:
    table = {"fp32": torch.float32, "float32": torch.float32, "bf16": torch.bfloat16, "bfloat16": torch.bfloat16,
             "fp16": torch.float16, "float16": torch.float16}
    if name not in table:
        raise ConfigError(f"unknown dtype {name!r}; accepted: fp32, bf16, fp16")
    return table[name]
