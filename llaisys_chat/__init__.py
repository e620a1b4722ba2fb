"""llaisys-chat: chat with a Qwen2-family model whose weights are split over MPI ranks.

Front ends: the `llaisys-chat` REPL (repl.py), the `%%llaisys` magic (magic.py, loaded with
`%load_ext llaisys_chat`), the chat kernel (kernel/) and scripts (cluster.connect()).
"""

__version__ = "0.1.0"


def load_ipython_extension(ipython):
    """`%load_ext llaisys_chat`: register %llaisys and %%llaisys."""
    from .magic import LlaisysMagics

    ipython.register_magics(LlaisysMagics)
