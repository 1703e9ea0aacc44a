"""Qwen1 (model_type 'qwen', remote code) hub format."""

from __future__ import annotations

FORMATS: list = []
