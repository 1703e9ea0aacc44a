"""ChatGLM-6B (GLM v1, a prefix LM) in its chatglm (remote code) format."""

from __future__ import annotations

FORMATS: list = []
