"""Torch autograd functions of the fused LoRA block and their mask and dtype helpers: tensors in,
tensors out. Which model layers run them is sft.modeling.fusion's business; nothing here imports
PEFT or transformers.

dtypes.py       compute_dtype: the one dtype rule of a matmul over mixed-precision operands
dropout.py      the one-byte keep mask (16 random bits per element) and the dropout function
lora_linear.py  FusedLoraFunction: a group of LoRA layers that read one input as one node
swiglu.py       SwiGLUDownFunction: down(silu(gate) * up) with its LoRA adapter as one node
rms_norm.py     RMSNormFunction: Llama's RMSNorm with a three-pass backward
"""
