"""The fused LoRA linear in ten lines: forward + backward, checked against the float64 reference.

    python examples/quickstart.py                                            # CUDA: Triton kernels; CPU: reference
    TRITON_INTERPRET=1 RELORA_KERNELS_BACKEND=triton python examples/quickstart.py   # the kernels on a CPU (slow)
"""

import torch

import relora_kernels as rk
from relora_kernels import reference
from relora_kernels._backend import use_triton

torch.manual_seed(0)
device = "cuda" if torch.cuda.is_available() else "cpu"
dtype = torch.bfloat16 if device == "cuda" else torch.float32
tokens, d_in, d_out, rank = (4096, 1024, 1024, 16) if device == "cuda" else (64, 96, 80, 8)

x = torch.randn(tokens, d_in, device=device, dtype=dtype, requires_grad=True)
weight = torch.randn(d_out, d_in, device=device, dtype=dtype) / d_in**0.5
lora_a = (torch.randn(rank, d_in, device=device, dtype=dtype) / d_in**0.5).requires_grad_()
lora_b = (torch.randn(d_out, rank, device=device, dtype=dtype) / rank**0.5).requires_grad_()

y = rk.lora_linear(x, weight, lora_a, lora_b, scale=2.0, dropout_p=0.1, seed=1)
y.sum().backward()

leaves = [t.detach().double().requires_grad_() for t in (x, lora_a, lora_b)]
y64 = reference.lora_linear(leaves[0], weight.double(), leaves[1], leaves[2], 2.0, None, 0.1, 1)
y64.sum().backward()
print(f"backend: {'triton' if use_triton(x.device) else 'reference'} on {device}, {dtype}, "
      f"x {tuple(x.shape)}, weight {tuple(weight.shape)}, r = {rank}, p = 0.1")
for name, got, exact in [("y", y, y64), ("dx", x.grad, leaves[0].grad), ("dA", lora_a.grad, leaves[1].grad),
                         ("dB", lora_b.grad, leaves[2].grad)]:
    print(f"  {name:3s} max |error| vs float64 reference: {(got.double() - exact).abs().max().item():.2e}")
