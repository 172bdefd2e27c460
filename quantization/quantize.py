"""Checkpoint -> quantised bundle: export through the existing export path, replace the LLM graph
by its quantised form, and add the recipe to the manifest (:func:`write_quantized_bundle`, the one
place that touches the bundle format)."""

from __future__ import annotations

import dataclasses
import json
import logging
import shutil
import tempfile
from pathlib import Path
from typing import Callable

import numpy as np
import onnx
import torch
from molmoact_edge.export.checkpoint import load_model
from molmoact_edge.export.onnx_export import EXTERNAL_DATA_BYTES, Progress, export_bundle
from molmoact_edge.quantization import onnx_passes
from molmoact_edge.quantization.calibration import load_calibration_set
from molmoact_edge.quantization.recipes import AwqRecipe, Fp8Recipe, FloatRecipe, SmoothQuantRecipe, WeightOnlyRecipe, recipe_for
from molmoact_edge.runtime.engine.bundle import MANIFEST, sha256_file
from molmoact_edge.runtime.engine.manifest import Manifest


def _tool_versions() -> dict[str, str]:
    import onnxruntime

    return {"onnx": onnx.__version__, "onnxruntime": onnxruntime.__version__, "torch": torch.__version__}


def reference_bytes(model) -> dict[str, int]:
    """fp32 bytes per component of the reference model (the denominator of every ratio)."""
    out = {"transformer_layers": 0, "lm_head": 0, "embeddings": 0, "vision": 0, "other": 0}
    for name, p in model.named_parameters():
        if name.startswith("model.transformer.blocks."):
            key = "transformer_layers"
        elif name.startswith("lm_head"):
            key = "lm_head"
        elif name.startswith("model.transformer.wte"):
            key = "embeddings"
        elif name.startswith("model.vision_backbone"):
            key = "vision"
        else:
            key = "other"
        out[key] += p.numel() * 4
    return out


def bundle_bytes(bundle: Path, llm: onnx.ModelProto | None = None) -> dict[str, int]:
    """Bytes per component as stored in a bundle (graph constants and the embedding table);
    ``llm``: the LLM graph about to replace the bundle's own."""
    m = json.loads((bundle / MANIFEST).read_text())
    llm = llm if llm is not None else onnx.load(str(bundle / m["graphs"]["llm"]["file"]))
    out = {"transformer_layers": 0, "lm_head": 0, "other": 0}
    out.update(onnx_passes.initializer_bytes(llm))
    vision = onnx.load(str(bundle / m["graphs"]["vision"]["file"]))
    out["vision"] = sum(onnx_passes.initializer_bytes(vision).values())
    emb = np.load(bundle / m["embeddings"]["file"], mmap_mode="r")
    out["embeddings"] = int(emb.nbytes)
    return out


def _default_opset(model: onnx.ModelProto) -> int:
    return max(o.version for o in model.opset_import if o.domain in ("", "ai.onnx"))


