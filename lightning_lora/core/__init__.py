"""The core: the adapter contract (methods and layer kinds), the layer wrapper, target selection and the verbs over a
model (inject, set_adapter, merge, remove). Imports nothing else of lightning_lora."""
