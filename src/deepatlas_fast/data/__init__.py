"""Images and data sets: NIfTI io, datalists and datasets, preprocessing, affine pre-alignment,
the knee loader, augmentation and the shipped demo set (demo_data)."""
