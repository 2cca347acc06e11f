"""pcpt transfer: finetuning, frozen-feature probes, few-shot episodes and adapters."""
