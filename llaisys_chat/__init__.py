"""llaisys-chat: chat with a Qwen2-family model whose weights are split over MPI ranks."""

__version__ = "0.1.0"
