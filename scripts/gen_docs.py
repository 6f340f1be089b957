"""Write the reference tables that mirror code: settings into docs/configuration.md, metrics into docs/metrics.md.

    python scripts/gen_docs.py          # rewrite them (`make docs`)
    python scripts/gen_docs.py --check  # exit 1 when a page and the code disagree (tests/test_docs.py, `make lint`)

Only the text between a page's `<!-- BEGIN GENERATED: name -->` and `<!-- END GENERATED: name -->` lines is
written; the rest of the page is prose kept by hand. The settings come from the fields of
`mnist_service.settings.Settings` (type, constraints, default, description); the metrics from the
registries of `mnist_service.metrics.Metrics` (every worker) and `SupervisorMetrics` (the supervisor).

prometheus_client has no public call that gives a metric's label names or bucket bounds before it has
samples, so this reads two private attributes of each metric object, `_labelnames` and `_upper_bounds`
(prometheus-client is pinned in requirements.txt).
"""

from __future__ import annotations

import argparse
import json
import re
import sys
import types
import typing
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from prometheus_client.metrics import MetricWrapperBase  # noqa: E402
from pydantic import SecretStr  # noqa: E402
from pydantic.fields import FieldInfo  # noqa: E402

from mnist_service.metrics import Metrics, SupervisorMetrics  # noqa: E402
from mnist_service.settings import Settings  # noqa: E402

CONFIGURATION = ROOT / "docs" / "configuration.md"
METRICS = ROOT / "docs" / "metrics.md"
_SUFFIXES = {"counter": ("_total",), "gauge": ("",), "histogram": ("_bucket", "_sum", "_count")}


def _cell(text: str) -> str:
    """Text safe inside a Markdown table cell: no pipes, no line breaks, no HTML tags."""
    return " ".join(text.split()).replace("|", "\\|").replace("<", "&lt;").replace(">", "&gt;")


def _type_name(annotation: Any) -> str:
    origin = typing.get_origin(annotation)
    if origin is typing.Literal:
        return " \\| ".join(f"`{value}`" for value in typing.get_args(annotation))
    if origin in (typing.Union, types.UnionType):
        names = [_type_name(arg) for arg in typing.get_args(annotation) if arg is not type(None)]
        return " \\| ".join(names)
    if origin is list:
        (item,) = typing.get_args(annotation)
        return f"JSON list of {_type_name(item)}"
    if annotation is SecretStr:
        return "secret"
    if annotation is Path:
        return "path"
    return annotation.__name__


def _constraints(field: FieldInfo) -> list[str]:
    out = []
    for item in field.metadata:
        for attribute, symbol in (("gt", ">"), ("ge", "≥"), ("lt", "<"), ("le", "≤")):
            if getattr(item, attribute, None) is not None:
                out.append(f"{symbol} {getattr(item, attribute):g}")
        if getattr(item, "pattern", None) is not None:
            out.append(f"matches `{item.pattern}`")
    return out


def _default(field: FieldInfo) -> str:
    factory = field.default_factory
    if factory is not None and factory.__module__ == Settings.__module__:
        return "depends on the machine (see meaning)"  # a function of the settings module, such as RUNTIME's
    value = field.get_default(call_default_factory=True)
    if value is None:
        return "unset"
    if isinstance(value, float):
        return f"`{value:g}`"
    if isinstance(value, list):
        return f"`{json.dumps(value)}`"
    return f"`{value}`"


def settings_table() -> str:
    """One row per Settings field: its environment variable, type, default and description."""
    prefix = Settings.model_config.get("env_prefix") or ""
    rows = ["| variable | type | default | meaning |", "|---|---|---|---|"]
    for name, field in Settings.model_fields.items():
        kind = ", ".join([_type_name(field.annotation), *_constraints(field)])
        description = _cell(field.description or "")
        rows.append(f"| `{(prefix + name).upper()}` | {kind} | {_default(field)} | {description} |")
    return "\n".join(rows)


def _metrics_of(holder: object) -> Iterator[MetricWrapperBase]:
    """The metric objects an instance holds, directly or in a dict, in the order they were made."""
    for value in vars(holder).values():
        if isinstance(value, MetricWrapperBase):
            yield value
        elif isinstance(value, dict):
            yield from (item for item in value.values() if isinstance(item, MetricWrapperBase))


def _metric_rows(metrics: list[MetricWrapperBase]) -> list[str]:
    rows = ["| metric | type | labels | help |", "|---|---|---|---|"]
    for metric in metrics:
        (family,) = metric.describe()
        first, *rest = _SUFFIXES[family.type]
        names = ", ".join([f"`{family.name}{first}`", *(f"`{suffix}`" for suffix in rest)])
        labels = ", ".join(f"`{label}`" for label in metric._labelnames) or "none"
        rows.append(f"| {names} | {family.type} | {labels} | {_cell(family.documentation)} |")
    return rows


def metrics_tables() -> str:
    """The metrics of a worker and of the supervisor, and the bucket bounds of every histogram."""
    worker, supervisor = list(_metrics_of(Metrics())), list(_metrics_of(SupervisorMetrics()))
    lines = ["### Every worker (`Metrics`)", "", *_metric_rows(worker), ""]
    lines += ["### The supervisor (`SupervisorMetrics`)", "", *_metric_rows(supervisor), ""]
    lines += ["### Histogram buckets", "", "| histogram | upper bounds (`le`) |", "|---|---|"]
    for metric in worker + supervisor:
        (family,) = metric.describe()
        if family.type == "histogram":
            bounds = ", ".join(f"{bound:g}" for bound in metric._upper_bounds)
            lines.append(f"| `{family.name}` | {bounds} |")
    return "\n".join(lines)


PAGES: dict[Path, dict[str, Callable[[], str]]] = {
    CONFIGURATION: {"settings": settings_table},
    METRICS: {"metrics": metrics_tables},
}


def render(text: str, name: str, body: str) -> str:
    """`text` with the part between its markers for `name` replaced by `body`."""
    pattern = re.compile(
        rf"(<!-- BEGIN GENERATED: {name} [^\n]*-->\n).*?(<!-- END GENERATED: {name} -->)", re.DOTALL
    )
    if not pattern.search(text):
        raise SystemExit(f"no '<!-- BEGIN GENERATED: {name} ... -->' / '<!-- END GENERATED: {name} -->' lines")
    return pattern.sub(lambda match: match.group(1) + body + "\n" + match.group(2), text)


def generated(page: Path) -> str:
    """The page as the code says it should read."""
    text = page.read_text()
    for name, make in PAGES[page].items():
        text = render(text, name, make())
    return text


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--check", action="store_true", help="only report pages that differ from the code")
    args = parser.parse_args(argv)
    stale = []
    for page in PAGES:
        text = generated(page)
        if text == page.read_text():
            continue
        if args.check:
            stale.append(page.relative_to(ROOT))
        else:
            page.write_text(text)
            print(f"wrote {page.relative_to(ROOT)}")
    if stale:
        names = ", ".join(str(page) for page in stale)
        print(f"{names} out of date with mnist_service/settings.py or mnist_service/metrics.py: run `make docs`")
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
