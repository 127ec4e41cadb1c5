"""paddle_ernie5: a PaddlePaddle-native reproduction of ERNIE 5.0."""

__version__ = "0.1.0"
