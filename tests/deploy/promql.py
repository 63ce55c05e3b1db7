"""What the shipped PromQL refers to: metric names in expressions, and the names an exporter
really exposes (from its text exposition)."""

from __future__ import annotations

import re
from collections.abc import Iterable

from prometheus_client.parser import text_string_to_metric_families

_KEYWORDS = frozenset(
    {
        "and",
        "or",
        "unless",
        "by",
        "without",
        "on",
        "ignoring",
        "group_left",
        "group_right",
        "offset",
        "bool",
        "inf",
        "nan",
        "atan2",
    }
)
_STRING = re.compile(r'"(?:[^"\\]|\\.)*"' + r"|'(?:[^'\\]|\\.)*'")
_MATCHERS = re.compile(r"\{[^}]*\}")
_RANGES = re.compile(r"\[[^\]]*\]")
_GROUPING = re.compile(r"\b(?:by|without|on|ignoring|group_left|group_right)\s*\([^)]*\)")
_IDENTIFIER = re.compile(r"(?<![\w.$])[A-Za-z_:][A-Za-z0-9_:]*")
_SUFFIXES = {
    "counter": ("_total", "_created"),
    "histogram": ("_bucket", "_sum", "_count", "_created"),
    "summary": ("", "_sum", "_count", "_created"),
    "gaugehistogram": ("_bucket", "_gsum", "_gcount"),
    "info": ("_info",),
}


def metric_names(expression: str) -> set[str]:
    """The metric (and recording rule) names a PromQL expression selects."""
    text = _STRING.sub('""', expression)
    text = _MATCHERS.sub(" ", text)
    text = _RANGES.sub(" ", text)
    text = _GROUPING.sub(" ", text)
    names = set()
    for match in _IDENTIFIER.finditer(text):
        word = match.group()
        if word.lower() in _KEYWORDS or text[match.end() :].lstrip().startswith("("):
            continue  # a keyword or a function call
        names.add(word)
    return names


def exposed_names(exposition: str) -> set[str]:
    """Every series name a query may use against this text exposition, including the
    families that are declared but have no samples yet (GPU gauges on a machine without one)."""
    names: set[str] = set()
    for family in text_string_to_metric_families(exposition):
        names.update(sample.name for sample in family.samples)
        names.update(family.name + suffix for suffix in _SUFFIXES.get(family.type, ("",)))
    return names


def grafana_queries(dashboard: dict[str, object]) -> Iterable[tuple[str, str]]:
    """``(where, expression)`` for every query of the dashboard's panels and variables."""

    def panels(items: object) -> Iterable[dict[str, object]]:
        for panel in items if isinstance(items, list) else []:
            yield panel
            yield from panels(panel.get("panels"))

    for panel in panels(dashboard.get("panels")):
        for target in panel.get("targets", []) or []:  # type: ignore[attr-defined]
            yield f"panel {panel.get('title')!r} {target.get('refId')}", target["expr"]
    templating = dashboard.get("templating", {})
    for variable in templating.get("list", []):  # type: ignore[attr-defined]
        query = variable.get("query")
        if isinstance(query, dict):
            query = query.get("query")
        if variable.get("type") == "query" and isinstance(query, str):
            label_values = re.fullmatch(r"\s*label_values\((.*),\s*\w+\)\s*", query)
            yield f"variable {variable['name']!r}", label_values[1] if label_values else query


def without_grafana_variables(expression: str) -> str:
    """The expression as Prometheus sees it once Grafana has filled in its variables."""
    expression = re.sub(r"\$__(?:rate_interval|interval|range)\b", "1m", expression)
    return re.sub(r"\$\{?\w+\}?", ".*", expression)
