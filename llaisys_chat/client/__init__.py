"""The client side: runs in the user's process (REPL, notebook, script), never on the ranks.

It finds or starts the cluster (launch.py), calls the engine worker's functions on every rank at once
(ranks.py), streams replies over its own link to rank 0 (reply_stream.py, stream_link.py), and holds
conversations (session.py). Nothing here loads the native engine.
"""
