"""End-to-end: the Stability panel in a real TensorBoard, driven by Chromium via Playwright.

Skipped loudly (pytest skip + a printed warning) when /usr/bin/chromium or the
playwright package is missing.
"""

from __future__ import annotations

import contextlib
import os
import sys
import warnings

import pytest

from tests import browser_support, plugin_support

_REASON = browser_support.missing_browser_reason()
if _REASON:
    _MESSAGE = f"BROWSER TESTS SKIPPED: {_REASON}"
    print(f"\nWARNING: {_MESSAGE}", file=sys.stderr)
    warnings.warn(_MESSAGE)
    pytest.skip(_MESSAGE, allow_module_level=True)

from playwright.sync_api import sync_playwright  # noqa: E402


@pytest.fixture(scope="module")
def session(tmp_path_factory):
    """One TensorBoard process, one browser page on the Stability tab."""
    logdir = plugin_support.build_logdir(str(tmp_path_factory.mktemp("browser") / "logs"))
    plugin_support.write_disconnected_run(logdir)
    plugin_support.write_ordinary_run(logdir)
    plugin_support.write_blowup_run(logdir)
    plugin_support.write_unchecked_run(logdir)
    plugin_support.write_gan_run(logdir)
    # A corrupt event file in the hostile run: its warning names a hostile path.
    corrupt = os.path.join(logdir, plugin_support.HOSTILE_RUN, "events.out.tfevents.0.corrupt")
    with open(corrupt, "wb") as handle:
        handle.write(b"\x00\x01 not an event file <script>alert(2)</script>" * 10)
    events = {"console": [], "dialogs": []}
    with plugin_support.TensorBoardProcess(logdir) as tb, sync_playwright() as playwright:
        browser = browser_support.launch(playwright)
        try:
            page = browser.new_page(viewport={"width": 1500, "height": 1000})
            page.on("console", lambda m: events["console"].append((m.type, m.text)))
            page.on("pageerror", lambda e: events["console"].append(("pageerror", str(e))))

            def on_dialog(dialog):
                events["dialogs"].append(dialog.message)
                dialog.dismiss()

            page.on("dialog", on_dialog)
            frame = browser_support.open_panel(page, tb.url)
            yield {"page": page, "frame": frame, "events": events, "tb": tb, "browser": browser}
        finally:
            browser.close()


def x_ranges(frame, run):
    return frame.eval_on_selector_all(
        f".run-view[data-run='{run}'] .chart",
        "els => els.map(e => [e.dataset.tag, Number(e.dataset.xMin), Number(e.dataset.xMax)])",
    )


def test_tab_and_findings_show(session):
    page, frame = session["page"], session["frame"]
    assert page.get_by_text("Stability", exact=True).first.is_visible()
    kinds = frame.eval_on_selector_all(".finding", "els => els.map(e => e.dataset.kind)")
    assert "final_step_spike" in kinds and "nan_inf" in kinds
    severities = frame.eval_on_selector_all(".finding", "els => els.map(e => e.dataset.severity)")
    order = {"critical": 0, "warning": 1, "info": 2}
    assert [order[s] for s in severities] == sorted(order[s] for s in severities)
    badge = frame.locator(".run-item[data-run='spiky'] .badge")
    assert badge.text_content().strip() == "critical"
    remedy = frame.locator(".finding[data-kind='nan_inf'] .remedy").first
    assert remedy.is_visible() and remedy.text_content().strip()
    # Long prose lines wrap inside the box (nothing hidden behind a scroll bar);
    # the snippet's line breaks and indentation stay.
    widths = frame.eval_on_selector_all(
        ".remedy", "els => els.map(e => [e.scrollWidth, e.clientWidth])")
    assert widths and all(scroll <= client + 1 for scroll, client in widths), widths
    assert "\n    optimizer = " in remedy.text_content()


