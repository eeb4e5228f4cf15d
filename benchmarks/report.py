"""What every benchmark script ends with: its table's rows and the run's facts as JSON."""

import json
from pathlib import Path


def write_json(out: str, meta: dict, rows: list[dict]) -> Path:
    """Writes ``{"meta": meta, "rows": rows}`` to ``out`` (creating its folder) and says so."""
    path = Path(out)
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps({"meta": meta, "rows": rows}, indent=2) + "\n", encoding="utf-8")
    print(f"wrote {path}")
    return path
