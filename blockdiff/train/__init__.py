"""Training: corpus and tokenizer building (data), objective and trainer."""
