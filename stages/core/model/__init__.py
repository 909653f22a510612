"""The networks: SiT (with REPA projectors), the repa-rf DiT, LightningDiT and DiT-DH, RAE's pixel decoder,
their shapes (kept free of torch) and the conditioning they take. ``network.build_model`` is the entry point."""