def test_selecting_a_finding_zooms_the_charts(session):
    frame = session["frame"]
    before = dict((tag, (lo, hi)) for tag, lo, hi in x_ranges(frame, "spiky"))
    assert before["loss"] == (0, plugin_support.STEPS - 1)
    frame.click(".finding[data-kind='loss_spike'][data-run='spiky']")
    frame.wait_for_function(
        "() => document.querySelector(\".run-view[data-run='spiky'] .chart\").dataset.xMin !== '0'"
    )
    after = dict((tag, (lo, hi)) for tag, lo, hi in x_ranges(frame, "spiky"))
    for lo, hi in after.values():
        assert lo <= plugin_support.SPIKE_STEP <= hi
        assert hi - lo < (plugin_support.STEPS - 1) / 2
    heat = frame.locator(".run-view[data-run='spiky'] .heatmap")
    assert int(heat.get_attribute("data-x-min")) <= plugin_support.SPIKE_STEP
    assert frame.locator(".finding.selected").count() == 1
    frame.click(".run-view[data-run='spiky'] .reset")
    reset = dict((tag, (lo, hi)) for tag, lo, hi in x_ranges(frame, "spiky"))
    assert reset["loss"] == (0, plugin_support.STEPS - 1)


def test_nan_origin_and_heatmap_names(session):
    frame = session["frame"]
    origin = frame.locator(".run-view[data-run='nan'] .nan-origin")
    assert "step 300" in origin.text_content()
    assert frame.locator(".run-view[data-run='nan'] .heatmap canvas.heatmap-canvas").count() == 1


def test_heatmap_quantity_switch_to_dead_fraction(session):
    frame = session["frame"]
    view = ".run-view[data-run='spiky']"
    frame.select_option(f"{view} select.quantity", "dead_fraction")
    frame.wait_for_selector(f"{view} .heatmap[data-quantity='dead_fraction']")
    title = frame.locator(f"{view} .heatmap .chart-title").text_content()
    assert "per-layer dead_fraction" in title and "linear" in title


@contextlib.contextmanager
def selected(frame, run):
    """The run's checkbox ticked (its view shown) for the body, unticked after."""
    box = frame.locator(f".run-item[data-run='{run}'] input[type=checkbox]")
    box.check()
    try:
        yield
    finally:
        box.uncheck()


def test_a_variable_without_gradient_is_a_legended_zero_on_the_log_scale(session):
    frame = session["frame"]
    view = ".run-view[data-run='disconnected']"
    box = frame.locator(".run-item[data-run='disconnected'] input[type=checkbox]")
    assert not box.is_checked()  # only the most urgent runs are shown at first
    with selected(frame, "disconnected"):
        finding = frame.locator(".finding[data-run='disconnected']")
        assert finding.get_attribute("data-kind") == "update_ratio_low"
        assert "no gradient at all" in finding.text_content()
        heat = frame.locator(f"{view} .heatmap[data-quantity='grad_norm']")
        assert "log" in heat.locator(".chart-title").text_content()
        assert heat.locator(".legend .swatch-missing").count() == 1
        assert heat.locator(".legend").text_content().rstrip().endswith("0 or not recorded")
        # No zero in the spiky run's norms: no such legend entry there.
        spiky = frame.locator(".run-view[data-run='spiky'] .heatmap[data-quantity='grad_norm']")
        assert spiky.locator(".legend .swatch-missing").count() == 0


def test_an_ordinary_log_charts_the_loss_the_findings_read(session):
    frame = session["frame"]
    run = plugin_support.ORDINARY_RUN
    with selected(frame, run):
        frame.wait_for_selector(f".run-view[data-run='{run}'][data-loaded=true] .chart")
        tags = [tag for tag, _, _ in x_ranges(frame, run)]
        # `Loss/train`, not `Accuracy/train` (first by name) nor the test split's loss.
        assert tags[0] == "Loss/train", tags
        kinds = frame.eval_on_selector_all(f".finding[data-run='{run}']",
                                           "els => els.map(e => e.dataset.kind)")
        assert {"loss_spike", "overfitting"} <= set(kinds), kinds
        frame.click(f".finding[data-kind='loss_spike'][data-run='{run}']")
        frame.wait_for_function(
            f"() => document.querySelector(\".run-view[data-run='{run}'] .chart\").dataset.xMin !== '0'")
        lo, hi = x_ranges(frame, run)[0][1:]
        assert lo <= plugin_support.SPIKE_STEP <= hi


def test_an_early_blowup_is_marked_as_a_blowup_on_the_loss_chart(session):
    frame = session["frame"]
    run = plugin_support.BLOWUP_RUN
    badge = frame.locator(f".run-item[data-run='{run}'] .badge")
    assert badge.text_content().strip() == "warning"
    with selected(frame, run):
        chart = frame.wait_for_selector(f".run-view[data-run='{run}'][data-loaded=true] .chart")
        assert chart.get_attribute("data-tag") == "loss"
        markers = chart.get_attribute("data-markers").split(";")
        assert [m for m in markers if m.startswith("blow-up@1-")], markers
        assert not [m for m in markers if m.startswith("diverges@")], markers


