"""Methods replaced on live Keras objects (an optimizer's ``apply``, a model's ``train_step``) and put back.

Every backend's capture wraps a few methods of the user's own optimizer and model instead of subclassing them, so a
compiled model keeps working; what was there before (an instance attribute, or nothing: the class's method) is
restored exactly when the callback lets go.
"""

from __future__ import annotations

from typing import Any

_MISSING = object()


class Patches:
    """The attributes set on objects, most recent last, with what each replaced."""

    def __init__(self) -> None:
        self._restore: list[tuple[Any, str, Any]] = []

    def set(self, obj: Any, name: str, value: Any) -> None:
        """Set ``obj.name`` to ``value``, remembering the instance attribute it shadows (if any)."""
        self._restore.append((obj, name, vars(obj).get(name, _MISSING)))
        setattr(obj, name, value)

    def restore(self) -> None:
        """Undo every :meth:`set`, newest first."""
        while self._restore:
            obj, name, previous = self._restore.pop()
            if previous is _MISSING:
                vars(obj).pop(name, None)
            else:
                setattr(obj, name, previous)
