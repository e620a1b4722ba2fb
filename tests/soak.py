"""A long run of chat turns on a real cluster: several conversations taking turns (more than the
engines keep caches for, so caches are evicted and re-prefilled), with replies stopped part-way
and retried. Used by tests/test_soak.py (short) and bench/soak.py (200 turns).

Every turn is greedy, so each sampled turn's reply can be checked against a fresh single-process
engine given the same messages.
"""
import random
from dataclasses import dataclass, field

TOPICS = ("MPI", "tensor parallelism", "a KV cache", "RoPE", "quantization", "Jupyter", "ipyparallel",
          "the softmax", "a hash map", "garbage collection", "virtual memory", "TCP", "bf16", "SIMD")


@dataclass
class SoakRun:
    turns: int = 0
    stopped: int = 0
    retried: int = 0
    resets: int = 0
    rss: list[tuple[int, list[int]]] = field(default_factory=list)   # (turn, resident bytes per rank)
    samples: list[tuple[list[dict], list[int]]] = field(default_factory=list)  # (messages, greedy reply ids)


def rss_per_rank(client) -> list[int]:
    return [r["rss_bytes"] for r in client.info()["per_rank"]]


def soak(client, turns: int, sessions: int, *, max_new_tokens: int = 24, sample_every: int = 10,
         rss_every: int = 10, seed: int = 0, exchanges: int = 8, report=lambda turn, rss: None) -> SoakRun:
    """Run `turns` turns over `sessions` conversations, in a shuffled order; every 7th turn is
    stopped after a few pieces and every 11th retried, and a conversation starts again after
    `exchanges` exchanges (as users start new ones), so that the work, and with it the memory the
    caches need, reaches a steady state. report(turn, rss) is called as memory is read."""
    rng = random.Random(seed)
    chats = [client.session(system=f"You are assistant {i}. Answer in one or two sentences.", temperature=0,
                            top_k=0, top_p=1.0, max_new_tokens=max_new_tokens) for i in range(sessions)]
    run = SoakRun(rss=[(0, rss_per_rank(client))])
    for turn in range(1, turns + 1):
        chat = rng.choice(chats)
        if len(chat.messages) >= 2 * exchanges:
            chat.reset()
            run.resets += 1
        message = f"Turn {turn}: what is {rng.choice(TOPICS)}?"
        if turn % 7 == 0:
            stream = chat.send(message, stream=True)
            for i, _ in enumerate(stream):
                if i == 3:
                    stream.stop()
            run.stopped += 1
        elif turn % 11 == 0 and chat.messages:
            chat.regenerate()
            run.retried += 1
        else:
            reply = chat.send(message)
            if turn % sample_every == 0:
                run.samples.append((chat.prompt_messages()[:-1], reply.new_ids))
        run.turns = turn
        if turn % rss_every == 0:
            run.rss.append((turn, rss_per_rank(client)))
            report(*run.rss[-1])
    return run


def fresh_replies(engine, run: SoakRun, max_new_tokens: int) -> list[bool]:
    """For each sampled turn, whether a fresh engine's greedy reply to the same messages is the same."""
    return [engine.reply(messages, max_new_tokens=max_new_tokens, cache_key="fresh").run().tokens == ids
            for messages, ids in run.samples]
