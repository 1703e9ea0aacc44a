"""lmzoo: the decoder-only LLM families as configurations of one readable decoder."""

from .checkpoint import default_model_path, from_config, load, save_hf_dir
from .config import Config
from .errors import LmzooError
from .families import PRESETS, preset
from .inference import prepare_for_inference
from .model import Decoder

__all__ = ["load", "save_hf_dir", "from_config", "default_model_path", "Config", "Decoder", "PRESETS",
           "preset", "LmzooError", "prepare_for_inference"]
__version__ = "0.1.0"