def write_quantized_bundle(src: Path, out: Path, graphs: dict[str, onnx.ModelProto], quantization: dict,
                           force: bool = False, extra_files: dict[str, bytes] | None = None) -> Path:
    """Copy the bundle ``src`` to ``out`` with ``graphs`` (name -> model) replacing its graph files and
    ``quantization`` added to the manifest; every file hash is recomputed. Atomic like the export."""
    if out.exists() and any(out.iterdir()) and not force:
        raise FileExistsError(f"{out} exists and is not empty; choose another --out or pass --force to replace it")
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{out.name}.", dir=out.parent))
    try:
        shutil.copytree(src, tmp, dirs_exist_ok=True)
        for name, data in (extra_files or {}).items():
            (tmp / name).write_bytes(data)
        manifest = Manifest.from_json(json.loads((tmp / MANIFEST).read_text()))
        for name, model in graphs.items():
            f = tmp / manifest.graphs[name].file
            for stale in tmp.glob(f.name + ".data"):
                stale.unlink()
            # protobuf cannot hold 2 GiB: large graphs keep their weights in a side file, as the export does
            big = sum(onnx_passes.initializer_bytes(model).values()) > EXTERNAL_DATA_BYTES
            onnx.save(model, str(f), save_as_external_data=big, location=f.name + ".data" if big else None)
        opsets = {name: _default_opset(onnx.load(str(tmp / g.file), load_external_data=False))
                  for name, g in manifest.graphs.items()}
        # Q/DQ forms raise the LLM graph's opset: that graph says so itself, the bundle's opset stays the export's
        new_graphs = {name: dataclasses.replace(g, opset=None if opsets[name] == manifest.opset else opsets[name])
                      for name, g in manifest.graphs.items()}
        files = {p.relative_to(tmp).as_posix(): sha256_file(p) for p in sorted(tmp.rglob("*"))
                 if p.is_file() and p.name != MANIFEST}
        manifest = dataclasses.replace(manifest, graphs=new_graphs, files=files,
                                       quantization={**quantization, "graph_opsets": opsets},
                                       tools={**manifest.tools, **quantization["tools"]})
        text = json.dumps(manifest.to_json(), indent=2)
        Manifest.from_json(json.loads(text))  # the reader's own checks, before the bundle appears
        (tmp / MANIFEST).write_text(text)
        if out.exists():
            shutil.rmtree(out)
        tmp.chmod(0o755)
        tmp.rename(out)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return out


def calibrated(recipe, reference, checkpoint: Path, cs, progress):
    """The recipe with its data-dependent parameters filled in from the calibration set."""
    import dataclasses

    from molmoact_edge.quantization.calibrate import collect_activation_stats

    stats = collect_activation_stats(reference, checkpoint, cs, recipe.max_samples, progress=progress)
    if isinstance(recipe, Fp8Recipe):
        return dataclasses.replace(recipe, act_amax=tuple(sorted(stats.amax.items())))
    raise TypeError(f"no calibration for {type(recipe).__name__}")


def split_kept(layers: dict[str, str], keep_float) -> dict[str, str]:
    """The linear layers (node -> layer) the recipe quantises: all but those kept in float.
    Raises ValueError naming the graph's layers when a kept name is not one of them."""
    keep = set(keep_float or ())
    unknown = sorted(keep - set(layers.values()))
    if unknown:
        raise ValueError(f"--keep-float names {unknown}, which are not linear layers of this model; "
                         f"accepted: {sorted(layers.values())}")
    return {node: layer for node, layer in layers.items() if layer not in keep}


STATIC_GRAPH = "llm_static"  # the static-cache LLM graph (export --static-kv), for GPU engines


def _quantize_graph(llm: onnx.ModelProto, layers: dict[str, str], recipe, act_amax) -> onnx.ModelProto:
    """One LLM graph (llm or llm_static: the same layers, the same pass) in the recipe's target form;
    all but w8a8-sq's onnxruntime form, which calibrates its graph itself."""
    if isinstance(recipe, SmoothQuantRecipe):
        from molmoact_edge.quantization.w8a8 import quantize_w8a8_qdq

        return quantize_w8a8_qdq(llm, layers, act_amax)
    if isinstance(recipe, FloatRecipe):
        return llm
    weights = recipe.weights if isinstance(recipe, AwqRecipe) else recipe
    if isinstance(recipe, Fp8Recipe):
        return onnx_passes.quantize_fp8_qdq(llm, layers, dict(recipe.act_amax))
    if weights.target == "tensorrt":
        return onnx_passes.quantize_weight_only_qdq(llm, layers, weights)
    return onnx_passes.quantize_llm_graph(llm, layers, weights)


