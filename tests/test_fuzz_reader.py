"""Property tests: mutated real event files never crash the reader, analysis or report.

Victim files are real: one written by `tb_stability.writer` and one written
by TensorFlow's own ``tf.summary`` file writer (through
`instrumentation.writer.SummaryWriter`, what training writes). Hypothesis
flips bytes, truncates, inserts bytes, duplicates and drops records. For every
mutation, `analysis.analyze_logdir` + every report format run without an
uncaught exception, the intact run next to the victim is unaffected, and:

* nothing is let in: for pure byte flips (CRC-protected) every value the
  reader returns for the victim is one the original file holds, and at least
  one warning names the file;
* duplicated records change nothing (last write wins, same values);
* truncation keeps a prefix of the data and warns unless it cut exactly at a
  record boundary.
"""

from __future__ import annotations

import json
import os
import shutil
import tempfile

import numpy as np
import pytest

hypothesis = pytest.importorskip("hypothesis")
from hypothesis import HealthCheck, given, settings  # noqa: E402
from hypothesis import strategies as st  # noqa: E402

from tb_stability import analysis, report_format, schema  # noqa: E402
from tb_stability.reader import LogdirReader  # noqa: E402
from tb_stability.reader.tfrecord import iter_records  # noqa: E402
from tb_stability.writer import StabilityWriter  # noqa: E402

NAMES = ("dense/kernel", "dense/bias")
SETTINGS = dict(deadline=None, derandomize=True, database=None,
                suppress_health_check=[HealthCheck.function_scoped_fixture,
                                       HealthCheck.too_slow])


def _block(first, count, nan_at=None):
    steps = np.arange(first, first + count, dtype=np.float64)
    loss = 2.0 / (1 + steps / 10)
    if nan_at is not None:
        loss[nan_at - first] = np.nan
    return np.stack([steps, loss, 1 + 0 * steps, 0 * steps, np.full(count, 1e-3)], axis=1)


def _write_ours(run_dir, nan=False):
    with StabilityWriter(run_dir) as writer:
        writer.write_json(schema.TAG_RUN_INFO, 0, {"every": 10})
        for b in range(4):
            writer.write_steps(_block(b * 10, 10, nan_at=35 if nan and b == 3 else None))
            writer.write_variables(b * 10 + 9, "grad_norm", NAMES, [b + 1.0, np.inf if nan else 2.0])
            writer.write_scalar("epoch_loss", b, 1.0 / (b + 1))
        writer.write_legacy_scalar("legacy/acc", 7, 0.125)
        return writer.path


def _write_tf(run_dir):
    tf = pytest.importorskip("tensorflow")
    from instrumentation.writer import SummaryWriter

    writer = SummaryWriter(str(run_dir))
    writer.write_json(schema.TAG_RUN_INFO, 0, {"every": 10})
    for b in range(4):
        writer.write_steps(_block(b * 10, 10))
        writer.write_variables(b * 10 + 9, np.array([[b, 1.0], [2.0, 2.0], [1e-3, 1e-3]]), NAMES)
        writer.write_scalars(b, {"epoch_loss": 1.0 / (b + 1)})
    writer.close()
    del tf
    (name,) = [n for n in os.listdir(run_dir) if "tfevents" in n]
    return os.path.join(run_dir, name)


