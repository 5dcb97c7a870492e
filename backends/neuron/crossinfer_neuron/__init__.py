"""crossinfer backend for AWS Trainium and Inferentia: the shared XLA base (crossinfer_xla)
with Neuron's buckets, prefill and decode in separate steps, and Neuron's cache layout."""

from crossinfer_neuron.backend import NeuronBackend

__all__ = ["NeuronBackend"]
