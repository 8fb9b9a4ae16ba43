"""The summary contract between `instrumentation` (writer) and `tb_stability` (reader).

This is the only module both sides import. It owns the plugin name, the tag
names, the shape of each tensor and the versioned metadata content (see
`plugin_data.proto`). It never imports TensorFlow.

Layout of what the instrumentation writes into a run directory (all summaries
carry plugin name ``"stability"`` and ``data_class = DATA_CLASS_TENSOR``):

* ``stability/steps``: a float64 tensor ``[k, len(columns)]`` holding ``k``
  consecutive training steps, one row per step; column names (``STEP_COLUMNS``
  and possibly more) are in the metadata ``names``. The event's ``step`` is
  the last step in the block. Every training step appears exactly once.
* ``stability/var/<quantity>``: float32 vectors ``[num_variables]``, one per
  logged step, for ``VARIABLE_QUANTITIES``; variable paths in ``names``.
* ``stability/layer/<quantity>``: float32 vectors ``[num_layers]`` for
  ``LAYER_QUANTITIES`` (activation probes); layer names in ``names``.
* ``stability/inputs``: float32 ``[4, num_features]`` (rows mean/std/min/max).
* ``stability/targets``: float32 ``[4, num_targets]``, the same rows over a
  regression output's labels (the first output's, when no class counts are
  taken): the loss a model that predicts their mean would reach.
* ``stability/labels`` and ``stability/predictions``: float32 class counts.
* ``stability/run_info`` and ``stability/nan_origin``: a scalar string tensor
  holding a JSON object.

Steps are 0-based global training steps (the optimizer's ``iterations``
before the update).
"""

from __future__ import annotations

import dataclasses
from typing import Iterable

from google.protobuf import descriptor_pb2, descriptor_pool, message_factory
from tensorboard.compat.proto import summary_pb2

PLUGIN_NAME = "stability"
METADATA_VERSION = 1
TAG_PREFIX = "stability/"

# Per-step signals, written in blocks.
TAG_STEPS = "stability/steps"
STEP_COLUMNS = ("step", "loss", "grad_norm", "nonfinite_grads", "learning_rate")

# Per-variable vectors, every N steps.
VARIABLE_QUANTITIES = ("grad_norm", "weight_norm", "update_ratio")
# Per-layer activation vectors, every N steps (activation probes).
LAYER_QUANTITIES = ("dead_fraction", "saturated_fraction", "act_mean", "act_std")

TAG_INPUTS = "stability/inputs"
INPUT_ROWS = ("mean", "std", "min", "max")
TAG_TARGETS = "stability/targets"
TAG_LABELS = "stability/labels"
TAG_PREDICTIONS = "stability/predictions"
TAG_RUN_INFO = "stability/run_info"
TAG_NAN_ORIGIN = "stability/nan_origin"

JSON_TAGS = (TAG_RUN_INFO, TAG_NAN_ORIGIN)


def variable_tag(quantity: str) -> str:
    """Tag of a per-variable quantity, e.g. ``stability/var/grad_norm``."""
    if quantity not in VARIABLE_QUANTITIES:
        raise ValueError(f"unknown per-variable quantity {quantity!r}")
    return f"{TAG_PREFIX}var/{quantity}"


def layer_tag(quantity: str) -> str:
    """Tag of a per-layer quantity, e.g. ``stability/layer/dead_fraction``."""
    if quantity not in LAYER_QUANTITIES:
        raise ValueError(f"unknown per-layer quantity {quantity!r}")
    return f"{TAG_PREFIX}layer/{quantity}"


def _build_content_class():
    """Builds the `StabilityPluginData` message class from `plugin_data.proto`.

    Built at runtime from a descriptor rather than from protoc output so that it
    works with every protobuf runtime TensorBoard accepts (generated code pins a
    minimum runtime version).
    """
    file_proto = descriptor_pb2.FileDescriptorProto(
        name="tb_stability/plugin_data.proto", package="tb_stability", syntax="proto3"
    )
    message = file_proto.message_type.add(name="StabilityPluginData")
    label = descriptor_pb2.FieldDescriptorProto
    for number, (name, type_, rule) in enumerate(
        [
            ("version", label.TYPE_INT32, label.LABEL_OPTIONAL),
            ("quantity", label.TYPE_STRING, label.LABEL_OPTIONAL),
            ("names", label.TYPE_STRING, label.LABEL_REPEATED),
            ("rows", label.TYPE_STRING, label.LABEL_REPEATED),
        ],
        start=1,
    ):
        message.field.add(name=name, number=number, type=type_, label=rule)
    pool = descriptor_pool.DescriptorPool()
    pool.Add(file_proto)
    descriptor = pool.FindMessageTypeByName("tb_stability.StabilityPluginData")
    if hasattr(message_factory, "GetMessageClass"):
        return message_factory.GetMessageClass(descriptor)
    return message_factory.MessageFactory(pool).GetPrototype(descriptor)  # protobuf < 4.21


