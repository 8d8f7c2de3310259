"""PEFT compatibility: apply, merge and inspect Hugging Face PEFT LoRA adapters without PyTorch.

- ``minilora.peft.targets``: PEFT's target rules (``target_modules``, ``rank_pattern``, ``alpha_pattern``), one matcher
- ``minilora.peft.files``: adapter folders (``adapter_config.json`` + ``adapter_model.safetensors``)
- ``minilora.peft.merge``: the streaming ``merge_and_unload`` of an adapter into a checkpoint
- ``minilora.peft.models``: LoRA over a model's named weights, PEFT's parameter names
- ``minilora.peft.multi_adapter``: PEFT's ``add_weighted_adapter`` combinations
- ``minilora.peft.inspect``: ``describe``, a summary of an adapter folder

Depends on the core, ``minilora.variants`` and ``minilora.formats``; torch is never imported.
"""
