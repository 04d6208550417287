"""The README's result tables are the committed CSVs, rendered: a table edited by hand or left stale fails here."""
import pytest

from scripts import render_readme as report


@pytest.fixture(scope="module")
def readme() -> str:
    return report.readme_path().read_text()


def test_readme_marks_every_table(readme):
    assert set(report.marked_tables(readme)) == set(report.TABLES)


def test_readme_tables_agree_with_csvs(readme):
    rendered = report.marked_tables(report.render_readme(readme))
    stale = [name for name, body in report.marked_tables(readme).items()
             if name not in report.TIMING_TABLES and body != rendered[name]]
    assert not stale, f"README tables {stale} differ from the CSVs: run `python3 -m scripts.render_readme`"


def test_timing_tables_have_the_csv_rows(readme):
    # timings change from run to run, but the rows (variants, stages) must be the CSV's
    rendered = report.marked_tables(report.render_readme(readme))
    for name in report.TIMING_TABLES:
        first_col = lambda body: [line.split("|")[1].strip() for line in body.splitlines()[2:]]  # noqa: E731
        assert first_col(report.marked_tables(readme)[name]) == first_col(rendered[name]), name


def test_unknown_marker_is_refused():
    with pytest.raises(KeyError, match="unknown table 'nope'"):
        report.render_readme("<!-- table:nope -->\nx\n<!-- /table:nope -->")
