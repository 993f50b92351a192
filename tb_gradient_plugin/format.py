"""The on-disk format: the only module that builds or parses our summary protos.

Everything the writer puts into an event file and everything the reader takes out of one goes through here, so the
format can evolve (and be versioned) in one place. See ``docs/FORMAT.md`` for the prose description. The metric
registry (``METRIC_REGISTRY``) names every metric, stored or derived, with its label and unit.

Layout of one logged step
-------------------------
* One ``tensor`` summary per per-layer metric (``gradients/grad_norm`` ...): a rank-1 float32 tensor holding the value
  of every layer of the step's *layout*, packed in ``tensor_content``.
* Per-step extras (``gradients/loss_scale`` ...) are rank-0 float32 tensors under our plugin.
* Loss and total gradient norm are ordinary scalar-plugin summaries (``gradients/loss``,
  ``gradients/total_grad_norm``) so TensorBoard's stock Scalars tab shows them too.
* Histograms (``gradients/grad_hist``) are rank-2 int64 tensors ``[layers, HIST_BINS]`` on fixed log10|g| bins.

Every one of our tensor summaries carries plugin metadata naming its *layout* (the ordered list of layer names) by a
content hash. The first time a layout appears in a file, the metadata carries the full list of names too. A value is
therefore attributed to a layer only through an explicit, verifiable layout id: if the event defining a layout is lost
(corruption), values that refer to it are dropped and reported, never attached to the wrong layers.
"""

from __future__ import annotations

import hashlib
import json
import math
import struct
from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np
from tensorboard.compat.proto import event_pb2, summary_pb2, tensor_pb2, tensor_shape_pb2, types_pb2

PLUGIN_NAME = "gradients"
FORMAT_VERSION = 1
TAG_PREFIX = "gradients/"

#: How a metric is stored: one packed float32 tensor per logged step holding every layer's value ...
LAYER_TENSOR = "layer_tensor"
#: ... a rank-0 float32 tensor under our plugin per logged step ...
STEP_TENSOR = "step_tensor"
#: ... a stock scalar (so TensorBoard's Scalars tab shows it too) ...
SCALAR = "scalar"
#: ... an int64 ``[layers, HIST_BINS]`` tensor on the fixed histogram bins ...
HISTOGRAM = "histogram"
#: ... or not at all: readers compute it from the metrics it is derived from.
DERIVED = "derived"


@dataclass(frozen=True)
class Metric:
    """One quantity we record or derive. Metrics are declared once, in the registry below, so that the writer, the
    reader, the plugin's routes and the tab (which the plugin serves the registry to) agree on what exists, how it is
    stored and what it is called."""

    name: str
    #: ``"layer"``: one value per layer and logged step; ``"step"``: one value per logged step.
    scope: str
    #: ``LAYER_TENSOR``, ``STEP_TENSOR``, ``SCALAR``, ``HISTOGRAM`` or ``DERIVED``.
    storage: str
    #: How people read its name (the tab's legends, titles and tooltips).
    label: str
    #: What a value measures or counts; empty where it is the training's own quantity (loss, learning rate).
    unit: str
    #: The stored metrics a derived one is computed from, in the order of its formula.
    derived_from: tuple[str, ...] = ()

    def to_json(self) -> dict:
        return {"name": self.name, "scope": self.scope, "storage": self.storage, "label": self.label,
                "unit": self.unit, "derived_from": list(self.derived_from)}


