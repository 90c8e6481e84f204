"""Minimal LLaVA components on stock transformers: prompt templates, adapters per checkpoint format."""
