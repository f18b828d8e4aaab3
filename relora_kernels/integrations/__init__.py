"""Integrations of ReLoRA with training frameworks, one submodule each, imported only on request.

    from relora_kernels.integrations.transformers import ReLoRACallback, jagged_cosine_scheduler

This package imports nothing itself, so `import relora_kernels` never needs (or loads) a framework.
"""