METRIC_REGISTRY: tuple[Metric, ...] = (
    Metric("grad_norm", "layer", LAYER_TENSOR, "grad norm", "L2 norm"),
    Metric("param_norm", "layer", LAYER_TENSOR, "param norm", "L2 norm"),
    Metric("update_norm", "layer", LAYER_TENSOR, "update norm", "L2 norm"),
    Metric("update_ratio", "layer", DERIVED, "update ratio", "ratio", ("update_norm", "param_norm")),
    Metric("grad_max_abs", "layer", LAYER_TENSOR, "max |grad|", "absolute value"),
    Metric("nonfinite_count", "layer", LAYER_TENSOR, "non-finite entries", "entries"),
    Metric("grad_hist", "layer", HISTOGRAM, "gradient histogram", "entries per log10|g| bin"),
    Metric("exp_avg_norm", "layer", LAYER_TENSOR, "Adam 1st moment norm", "L2 norm"),
    Metric("exp_avg_sq_norm", "layer", LAYER_TENSOR, "Adam 2nd moment norm", "L2 norm"),
    Metric("loss", "step", SCALAR, "loss", ""),
    Metric("total_grad_norm", "step", SCALAR, "total grad norm", "L2 norm"),
    Metric("lr", "step", STEP_TENSOR, "learning rate", ""),
    Metric("loss_scale", "step", STEP_TENSOR, "loss scale", "factor"),
    Metric("step_skipped", "step", STEP_TENSOR, "skipped step", "1 = skipped"),
    Metric("guard_action", "step", STEP_TENSOR, "guard action", "action code"),
    Metric("clip_threshold", "step", STEP_TENSOR, "clip threshold", "L2 norm"),
    Metric("epoch", "step", STEP_TENSOR, "epoch", "epoch (from 0)"),
    Metric("batch_index", "step", STEP_TENSOR, "batch in epoch", "index (from 0)"),
)


def _stored_as(storage: str) -> tuple[str, ...]:
    return tuple(m.name for m in METRIC_REGISTRY if m.storage == storage)


#: Per-layer metrics, one packed float32 tensor per logged step each.
LAYER_METRICS: tuple[str, ...] = _stored_as(LAYER_TENSOR)
#: Per-step extras written as rank-0 tensors under our plugin.
STEP_METRICS: tuple[str, ...] = _stored_as(STEP_TENSOR)
#: Per-step series written as stock scalars (visible in the Scalars tab).
SCALAR_METRICS: tuple[str, ...] = _stored_as(SCALAR)
HISTOGRAM_METRIC: str = _stored_as(HISTOGRAM)[0]

#: Fixed histogram bins on log10|g|: one bin for exact zeros, one below 1e-12, 48 bins of half a decade from 1e-12
#: to 1e12, one at or above 1e12, one for NaN/Inf. The same bins for every layer and step, so histograms compare.
HIST_LOG10_EDGES: np.ndarray = np.arange(-12.0, 12.0 + 0.25, 0.5)
HIST_BINS = len(HIST_LOG10_EDGES) - 1 + 4
HIST_ZERO, HIST_UNDERFLOW, HIST_OVERFLOW, HIST_NONFINITE = 0, 1, HIST_BINS - 2, HIST_BINS - 1


def tag_for(metric: str) -> str:
    """The event-file tag of one of our metrics."""
    return TAG_PREFIX + metric


_METRIC_OF_TAG = {TAG_PREFIX + m.name: m.name for m in METRIC_REGISTRY if m.storage != DERIVED}


def metric_of(tag: str) -> str | None:
    """Inverse of :func:`tag_for`; ``None`` for tags that are not ours."""
    return _METRIC_OF_TAG.get(tag)


#: The sample ids of a logged step's batch (dataset indices, or any integer ids): a rank-1 int64 tensor under our
#: plugin, metadata ``{"v":1}``, in the same event as the step's statistics. Not a metric: no layer, no series.
BATCH_IDS_TAG = TAG_PREFIX + "batch_ids"


def layout_id(layers: Sequence[str]) -> str:
    """Content hash of an ordered list of layer names (names may hold any unicode, including NUL-free text)."""
    h = hashlib.blake2b(digest_size=8)
    for name in layers:
        h.update(name.encode("utf-8", "surrogatepass"))
        h.update(b"\x00")
    return h.hexdigest()


class FormatError(ValueError):
    """A summary claims to be ours but cannot be decoded."""


@dataclass(frozen=True)
class Metadata:
    """Decoded plugin metadata content of one of our summaries."""

    version: int
    layout: str | None
    layers: tuple[str, ...] | None


