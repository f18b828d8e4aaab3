"""Benchmarks of relora_kernels: cases (cases.py, e2e.py) apart from the harness (harness.py, sweep.py, report.py).

Importing this package changes nothing in the process: the sweep runs each case inside `cases.provider_env`
(the kernels forced for the fused providers, their engine set, both restored after). Without CUDA the kernels run
only through the Triton interpreter, which must be switched on before triton compiles them: CPU smoke runs are
started with TRITON_INTERPRET=1 (their timings are never performance numbers), and say so when it is missing.
"""