@pytest.fixture(scope="module")
def templates(tmp_path_factory):
    """Original bytes of the victim files and the intact run's report."""
    root = tmp_path_factory.mktemp("fuzz")
    _write_ours(root / "intact", nan=True)
    ours = open(_write_ours(root / "victim_ours"), "rb").read()
    tf_bytes = open(_write_tf(root / "victim_tf"), "rb").read()
    victims = {"ours": ours, "tf": tf_bytes}
    originals = {}
    for kind, data in victims.items():
        originals[kind] = _data_of(_load_victim(root, kind, data)[0])
    shutil.copytree(root / "intact", root / "solo" / "intact")
    shutil.copytree(root / "intact", root / "solo" / "victim" / "intact")
    intact = _run_json(analysis.analyze_logdir(root / "solo"), "intact")
    assert intact["findings"], "the intact run should have findings (NaN, inf) to compare"
    # End to end once: the intact run's report next to a victim equals its report alone.
    _load_victim(root / "solo", "ours", ours[: len(ours) // 2])
    report = analysis.analyze_logdir(root / "solo" / "victim")
    assert _run_json(report, "intact") == intact
    intact_data = _data_of(LogdirReader().load_logdir(root / "intact").runs["."])
    return {"victims": victims, "originals": originals, "intact": intact,
            "intact_data": intact_data, "intact_dir": str(root / "intact")}


def _load_victim(root, kind, data):
    run_dir = os.path.join(root, "victim", kind)
    os.makedirs(run_dir, exist_ok=True)
    with open(os.path.join(run_dir, "events.out.tfevents.1.victim"), "wb") as handle:
        handle.write(data)
    logdir = LogdirReader().load_logdir(os.path.join(root, "victim"))
    return logdir.runs[kind], logdir


def _data_of(run) -> dict:
    """Every value the reader returned: {(kind, name): {step: value-tuple}}."""
    out = {}
    for column, series in run.steps.items():
        out[("steps", column)] = {int(s): (v,) for s, v in zip(series.steps, series.values)}
    for tag, series in run.scalars.items():
        out[("scalar", tag)] = {int(s): (v,) for s, v in zip(series.steps, series.values)}
    for quantity, matrix in run.variables.items():
        out[("var", quantity)] = {int(s): tuple(row) for s, row in zip(matrix.steps, matrix.values)}
    for tag, records in run.json.items():
        out[("json", tag)] = {int(s): (json.dumps(v, sort_keys=True),) for s, v in records}
    return out


def _same(a: tuple, b: tuple) -> bool:
    return len(a) == len(b) and all(
        (x == y) or (isinstance(x, float) and isinstance(y, float) and np.isnan(x) and np.isnan(y))
        for x, y in zip(a, b))


def _assert_subset(mutated: dict, original: dict) -> None:
    for key, values in mutated.items():
        assert key in original, f"invented {key}"
        for step, value in values.items():
            assert step in original[key] and _same(value, original[key][step]), (key, step)


def _run_json(report, name):
    (entry,) = [r for r in analysis.report_to_json(report)["runs"] if r["run"] == name]
    return entry


def _records(data: bytes) -> list[tuple[int, int]]:
    return [(offset, end) for offset, end, _ in iter_records(data)]


def _analyse_everything(root, run_filter=None) -> dict:
    """analyze_logdir + every output format; returns the JSON report."""
    report = analysis.analyze_logdir(root, run_filter=run_filter)
    as_json = analysis.report_to_json(report)
    json.dumps(as_json, allow_nan=False)  # strict JSON, no NaN literals
    report_format.render_text(report)
    report_format.render_warnings_text(report)
    report_format.render_markdown(report)
    return as_json


def _check(templates, kind, data, expect_warning: bool | None):
    root = tempfile.mkdtemp(prefix="fuzz_")
    try:
        shutil.copytree(templates["intact_dir"], os.path.join(root, "victim", "intact"))
        run, logdir = _load_victim(root, kind, data)
        # The intact run loads exactly as before (so its findings are unchanged:
        # analysis is a function of the loaded data; the fixture checks them once).
        assert _equal_nan(_data_of(logdir.runs["intact"]), templates["intact_data"])
        assert logdir.runs["intact"].warnings == [] and logdir.warnings == []
        as_json = _analyse_everything(os.path.join(root, "victim"), run_filter=kind)
        assert [r["run"] for r in as_json["runs"]] == [kind]
        mutated = _data_of(run)
        _assert_subset(mutated, templates["originals"][kind])
        label = f"{kind}/events.out.tfevents.1.victim"
        if expect_warning:
            assert run.warnings and all(label in w or "detector" in w for w in run.warnings)
        return run, mutated
    finally:
        shutil.rmtree(root, ignore_errors=True)


KINDS = st.sampled_from(["ours", "tf"])


@settings(max_examples=60, **SETTINGS)
@given(kind=KINDS, flips=st.lists(st.tuples(st.floats(0, 1, exclude_max=True),
                                            st.integers(1, 255)), min_size=1, max_size=4))
def test_byte_flips_are_caught_and_let_nothing_in(templates, kind, flips):
    data = bytearray(templates["victims"][kind])
    for where, mask in flips:
        data[int(where * len(data))] ^= mask
    changed = bytes(data) != templates["victims"][kind]
    _check(templates, kind, bytes(data), expect_warning=changed)


@settings(max_examples=40, **SETTINGS)
@given(kind=KINDS, where=st.floats(0, 1))
def test_truncation_keeps_a_prefix(templates, kind, where):
    original = templates["victims"][kind]
    cut = int(where * len(original))
    boundaries = {0} | {end for _, end in _records(original)}
    run, mutated = _check(templates, kind, original[:cut], expect_warning=cut not in boundaries)
    if cut == len(original):
        assert mutated == templates["originals"][kind] and not run.warnings


@settings(max_examples=30, **SETTINGS)
@given(kind=KINDS, index=st.floats(0, 1, exclude_max=True), at=st.floats(0, 1))
def test_duplicated_records_change_nothing(templates, kind, index, at):
    original = templates["victims"][kind]
    records = _records(original)
    start, end = records[int(index * len(records))]
    insert_at = ([0] + [e for _, e in records])[int(at * len(records))]
    data = original[:insert_at] + original[start:end] + original[insert_at:]
    run, mutated = _check(templates, kind, data, expect_warning=False)
    assert mutated == templates["originals"][kind] or _equal_nan(mutated, templates["originals"][kind])
    assert not run.warnings


def _equal_nan(a, b):
    return a.keys() == b.keys() and all(
        a[k].keys() == b[k].keys() and all(_same(a[k][s], b[k][s]) for s in a[k]) for k in a)


@settings(max_examples=40, **SETTINGS)
@given(kind=KINDS, at=st.floats(0, 1), junk=st.binary(min_size=1, max_size=64),
       drop=st.booleans())
def test_inserted_junk_and_dropped_records_never_crash(templates, kind, at, junk, drop):
    original = templates["victims"][kind]
    records = _records(original)
    position = int(at * len(original))
    if drop:  # remove one whole record: a valid file with less data, no warning needed
        start, end = records[min(int(at * len(records)), len(records) - 1)]
        data = original[:start] + original[end:]
        _check(templates, kind, data, expect_warning=None)
    else:
        data = original[:position] + junk + original[position:]
        _check(templates, kind, data, expect_warning=True)
