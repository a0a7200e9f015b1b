"""The networks: ESM-2 (config, tokenizer, the encoder), LoRA layers, task heads, encoder + head. They only compute."""
