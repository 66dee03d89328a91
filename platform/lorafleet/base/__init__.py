"""Building the small offline base model (tokenizer + Llama + pre-training)."""
