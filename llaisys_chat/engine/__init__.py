"""The engine side: runs on every MPI rank (inside an ipyparallel engine, or under mpiexec).

worker.py is what the client calls on each rank; engine.py holds the rank's shard of the native model
and generates; shard_plan.py says which slice of each weight the rank holds; sampling.py and
collectives.py make the ranks agree on every token.
"""
from .engine import Engine

__all__ = ["Engine"]
