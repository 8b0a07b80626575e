"""The embedded world: seeded arithmetic problems, their word-level tokenizer and the small model trained on them."""
