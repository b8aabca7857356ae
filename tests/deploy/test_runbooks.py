"""docs/runbooks: every alert of the rules has a page, linked from its runbook_url, and every
page is an alert's; each page says what the alert means, what to look at, how to fix it."""

from __future__ import annotations

import yaml

from .conftest import ROOT, RULES

RUNBOOKS = ROOT / "docs" / "runbooks"
SECTIONS = ("## What it means", "## What to look at", "## How to fix")


def alerts() -> list[dict[str, object]]:
    doc = yaml.safe_load(RULES.read_text())
    return [r for g in doc["groups"] for r in g["rules"] if "alert" in r]


def test_every_alert_links_its_runbook_page() -> None:
    found = alerts()
    assert len({a["alert"] for a in found}) >= 12
    for alert in found:
        name = alert["alert"]
        annotations = alert["annotations"]
        assert isinstance(annotations, dict)
        assert annotations["runbook_url"] == f"docs/runbooks/{name}.md", name
        page = ROOT / annotations["runbook_url"]
        assert page.is_file(), f"{name}: no runbook at {page}"
        text = page.read_text()
        assert text.startswith(f"# {name}\n"), name
        for section in SECTIONS:
            assert section in text, (name, section)


def test_every_runbook_page_is_an_alerts_and_listed() -> None:
    names = {str(a["alert"]) for a in alerts()}
    pages = {p.stem for p in RUNBOOKS.glob("*.md")} - {"README"}
    assert pages == names
    index = (RUNBOOKS / "README.md").read_text()
    for name in names:
        assert f"[{name}.md]({name}.md)" in index, name
