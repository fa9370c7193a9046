"""Training with Lightning: LoRAModule, AdapterCallback, data, optimizer groups, guards, distributed strategies."""
