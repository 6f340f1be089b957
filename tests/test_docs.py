"""The docs stay true to the code and to themselves: generated references current, links and anchors resolve."""

from __future__ import annotations

import re
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

ROOT = Path(__file__).resolve().parent.parent
PAGES = [ROOT / "README.md", ROOT / "CHANGELOG.md", *sorted((ROOT / "docs").glob("*.md"))]
RULES = ROOT / "monitoring" / "prometheus" / "rules.yml"

_FENCE = re.compile(r"^(```|~~~).*?^\1[^\n]*$", re.MULTILINE | re.DOTALL)
_CODE_SPAN = re.compile(r"`[^`\n]*`")
_LINK = re.compile(r"!?\[[^\]]*\]\(\s*<?([^)\s>]+)>?(?:\s+\"[^\"]*\")?\s*\)")
_HEADING = re.compile(r"^#{1,6}\s+(.+?)\s*#*\s*$", re.MULTILINE)


def _prose(text: str) -> str:
    """The text without fenced code blocks: what Markdown renders as links and headings."""
    return _FENCE.sub("", text)


def github_slug(heading: str) -> str:
    """The anchor GitHub gives a heading: lower case, punctuation dropped, spaces to hyphens."""
    text = re.sub(r"\[([^\]]*)\]\([^)]*\)", r"\1", heading)  # a link keeps its text
    text = text.replace("`", "").strip().lower()
    text = re.sub(r"[^\w\- ]", "", text)
    return text.replace(" ", "-")


def anchors(page: Path) -> set[str]:
    """Every heading's anchor on a page, with GitHub's -1, -2 suffixes for repeated headings."""
    seen: dict[str, int] = {}
    out = set()
    for heading in _HEADING.findall(_prose(page.read_text())):
        slug = github_slug(heading)
        count = seen.get(slug, 0)
        seen[slug] = count + 1
        out.add(slug if count == 0 else f"{slug}-{count}")
    return out


def links(page: Path) -> list[str]:
    """The link targets of a page, outside code."""
    return _LINK.findall(_CODE_SPAN.sub("", _prose(page.read_text())))


def _shown(path: Path) -> Path:
    return path.relative_to(ROOT) if path.is_relative_to(ROOT) else path


def _broken(page: Path) -> list[str]:
    broken = []
    for target in links(page):
        if re.match(r"[a-z][a-z0-9+.-]*:", target):  # http:, https:, mailto: are not ours to check here
            continue
        path, _, anchor = target.partition("#")
        resolved = (page.parent / path).resolve() if path else page
        if not resolved.exists():
            broken.append(f"{target}: {_shown(resolved)} does not exist")
        elif anchor and (resolved.suffix != ".md" or anchor not in anchors(resolved)):
            broken.append(f"{target}: no heading with the anchor #{anchor} in {_shown(resolved)}")
    return broken


def test_the_slug_rules_are_githubs() -> None:
    assert github_slug("What the reliability, versioning and drift work cost") == (
        "what-the-reliability-versioning-and-drift-work-cost"
    )
    assert github_slug("minikube / kind") == "minikube--kind"
    assert github_slug("`MnistInputDrift` (warning)") == "mnistinputdrift-warning"
    assert github_slug("Behind ingress-nginx (TLS)") == "behind-ingress-nginx-tls"


def test_a_broken_link_is_found(tmp_path: Path) -> None:
    page = tmp_path / "page.md"
    page.write_text("# Title\n\n[ok](#title) [gone](#nothing) [file](missing.md) `[code](x.md)`\n")
    assert [problem.split(":")[0] for problem in _broken(page)] == ["#nothing", "missing.md"]


@pytest.mark.parametrize("page", PAGES, ids=lambda page: str(page.relative_to(ROOT)))
def test_every_relative_link_and_anchor_resolves(page: Path) -> None:
    assert page.exists()
    assert not _broken(page), f"{page.relative_to(ROOT)}: " + "; ".join(_broken(page))


def test_every_page_is_reachable_from_the_readme() -> None:
    reached, todo = set(), [ROOT / "README.md"]
    while todo:
        page = todo.pop()
        if page in reached:
            continue
        reached.add(page)
        for target in links(page):
            path = target.partition("#")[0]
            if path.endswith(".md") and not re.match(r"[a-z]+:", path):
                todo.append((page.parent / path).resolve())
    assert not set(PAGES) - reached, f"pages no link leads to: {sorted(str(p) for p in set(PAGES) - reached)}"


def test_the_readme_is_a_short_front_door() -> None:
    lines = (ROOT / "README.md").read_text().splitlines()
    assert len(lines) <= 200, f"README.md has {len(lines)} lines: move reference material into docs/"


def test_generated_references_match_the_code() -> None:
    result = subprocess.run(
        [sys.executable, str(ROOT / "scripts" / "gen_docs.py"), "--check"],
        cwd=ROOT, capture_output=True, text=True, timeout=120, check=False,
    )
    assert result.returncode == 0, (
        "docs/configuration.md or docs/metrics.md no longer match mnist_service/settings.py or "
        f"mnist_service/metrics.py: run `make docs` and commit the result\n{result.stdout}{result.stderr}"
    )


def test_every_alert_links_its_runbook_entry() -> None:
    operations = ROOT / "docs" / "operations.md"
    groups = yaml.safe_load(RULES.read_text())["groups"]
    alerts = [rule for group in groups for rule in group["rules"] if "alert" in rule]
    assert alerts
    for rule in alerts:
        url = rule["annotations"].get("runbook_url", "")
        assert url == f"docs/operations.md#{rule['alert'].lower()}", f"{rule['alert']}: runbook_url is {url!r}"
        assert url.partition("#")[2] in anchors(operations), f"{rule['alert']}: no runbook entry in {operations}"
