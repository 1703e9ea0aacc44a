#!/usr/bin/env bash
# The real peer for tests/interop: llama.cpp, as the llama-cpp-python bindings and the converters
# its source distribution vendors (convert_hf_to_gguf.py, convert_lora_to_gguf.py, gguf-py).
# Nothing of it is committed: the source distribution is downloaded once into a cache outside the
# clone, the wheel is built from it once (~8 minutes on 2 cores) and reused by every later run.
#   usage: tests/interop/setup.sh PYTHON   -> installs the bindings into PYTHON's environment and
#          prints the directory holding the extracted converters
set -euo pipefail
PYTHON=$1
VERSION=0.3.36
CACHE=${LMZOO_INTEROP_CACHE:-$HOME/.cache/lmzoo/interop}
SDIST=$CACHE/llama_cpp_python-$VERSION.tar.gz
# ggml's default build tunes itself to the building CPU (GGML_NATIVE), and that build crashes in
# its first evaluation on this machine's AMX-capable Xeon; name the instruction sets instead,
# AVX-512 only where the CPU has it. The flags are part of the wheel's folder name, so a wheel
# built for other flags is never picked up.
FLAGS="-DGGML_NATIVE=OFF -DGGML_AVX=ON -DGGML_AVX2=ON -DGGML_FMA=ON -DGGML_F16C=ON"
grep -qw avx512f /proc/cpuinfo && FLAGS="$FLAGS -DGGML_AVX512=ON"
WHEELS=$CACHE/wheels-$VERSION-$(echo "$FLAGS" | md5sum | cut -c1-8)
SRC=$CACHE/src-$VERSION
mkdir -p "$CACHE"
if [ ! -f "$SDIST" ]; then
    "$PYTHON" -m pip download -q --no-deps --no-binary :all: "llama-cpp-python==$VERSION" -d "$CACHE" >&2
fi
if ! ls "$WHEELS"/llama_cpp_python-$VERSION-*.whl >/dev/null 2>&1; then
    echo "building llama-cpp-python $VERSION once (about 8 minutes) into $WHEELS" >&2
    # --no-cache-dir: pip's own wheel cache may hold a build with other flags, keyed by the sdist alone
    CMAKE_ARGS="$FLAGS" "$PYTHON" -m pip wheel -q --no-cache-dir --no-deps -w "$WHEELS.tmp" "$SDIST" >&2
    mv "$WHEELS.tmp" "$WHEELS"
fi
if ! "$PYTHON" -c "import llama_cpp" 2>/dev/null; then
    "$PYTHON" -m pip install -q --find-links "$WHEELS" --only-binary llama-cpp-python "llama-cpp-python==$VERSION" >&2
fi
# the converter tries a SentencePiece vocabulary first, and needs the library to find there is none
"$PYTHON" -c "import sentencepiece" 2>/dev/null || "$PYTHON" -m pip install -q sentencepiece >&2
if [ ! -f "$SRC/convert_hf_to_gguf.py" ]; then
    rm -rf "$SRC.tmp" && mkdir -p "$SRC.tmp"
    tar xzf "$SDIST" -C "$SRC.tmp" --strip-components=3 \
        "llama_cpp_python-$VERSION/vendor/llama.cpp/convert_hf_to_gguf.py" \
        "llama_cpp_python-$VERSION/vendor/llama.cpp/convert_lora_to_gguf.py" \
        "llama_cpp_python-$VERSION/vendor/llama.cpp/conversion" \
        "llama_cpp_python-$VERSION/vendor/llama.cpp/gguf-py"
    rm -rf "$SRC" && mv "$SRC.tmp" "$SRC"
fi
echo "$SRC"
