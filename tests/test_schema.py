"""The contract: metadata content round-trips, data_class is set, .proto and runtime agree."""

import os
import re

import pytest

from tb_stability import schema
from tensorboard.compat.proto import summary_pb2

PROTO = os.path.join(os.path.dirname(schema.__file__), "plugin_data.proto")


def test_metadata_round_trip_keeps_names_and_sets_data_class():
    names = ["sequential/dense/kernel", "sequential/dense/bias", "<img src=x onerror=alert(1)>"]
    metadata = schema.create_summary_metadata("grad_norm", names=names)
    assert metadata.plugin_data.plugin_name == "stability"
    assert metadata.data_class == summary_pb2.DATA_CLASS_TENSOR
    content = schema.parse_content(metadata.plugin_data.content)
    assert content == schema.Content(version=1, quantity="grad_norm", names=tuple(names))


def test_newer_version_is_refused_with_a_clear_error():
    newer = schema.StabilityPluginData(version=schema.METADATA_VERSION + 1, quantity="x")
    with pytest.raises(schema.UnknownMetadataVersion, match="newer"):
        schema.parse_content(newer.SerializeToString())


def test_garbage_content_is_a_value_error():
    with pytest.raises(ValueError):
        schema.parse_content(b"\xff\xff\xff")


def test_proto_file_matches_runtime_descriptor():
    text = open(PROTO).read()
    declared = {
        (name, int(number)) for name, number in re.findall(r"^\s*(?:repeated\s+)?\w+\s+(\w+)\s*=\s*(\d+);", text, re.M)
    }
    runtime = {(f.name, f.number) for f in schema.StabilityPluginData.DESCRIPTOR.fields}
    assert declared == runtime


@pytest.mark.parametrize(
    "tag,quantity",
    [("stability/steps", "steps"), ("stability/var/grad_norm", "grad_norm"),
     ("stability/layer/dead_fraction", "dead_fraction"), ("stability/run_info", "run_info"),
     ("epoch_loss", None)],
    ids=["steps", "variable", "layer", "json", "foreign"],
)
def test_quantity_of_tag(tag, quantity):
    assert schema.quantity_of_tag(tag) == quantity


def test_tag_builders_reject_unknown_quantities():
    with pytest.raises(ValueError):
        schema.variable_tag("nope")
    assert schema.variable_tag("update_ratio") in schema.all_known_tags()
