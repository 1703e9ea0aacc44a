"""Every file lmzoo reads or writes: Hugging Face directories (hf and one name table per
model_type), GGUF (gguf_file, gguf), PEFT adapter files (peft), tokenizers (tokenizer), loading
a model by source (checkpoint), and atomic writes (atomic). Adding a file format touches only this folder."""
