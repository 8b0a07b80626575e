"""Converters from other checkpoint formats to Hugging Face folders that swiftjax loads."""
from __future__ import annotations

from swiftjax.convert.llama2c import (
    convert_llama2c,
    main_convert,
    read_llama2c_checkpoint,
    read_llama2c_tokenizer,
)

__all__ = ["convert_llama2c", "main_convert", "read_llama2c_checkpoint", "read_llama2c_tokenizer"]
