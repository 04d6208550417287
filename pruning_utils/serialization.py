"""JSON round-trip shared by the plain configuration objects (plans, recovery configs)."""
from __future__ import annotations

import json
from pathlib import Path


class JsonMixin:
    """Adds `to_json` / `from_json` to a class that defines `to_dict` and `from_dict`."""

    def to_json(self, path: str | Path | None = None) -> str:
        """Return the object as JSON text, also writing it to `path` when given."""
        text = json.dumps(self.to_dict(), indent=1)
        if path is not None:
            Path(path).write_text(text)
        return text

    @classmethod
    def from_json(cls, text_or_path: str | Path):
        """Return the object read from JSON text or from a file path."""
        text = str(text_or_path)
        if not text.lstrip().startswith("{"):
            text = Path(text_or_path).read_text()
        return cls.from_dict(json.loads(text))