def test_a_gan_charts_both_losses_and_marks_the_discriminator_winning(session):
    frame = session["frame"]
    run = plugin_support.GAN_RUN
    with selected(frame, run):
        frame.wait_for_selector(f".run-view[data-run='{run}'][data-loaded=true] .chart")
        charts = frame.eval_on_selector_all(
            f".run-view[data-run='{run}'] .chart",
            "els => els.map(e => [e.dataset.tag, e.querySelector('.chart-title').textContent,"
            " e.dataset.markers])")
        assert [tag for tag, _, _ in charts] == ["g_loss", "d_loss"], charts
        assert charts[0][1].startswith("generator loss") and charts[1][1].startswith(
            "discriminator loss"), charts
        finding = frame.locator(f".finding[data-kind='divergence'][data-run='{run}']")
        assert "discriminator won" in finding.text_content()
        markers = charts[0][2].split(";")
        assert [m for m in markers if m.startswith("diverges@")], markers


def test_a_run_with_nothing_to_check_says_so(session):
    item = session["frame"].locator(f".run-item[data-run='{plugin_support.UNCHECKED_RUN}']")
    assert item.locator(".badge").text_content().strip() == "no data"
    assert item.get_attribute("data-severity") == "unchecked"
    assert item.locator(".counts").text_content().strip() == "nothing to check"
    assert session["frame"].locator(".run-item[data-run='spiky'] .badge").text_content().strip() != "no data"


def test_hostile_run_name_is_inert_text(session):
    frame, events = session["frame"], session["events"]
    hostile = plugin_support.HOSTILE_RUN
    item = frame.locator(".run-item", has_text=hostile)
    assert item.count() == 1 and item.is_visible()
    item.locator("input[type=checkbox]").check()
    frame.wait_for_selector(".run-view[data-loaded=true] >> text=" + hostile)
    card = frame.locator(".finding", has_text=hostile)
    assert card.count() >= 1
    card.first.click()
    session["page"].wait_for_timeout(300)
    assert frame.locator("img").count() == 0
    assert frame.get_by_text(hostile, exact=True).first.is_visible()
    assert events["dialogs"] == []


def test_reader_warnings_are_listed_as_inert_text(session):
    frame, events = session["frame"], session["events"]
    details = frame.locator(".reader-warnings")
    assert details.count() == 1
    details.locator("summary").click()
    items = details.locator("li")
    assert items.count() >= 1
    texts = items.all_text_contents()
    assert any("events.out.tfevents.0.corrupt" in t and plugin_support.HOSTILE_RUN in t for t in texts), texts
    assert frame.locator("img").count() == 0
    assert frame.locator("script", has_text="alert").count() == 0
    assert events["dialogs"] == []


def test_run_filter(session):
    frame = session["frame"]
    frame.fill(".filter", "spik")
    assert frame.eval_on_selector_all(".run-item", "els => els.map(e => e.dataset.run)") == ["spiky"]
    frame.fill(".filter", "")
    assert frame.locator(".run-item").count() == 9


def test_theme_follows_tensorboard_dark_mode(session):
    page, frame = session["page"], session["frame"]
    page.evaluate("document.body.classList.add('dark-mode')")
    frame.wait_for_function("() => document.documentElement.dataset.theme === 'dark'")
    background = frame.evaluate("getComputedStyle(document.body).backgroundColor")
    page.evaluate("document.body.classList.remove('dark-mode')")
    frame.wait_for_function("() => document.documentElement.dataset.theme === 'light'")
    assert frame.evaluate("getComputedStyle(document.body).backgroundColor") != background
    # Charts are rebuilt for the new theme.
    frame.wait_for_selector(".run-view[data-run='spiky'][data-loaded=true] .chart")


def test_dark_by_default_under_dark_color_scheme(session):
    page = session["browser"].new_page(color_scheme="dark")
    try:
        frame = browser_support.open_panel(page, session["tb"].url)
        assert frame.evaluate("document.documentElement.dataset.theme") == "dark"
    finally:
        page.close()


def test_no_console_errors(session):
    errors = [(kind, text) for kind, text in session["events"]["console"] if kind in ("error", "pageerror")]
    assert errors == []
    assert session["events"]["dialogs"] == []
