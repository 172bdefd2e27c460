"""Quantisation recipes: one frozen dataclass per scheme, the single description that both the
ONNX passes (the artifact) and the torch fake-quant simulation (the reference) read.

What each scheme does to the four parts of the model, and why:

- transformer layers (q|k|v, attention output, MLP in/out projections): quantised by every scheme;
  they are ~93% of a 7B model's bytes per decoded token.
- lm_head: quantised like the layers (INT8 per channel in ``int8-wo``, INT4 blockwise in
  ``int4-rtn``). Keeping it in INT8 under INT4 was tried and measured: onnxruntime 1.32's 8-bit
  MatMulNBits has no fast fp32-compute path on x86 (the 152k x 768 head took 3.3 s per token
  against 0.16 s in fp32), while the INT4 kernel is faster than fp32; ``lm_head_bits`` keeps the
  choice open for engines where INT8 is fast.
- embeddings: kept in the bundle's float dtype. The runtime gathers only the rows of the new tokens
  from a memory-mapped table, so they cost no bandwidth per token; quantising them would only shrink
  the file.
- vision tower: kept in float. It runs once per control step, not per token, so it does not set the
  decode bandwidth, and it is the part least studied under quantisation.

Groups (INT4): ``group_size`` consecutive input features (along K) share one scale. Where K is
smaller than the group, the group is the whole input dimension (one scale per output channel);
where K is not a multiple of the group, the last group is shorter. Both are how onnxruntime's
MatMulNBits lays blocks out (zero padding never changes a symmetric scale).

Rounding rule (symmetric, float32 arithmetic; the rule of onnxruntime's MatMulNBits quantiser,
which matters because bf16 checkpoints put many weights exactly on a rounding tie): with z = 2^(b-1),
peak = the group's max if |max| > |min| else its min, scale = peak / -z, and each weight is stored
as code = clip(floor(w * (1 / scale) + z + 0.5), 0, 2z - 1), i.e. it dequantises to
(code - z) * scale. Ties round up; the peak lands exactly on a code. That rule is the
``onnxruntime`` target's (``scale_rule`` "peak"). Its scale is NEGATIVE wherever the peak is
positive, and TensorRT's Q/DQ importer refuses any non-positive constant scale; flipping the sign of
scale and codes is not exact there, because the peak's code -2^(b-1) would become +2^(b-1), one past
the signed range. So the ``tensorrt`` target (``scale_rule`` "absmax") uses the symmetric rule its
INT8/INT4 engines are built from: scale = absmax / (2^(b-1) - 1) > 0 and code = clip(round(w / scale),
-(2^(b-1) - 1), 2^(b-1) - 1), float32 division, ties to even; the absmax lands exactly on +-(2^(b-1) - 1)
and the code -2^(b-1) goes unused. An all-zero group gets scale 1 (codes 0), still positive.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, field

TARGETS = ("onnxruntime", "tensorrt")
# What the manifest says of each weight rule (module docstring); the key is WeightOnlyRecipe.scale_rule.
SCALE_RULES = {
    "peak": "onnxruntime's MatMulNBits rule: scale = peak / -2^(b-1) (signed); "
            "code = clip(floor(w / scale + 2^(b-1) + 0.5), 0, 2^b - 1) - 2^(b-1), ties up",
    "absmax": "TensorRT Q/DQ rule: scale = absmax / (2^(b-1) - 1) > 0 (1 for an all-zero group); "
              "code = clip(round(w / scale), -(2^(b-1) - 1), 2^(b-1) - 1), ties to even",
}


@dataclass(frozen=True)
class FloatRecipe:
    """``fp16``: the same graphs as ``export --dtype fp16`` (the GPU baseline)."""

    scheme: str = "fp16"
    dtype: str = "fp16"
    target: str = "onnxruntime"

    def __post_init__(self):
        if self.dtype != "fp16":
            raise ValueError(f"FloatRecipe.dtype must be 'fp16', got {self.dtype!r}")
        _check_target(self)

    @property
    def uses_calibration(self) -> bool:
        return False

    def describe(self) -> dict:
        return {**asdict(self), "granularity": None, "group_size": None, "form": "fp16 graphs (export --dtype fp16)",
                "components": {"transformer_layers": "fp16", "lm_head": "fp16", "embeddings": "fp16", "vision": "fp16"},
                "kept_in_higher_precision": []}


@dataclass(frozen=True)
class WeightOnlyRecipe:
    """INT8 or INT4 weights, float activations (dequantised inside the kernel), round-to-nearest."""

    scheme: str
    bits: int
    granularity: str  # "per-channel" | "blockwise"
    group_size: int | None = None  # blockwise only
    lm_head_bits: int | None = None  # None: like the layers; 8: INT8 per output channel
    target: str = "onnxruntime"
    symmetric: bool = True

    def __post_init__(self):
        if self.bits not in (4, 8):
            raise ValueError(f"WeightOnlyRecipe.bits must be 4 or 8, got {self.bits}")
        if self.granularity not in ("per-channel", "blockwise"):
            raise ValueError(f"WeightOnlyRecipe.granularity must be 'per-channel' or 'blockwise', got {self.granularity!r}")
        if self.granularity == "blockwise":
            g = self.group_size
            if g is None or g < 16 or g & (g - 1):
                raise ValueError(f"--group-size must be a power of two >= 16 (MatMulNBits blocks), got {g}")
        elif self.group_size is not None:
            raise ValueError(f"{self.scheme} quantises per output channel; --group-size does not apply")
        if self.lm_head_bits not in (None, 4, 8):
            raise ValueError(f"WeightOnlyRecipe.lm_head_bits must be 4 or 8, got {self.lm_head_bits}")
        if not self.symmetric:
            raise ValueError("WeightOnlyRecipe.symmetric: only symmetric scales are implemented")
        _check_target(self)

    @property
    def uses_calibration(self) -> bool:
        return False  # round-to-nearest: no data needed

    def group_for(self, k: int) -> int:
        """Input features sharing one scale for a weight with K inputs (see the module docstring)."""
        return k if self.granularity == "per-channel" else min(self.group_size, k)

    @property
    def scale_rule(self) -> str:
        """The target's weight rule (module docstring): "peak" (onnxruntime) or "absmax" (tensorrt)."""
        return "peak" if self.target == "onnxruntime" else "absmax"

    def head_recipe(self) -> WeightOnlyRecipe:
        if self.lm_head_bits in (None, self.bits):
            return self
        return WeightOnlyRecipe(f"{self.scheme}/lm_head", self.lm_head_bits, "per-channel", target=self.target)

    def describe(self) -> dict:
        head = self.head_recipe()
        kept = [] if head is self else [f"lm_head: INT{head.bits} per-channel"]
        form = ("MatMulNBits (com.microsoft), fp32 compute" if self.target == "onnxruntime" else
                "DequantizeLinear (INT8 axis=1 / INT4 block_size along K, opset 21) -> MatMul")
        return {**asdict(self), "form": form,
                "components": {"transformer_layers": f"int{self.bits} {self.granularity}",
                               "lm_head": f"int{head.bits} {head.granularity}", "embeddings": "fp32",
                               "vision": "fp32"},
                "kept_in_higher_precision": kept, "scale_rule": SCALE_RULES[self.scale_rule],
                "small_k_rule": "K < group: one group over the whole input dimension (per output channel)"}


