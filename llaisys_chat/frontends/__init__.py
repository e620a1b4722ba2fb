"""The front ends behind `repl.py`: the Jupyter magic and chat kernel, and the pieces every front end
shares (command-line options, streaming a reply with Ctrl-C, slash commands, terminal rendering).

Front ends talk to the model only through cluster.connect() and Sessions.
"""
