"""Attributes set on instances (never on their classes) and restored later.

The callback wraps ``optimizer.apply``, ``model.compute_loss`` and friends,
the probes wrap layers' activations, and the update capture wraps the
optimizer's ``assign_add``/``assign_sub`` during one trace. Each sets the
attribute on the instance only (other models and optimizers are untouched)
and must later put back exactly what was there: the instance's own value, or
no instance attribute at all.
"""

from __future__ import annotations

from typing import Any, Callable, Optional


class InstancePatches:
    """Instance attributes replaced so far, restorable in reverse order."""

    def __init__(self):
        self._saved: list = []  # (obj, name, had an instance attribute, its old value)

    def __bool__(self) -> bool:
        return bool(self._saved)

    def set(self, obj: Any, name: str, value: Any) -> None:
        """Sets ``obj.name = value`` on the instance, remembering what was there."""
        had = name in vars(obj)
        self._saved.append((obj, name, had, vars(obj).get(name)))
        object.__setattr__(obj, name, value)

    def restore(self, on_error: Optional[Callable[[Exception, str], None]] = None) -> None:
        """Puts every attribute back, last set first, and forgets them.

        Args:
          on_error: Called with ``(error, name)`` when one attribute cannot be
            restored (the others still are); without it the error is raised
            after the rest were restored.
        """
        saved, self._saved = self._saved, []
        failure = None
        for obj, name, had, old in reversed(saved):
            try:
                if had:
                    object.__setattr__(obj, name, old)
                else:
                    object.__delattr__(obj, name)
            except Exception as error:  # noqa: BLE001
                if on_error is None:
                    failure = failure or error
                else:
                    on_error(error, name)
        if failure is not None:
            raise failure
