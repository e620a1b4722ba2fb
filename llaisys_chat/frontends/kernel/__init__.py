"""A Jupyter kernel in which every cell is the next chat message (built on ipykernel's Kernel)."""
