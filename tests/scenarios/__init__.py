"""Seeded Keras programs reproducing the failure modes of the seed articles.

Each `Scenario` trains a small model twice over: the broken program as the
article describes it, and its fixed twin (the article's fix applied). The
scenario matrix test, `benchmarks/detection.py` and `make demo` all use this
registry.
"""

from tests.scenarios.registry import SCENARIOS, Scenario, run_scenario

__all__ = ["SCENARIOS", "Scenario", "run_scenario"]
