"""How the `lsd` commands print a result for a reader (`--json` prints it for a program)."""

from __future__ import annotations


def si(value: float, unit: str) -> str:
    """`value` with an SI prefix: `si(1.5e9, "FLOP")` is "1.5 GFLOP"."""
    for factor, prefix in ((1e12, "T"), (1e9, "G"), (1e6, "M"), (1e3, "k")):
        if abs(value) >= factor:
            return f"{value / factor:.1f} {prefix}{unit}"
    return f"{value:.0f} {unit}"


def print_rows(rows: list[tuple[str, str]]) -> None:
    """Labels in a column as wide as the widest, each followed by its text."""
    width = max(len(label) for label, _ in rows)
    for label, text in rows:
        print(f"{label:<{width}}  {text}")
