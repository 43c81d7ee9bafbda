"""The commands beside train: bench, plan, export, and data/tokenizer preparation."""
