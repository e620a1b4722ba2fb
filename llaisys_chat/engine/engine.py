"""One rank's engine: its shard of the native model, its key/value caches, and the generation loop.

Every rank of a group runs the same Python on the same inputs, so they make the same decisions
(prompt too long, stop string seen, ...) without talking; they talk only inside the native
model's all-reduce hook and in `choose_token`, which every rank enters at every step.
"""
import dataclasses
import os
import random
import socket
import time
from collections import OrderedDict, deque
from pathlib import Path

import numpy as np

from .. import _native
from ..errors import LlaisysError
from ..model.chat_format import ChatFormat
from ..model.config import ModelConfig
from ..model.sliced import open_checkpoint
from ..protocol.messages import partial_suffix
from ..protocol.reply import GenerationStats
from ..protocol.sampling import SamplingParams
from .collectives import SingleProcess, raise_if_any_failed
from .loading import cache_type, column_units, load_weights, packed_types
from .model_transfer import share_model
from .sampling import STOP, choose_token
from .shard_plan import ShardPlan

DEFAULT_MAX_CONTEXT = 8192
POOLED = "pooled:"  # the key prefix of caches that requests without a conversation key share


class Engine:
    """A Qwen2 model (or this rank's shard of it) ready to generate."""

    def __init__(self, model="demo", *, group=None, threads: int | None = None, max_context: int | None = None,
                 weights: str = "auto", reduction: str = "exact", cache_slots: int = 4):
        self.group = group or SingleProcess()
        self.threads = threads or default_threads(self.group)  # collective: before anything can fail
        self._links = self.group.native_mpi()  # collective too (the ranks may map a shared segment)
        error = None
        try:
            self._load(model, max_context, weights, reduction, cache_slots)
        except Exception as e:  # whatever failed here, every rank must hear of it or the others wait forever
            error = e
        raise_if_any_failed(self.group, error)

    def _load(self, model, max_context, weights, reduction, cache_slots):
        if reduction not in ("exact", "fast"):
            raise LlaisysError(f"reduction must be exact or fast, not {reduction!r}")
        self.folder = share_model(self.group, model, weights)
        self.config = ModelConfig.from_file(self.folder / "config.json")
        self.chat = ChatFormat(self.folder)
        checkpoint = open_checkpoint(self.folder)
        checkpoint.check_shapes(self.config)
        types = packed_types(checkpoint, self.config, weights)
        head_unit, ffn_unit = column_units(checkpoint, self.config, types)
        self.plan = ShardPlan.for_rank(self.config, self.group.rank, self.group.size, head_unit, ffn_unit)
        self.weights = "+".join(sorted({t for w, t in types.items() if len(w.shape(self.config)) == 2}))
        options = _native.Qwen2Options(cache=getattr(_native.DType, cache_type(types).upper()), threads=self.threads,
                                       reduction=getattr(_native.Reduction, reduction.upper()),
                                       ffn_block=self.plan.ffn_block)
        self.model = _native.Qwen2(native_config(self.config), self.plan.native(), options, mpi=self._links)
        load_weights(self.model, checkpoint, self.plan, self.config, types)
        del checkpoint  # unmap the file: only the packed shard stays resident
        self.max_context = max_context or min(self.config.max_position_embeddings, DEFAULT_MAX_CONTEXT)
        if self.max_context < 2:
            raise LlaisysError(f"max_context must be at least 2, not {self.max_context}")
        self.cache_slots = cache_slots
        self._caches: OrderedDict[str, object] = OrderedDict()
        self._pooled = 0  # pooled caches made so far (their keys: POOLED + number)

    def fit(self, messages: list[dict], max_new_tokens: int, context: str = "trim") -> tuple[str, list[int], int]:
        """The conversation's prompt (text and ids) and how many of its earliest messages were left
        out to fit the context with room for the reply (up to a quarter of it): whole messages,
        never the system prompt, starting again at a user's turn. With context="error", none are."""
        system = messages[:1] if messages and messages[0]["role"] == "system" else []
        rest = messages[len(system):]
        room = self.max_context - min(max_new_tokens, self.max_context // 4)
        dropped = 0
        while True:
            prompt = self.chat.render(system + rest[dropped:])
            ids = self.chat.encode(prompt)
            if len(ids) <= room or context != "trim" or dropped >= len(rest) - 1:
                break
            dropped += 1
            while dropped < len(rest) - 1 and rest[dropped]["role"] != "user":
                dropped += 1
        if len(ids) >= self.max_context:
            what = "the last message alone" if context == "trim" and len(rest) > 1 else "the conversation"
            hint = "shorten it" if context == "trim" else "start a new conversation, or let its oldest messages go (context trim)"
            raise LlaisysError(f"{what} is {len(ids)} tokens but the context holds {self.max_context} ({hint})")
        return prompt, ids, dropped

    def reply(self, messages: list[dict], params: SamplingParams = SamplingParams(), *, max_new_tokens: int = 256,
              context: str = "trim", **options) -> "Generation":
        """Start the reply to a conversation, fitted to the context (fit()); `prompt` on the result is
        the rendered prompt, and its stats say how many messages were left out."""
        prompt, prompt_ids, dropped = self.fit(messages, max_new_tokens, context)
        run = self.generate(prompt_ids, params, max_new_tokens=max_new_tokens, **options)
        run.prompt = prompt
        run.stats.dropped_messages, run.stats.max_context = dropped, self.max_context
        return run

    def generate(self, prompt_ids: list[int], params: SamplingParams = SamplingParams(), *, max_new_tokens: int = 256,
                 stop: tuple[str, ...] = (), cache_key: str | None = "default", busy=frozenset(),
                 should_stop=None) -> "Generation":
        """Start a reply to prompt_ids; iterate the result for (token id, text piece) pairs.
        cache_key None picks, among the pooled caches not in `busy` (the keys of replies running
        meanwhile), the one holding the longest start of the prompt: a request that continues an
        earlier one finds its keys and values there."""
        if len(prompt_ids) == 0:
            raise LlaisysError("the prompt is empty")
        if len(prompt_ids) >= self.max_context:
            raise LlaisysError(f"the prompt is {len(prompt_ids)} tokens but the context holds {self.max_context} "
                               f"(start a new conversation, let its oldest messages go (context trim), or raise "
                               f"max_context)")
        if max_new_tokens < 1:
            raise LlaisysError(f"max_new_tokens must be at least 1, not {max_new_tokens}")
        if params.temperature > 0 and params.seed is None:
            # Every rank must draw the same noise: rank 0's random seed serves all (a collective).
            params = dataclasses.replace(params, seed=self.group.bcast(random.getrandbits(63)))
        if cache_key is None:
            cache_key = self._pooled_cache_key(prompt_ids, busy)
        return Generation(self, list(prompt_ids), params, max_new_tokens, tuple(stop), cache_key,
                          self._cache(cache_key, busy), should_stop or (lambda: False))

    def drop_cache(self, cache_key: str) -> None:
        """Forget a conversation's cached keys and values."""
        self._caches.pop(cache_key, None)

    def info(self) -> dict:
        """What this rank holds: model, shard bounds, bytes of weights and caches, resident memory."""
        return {
            "model": str(self.folder), "rank": self.group.rank, "ranks": self.group.size, "threads": self.threads,
            "weights": self.weights, "max_context": self.max_context, "shard": self.plan.bounds(),
            "weight_bytes": self.model.weight_bytes, "decode_bytes": self.model.decode_bytes,
            "cache_bytes": sum(c.nbytes for c in self._caches.values()),
            "cache_slots": self.cache_slots,
            "rss_bytes": resident_bytes(),
        }

    def _cache(self, key: str, busy=frozenset()):
        """The cache of conversation `key`, least recently used ones (not busy) evicted beyond cache_slots."""
        if key in self._caches:
            self._caches.move_to_end(key)
        else:
            idle = [k for k in self._caches if k not in busy]
            for old in idle[:max(0, len(self._caches) + 1 - self.cache_slots)]:
                del self._caches[old]
            self._caches[key] = self.model.new_cache(self.max_context)
        return self._caches[key]

    def _pooled_cache_key(self, prompt_ids, busy) -> str:
        """The idle pooled cache that holds the longest start of the prompt, or a new one's key."""
        prompt = np.asarray(prompt_ids, dtype=np.int32)
        held = {k: _common_prefix(c.tokens, prompt) for k, c in self._caches.items()
                if k.startswith(POOLED) and k not in busy}
        best = max(held, key=held.get, default=None)
        if best is not None and held[best] > 0:
            return best
        self._pooled += 1
        return f"{POOLED}{self._pooled}"


class Generation:
    """A reply in progress: iterate for (token id, text piece), or drive it a step at a time
    (prefill(), then step() with each step's logits, as Batch does). Text pieces hold back any
    tail that might start a stop string. `tokens`, `text` and `stats` fill in as it runs."""

    def __init__(self, engine: Engine, prompt_ids, params, max_new_tokens, stop, cache_key, cache, should_stop):
        self.engine, self.prompt_ids, self.max_new_tokens, self.stop = engine, prompt_ids, max_new_tokens, stop
        self.params = params
        self.cache_key, self.cache, self.should_stop = cache_key, cache, should_stop
        self.tokens: list[int] = []
        self.text = ""
        self.prompt = ""  # the rendered prompt, when the reply was asked for by messages
        self.stats = GenerationStats(prompt_tokens=len(prompt_ids))
        self.finished = False
        self._decoder, self._raw, self._emitted, self._cut = engine.chat.stream_decoder(), "", 0, None
        self._longest_stop = max(map(len, stop), default=0)
        self._start = self._decode_start = None

    def __iter__(self):
        logits = self.prefill()
        try:
            while True:
                token, piece = self.step(logits)
                if token is not None or piece:
                    yield token, piece
                if self.finished:
                    return
                logits = self.engine.model.forward(self.cache, [token])[0]
        finally:  # also when the consumer stops iterating early
            self._finish()

    def run(self) -> "Generation":
        """Generate to the end without streaming; returns self."""
        for _ in self:
            pass
        return self

    def prefill(self) -> np.ndarray:
        """Compute the prompt (what the cache does not hold of it); returns the logits of the first step."""
        return self.end_prefill(self.engine.model.forward(self.cache, self.begin_prefill())[0])

    def begin_prefill(self) -> list[int]:
        """Ready the cache for the prompt; returns the prompt ids it does not hold, to compute."""
        self._start = time.perf_counter()
        return self._prompt_to_compute()

    def end_prefill(self, logits: np.ndarray) -> np.ndarray:
        """The prompt has been computed (with these logits of its last position)."""
        self.stats.prefill_seconds = time.perf_counter() - self._start
        return logits

    def step(self, logits: np.ndarray) -> tuple[int | None, str]:
        """Collective: choose this step's token from this rank's slice of its logits. Returns the
        token (None when the reply ended instead) and the text that may be shown now; once the
        reply is over, `finished` is set and that text includes the rest."""
        engine, stats = self.engine, self.stats
        token = choose_token(logits, engine.plan.vocab_begin, self.params, len(self.tokens), engine.group,
                             self.should_stop())
        if token == STOP or token in engine.chat.stop_ids:
            stats.finish_reason = "interrupted" if token == STOP else "stop"
            return None, self._finish()
        if self._decode_start is None:
            self._decode_start = time.perf_counter()
            stats.first_token_seconds = self._decode_start - self._start
        self.tokens.append(token)
        stats.new_tokens += 1
        self._raw += self._decoder.step(token)
        # Only new text can hold a stop string.
        self._cut = _stop_position(self._raw, self.stop, max(0, self._emitted - self._longest_stop))
        end = self._cut if self._cut is not None else len(self._raw) - _held_back(self._raw, self.stop)
        piece, self._emitted = self._raw[self._emitted:end], end
        if self._cut is not None:
            stats.finish_reason = "stop"
        elif len(self.tokens) == self.max_new_tokens:
            stats.finish_reason = "length"
        elif self.cache.n_tokens >= engine.max_context:
            stats.finish_reason = "context"
        else:
            return token, piece
        return token, piece + self._finish()

    def _finish(self) -> str:
        """End the reply (once): its text and timing are final. Returns the text not yet shown."""
        if not self.finished:
            self.finished = True
            if self._decode_start is not None:
                self.stats.decode_seconds = time.perf_counter() - self._decode_start
            self.text = self._raw[:self._cut] if self._cut is not None else self._raw
        rest, self._emitted = self.text[self._emitted:], max(self._emitted, len(self.text))
        return rest

    def _prompt_to_compute(self) -> list[int]:
        """Reuse what the cache holds of the prompt; returns the rest. The cache may hold the
        prompt's start, or (once a long conversation's oldest messages were let go) its start, then
        the dropped messages, then the prompt's continuation: the dropped span is taken out of it."""
        cached = self.cache.tokens
        prompt = np.asarray(self.prompt_ids, dtype=np.int32)
        keep = _common_prefix(cached, prompt[:len(prompt) - 1])  # the last prompt token is always recomputed
        span = _dropped_span(cached, prompt, keep)
        if span:
            self.engine.model.drop_from_cache(self.cache, keep, keep + span)
            keep = _common_prefix(self.cache.tokens, prompt[:len(prompt) - 1])
        self.cache.truncate(keep)
        self.stats.cached_tokens = keep
        return self.prompt_ids[keep:]


class Batch:
    """Replies decoded together. Each step is one forward pass for all of them: every running reply's
    new token and the prompts of replies starting (up to the model's batch_tokens in all), so the
    weights are read once; then each running reply chooses its next token. A reply gives the same
    tokens as it would alone. Replies wait in arrival order for one of `max_running` places; a prompt
    too long to share a step is computed alone first. Every rank must add the same replies in the
    same order: steps are collectives."""

    def __init__(self, engine: Engine, max_running: int):
        self.engine, self.max_running = engine, max_running
        self._waiting: deque[Generation] = deque()
        self._running: list[Generation] = []
        self._logits: dict[Generation, np.ndarray] = {}

    def __bool__(self) -> bool:
        return bool(self._waiting or self._running)

    def add(self, run: Generation) -> None:
        self._waiting.append(run)

    def cache_keys(self) -> frozenset:
        """The caches of the replies in the batch (which a new reply must not take)."""
        return frozenset(r.cache_key for r in (*self._waiting, *self._running))

    def step(self) -> list[tuple[Generation, int | None, str]]:
        """Collective: a token for every running reply that has its logits, then the forward pass
        of the next step. Returns (reply, token or None, text piece) for each reply that chose;
        finished replies leave the batch."""
        model = self.engine.model
        events = [(run, *run.step(self._logits.pop(run))) for run in self._running if run in self._logits]
        self._running = [run for run in self._running if not run.finished]
        rows = [(run, [run.tokens[-1]]) for run in self._running if run not in self._logits]
        room = model.batch_tokens - len(rows)
        while self._waiting and len(self._running) < self.max_running:
            run = self._waiting.popleft()
            self._running.append(run)
            prompt = run.begin_prefill()
            if len(prompt) <= room:
                rows.append((run, prompt))
                room -= len(prompt)
            else:  # alone, in chunks
                self._logits[run] = run.end_prefill(model.forward(run.cache, prompt)[0])
        if rows:
            logits = model.forward_batch([run.cache for run, _ in rows], [ids for _, ids in rows])
            for (run, ids), row in zip(rows, logits):
                self._logits[run] = row if run.tokens else run.end_prefill(row)
        return events


def _common_prefix(a: np.ndarray, b: np.ndarray) -> int:
    """Length of the longest common prefix of two id arrays."""
    n = min(len(a), len(b))
    different = np.flatnonzero(a[:n] != b[:n])
    return int(different[0]) if different.size else n


def _dropped_span(cached: np.ndarray, prompt: np.ndarray, keep: int) -> int:
    """The length d of a span cached[keep:keep + d] whose removal leaves the rest of the cache
    continuing the prompt (at least 16 tokens of it), or 0."""
    rest = prompt[keep:len(prompt) - 1]
    if len(rest) < 16 or len(cached) - keep < 16:
        return 0
    for d in np.flatnonzero(cached[keep + 1:] == rest[0]) + 1:
        n = min(len(cached) - keep - d, len(rest))
        if n >= 16 and np.array_equal(cached[keep + d:keep + d + n], rest[:n]):
            return int(d)
    return 0


def _stop_position(text: str, stops: tuple[str, ...], start: int = 0) -> int | None:
    """Where the earliest stop string starts in text (searching from start), or None."""
    found = [i for i in (text.find(s, start) for s in stops if s) if i >= 0]
    return min(found) if found else None


def _held_back(text: str, stops: tuple[str, ...]) -> int:
    """Length of the longest tail of text that is the start of a stop string."""
    return max((partial_suffix(text, s) for s in stops if s), default=0)


def native_config(config: ModelConfig) -> "_native.Qwen2Config":
    """The hyper-parameters under the native model's names."""
    return _native.Qwen2Config(vocab_size=config.vocab_size, hidden_size=config.hidden_size,
                               n_layer=config.num_hidden_layers, n_head=config.num_attention_heads,
                               n_head_kv=config.num_key_value_heads, head_dim=config.head_dim,
                               ffn_size=config.intermediate_size, rope_theta=config.rope_theta,
                               rms_eps=config.rms_norm_eps)


def default_threads(group) -> int:
    """The cores this rank may run on, shared with the ranks of this machine that may run on them too:
    mpiexec binds each rank to its own cores (`--map-by slot:PE=T` gives T), or binds none, and then
    the ranks of a machine share all its cores. (Collective: every rank calls it.)"""
    mine = frozenset(os.sched_getaffinity(0))
    everyone = group.allgather((socket.gethostname(), mine))
    sharing = sum(1 for host, cores in everyone if host == socket.gethostname() and cores & mine)
    return max(1, len(mine) // sharing)


def resident_bytes() -> int:
    """Resident set size of this process."""
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) * 1024
    return 0
