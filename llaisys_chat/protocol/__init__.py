"""What crosses between the client and the ranks: chat messages, the reply request and its result,
sampling settings, and the stream link's wire format.

Both sides import this package; it imports neither of them (nor the native engine).
"""
