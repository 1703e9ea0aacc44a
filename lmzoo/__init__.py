"""lmzoo: the decoder-only LLM families as configurations of one readable decoder."""

from .config import Config
from .errors import LmzooError
from .families import PRESETS, preset
from .formats.checkpoint import default_model_path, from_config, load, save_hf_dir
from .formats.peft import load_adapter, save_adapter
from .infer.compiled import default_step as _default_step
from .infer.prepare import prepare_for_inference
from .nn import generate as _generate
from .nn.model import Decoder

# A model not prepared for inference decodes through its compiled step, built once per model layout
# in the background and kept on disk (lmzoo.infer.compiled.default_step); LMZOO_COMPILE=0 turns it off.
_generate.default_decode_step = _default_step

__all__ = ["load", "save_hf_dir", "save_adapter", "load_adapter", "from_config", "default_model_path", "Config",
           "Decoder", "PRESETS", "preset", "LmzooError", "prepare_for_inference"]
__version__ = "0.1.0"
