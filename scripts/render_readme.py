"""Re-render the README's result tables from the committed CSVs (`pruning_utils/report.py`).

Run from the repository root after `bash run_all.sh`: `python3 -m scripts.render_readme` (`--check`: exit 1 and
name the tables that disagree, changing nothing).
"""
import argparse
import sys

from pruning_utils.report import marked_tables, readme_path, render_readme


def main(argv: list[str] | None = None) -> int:
    """Rewrite README.md (or only compare it, with --check); returns the exit code."""
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("--check", action="store_true", help="only report the tables that differ from the CSVs")
    args = ap.parse_args(argv)
    path = readme_path()
    text = path.read_text()
    new = render_readme(text)
    stale = [n for n, body in marked_tables(new).items() if marked_tables(text).get(n) != body]
    if args.check:
        print("README tables agree with the CSVs" if not stale else f"stale README tables: {', '.join(stale)}")
        return 1 if stale else 0
    path.write_text(new)
    print(f"rendered {len(marked_tables(new))} tables into {path}" + (f" (changed: {', '.join(stale)})" if stale else ""))
    return 0


if __name__ == "__main__":
    sys.exit(main())
