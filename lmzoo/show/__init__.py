"""What the presets and checkpoints differ in, shown to a person: `lmzoo info`, `diff` and
`families` (compare, report), the decoder block as a picture (diagram) and the attention
patterns (mask_pictures). Reads configs; never changes a model."""
