"""The report: valid HTML, images embedded, a verdict for every claim, built from the
results directory alone."""

from __future__ import annotations

import base64
import re
import shutil
from html.parser import HTMLParser
from pathlib import Path

import pytest

from batchnorm.lab import report
from batchnorm.lab.experiments import REGISTRY
from batchnorm.lab.experiments.base import VERDICTS

VOID = {"meta", "img", "br", "hr", "link", "input"}


class Page(HTMLParser):
    """Collects images, scorecard rows and checks that tags nest."""

    def __init__(self) -> None:
        super().__init__()
        self.stack: list[str] = []
        self.images: list[str] = []
        self.verdict_cells: list[str] = []
        self.ids: list[str] = []
        self.links: list[str] = []
        self._in_verdict = False

    def handle_starttag(self, tag: str, attrs: list[tuple[str, str | None]]) -> None:
        a = dict(attrs)
        if tag == "img":
            self.images.append(a.get("src") or "")
        if tag == "a" and a.get("href", "").startswith("#"):
            self.links.append(a["href"][1:])
        if a.get("id"):
            self.ids.append(a["id"])
        if tag == "td" and "verdict" in (a.get("class") or ""):
            self._in_verdict = True
            self.verdict_cells.append("")
        if tag not in VOID:
            self.stack.append(tag)

    def handle_endtag(self, tag: str) -> None:
        assert self.stack and self.stack[-1] == tag, f"</{tag}> closes <{self.stack[-1:]}>"
        self.stack.pop()
        if tag == "td":
            self._in_verdict = False

    def handle_data(self, data: str) -> None:
        if self._in_verdict:
            self.verdict_cells[-1] += data


def parse(path: Path) -> Page:
    page = Page()
    page.feed(path.read_text(encoding="utf-8"))
    page.close()
    assert page.stack == [], f"unclosed tags: {page.stack}"
    return page


@pytest.fixture(scope="module")
def rebuilt(tiny_results: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The results copied elsewhere (nothing but the saved files) and the report rebuilt."""
    copy = tmp_path_factory.mktemp("copy") / "results"
    shutil.copytree(tiny_results, copy)
    (copy / report.REPORT_FILE).unlink(missing_ok=True)
    return report.build(copy)


def test_report_is_valid_html_with_embedded_pngs(rebuilt: Path) -> None:
    page = parse(rebuilt)
    assert page.images, "no images"
    for src in page.images:
        assert src.startswith("data:image/png;base64,")
        assert base64.b64decode(src.split(",", 1)[1]).startswith(b"\x89PNG\r\n\x1a\n")
    assert set(page.links) <= set(page.ids)


def test_every_claim_has_a_verdict(rebuilt: Path) -> None:
    page = parse(rebuilt)
    assert page.verdict_cells and all(v.strip() in VERDICTS for v in page.verdict_cells)
    text = rebuilt.read_text()
    assert "Scorecard" in text and "The verdict rule" in text
    for exp in REGISTRY.values():
        assert f'id="exp-{exp.name}"' in text
        assert "Criterion." in text


def test_report_output_option_and_missing_dir(tiny_results: Path, tmp_path: Path) -> None:
    out = report.build(tiny_results, tmp_path / "r.html")
    assert out == tmp_path / "r.html" and out.stat().st_size > 1000
    with pytest.raises(FileNotFoundError):
        report.build(tmp_path / "empty")


def test_damaged_results_give_a_clear_error_or_a_partial_report(
    tiny_results: Path, tmp_path: Path
) -> None:
    import json

    copy = tmp_path / "results"
    shutil.copytree(tiny_results, copy)
    result = copy / "fig1" / "result.json"
    record = json.loads(result.read_text())
    for content, match in (("null", "a JSON NoneType, not an object"),
                           (b"\xff\xfe", "not valid JSON"),
                           ('{"experiment": "fig1", "config": {}, "runs": [1]}',
                            "'runs' is not a list of objects")):
        if isinstance(content, bytes):
            result.write_bytes(content)
        else:
            result.write_text(content)
        with pytest.raises(ValueError, match=match):
            report.build(copy)
    # Runs without fields a later version added: that section says so, the rest renders.
    for run in record["runs"]:
        del run["wall_s"], run["outcome"]
    result.write_text(json.dumps(record))
    text = report.build(copy).read_text()
    assert "runs table failed" in text and 'id="exp-speedup"' in text


def test_checks_are_marked_and_counted(rebuilt: Path) -> None:
    """A property that holds by construction (placement's zero bias gradient) is shown
    as a check, not counted as evidence without saying so."""
    from batchnorm.lab.experiments.base import CHECK_RULE

    text = rebuilt.read_text()
    assert "check: A bias in front of BN gets no gradient" in text
    assert re.search(r"\d+ verdicts \(\d+ of them checks, rows that verify an identity\):", text)
    assert CHECK_RULE.split(":")[0] in text.replace("&#x27;", "'")
