"""Chat templates: Jinja source from a model's files, rendered as transformers renders it, but
as code from a stranger.

The template runs in Jinja's immutable sandbox (no attribute escapes such as
`cycler.__init__.__globals__`, no mutation), and on top of it:
- `"A" * 10**9`, `10 ** (10**9)` and string methods asked for a giant result are refused before
  they allocate;
- the render stops after RENDER_SECONDS, whatever loop it is in;
- the output is cut off at MAX_OUTPUT_CHARS.
Whatever goes wrong (a syntax error, raise_exception, a blocked escape, a limit) is one
LmzooError that says it was the chat template.
"""

from __future__ import annotations

import ctypes
import json
import threading
from datetime import datetime

import jinja2
import jinja2.ext
import jinja2.nodes
from jinja2.sandbox import ImmutableSandboxedEnvironment

from ..errors import LmzooError

RENDER_SECONDS = 5.0  # real templates render in milliseconds
MAX_OUTPUT_CHARS = 16 << 20  # 16 M characters: ~4 M tokens, far past any context
_MAX_POWER_BITS = 1 << 16  # an integer power larger than 65,536 bits is no prompt arithmetic
_SIZED_STR_METHODS = {"ljust", "rjust", "center", "zfill", "expandtabs"}


class _GenerationTag(jinja2.ext.Extension):
    # Some templates wrap assistant text in {% generation %}; transformers uses it for masks, we just render it.
    tags = {"generation"}

    def parse(self, parser):
        lineno = next(parser.stream).lineno
        body = parser.parse_statements(("name:endgeneration",), drop_needle=True)
        return jinja2.nodes.CallBlock(self.call_method("_render"), [], [], body).set_lineno(lineno)

    def _render(self, caller):
        return caller()


def _raise_exception(message):
    raise jinja2.exceptions.TemplateError(message)


def _tojson(value, ensure_ascii=False, indent=None, separators=None, sort_keys=False):
    # Jinja's own tojson escapes HTML characters (<, >, &), which would change the prompt.
    return json.dumps(value, ensure_ascii=ensure_ascii, indent=indent, separators=separators, sort_keys=sort_keys)


class _TemplateLimit(Exception):
    """Raised inside a render that went past a limit."""


class _LimitedSandbox(ImmutableSandboxedEnvironment):
    """The immutable sandbox, refusing operations whose result alone would exhaust memory."""

    intercepted_binops = frozenset(["*", "**"])

    def call_binop(self, context, operator, left, right):
        if operator == "*":
            for seq, n in ((left, right), (right, left)):
                if isinstance(seq, (str, list, tuple)) and isinstance(n, int) and len(seq) * n > MAX_OUTPUT_CHARS:
                    raise _TemplateLimit(f"a {type(seq).__name__} repeated {n} times is too large")
        if operator == "**" and isinstance(left, int) and isinstance(right, int) and right > 0 and \
                abs(left).bit_length() * right > _MAX_POWER_BITS:
            raise _TemplateLimit(f"{left} ** {right} is too large")
        return super().call_binop(context, operator, left, right)

    def call(__self, __context, __obj, *args, **kwargs):  # Jinja's own signature
        if getattr(__obj, "__name__", None) in _SIZED_STR_METHODS and isinstance(getattr(__obj, "__self__", None), str):
            if any(isinstance(a, int) and a > MAX_OUTPUT_CHARS for a in args):
                raise _TemplateLimit(f"str.{__obj.__name__} asked for a result over {MAX_OUTPUT_CHARS} characters")
        return super().call(__context, __obj, *args, **kwargs)


def compile_template(source: str) -> jinja2.Template:
    # The same options as transformers' environment, so that templates render the same text.
    env = _LimitedSandbox(trim_blocks=True, lstrip_blocks=True, extensions=[_GenerationTag, jinja2.ext.loopcontrols])
    env.filters["tojson"] = _tojson
    env.globals["raise_exception"] = _raise_exception
    env.globals["strftime_now"] = lambda fmt: datetime.now().strftime(fmt)
    try:
        return env.from_string(source)
    except jinja2.exceptions.TemplateSyntaxError as e:
        raise LmzooError(f"chat template: syntax error on line {e.lineno}: {e.message}") from None


def render(template: jinja2.Template, **variables) -> str:
    """The rendered text, within the time and size limits; any failure is one LmzooError."""
    try:
        with _Deadline(RENDER_SECONDS):
            parts, size = [], 0
            for chunk in template.generate(**variables):
                size += len(chunk)
                if size > MAX_OUTPUT_CHARS:
                    raise _TemplateLimit(f"the output passed {MAX_OUTPUT_CHARS} characters")
                parts.append(chunk)
            return "".join(parts)
    except _TemplateLimit as e:
        raise LmzooError(f"chat template: stopped: {e}") from None
    except _DeadlineExceeded:  # fired in the instant the block was ending
        raise LmzooError(f"chat template: stopped: rendering took longer than {RENDER_SECONDS:g} s") from None
    except jinja2.exceptions.SecurityError as e:
        raise LmzooError(f"chat template: blocked an unsafe operation ({e})") from None
    except jinja2.exceptions.TemplateError as e:
        raise LmzooError(f"chat template: {e.message or type(e).__name__}") from None
    except (MemoryError, RecursionError, OverflowError) as e:
        raise LmzooError(f"chat template: stopped: {type(e).__name__}") from None
    except (TypeError, ValueError, AttributeError, KeyError, IndexError, ZeroDivisionError) as e:
        raise LmzooError(f"chat template: {type(e).__name__}: {e}") from None


class _Deadline:
    """Raise _TemplateLimit in this thread if it is still inside the block after `seconds`: a
    watchdog thread sets an asynchronous exception, which Python delivers between two bytecodes,
    so it stops any loop of the template's compiled code (which is Python)."""

    def __init__(self, seconds: float):
        self.seconds, self.thread_id = seconds, threading.get_ident()
        self.lock, self.inside, self.fired = threading.Lock(), False, False

    def _fire(self):
        with self.lock:
            if self.inside:
                self.fired = True
                ctypes.pythonapi.PyThreadState_SetAsyncExc(ctypes.c_ulong(self.thread_id),
                                                           ctypes.py_object(_DeadlineExceeded))

    def __enter__(self):
        self.inside = True
        self.timer = threading.Timer(self.seconds, self._fire)
        self.timer.daemon = True
        self.timer.start()
        return self

    def __exit__(self, kind, value, tb):
        with self.lock:
            self.inside = False
            self.timer.cancel()
            if self.fired and kind is None:  # fired as the block ended: take back the pending exception
                ctypes.pythonapi.PyThreadState_SetAsyncExc(ctypes.c_ulong(self.thread_id), None)
        if kind is _DeadlineExceeded:
            raise _TemplateLimit(f"rendering took longer than {self.seconds:g} s") from None
        return False


class _DeadlineExceeded(Exception):
    pass
