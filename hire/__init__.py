"""hire: HiRE approximate top-k sparsity and tandem transformers for LLM inference, in JAX."""