@dataclass(frozen=True)
class Fp8Recipe:
    """``fp8``: E4M3 weights per output channel (scale = channel amax / 448) and static per-tensor
    E4M3 activations at every transformer-layer linear input (scale = calibration amax / 448).
    lm_head stays float: it is the one layer whose output is read directly, and FP8 kernels
    (TensorRT, Hopper/Ada/Thor) commonly leave it unquantised. On onnxruntime CPU the form is an
    explicit QuantizeLinear/DequantizeLinear graph (opset 21): a simulation of the FP8 engine."""

    scheme: str = "fp8"
    target: str = "onnxruntime"
    max_samples: int | None = None  # calibration samples used (None: the whole calibration split)
    act_amax: tuple[tuple[str, float], ...] = ()  # (layer, max |input|), filled in by calibration

    FP8_MAX = 448.0

    def __post_init__(self):
        _check_target(self)
        if self.max_samples is not None and self.max_samples < 1:
            raise ValueError(f"Fp8Recipe.max_samples must be >= 1, got {self.max_samples}")
        for layer, sc in self.act_amax:
            if not sc > 0:
                raise ValueError(f"Fp8Recipe.act_amax: layer {layer} has amax {sc}; calibration saw no signal")

    @property
    def uses_calibration(self) -> bool:
        return True

    def amax_of(self, layer: str) -> float:
        return dict(self.act_amax)[layer]

    def describe(self) -> dict:
        return {"scheme": self.scheme, "target": self.target, "granularity": "per-channel weights, per-tensor activations",
                "form": "QuantizeLinear/DequantizeLinear float8e4m3fn (opset 21), both targets",
                "group_size": None, "weights": "float8 e4m3fn, scale = channel amax / 448",
                "activations": "float8 e4m3fn static per tensor, scale = calibration amax / 448",
                "components": {"transformer_layers": "fp8 e4m3 (W per channel, A per tensor)", "lm_head": "fp32",
                               "embeddings": "fp32", "vision": "fp32"},
                "kept_in_higher_precision": ["lm_head: fp32"],
                "act_amax": {k: v for k, v in self.act_amax}}


