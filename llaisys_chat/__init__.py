"""llaisys-chat: chat with a Qwen2-family model whose weights are split over MPI ranks.

Front ends: the `llaisys-chat` REPL (repl.py), scripts (cluster.py: cluster.connect()), one reply
without a cluster (generate.py), and the `%%llaisys` magic and chat kernel (frontends/). Behind them,
in the order data flows: client/ (session, connection to the cluster), engine/ (runs on each rank),
model/ (model files), protocol/ (what crosses between client and ranks), and the native model
(_native, built from native/).
"""

__version__ = "0.1.0"


def load_ipython_extension(ipython):
    """`%load_ext llaisys_chat`: register %llaisys and %%llaisys."""
    from .frontends.magic import LlaisysMagics

    ipython.register_magics(LlaisysMagics)
