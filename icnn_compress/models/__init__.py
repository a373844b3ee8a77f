"""Models: the architecture registry and the surgery that makes a CNN interpretable, torchvision weights,
state-dict loading, and the replay of a pruned model's history."""
