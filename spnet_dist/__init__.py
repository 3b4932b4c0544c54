"""spnet_dist: distributed training of dynamic-inference ResNets (SP-Net and peers)."""

__version__ = "0.1.0"
