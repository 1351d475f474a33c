"""What the MMDiT families (FLUX.1, SD3/3.5) share: target patterns, single-file rules, converters, adapter (T5,
FlowMatch sampler)."""
