"""The MoDULA layer (universal + domain LoRA experts + per-layer router), attaching it to any HF causal LM, stage freezing, domains, expert files, PEFT interop. Knows nothing of Ray."""