def encode_metadata_content(layout: str | None, layers: Sequence[str] | None) -> bytes:
    """JSON content: ``{"v":1,"layout":id}`` plus ``"layers":[...]`` when the layout is defined here."""
    doc: dict = {"v": FORMAT_VERSION}
    if layout is not None:
        doc["layout"] = layout
    if layers is not None:
        doc["layers"] = list(layers)
    # ASCII escapes keep any name encodable, lone surrogates included (they have no UTF-8 form)
    return json.dumps(doc, separators=(",", ":")).encode("ascii")


def decode_metadata_content(content: bytes) -> Metadata:
    try:
        doc = json.loads(content.decode("utf-8")) if content else {}
    except (UnicodeDecodeError, json.JSONDecodeError, RecursionError) as exc:
        raise FormatError(f"unparseable plugin metadata: {type(exc).__name__}") from exc
    if not isinstance(doc, dict):
        raise FormatError("plugin metadata is not an object")
    version = doc.get("v", 0)
    if not isinstance(version, int) or version > FORMAT_VERSION:
        raise FormatError(f"unsupported format version {version!r} (this reader knows up to {FORMAT_VERSION})")
    layers = doc.get("layers")
    if layers is not None:
        if not isinstance(layers, list) or not all(isinstance(x, str) for x in layers):
            raise FormatError("layer list is not a list of strings")
        layers = tuple(layers)
    layout = doc.get("layout")
    if layout is not None and not isinstance(layout, str):
        raise FormatError("layout id is not a string")
    if layers is not None and layout is not None and layout_id(layers) != layout:
        raise FormatError("layout id does not match its layer list")
    return Metadata(version=version, layout=layout, layers=layers)


def _metadata(layout: str | None, layers: Sequence[str] | None) -> summary_pb2.SummaryMetadata:
    return summary_pb2.SummaryMetadata(
        plugin_data=summary_pb2.SummaryMetadata.PluginData(
            plugin_name=PLUGIN_NAME, content=encode_metadata_content(layout, layers)
        ),
        data_class=summary_pb2.DATA_CLASS_TENSOR,
    )


def _scalar_metadata() -> summary_pb2.SummaryMetadata:
    # Empty content is version 0 of the scalars plugin's ScalarPluginData.
    return summary_pb2.SummaryMetadata(
        plugin_data=summary_pb2.SummaryMetadata.PluginData(plugin_name="scalars", content=b""),
        data_class=summary_pb2.DATA_CLASS_SCALAR,
    )


def _tensor(array: np.ndarray) -> tensor_pb2.TensorProto:
    if array.dtype == np.int64:
        dtype, data = types_pb2.DT_INT64, array.astype("<i8", copy=False)
    else:
        dtype, data = types_pb2.DT_FLOAT, array.astype("<f4", copy=False)
    shape = tensor_shape_pb2.TensorShapeProto(dim=[tensor_shape_pb2.TensorShapeProto.Dim(size=d) for d in array.shape])
    return tensor_pb2.TensorProto(dtype=dtype, tensor_shape=shape, tensor_content=data.tobytes())


def layer_value(metric: str, array: np.ndarray, layout: str, layers: Sequence[str] | None) -> summary_pb2.Summary.Value:
    """Summary value for one per-layer metric (or the histogram). ``layers`` is given only where the layout is new."""
    return summary_pb2.Summary.Value(tag=tag_for(metric), metadata=_metadata(layout, layers), tensor=_tensor(array))


def step_value(metric: str, value: float) -> summary_pb2.Summary.Value:
    """Summary value for a per-step extra (rank-0 float32 tensor under our plugin)."""
    return summary_pb2.Summary.Value(
        tag=tag_for(metric), metadata=_metadata(None, None), tensor=_tensor(np.asarray(value, dtype=np.float32))
    )


def scalar_value(metric: str, value: float) -> summary_pb2.Summary.Value:
    """Summary value for loss / total grad norm as a stock scalar."""
    return summary_pb2.Summary.Value(
        tag=tag_for(metric), metadata=_scalar_metadata(), tensor=_tensor(np.asarray(value, dtype=np.float32))
    )


