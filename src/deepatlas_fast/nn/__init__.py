"""The networks (nets: F_R, F_S) and the losses of DeepAtlas, built on the package's ops."""
