"""Integrations: TRL GRPOTrainer patch, transformers causal-LM patch, trainer callbacks."""
