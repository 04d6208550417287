"""Reading the user's data files (CSV, JSONL, text) so that a bad one is refused naming the file, the line and what
to do: the encoding is checked first (UTF-8, with or without a byte-order mark; a UTF-16 or UTF-32 file is recognised
by its mark and named as such), JSONL is parsed line by line (blank lines counted), CSV parse errors carry the file.
"""
from __future__ import annotations

import codecs
import io
import json
from pathlib import Path

# longest first: the UTF-32 little-endian mark begins with the UTF-16 one
_BOMS = ((codecs.BOM_UTF32_LE, "UTF-32"), (codecs.BOM_UTF32_BE, "UTF-32"), (codecs.BOM_UTF16_LE, "UTF-16"),
         (codecs.BOM_UTF16_BE, "UTF-16"))


class DataFileError(ValueError):
    """A data file that cannot be read as given: not UTF-8, malformed, or without the rows a step needs."""


def read_text(path: str | Path) -> str:
    """Return a UTF-8 text file's contents (a UTF-8 byte-order mark dropped); raises DataFileError naming the file
    when it is not UTF-8 (UTF-16 / UTF-32 recognised by their byte-order mark)."""
    path = Path(path)
    raw = path.read_bytes()
    fix = f"re-save it as UTF-8 (e.g. `iconv -t UTF-8 {path.name} > {path.stem}-utf8{path.suffix}`)"
    for bom, name in _BOMS:
        if raw.startswith(bom):
            raise DataFileError(f"{path} is {name} (it starts with a {name} byte-order mark), not UTF-8: {fix}")
    try:
        return raw.decode("utf-8-sig")
    except UnicodeDecodeError as err:
        line = raw[:err.start].count(b"\n") + 1
        raise DataFileError(f"{path} is not UTF-8: byte 0x{raw[err.start]:02x} on line {line} is not valid UTF-8 "
                            f"(a Latin-1 / Windows-1252 file?); {fix}") from None


def jsonl_records(path: str | Path) -> list[tuple[int, dict]]:
    """Return `(line number, record)` for every non-blank line of a JSONL file (lines counted from 1, blank ones
    included); raises DataFileError naming the file and line of one that is not a JSON object."""
    path = Path(path)
    records = []
    # split on newlines only: str.splitlines also splits on U+2028 and friends, which JSON strings may hold
    for line_no, line in enumerate(read_text(path).split("\n"), 1):
        if not line.strip():
            continue
        try:
            record = json.loads(line)
        except json.JSONDecodeError as err:
            raise DataFileError(f"{path}:{line_no}: not valid JSON ({err.msg} at column {err.colno}); a JSONL file "
                                "holds one JSON object per line") from None
        if not isinstance(record, dict):
            raise DataFileError(f"{path}:{line_no}: a JSON {type(record).__name__}, not an object; a JSONL file holds "
                                'one object per line, e.g. {"text": "...", "label": 1}')
        records.append((line_no, record))
    return records


def read_csv(path: str | Path, **kw):
    """Return a CSV file as a DataFrame (`pd.read_csv` keywords pass through); raises DataFileError naming the file
    when it is not UTF-8, empty, or malformed (pandas names the line)."""
    import pandas as pd

    path = Path(path)
    text = read_text(path)
    try:
        return pd.read_csv(io.StringIO(text), **kw)
    except pd.errors.EmptyDataError:
        raise DataFileError(f"{path} is empty: give a CSV file with a header row and one row per item") from None
    except pd.errors.ParserError as err:
        raise DataFileError(f"{path} is not a well-formed CSV file: {str(err).strip()} (quote cells that hold "
                            "commas or line breaks)") from None