def check_static_graph(recipe) -> None:
    """Raises ValueError where the recipe cannot quantise the static-cache graph too."""
    if isinstance(recipe, SmoothQuantRecipe) and recipe.target == "onnxruntime":
        raise ValueError("w8a8-sq --target onnxruntime calibrates onnxruntime's CPU graph (llm.onnx) with its own "
                         "quantiser; the static-cache graph (llm_static, --static-kv, for GPU engines) is quantised "
                         "only in the TensorRT form: use --target tensorrt, or drop --static-kv")


def quantize_bundle(checkpoint: str | Path, out: str | Path, recipe, calib: str | Path | None = None,
                    base_bundle: str | Path | None = None, force: bool = False,
                    progress: Callable[[str], None] | None = None, keep_float=(), static_kv: bool = False) -> Path:
    """Write a quantised bundle for ``recipe``. ``base_bundle``: an existing fp32 export of the same
    checkpoint to start from (otherwise the checkpoint is exported first, into a temporary folder).
    ``keep_float``: linear layers (names as in ``linear_layers``) left in the bundle's float dtype,
    a mixed-precision recipe (e.g. the one the study's sensitivity ranking proposes). ``static_kv``:
    the export also writes the static-cache graph (``llm_static``, export --static-kv); every LLM graph
    the bundle has, a base bundle's included, is quantised by the same recipe."""
    checkpoint, out = Path(checkpoint), Path(out)
    keep_float = tuple(dict.fromkeys(keep_float or ()))
    if keep_float and isinstance(recipe, FloatRecipe):
        raise ValueError("fp16 quantises no layer; --keep-float applies to the quantising schemes")
    base_static = base_bundle is not None and STATIC_GRAPH in json.loads((Path(base_bundle) / MANIFEST).read_text())["graphs"]
    if static_kv and base_bundle is not None and not base_static:
        raise ValueError(f"static_kv asks for the static-cache graph, but the base bundle {base_bundle} has none; "
                         "export it with --static-kv, or leave static_kv off")
    static_kv = static_kv or base_static
    if static_kv:
        check_static_graph(recipe)
    if out.exists() and any(out.iterdir()) and not force:
        raise FileExistsError(f"{out} exists and is not empty; choose another --out or pass --force to replace it")
    say = progress or Progress(0).out
    smooths = isinstance(recipe, (SmoothQuantRecipe, AwqRecipe))
    step = Progress(6 if smooths else 5 if recipe.uses_calibration else 4, say)
    calib_info, cs = None, None
    if recipe.uses_calibration or calib is not None:
        cs = load_calibration_set(calib)
        calib_info = {"path": str(cs.path), "sha256": cs.sha256, "samples": len(cs.split("calibration"))}
        if not recipe.uses_calibration:
            say(f"note: {recipe.scheme} is data-free (round-to-nearest); the calibration set is recorded, not used")
            calib_info["used"] = False
    work = Path(tempfile.mkdtemp(prefix=".quantize.", dir=out.parent if out.parent.exists() else None))
    try:
        dtype = "fp16" if isinstance(recipe, FloatRecipe) else "fp32"
        if base_bundle is not None and dtype == "fp32":
            src = Path(base_bundle)
            step(f"starting from the exported bundle {src}")
        else:
            step(f"exporting {checkpoint} ({dtype})")
            src = export_bundle(checkpoint, work / "base", dtype=dtype, progress=lambda s: say("  " + s),
                                static_kv=static_kv)
        step("loading the reference weights to name the graph's linear layers")
        ref = load_model(checkpoint, torch.float32)
        manifest = json.loads((src / MANIFEST).read_text())
        names = [g for g in ("llm", STATIC_GRAPH) if g in manifest["graphs"]]
        graphs = {g: onnx.load(str(src / manifest["graphs"][g]["file"])) for g in names}
        named = {g: onnx_passes.name_linear_weights(m, ref, gemm_to_matmul=isinstance(recipe, (WeightOnlyRecipe, AwqRecipe)))
                 for g, m in graphs.items()}
        all_layers, layers = named["llm"], split_kept(named["llm"], keep_float)
        if isinstance(recipe, Fp8Recipe):
            step(f"calibrating on {cs.path} ({recipe.max_samples or len(cs.split('calibration'))} samples)")
            recipe = calibrated(recipe, ref, checkpoint, cs, lambda s: say("  " + s))
            calib_info["samples"] = len(cs.split("calibration")[:recipe.max_samples])
        extra, smoothing, act_amax = {}, None, None
        if isinstance(recipe, (SmoothQuantRecipe, AwqRecipe)):
            step(f"calibrating on {cs.path} and {'searching AWQ scales' if isinstance(recipe, AwqRecipe) else 'smoothing'}")
            recipe, inputs, act_amax = smoothing_calibrated(recipe, ref, checkpoint, cs, lambda s: say("  " + s))
            calib_info["samples"] = inputs.samples
            step(f"exporting the LLM graph{'s' if len(names) > 1 else ''} of the smoothed model")
            graphs, named = smoothed_llm(checkpoint, recipe, manifest["opset"], work, names)
            all_layers, layers = named["llm"], split_kept(named["llm"], keep_float)
            extra, smoothing = _scales_file(recipe.smooth)
        step(f"applying {recipe.scheme} to {len(layers)} linear layers of {' and '.join(f'{g}.onnx' for g in names)}")
        if isinstance(recipe, SmoothQuantRecipe) and recipe.target == "onnxruntime":
            from molmoact_edge.quantization.w8a8 import PrefillReader, quantize_static_ort

            c = ref.config.llm
            reader = PrefillReader(graphs["llm"], inputs.embeds, c.num_hidden_layers, c.num_key_value_heads, c.head_dim)
            graphs["llm"], act_quant = quantize_static_ort(graphs["llm"], layers, reader, work / "ort")
            recipe = dataclasses.replace(recipe, act_quant=act_quant)
        elif isinstance(recipe, SmoothQuantRecipe):
            from molmoact_edge.quantization.w8a8 import tensorrt_act_quant

            recipe = dataclasses.replace(recipe, act_quant=tensorrt_act_quant(act_amax))
        if not (isinstance(recipe, SmoothQuantRecipe) and recipe.target == "onnxruntime"):
            graphs = {g: _quantize_graph(m, split_kept(named[g], keep_float), recipe, act_amax)
                      for g, m in graphs.items()}
        llm = graphs["llm"]
        step(f"writing {out}")
        described = recipe.describe()
        if keep_float:  # the mixed-precision part, recorded like the recipe's own exceptions
            described["kept_in_higher_precision"] = [*described.get("kept_in_higher_precision", []),
                                                     *(f"{layer}: {dtype}" for layer in keep_float)]
        quantization = {**described, "calibration": calib_info, "tools": _tool_versions(),
                        "keep_float": list(keep_float), "linear_layers": sorted(all_layers.values()),
                        "quantized_graphs": [] if isinstance(recipe, FloatRecipe) else names,
                        "fp32_bytes": reference_bytes(ref), "bytes": bundle_bytes(src, llm)}
        if smoothing is not None:
            quantization["smoothing"] = smoothing
        write_quantized_bundle(src, out, graphs, quantization, force=force, extra_files=extra)
    finally:
        shutil.rmtree(work, ignore_errors=True)
    return out