def batch_ids_value(ids: np.ndarray) -> summary_pb2.Summary.Value:
    """Summary value for a step's sample ids (an int64 vector; see :data:`BATCH_IDS_TAG`)."""
    arr = np.asarray(ids, dtype=np.int64).reshape(-1)
    return summary_pb2.Summary.Value(tag=BATCH_IDS_TAG, metadata=_metadata(None, None), tensor=_tensor(arr))


def make_event(step: int, wall_time: float, values: Sequence[summary_pb2.Summary.Value]) -> event_pb2.Event:
    return event_pb2.Event(step=int(step), wall_time=wall_time, summary=summary_pb2.Summary(value=list(values)))


# ------------------------------------------------------------------------------------------------------------ decode


#: A tensor may store one value for its whole shape; a shape claiming more than this is damage, not data (expanding
#: it would allocate what a hostile record asks for, not what the file holds).
MAX_SHORTHAND_VALUES = 1 << 20
_F32 = np.dtype("<f4")
_F32_SCALAR = struct.Struct("<f")
_NUMERIC_KINDS = {
    types_pb2.DT_FLOAT: (np.dtype("<f4"), "float_val"),
    types_pb2.DT_DOUBLE: (np.dtype("<f8"), "double_val"),
    types_pb2.DT_INT64: (np.dtype("<i8"), "int64_val"),
    types_pb2.DT_INT32: (np.dtype("<i4"), "int_val"),
    types_pb2.DT_HALF: (np.dtype("<f2"), "half_val"),
}


def tensor_to_numpy(tensor: tensor_pb2.TensorProto) -> np.ndarray:
    """Decode a TensorProto of the dtypes we and the scalar writers use, without TensorFlow."""
    shape = tuple([d.size for d in tensor.tensor_shape.dim])
    if any(d < 0 for d in shape):
        raise FormatError(f"tensor has unknown dimensions {shape}")
    count = math.prod(shape)
    kind = _NUMERIC_KINDS.get(tensor.dtype)
    if kind is None:
        raise FormatError(f"unsupported tensor dtype {tensor.dtype}")
    dt, field = kind
    content = tensor.tensor_content
    if content:
        if len(content) != count * dt.itemsize:
            raise FormatError(f"tensor content of {len(content)} bytes does not match shape {shape}")
        return np.frombuffer(content, dtype=dt).reshape(shape)
    vals = getattr(tensor, field)
    if tensor.dtype == types_pb2.DT_HALF:
        arr = np.asarray(vals, dtype=np.uint16).view(np.float16)
    else:
        arr = np.asarray(vals, dtype=dt)
    if arr.size == count:
        return arr.reshape(shape)
    if arr.size == 1 and count <= MAX_SHORTHAND_VALUES:  # proto shorthand: one value repeated to fill the shape
        return np.full(shape, arr[0], dtype=arr.dtype)
    raise FormatError(f"tensor holds {arr.size} values for shape {shape}")


def is_ours(value: summary_pb2.Summary.Value) -> bool:
    return value.metadata.plugin_data.plugin_name == PLUGIN_NAME


def layer_vector(tensor: tensor_pb2.TensorProto, n_layers: int) -> np.ndarray:
    """Decode a per-layer metric tensor, checking it holds one value per layer (fast path for packed float32)."""
    content = tensor.tensor_content
    if tensor.dtype == types_pb2.DT_FLOAT and content and len(tensor.tensor_shape.dim) == 1:
        if len(content) != 4 * n_layers or tensor.tensor_shape.dim[0].size != n_layers:
            raise FormatError(f"tensor of {len(content) // 4} values does not match a layout of {n_layers} layers")
        return np.frombuffer(content, dtype=_F32)
    arr = tensor_to_numpy(tensor)
    if arr.shape != (n_layers,):
        raise FormatError(f"shape {arr.shape} does not match a layout of {n_layers} layers")
    return arr


