"""ChatGLM2/3 and GLM-4 in the chatglm (remote code) format, and transformers' native glm and glm4."""

from __future__ import annotations

FORMATS: list = []