SCALES_FILE = "quant_scales.npz"


def smoothing_calibrated(recipe, reference, checkpoint: Path, cs, progress):
    """SmoothQuant / AWQ recipe with its scales filled in; also the calibration inputs and, for the
    TensorRT form, each smoothed input's max |x| (max_j amax_j / s_j: the fold divides channel j by s_j)."""
    from molmoact_edge.quantization.calibrate import collect_layer_inputs
    from molmoact_edge.quantization.smoothing import awq_search, smoothquant_scales

    rows = recipe.max_rows if isinstance(recipe, AwqRecipe) else 1
    inputs = collect_layer_inputs(reference, checkpoint, cs, recipe.max_samples, max_rows=rows, progress=progress)
    if isinstance(recipe, SmoothQuantRecipe):
        recipe = dataclasses.replace(recipe, smooth=smoothquant_scales(reference, inputs.channel_amax, recipe.alpha))
    else:
        w = recipe.weights
        scales, alphas = awq_search(reference, inputs.channel_mean, inputs.rows, w.bits, w.group_for, recipe.grid,
                                    progress=progress, rule=w.scale_rule)
        recipe = dataclasses.replace(recipe, smooth=scales, alphas=alphas)
    act_amax = {k: float((inputs.channel_amax[k] / recipe.smooth[k]).max()) for k in recipe.smooth}
    return recipe, inputs, act_amax


