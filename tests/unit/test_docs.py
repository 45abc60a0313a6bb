"""Docs that mirror code stay in sync with it."""

from __future__ import annotations

from pathlib import Path

from pydantic import BaseModel

from worker.errors import ERROR_CODES
from worker.settings import Settings, env_name

DOCS = Path(__file__).resolve().parents[2] / "docs"


def test_every_error_code_is_documented() -> None:
    text = (DOCS / "errors.md").read_text()
    for code, meaning in ERROR_CODES.items():
        assert f"| `{code}` | {meaning} |" in text, code


def _env_names(model: type[BaseModel], prefix: tuple[str, ...] = ()) -> list[str]:
    names = []
    for name, field in model.model_fields.items():
        annotation = field.annotation
        if isinstance(annotation, type) and issubclass(annotation, BaseModel):
            names.extend(_env_names(annotation, (*prefix, name)))
        else:
            names.append(env_name((*prefix, name)))
    return names


def test_every_setting_is_documented() -> None:
    text = (DOCS / "operations.md").read_text()
    missing = [n for n in _env_names(Settings) if f"`{n}`" not in text]
    assert not missing, f"document these in docs/operations.md: {missing}"
