"""GenARM: an autoregressive reward model that guides decoding token by token (arm, guided, lora, pipeline)."""