def smoothed_llm(checkpoint: Path, recipe, opset: int, work: Path,
                 names=("llm",)) -> tuple[dict[str, onnx.ModelProto], dict[str, dict[str, str]]]:
    """The LLM graphs ``names`` (llm, llm_static) exported from the reference with the recipe's scales
    folded in, and each one's linears named."""
    from molmoact_edge.export.onnx_export import _quiet_exporter, export_llm, export_llm_static
    from molmoact_edge.quantization.smoothing import fold_scales

    model = fold_scales(load_model(checkpoint, torch.float32), recipe.smooth)
    ir_log = logging.getLogger("onnx_ir")  # one INFO line per deduplicated constant, when a caller logs INFO
    level = ir_log.level
    ir_log.setLevel(logging.WARNING)
    graphs, named = {}, {}
    try:
        for name in names:
            path = work / "smoothed" / f"{name}.onnx"
            path.parent.mkdir(parents=True, exist_ok=True)
            with torch.inference_mode(False), torch.no_grad(), _quiet_exporter():
                (export_llm_static if name == STATIC_GRAPH else export_llm)(model, path, torch.float32, opset)
            graphs[name] = onnx.load(str(path))
            named[name] = onnx_passes.name_linear_weights(graphs[name], model, gemm_to_matmul=isinstance(recipe, AwqRecipe))
    finally:
        ir_log.setLevel(level)
    return graphs, named


def _scales_file(scales: dict[str, np.ndarray]) -> tuple[dict[str, bytes], dict]:
    import io

    from molmoact_edge.quantization.smoothing import FOLDED_INTO, summarise

    buf = io.BytesIO()
    np.savez(buf, **{k: v.astype(np.float32) for k, v in scales.items()})
    return {SCALES_FILE: buf.getvalue()}, {"file": SCALES_FILE, "folded_into": FOLDED_INTO,
                                           "smoothed_linears": sorted(scales), "scales": summarise(scales)}


def recipe_from_bundle(bundle: str | Path):
    """The calibrated recipe a quantised bundle records (scheme, target, group, alpha, scales, activation
    parameters): what the simulation of that bundle runs."""
    bundle = Path(bundle)
    q = json.loads((bundle / MANIFEST).read_text())["quantization"]
    group = q.get("group_size") if q["scheme"] in ("int4-rtn", "int4-awq") else None
    r = recipe_for(q["scheme"], q["target"], group)
    if isinstance(r, Fp8Recipe):
        return dataclasses.replace(r, act_amax=tuple(sorted(q["act_amax"].items())))
    if isinstance(r, (SmoothQuantRecipe, AwqRecipe)):
        with np.load(bundle / q["smoothing"]["file"]) as z:
            smooth = {k: z[k] for k in z.files}
        if isinstance(r, SmoothQuantRecipe):
            return dataclasses.replace(r, alpha=q["alpha"], smooth=smooth,
                                       act_quant={k: tuple(v) for k, v in q["act_quant"].items()})
        return dataclasses.replace(r, smooth=smooth, alphas=q["alphas"])
    return r
