"""Masked LoRA fine-tuning (stage 3); the module moves here before its split into lora / train / data."""

from uniql_jax.finetune.lora import *  # noqa: F401,F403