StabilityPluginData = _build_content_class()


class UnknownMetadataVersion(ValueError):
    """Raised for content written by a newer, unknown version of the contract."""


@dataclasses.dataclass(frozen=True)
class Content:
    """Parsed metadata content of one stability summary."""

    version: int
    quantity: str
    names: tuple[str, ...] = ()
    rows: tuple[str, ...] = ()


def create_summary_metadata(
    quantity: str,
    names: Iterable[str] = (),
    rows: Iterable[str] = (),
    description: str = "",
) -> summary_pb2.SummaryMetadata:
    """Creates the `SummaryMetadata` for one stability summary.

    Args:
      quantity: What the tensor holds (e.g. ``"grad_norm"``, ``"steps"``).
      names: Names along the tensor's last axis (variables, layers, columns).
      rows: Names along the first axis of 2-D tensors.
      description: Optional human-readable description.

    Returns:
      A `SummaryMetadata` with plugin name, versioned content and
      ``data_class`` set to ``DATA_CLASS_TENSOR``.
    """
    content = StabilityPluginData(
        version=METADATA_VERSION, quantity=quantity, names=list(names), rows=list(rows)
    )
    return summary_pb2.SummaryMetadata(
        summary_description=description,
        plugin_data=summary_pb2.SummaryMetadata.PluginData(
            plugin_name=PLUGIN_NAME, content=content.SerializeToString()
        ),
        data_class=summary_pb2.DATA_CLASS_TENSOR,
    )


def parse_content(content: bytes) -> Content:
    """Parses ``plugin_data.content`` of a stability summary.

    Raises:
      UnknownMetadataVersion: If written by a newer contract version.
      ValueError: If the bytes are not a valid content message.
    """
    if not isinstance(content, (bytes, bytearray)):
        raise TypeError("content must be bytes")
    try:
        message = StabilityPluginData.FromString(bytes(content))
    except Exception as error:  # protobuf raises DecodeError, a private subclass
        raise ValueError(f"invalid stability metadata content: {error}") from error
    if message.version > METADATA_VERSION:
        raise UnknownMetadataVersion(
            f"stability metadata version {message.version} is newer than the "
            f"supported version {METADATA_VERSION}; upgrade tb-stability"
        )
    return Content(
        version=message.version,
        quantity=message.quantity,
        names=tuple(message.names),
        rows=tuple(message.rows),
    )


def quantity_of_tag(tag: str) -> str | None:
    """The quantity a stability tag holds, or None for a foreign tag."""
    if tag == TAG_STEPS:
        return "steps"
    for prefix in (f"{TAG_PREFIX}var/", f"{TAG_PREFIX}layer/"):
        if tag.startswith(prefix):
            return tag[len(prefix):]
    if tag.startswith(TAG_PREFIX):
        return tag[len(TAG_PREFIX):]
    return None


def all_known_tags() -> tuple[str, ...]:
    """Every tag the contract defines (activation and input tags included)."""
    return (
        (TAG_STEPS,)
        + tuple(variable_tag(q) for q in VARIABLE_QUANTITIES)
        + tuple(layer_tag(q) for q in LAYER_QUANTITIES)
        + (TAG_INPUTS, TAG_TARGETS, TAG_LABELS, TAG_PREDICTIONS)
        + JSON_TAGS
    )


def snake_case(name: str) -> str:
    """A loss or class name as run_info's ``loss_name`` holds it: ``BinaryCrossentropy`` ->
    ``binary_crossentropy`` (strings lower-cased). The writer records names this way and
    the detectors read serialised class names the same way."""
    name = str(name)
    out = []
    for i, ch in enumerate(name):
        if ch.isupper() and i and not name[i - 1].isupper() and name[i - 1] != "_":
            out.append("_")
        out.append(ch.lower())
    return "".join(out)


def is_multilabel(loss_name, activation, units) -> bool:
    """Whether an output holds several independent yes/no labels (run_info's field values).

    Sigmoid units, or a binary loss on more than one unit that is not a softmax
    (one-hot labels over two softmax units are one label). The arg-max of a
    multi-hot row is no class, so such an output has no class counts: the
    writer takes none and the detectors read none.
    """
    several = isinstance(units, int) and not isinstance(units, bool) and units > 1
    return several and (activation == "sigmoid" or ("binary" in str(loss_name or "")
                                                     and activation != "softmax"))
