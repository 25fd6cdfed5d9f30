"""What comes from files: GGUF (gguf_file.py, quants.py), Hugging Face folders (hf_folder.py), tokenizers
(tokenizer.py), chat templates (template.py) and the prompt-format checker (prompt_check.py)."""
