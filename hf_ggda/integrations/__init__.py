"""Integrations with accelerate, transformers Trainer, the Hub and evaluate."""
