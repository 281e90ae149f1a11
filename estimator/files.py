"""Reading the documents a user hands us (JSON and TOML), one way, with one kind of error:
a ``ValueError`` naming the file and what is wrong with it. Plain data only: no pickle,
nothing executed."""
from __future__ import annotations

import json
import tomllib
from pathlib import Path
from typing import Any


def read_document(path: str | Path, what: str, fmt: str = "json") -> Any:
    """The parsed content of a JSON (``fmt="json"``) or TOML (``fmt="toml"``) file.
    ``what`` names the document in the error ("calibration", "matrix")."""
    path = Path(path)
    try:
        text = path.read_text(encoding="utf-8")
    except OSError as exc:
        raise ValueError(f"cannot read {what} {path}: {exc.strerror}") from None
    except UnicodeDecodeError:
        raise ValueError(f"{what} {path} is not UTF-8 text") from None
    try:
        return tomllib.loads(text) if fmt == "toml" else json.loads(text)
    except json.JSONDecodeError as exc:
        raise ValueError(f"{what} {path} is not valid JSON (line {exc.lineno}: {exc.msg})") from None
    except tomllib.TOMLDecodeError as exc:
        raise ValueError(f"{what} {path} is not valid TOML ({exc})") from None
