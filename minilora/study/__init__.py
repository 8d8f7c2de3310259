"""Study tools: the seed blog post's experiment and the paper's side studies.

Each module is imported when used (``import minilora`` does not load them):

- ``minilora.study.seed``: the seed fine-tune of a 100x100 matrix with rank-4 LoRA (``minilora demo``)
- ``minilora.study.sweep``: rank/alpha/lr sweeps over the seed problem (``minilora sweep``)
- ``minilora.study.subspace``: the paper's subspace similarity of two adapters (Section 7.2)
- ``minilora.study.nf4``: QLoRA's NormalFloat4 code, quantize and dequantize
- ``minilora.study.qlora``: double quantization and the QLoRA dense layer over an NF4 base
- ``minilora.study.param_calc``: parameter and memory counts for LoRA on a transformer
- ``minilora.study.plots``: matplotlib (Agg) setup, PNG saving and the figures of demo and sweep

scipy, matplotlib and dask are imported inside the functions that need them.
"""
