"""GPT-1 (openai-gpt) and GPT-2 hub formats."""

from __future__ import annotations

FORMATS: list = []
