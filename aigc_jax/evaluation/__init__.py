"""Sample-quality metrics: Fréchet distance in the features of a small classifier."""
