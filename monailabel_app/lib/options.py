"""Request options: a per-task allow-list of names, each with its type and range.

Every option a client sends to a task (``POST /train/{model}`` body, ``POST /infer/{model}`` ``params``,
``POST /scoring/{method}`` and ``POST /activelearning/{strategy}`` bodies) is checked here before anything uses
it. Training options become overrides of the bundle's config, which MONAI parses: a string starting with ``$`` is
evaluated as Python, ``@`` and ``%`` are resolved as references and macros, and a dict with ``_target_`` (or any
``_..._`` key) is instantiated. So a request value must never reach it unchecked (issue: ``tracking_uri`` =
``$__import__('os').system(...)`` ran code in the training process). Rules:

* an option not in the task's list is a 422 that lists the allowed ones;
* a value of the wrong type or out of range is a 422 that says what is allowed;
* a string that MONAI would evaluate or resolve, or a dict key starting with ``_``, is a 422 wherever it sits
  (also inside lists and dicts), whatever the option.
"""

from __future__ import annotations

import math
import re
from dataclasses import dataclass
from typing import Any, Dict, Iterable, Mapping, Optional, Sequence, Tuple

from .errors import BadInput

EXPRESSION_PREFIXES = ("$", "@", "%")
MAX_STRING = 256  # longer strings are refused: no option needs more
MAX_ITEMS = 10000  # list items (clicks, label_info) in one option


@dataclass(frozen=True)
class Opt:
    """One allowed option.

    Args:
        kind: ``bool``, ``int``, ``float``, ``str``, ``list`` or ``dict`` (``int`` also takes integral floats,
            ``float`` takes ints; ``bool`` takes ``true``/``false`` strings as some clients send them).
        low, high: inclusive range for numbers.
        choices: allowed values (for ``str`` and numbers).
        pattern: a regular expression a ``str`` must match whole.
        doc: what it does, shown in the 422 listing.
    """

    kind: type
    low: Optional[float] = None
    high: Optional[float] = None
    choices: Optional[Tuple[Any, ...]] = None
    pattern: Optional[str] = None
    nullable: bool = False
    doc: str = ""

    def describe(self) -> str:
        if self.choices is not None:
            return f"one of {list(self.choices)}"
        if self.low is not None or self.high is not None:
            return f"{self.kind.__name__} in [{self.low}, {self.high}]"
        return self.kind.__name__

    def check(self, name: str, value: Any) -> Any:
        """The value, converted to ``kind``; a 422 when it does not fit."""
        bad = BadInput(f"Option '{name}' must be {self.describe()}, got {_short(value)}.")
        if value is None and self.nullable:
            return None
        if self.kind is bool:
            if isinstance(value, bool):
                return value
            if isinstance(value, str) and value.lower() in ("true", "false"):
                return value.lower() == "true"
            raise bad
        if self.kind in (int, float):
            if isinstance(value, bool) or not isinstance(value, (int, float)):
                raise bad
            if not math.isfinite(value):
                raise bad
            if self.kind is int:
                if value != int(value):
                    raise bad
                value = int(value)
            else:
                value = float(value)
            if (self.low is not None and value < self.low) or (self.high is not None and value > self.high):
                raise bad
        elif self.kind is str:
            if not isinstance(value, str) or len(value) > MAX_STRING:
                raise bad
            if self.pattern is not None and not re.fullmatch(self.pattern, value):
                raise bad
        elif self.kind is list:
            if not isinstance(value, (list, tuple)) or len(value) > MAX_ITEMS:
                raise bad
            value = list(value)
        elif self.kind is dict:
            if not isinstance(value, dict):
                raise bad
        if self.choices is not None and value not in self.choices:
            raise bad
        return value


def _short(value: Any, limit: int = 80) -> str:
    text = repr(value)
    return text if len(text) <= limit else text[: limit - 3] + "..."


def find_expression(value: Any, where: str) -> Optional[str]:
    """Where in ``value`` a string MONAI's config parser would evaluate or resolve sits (None if nowhere)."""
    if isinstance(value, str):
        if value.lstrip().startswith(EXPRESSION_PREFIXES):
            return where
        return None
    if isinstance(value, Mapping):
        for k, v in value.items():
            if str(k).startswith("_") or str(k).lstrip().startswith(EXPRESSION_PREFIXES):
                return f"{where}.{k}"
            found = find_expression(v, f"{where}.{k}")
            if found:
                return found
    elif isinstance(value, (list, tuple)):
        for i, v in enumerate(value):
            found = find_expression(v, f"{where}[{i}]")
            if found:
                return found
    return None


def check_options(
    what: str,
    options: Optional[Mapping[str, Any]],
    allowed: Mapping[str, Opt],
    server_keys: Iterable[str] = (),
) -> Dict[str, Any]:
    """Check a request's options against ``allowed``; return them converted. ``server_keys`` are keys the server
    itself adds (``model``, ``bundle_path``, ...): accepted as they are, but still never an expression."""
    if options is None:
        return {}
    if not isinstance(options, Mapping):
        raise BadInput(f"The {what} options must be a JSON object, got {_short(options)}.")
    server_keys = set(server_keys)
    try:
        found = find_expression(dict(options), "")  # first, anywhere in the request: the answer names the danger
    except RecursionError:
        raise BadInput(f"The {what} options are nested too deep.") from None
    if found:
        raise BadInput(
            f"Option '{found.lstrip('.')}' of {what} holds a string MONAI would evaluate or resolve ('$', '@', '%', "
            f"'_...' keys): request values are data, never code."
        )
    checked: Dict[str, Any] = {}
    for name, value in options.items():
        if name in server_keys:
            checked[name] = value
            continue
        opt = allowed.get(name)
        if opt is None:
            raise BadInput(f"Unknown option '{str(name)[:40]}' for {what}. Allowed options: {describe(allowed)}.")
        checked[name] = opt.check(name, value)
    return checked


def describe(allowed: Mapping[str, Opt]) -> str:
    return ", ".join(f"{k} ({o.describe()})" for k, o in sorted(allowed.items())) or "none"


def options_like(config: Mapping[str, Any]) -> Dict[str, Opt]:
    """Options typed after a task's displayed config (what Slicer shows and sends back): a list value is a choice
    among its items (Slicer sends the first), a bool/int/float/str value allows that type."""
    out: Dict[str, Opt] = {}
    for k, v in config.items():
        if isinstance(v, (list, tuple)):
            out[k] = Opt(type(v[0]) if v else str, choices=tuple(v))
        elif isinstance(v, bool):
            out[k] = Opt(bool)
        elif isinstance(v, (int, float)):
            out[k] = Opt(float if isinstance(v, float) else int)
        elif isinstance(v, str):
            out[k] = Opt(str, pattern=r"[\w .,:/+-]*")
        elif isinstance(v, dict):
            out[k] = Opt(dict)
    return out


# options every client may send to any task
CLIENT_ID = Opt(str, pattern=r"[\w .:@+-]{0,128}", nullable=True, doc="who asks (MONAI Label's client adds it)")
COMMON: Dict[str, Opt] = {"client_id": CLIENT_ID}


def devices(names: Sequence[str]) -> Opt:
    return Opt(str, choices=tuple(names), doc="device to run on")
