"""Low-rank factorization of weights, the pieces behind the `svd-split` pass.

- `rank`: rank selection (energy, ratio, a global parameter budget spread by sensitivity)
- `factorize`: plain and whitened (data-aware, SVD-LLM style) SVD, input Gram accumulation
- `conv`: Conv as spatial + pointwise convolution, and its im2col patches
- `sites`: which MatMul/Gemm/Conv ops can be factored, and how each is rewritten
- `groups`: weights read by several ops, factored once
- `statistics`: input Gram matrices over calibration batches
"""
