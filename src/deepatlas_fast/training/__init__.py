"""Training of DeepAtlas: config, the trainer and its run directory."""
