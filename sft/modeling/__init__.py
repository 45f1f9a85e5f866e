"""Devices and precision, model loading, attention kernels and LoRA adapters."""