@dataclass(frozen=True)
class SmoothQuantRecipe:
    """``w8a8-sq``: SmoothQuant. Per transformer-layer linear, smoothing scales
    s_j = max|X_j|^alpha / max|W_j|^(1-alpha) over input channel j (X: the calibration inputs,
    W: the column's weights), folded exactly into what precedes the linear (smoothing.py says
    where); then INT8 weights per output channel (symmetric, scale = channel absmax / 127, round
    half to even: onnxruntime's quantiser's rule) and STATIC INT8 activations per tensor. The
    activation convention is the target's: ``onnxruntime`` = its ``quantize_static`` (QDQ, uint8
    asymmetric, MinMax over our calibration split, run on the smoothed graph), ``tensorrt`` =
    symmetric int8 (zero point 0, scale = amax / 127 from our torch calibration), the only form
    TensorRT builds INT8 engines from. lm_head stays float, as in the fp8 recipe: static INT8 on
    the one layer read directly is the classic SmoothQuant exclusion, and it is ~7% of a 7B's bytes.

    ``smooth`` (layer -> s) and ``act_quant`` (layer -> (scale, zero point, qmin, qmax)) are filled
    in by calibration; they are data, not identity, so they take no part in equality."""

    scheme: str = "w8a8-sq"
    alpha: float = 0.5
    target: str = "onnxruntime"
    max_samples: int | None = None
    smooth: dict = field(default_factory=dict, compare=False, repr=False)
    act_quant: dict = field(default_factory=dict, compare=False, repr=False)

    def __post_init__(self):
        _check_target(self)
        if not 0.0 <= self.alpha <= 1.0:
            raise ValueError(f"SmoothQuant alpha must be in [0, 1], got {self.alpha}")
        if self.max_samples is not None and self.max_samples < 1:
            raise ValueError(f"SmoothQuantRecipe.max_samples must be >= 1, got {self.max_samples}")

    @property
    def uses_calibration(self) -> bool:
        return True

    def describe(self) -> dict:
        act = ("uint8 asymmetric per tensor (onnxruntime quantize_static, QDQ, MinMax)" if self.target == "onnxruntime"
               else "int8 symmetric per tensor, scale = calibration amax / 127")
        form = ("QDQ from onnxruntime.quantization.quantize_static (CPU EP fuses DQ->MatMul into its integer "
                "MatMulIntegerToFloat kernel)" if self.target == "onnxruntime" else
                "explicit QuantizeLinear/DequantizeLinear int8 on activations and weights (opset 21) -> MatMul")
        return {"scheme": self.scheme, "target": self.target, "alpha": self.alpha, "granularity":
                "per-channel weights, per-tensor static activations", "group_size": None, "form": form,
                "weights": "int8 symmetric per output channel, scale = absmax / 127, round half to even",
                "activations": act,
                "components": {"transformer_layers": "int8 W8A8 (smoothed)", "lm_head": "fp32", "embeddings": "fp32",
                               "vision": "fp32"},
                "kept_in_higher_precision": ["lm_head: fp32"],
                "act_quant": {k: list(v) for k, v in sorted(self.act_quant.items())}}


