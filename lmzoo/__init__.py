"""lmzoo: the decoder-only LLM families as configurations of one readable decoder."""

from .config import Config
from .errors import LmzooError
from .families import PRESETS, preset
from .formats.checkpoint import default_model_path, from_config, load, save_hf_dir
from .formats.peft import load_adapter, save_adapter
from .infer.prepare import prepare_for_inference
from .nn.model import Decoder

__all__ = ["load", "save_hf_dir", "save_adapter", "load_adapter", "from_config", "default_model_path", "Config",
           "Decoder", "PRESETS", "preset", "LmzooError", "prepare_for_inference"]
__version__ = "0.1.0"
