"""The one list of methods (classifier heads and their variants), with labels and colours.

A *head* is one of the three classes of :mod:`guided_nc.heads` (the paper's three methods). A
*method* is a head with fixed options, so that a comparison can put variants side by side:
the fixed ETF with a Haar-random rotation (paper appendix C) and the implicit ETF without the
DDN gradient (paper section 5, Table 3). Experiments, benchmarks and reports name methods only
through this module.

>>> [METHOD_VARIANTS[name].label for name in METHODS]
['Standard', 'Fixed ETF', 'Implicit ETF']
>>> METHOD_VARIANTS["implicit-no-ddn"].head_options()
{'ddn_grad': False}
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from guided_nc.catalog import did_you_mean, unknown_name

__all__ = [
    "HEAD_NAMES",
    "METHODS",
    "METHOD_VARIANTS",
    "TIMED_METHODS",
    "Method",
    "method_color",
    "method_label",
    "method_variant",
    "parse_methods",
]

#: The three heads of :mod:`guided_nc.heads`, in plotting order.
HEAD_NAMES = ("standard", "fixed", "implicit")


@dataclass(frozen=True)
class Method:
    """A head with fixed options.

    Attributes:
        name: the method's name on the command line and in run folders.
        head: one of :data:`HEAD_NAMES`.
        label: name in tables and legends.
        color: matplotlib colour of its lines and bands.
        options: constructor options of the head, as ``(name, value)`` pairs.
    """

    name: str
    head: str
    label: str
    color: str
    options: tuple[tuple[str, Any], ...] = ()

    def head_options(self) -> dict[str, Any]:
        """The head's constructor options as a dict."""
        return dict(self.options)


#: Every method, in plotting order.
METHOD_VARIANTS: dict[str, Method] = {
    method.name: method
    for method in (
        Method("standard", "standard", "Standard", "C0"),
        Method("fixed", "fixed", "Fixed ETF", "C1"),
        Method("fixed-haar", "fixed", "Fixed ETF (Haar)", "C4", (("rotation", "haar"),)),
        Method("implicit", "implicit", "Implicit ETF", "C2"),
        Method(
            "implicit-no-ddn",
            "implicit",
            "Implicit ETF, no DDN gradient",
            "C3",
            (("ddn_grad", False),),
        ),
    )
}

#: The paper's three methods: the default of every comparison.
METHODS = HEAD_NAMES

#: What the step timers measure by default (paper Table 3: the implicit head with and without
#: the DDN gradient; the Haar-rotated fixed head, which costs what the canonical one does).
TIMED_METHODS = ("standard", "fixed", "fixed-haar", "implicit", "implicit-no-ddn")


def method_label(name: str) -> str:
    """The table and legend label of a method (the name itself if unknown)."""
    method = METHOD_VARIANTS.get(name)
    return name if method is None else method.label


def method_color(name: str) -> str | None:
    """The colour of a method (None if unknown: the plot picks one)."""
    method = METHOD_VARIANTS.get(name)
    return None if method is None else method.color


def method_variant(name: str) -> Method:
    """The :class:`Method` called ``name``; ValueError naming the closest valid names if none.

    >>> method_variant("implicit-no-ddn").head
    'implicit'
    """
    if name not in METHOD_VARIANTS:
        raise ValueError(unknown_name("method", name, METHOD_VARIANTS, _ALIASES))
    return METHOD_VARIANTS[name]


#: The paper's names of the three heads ("Fixed ETF"), so that "etf" points at both ETF heads.
_ALIASES = {METHOD_VARIANTS[name].label: name for name in HEAD_NAMES}


def parse_methods(text: str | tuple[str, ...] | list[str]) -> tuple[str, ...]:
    """``"standard,implicit"`` (or a sequence) -> a tuple of known, distinct method names.

    Raises ValueError naming the unknown entries and the valid ones.
    """
    items = text.split(",") if isinstance(text, str) else list(text)
    names = tuple(item.strip() for item in items if item.strip())
    unknown = [name for name in names if name not in METHOD_VARIANTS]
    if unknown or not names:
        hints = "".join(
            f" ({name!r}: {hint})"
            for name in unknown
            if (hint := did_you_mean(name, METHOD_VARIANTS, _ALIASES))
        )
        raise ValueError(
            f"methods={','.join(names)!r} contains unknown {unknown}{hints}; use a "
            f"comma-separated subset of {','.join(METHOD_VARIANTS)}"
        )
    if len(set(names)) != len(names):
        raise ValueError(f"methods={','.join(names)!r} lists a method twice")
    return names
