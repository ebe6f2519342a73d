"""Embedded defaults: a small Llama model, its tokenizer and a generated corpus of verifiable tasks."""
