"""benchmarks package (installed as liveportrait_triton.benchmarks)."""
