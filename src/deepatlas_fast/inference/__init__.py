"""A trained run at work: loading it, segmenting and registering images, evaluating it."""