@dataclass(frozen=True)
class AwqRecipe:
    """``int4-awq``: the int4-rtn recipe (``weights``: same blocks, same rounding, lm_head RTN)
    applied after activation-aware scaling: per transformer-layer linear, s = mean|X|^alpha with
    alpha from a grid over [0, 1] minimising || Q(W diag(s)) (X / s) - W X ||^2 on calibration
    inputs (alpha = 0 is RTN itself), 1/s folded into what precedes the linear (smoothing.py).
    ``smooth`` and ``alphas`` are filled in by the search and take no part in equality."""

    weights: WeightOnlyRecipe
    scheme: str = "int4-awq"
    grid: int = 20  # alpha in {0, 1/grid, ..., 1}
    max_samples: int | None = None
    max_rows: int = 512  # calibration tokens per linear kept for the search (a random subset)
    smooth: dict = field(default_factory=dict, compare=False, repr=False)
    alphas: dict = field(default_factory=dict, compare=False, repr=False)

    def __post_init__(self):
        if self.grid < 1 or self.max_rows < 1:
            raise ValueError(f"AwqRecipe.grid and max_rows must be >= 1, got {self.grid}, {self.max_rows}")
        if self.max_samples is not None and self.max_samples < 1:
            raise ValueError(f"AwqRecipe.max_samples must be >= 1, got {self.max_samples}")

    @property
    def target(self) -> str:
        return self.weights.target

    @property
    def uses_calibration(self) -> bool:
        return True

    def describe(self) -> dict:
        d = self.weights.describe()
        d.update(scheme=self.scheme, search={"alpha_grid": [i / self.grid for i in range(self.grid + 1)],
                                            "objective": "sum of squared output error on calibration inputs",
                                            "rows_per_linear": self.max_rows},
                 alphas=dict(sorted(self.alphas.items())))
        d["components"] = {**d["components"], "transformer_layers": d["components"]["transformer_layers"] + " (AWQ-scaled)"}
        return d


def _check_target(r) -> None:
    if r.target not in TARGETS:
        raise ValueError(f"unknown --target {r.target!r}; accepted: {list(TARGETS)}")


SCHEMES = ("fp16", "int8-wo", "int4-rtn", "fp8", "w8a8-sq", "int4-awq")
PLANNED = ()
DEFAULT_GROUP = 128


def recipe_for(scheme: str, target: str = "onnxruntime", group_size: int | None = None):
    """The named scheme's recipe; ``group_size`` only for blockwise schemes (default 128)."""
    if scheme in PLANNED:
        raise NotImplementedError(f"scheme {scheme!r} is planned but not implemented in this version; "
                                  f"available: {list(SCHEMES)}")
    if scheme not in SCHEMES:
        raise ValueError(f"unknown --scheme {scheme!r}; accepted: {list(SCHEMES)}")
    if scheme == "fp16":
        if group_size is not None:
            raise ValueError("fp16 has no groups; drop --group-size")
        return FloatRecipe(target=target)
    if scheme == "fp8":
        if group_size is not None:
            raise ValueError("fp8 quantises per channel / per tensor; drop --group-size")
        return Fp8Recipe(target=target)
    if scheme == "int8-wo":
        return WeightOnlyRecipe("int8-wo", 8, "per-channel", group_size, target=target)
    if scheme == "w8a8-sq":
        if group_size is not None:
            raise ValueError("w8a8-sq quantises per channel / per tensor; drop --group-size")
        return SmoothQuantRecipe(target=target)
    rtn = WeightOnlyRecipe("int4-rtn", 4, "blockwise", group_size or DEFAULT_GROUP, target=target)
    return AwqRecipe(rtn) if scheme == "int4-awq" else rtn