def batch_ids(tensor: tensor_pb2.TensorProto) -> np.ndarray:
    """Decode a :data:`BATCH_IDS_TAG` tensor: the step's sample ids as an int64 vector."""
    if tensor.dtype not in (types_pb2.DT_INT64, types_pb2.DT_INT32):
        raise FormatError(f"batch ids of dtype {tensor.dtype}, expected int64")
    arr = tensor_to_numpy(tensor)
    if arr.ndim != 1:
        raise FormatError(f"batch ids of shape {arr.shape}, expected a vector")
    return arr.astype(np.int64)


def is_scalar(value: summary_pb2.Summary.Value) -> bool:
    """Whether a summary value is an ordinary scalar (TF1 ``simple_value`` or a rank-0 scalars-plugin tensor)."""
    kind = value.WhichOneof("value")
    if kind == "simple_value":
        return True
    if kind != "tensor":
        return False
    plugin = value.metadata.plugin_data.plugin_name if value.HasField("metadata") else ""
    # Keras' TF2 writer stores scalars as rank-0 tensors; the metadata is only on a tag's first event.
    return plugin in ("scalars", "") and value.tensor.dtype in _NUMERIC_KINDS and not value.tensor.tensor_shape.dim


def scalar_of(value: summary_pb2.Summary.Value) -> float:
    if value.WhichOneof("value") == "simple_value":
        return float(value.simple_value)
    return tensor_scalar(value.tensor)


def tensor_scalar(tensor: tensor_pb2.TensorProto) -> float:
    """The one number a rank-0 (or one-element) tensor holds; a fast path for the float32 scalars writers emit."""
    if tensor.dtype == types_pb2.DT_FLOAT and not tensor.tensor_shape.dim:
        content = tensor.tensor_content
        if len(content) == 4:
            return _F32_SCALAR.unpack(content)[0]
        if not content and len(tensor.float_val) == 1:
            return float(tensor.float_val[0])
    arr = tensor_to_numpy(tensor)
    if arr.size != 1:
        raise FormatError("scalar tensor does not hold exactly one value")
    return float(arr.reshape(-1)[0])


def histogram_counts(values: np.ndarray) -> np.ndarray:
    """Reference binning of gradient entries on the fixed bins (int64 ``[HIST_BINS]``).

    Bin ``2 + i`` holds ``10**edge[i] <= |g| < 10**edge[i+1]``; the monitors compute the same thing on the device.
    """
    a = np.abs(np.asarray(values, dtype=np.float64).reshape(-1))
    counts = np.zeros(HIST_BINS, dtype=np.int64)
    finite = np.isfinite(a)
    counts[HIST_NONFINITE] = int(a.size - finite.sum())
    a = a[finite]
    zero = a == 0
    counts[HIST_ZERO] = int(zero.sum())
    with np.errstate(divide="ignore"):
        logs = np.log10(a[~zero])
    idx = np.floor((logs - HIST_LOG10_EDGES[0]) / 0.5).astype(np.int64) + 2
    idx = np.clip(idx, HIST_UNDERFLOW, HIST_OVERFLOW)
    counts += np.bincount(idx, minlength=HIST_BINS)[:HIST_BINS]
    return counts


def histogram_edge_values(dtype: np.dtype | type) -> np.ndarray:
    """For each bin edge, the smallest magnitude of ``dtype`` that :func:`histogram_counts` puts at or above it.

    Device code (torch, TensorFlow) bins a magnitude by comparing it with these values and so reproduces the reference
    bins exactly, exact powers of ten included, without a float64 logarithm per entry.
    """
    dt = np.dtype(dtype)

    def bin_of(x: np.floating) -> int:
        return int(np.argmax(histogram_counts(np.asarray([x], dtype=np.float64))))

    out = []
    for k, edge in enumerate(HIST_LOG10_EDGES):
        target = k + 2
        x = dt.type(10.0 ** edge)
        while bin_of(x) < target:
            x = np.nextafter(x, dt.type(np.inf))
        while bin_of(np.nextafter(x, dt.type(0))) >= target:
            x = np.nextafter(x, dt.type(0))
        out.append(x)
    return np.asarray(out, dtype=dt)
