"""The method (Zhang, Wu, Zhu, CVPR 2018): the mask layer, the filter loss, the κ pilot, the measures and the
receptive-field geometry. Tensors in, tensors out; imports only :mod:`icnn_compress.runtime`."""
