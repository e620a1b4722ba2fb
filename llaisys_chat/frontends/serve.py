"""`llaisys-chat serve`: the cluster behind an OpenAI-compatible HTTP endpoint, for the tools that speak
that API (the `openai` client, editors, `llm`, jupyter-ai...).

    POST /v1/chat/completions   messages, max_tokens / max_completion_tokens, temperature, top_p,
                                top_k (an extension), seed, stop, stream (server-sent events)
    GET  /v1/models             the model the engines hold, and the built-in ones
    GET  /health                200 while the engines are up (with the requests in flight), 503 while down

Starlette and uvicorn speak HTTP; this file maps requests onto the cluster client's batched replies:
the engines decode the requests in flight together, each step reading the weights once for all of
them, with the same tokens each would get alone. Up to 8 run at once (the worker's BATCH_LIMIT); more
wait in arrival order (at most QUEUE_LIMIT in all, then 429). A request that continues an earlier
conversation reuses the keys and values cached for it. A client that disconnects mid-reply stops
it on every rank at the next step. Errors use OpenAI's JSON shape. It binds to 127.0.0.1 unless
told otherwise; a non-local bind needs --api-key (or an explicit --no-api-key, which warns).
"""
import argparse
import asyncio
import ipaddress
import json
import secrets
import signal
import sys
import time
import uuid

from .. import cluster
from ..client.ranks import counted
from ..errors import EnginesDown, LlaisysError
from ..model.builtins import BUILTINS, find_builtin
from .options import add_cluster_options, add_version_option, cluster_options

QUEUE_LIMIT = 16  # requests running or waiting for the engines before new ones get 429
CONTEXT_HEADER = "X-Llaisys-Dropped-Messages"  # how many earliest messages were left out to fit the context


class ApiError(Exception):
    """An error answered in OpenAI's shape: {"error": {"message", "type", "param", "code"}}."""

    def __init__(self, status: int, message: str, kind: str = "invalid_request_error", param: str | None = None,
                 code: str | None = None):
        super().__init__(message)
        self.status, self.kind, self.param, self.code = status, kind, param, code

    def body(self) -> dict:
        return {"error": {"message": str(self), "type": self.kind, "param": self.param, "code": self.code}}


def completion_options(body) -> dict:
    """The cluster client's generate() arguments from a chat-completions request body, checked."""
    if not isinstance(body, dict):
        raise ApiError(400, "the request body must be a JSON object")
    messages = body.get("messages")
    if not isinstance(messages, list) or not messages:
        raise ApiError(400, "'messages' must be a non-empty list", param="messages")
    chat = []
    for i, m in enumerate(messages):
        if not isinstance(m, dict) or m.get("role") not in ("system", "developer", "user", "assistant"):
            raise ApiError(400, f"messages[{i}] needs a role of system, user or assistant", param=f"messages[{i}]")
        content = m.get("content")
        if isinstance(content, list):  # content parts: text only
            if not all(isinstance(p, dict) and p.get("type") == "text" and isinstance(p.get("text"), str) for p in content):
                raise ApiError(400, f"messages[{i}]: only text content parts are supported", param=f"messages[{i}]")
            content = "".join(p["text"] for p in content)
        if not isinstance(content, str):
            raise ApiError(400, f"messages[{i}].content must be a string", param=f"messages[{i}].content")
        chat.append({"role": "system" if m["role"] == "developer" else m["role"], "content": content})
    options = {"max_new_tokens": _number(body, ("max_completion_tokens", "max_tokens"), int, 1, None, 1024),
               "temperature": _number(body, ("temperature",), float, 0.0, 2.0, 1.0),
               "top_p": _number(body, ("top_p",), float, 0.0, 1.0, 1.0),
               "top_k": _number(body, ("top_k",), int, 0, None, 0)}
    if options["top_p"] == 0.0:
        options["top_p"], options["temperature"] = 1.0, 0.0  # nothing but the most likely token
    seed = body.get("seed")
    if seed is not None and (not isinstance(seed, int) or isinstance(seed, bool)):
        raise ApiError(400, "'seed' must be an integer", param="seed")
    stop = body.get("stop") or ()
    if isinstance(stop, str):
        stop = (stop,)
    if not isinstance(stop, (list, tuple)) or not all(isinstance(s, str) and s for s in stop) or len(stop) > 4:
        raise ApiError(400, "'stop' must be a string or a list of up to 4 non-empty strings", param="stop")
    if body.get("n", 1) != 1:
        raise ApiError(400, "only n=1 is supported", param="n")
    return {"messages": chat, **options, "seed": seed, "stop": tuple(stop), "stream": bool(body.get("stream"))}


def _number(body: dict, names: tuple, kind, low, high, default):
    for name in names:
        value = body.get(name)
        if value is None:
            continue
        if isinstance(value, bool) or not isinstance(value, (int, float)) or (kind is int and value != int(value)):
            raise ApiError(400, f"'{name}' must be a number", param=name)
        if value < low or (high is not None and value > high):
            raise ApiError(400, f"'{name}' must be between {low} and {high if high is not None else 'any'}", param=name)
        return kind(value)
    return default


class Server:
    """The endpoint's state: the cluster client, its model's names, the key, and the queue."""

    def __init__(self, client, model: str, api_key: str | None):
        self.client, self.api_key = client, api_key
        builtin = find_builtin(model)
        self.model = builtin.name if builtin else model
        self.names = {model, self.model, *(builtin.aliases if builtin else ())}
        self.replies = client.batched()
        self.in_flight = 0  # requests running or waiting on the engines

    def check_key(self, request) -> None:
        if self.api_key is None:
            return
        given = request.headers.get("authorization", "")
        if not secrets.compare_digest(given.encode(), f"Bearer {self.api_key}".encode()):
            raise ApiError(401, "invalid API key", kind="authentication_error", code="invalid_api_key")

    def models(self) -> dict:
        now = int(time.time())
        entries = [{"id": self.model, "object": "model", "created": now, "owned_by": "llaisys-chat", "loaded": True}]
        entries += [{"id": b.name, "object": "model", "created": now, "owned_by": "llaisys-chat", "loaded": False}
                    for b in BUILTINS if b.name != self.model]
        return {"object": "list", "data": entries}

    def health(self) -> tuple[int, dict]:
        reason = self.client.down()
        if reason is not None:
            return 503, {"status": "down", "reason": reason}
        return 200, {"status": "ok", "model": self.model, "ranks": self.client.n_ranks, "requests": self.in_flight}


class Reply:
    """One completion on the engines, decoded along with the others in flight; its pieces and end
    reach the event loop through a queue."""

    def __init__(self, server: Server, options: dict, loop):
        o = options
        self.server, self.loop = server, loop
        self.request = server.client.request(o["messages"], max_new_tokens=o["max_new_tokens"],
                                             temperature=o["temperature"], top_k=o["top_k"], top_p=o["top_p"],
                                             seed=o["seed"], stop=o["stop"])
        self.pieces: asyncio.Queue = asyncio.Queue()
        self.ended = False

    def start(self) -> None:
        self.server.in_flight += 1
        self.server.replies.submit(self.request, self._piece, self._end)

    def _piece(self, text: str) -> None:  # on the batch's thread
        self.loop.call_soon_threadsafe(self.pieces.put_nowait, ("piece", text))

    def _end(self, reply, error) -> None:  # on the batch's thread
        if isinstance(error, EnginesDown):
            event = ("error", ApiError(503, str(error), "server_error", code="engines_down"))
        elif error is not None:
            event = ("error", ApiError(400, str(error)))
        else:
            event = ("end", reply)
        self.loop.call_soon_threadsafe(self._ended, event)

    def _ended(self, event) -> None:
        self.ended = True
        self.server.in_flight -= 1
        self.pieces.put_nowait(event)

    def stop(self) -> None:
        """The client went away: the ranks stop the reply at the next step (nothing once it has ended)."""
        if not self.ended:
            self.server.replies.stop(self.request.id)


def usage(reply) -> dict:
    stats = reply.stats
    return {"prompt_tokens": stats.prompt_tokens, "completion_tokens": stats.new_tokens,
            "total_tokens": stats.prompt_tokens + stats.new_tokens,
            "prompt_tokens_details": {"cached_tokens": stats.cached_tokens}}


def finish_reason(reply) -> str:
    return "length" if reply.stats.finish_reason == "length" else "stop"


def build_app(server: Server):
    """The Starlette application of the endpoint."""
    from starlette.applications import Starlette
    from starlette.responses import JSONResponse, StreamingResponse
    from starlette.routing import Route

    async def chat_completions(request):
        try:
            server.check_key(request)
            try:
                body = await request.json()
            except (json.JSONDecodeError, UnicodeDecodeError):
                raise ApiError(400, "the request body is not JSON") from None
            options = completion_options(body)
            if body.get("model") not in (None, *server.names):
                raise ApiError(404, f"this server serves {server.model}, not {body.get('model')!r}",
                               param="model", code="model_not_found")
            if server.in_flight >= QUEUE_LIMIT:
                raise ApiError(429, f"{QUEUE_LIMIT} requests are already running or waiting on the engines; "
                               "retry later", kind="rate_limit_error", code="queue_full")
            reply = Reply(server, options, asyncio.get_running_loop())
        except ApiError as e:
            return JSONResponse(e.body(), status_code=e.status)
        except LlaisysError as e:
            return JSONResponse(ApiError(400, str(e)).body(), status_code=400)
        created, ident = int(time.time()), f"chatcmpl-{uuid.uuid4().hex}"
        reply.start()
        if options["stream"]:
            return StreamingResponse(_events(reply, request, ident, created), media_type="text/event-stream",
                                     headers={"Cache-Control": "no-cache"})
        try:
            text = []
            while True:
                kind, value = await _next_or_disconnect(reply, request)
                if kind == "piece":
                    text.append(value)
                elif kind == "gone":
                    return JSONResponse({}, status_code=499)
                elif kind == "error":
                    return JSONResponse(value.body(), status_code=value.status)
                else:
                    message = {"role": "assistant", "content": "".join(text)}
                    body = {"id": ident, "object": "chat.completion", "created": created, "model": server.model,
                            "choices": [{"index": 0, "message": message, "finish_reason": finish_reason(value)}],
                            "usage": usage(value)}
                    return JSONResponse(body, headers={CONTEXT_HEADER: str(value.stats.dropped_messages)})
        finally:
            reply.stop()

    async def _events(reply: Reply, request, ident: str, created: int):
        def chunk(delta: dict, finish=None, **extra) -> str:
            data = {"id": ident, "object": "chat.completion.chunk", "created": created, "model": server.model,
                    "choices": [{"index": 0, "delta": delta, "finish_reason": finish}], **extra}
            return f"data: {json.dumps(data)}\n\n"

        try:
            yield chunk({"role": "assistant", "content": ""})
            while True:
                kind, value = await reply.pieces.get()  # a disconnect cancels this: Starlette watches for it
                if kind == "piece":
                    yield chunk({"content": value})
                elif kind == "error":
                    yield f"data: {json.dumps(value.body())}\n\n"
                    return
                else:
                    yield chunk({}, finish_reason(value), usage=usage(value),
                                llaisys={"dropped_messages": value.stats.dropped_messages})
                    yield "data: [DONE]\n\n"
                    return
        finally:
            reply.stop()

    async def models(request):
        try:
            server.check_key(request)
        except ApiError as e:
            return JSONResponse(e.body(), status_code=e.status)
        return JSONResponse(server.models())

    async def health(request):
        status, body = await asyncio.to_thread(server.health)
        return JSONResponse(body, status_code=status)

    return Starlette(routes=[Route("/v1/chat/completions", chat_completions, methods=["POST"]),
                             Route("/v1/models", models, methods=["GET"]),
                             Route("/health", health, methods=["GET"])])


async def _next_or_disconnect(reply: Reply, request) -> tuple[str, object]:
    """The reply's next event, or ("gone", None) once the HTTP client has disconnected."""
    while True:
        try:
            return await asyncio.wait_for(reply.pieces.get(), timeout=0.25)
        except asyncio.TimeoutError:
            if await request.is_disconnected():
                return "gone", None


def parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="llaisys-chat serve", description="Serve the cluster's model over an "
                                "OpenAI-compatible HTTP API (/v1/chat/completions, /v1/models, /health).")
    add_version_option(p)
    add_cluster_options(p)
    p.add_argument("--host", default="127.0.0.1", help="address to listen on (default: 127.0.0.1, this machine only)")
    p.add_argument("--port", type=int, default=8000, help="port to listen on (default: 8000)")
    p.add_argument("--api-key", help="require 'Authorization: Bearer KEY' on every request")
    p.add_argument("--no-api-key", action="store_true",
                   help="allow a non-local --host without --api-key (anyone who reaches it can use the engines)")
    return p


def is_local(host: str) -> bool:
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return host == "localhost"


def main(argv) -> int:
    """Entry point of `llaisys-chat serve`."""
    args = parser().parse_args(argv)
    if not is_local(args.host) and args.api_key is None:
        if not args.no_api_key:
            print(f"llaisys-chat serve: error: --host {args.host} is reachable from other machines: give --api-key KEY "
                  "(or --no-api-key to serve anyone who can reach it)", file=sys.stderr)
            return 2
        print(f"llaisys-chat serve: warning: serving {args.host} without an API key: anyone who reaches it can "
              "use the engines", file=sys.stderr)
    import uvicorn

    # A kill (SIGTERM) or a closed terminal (SIGHUP) still closes the client, which stops the cluster
    # if this process started it (uvicorn re-raises the signal to this handler after shutting down).
    for sig in (signal.SIGHUP, signal.SIGTERM):
        signal.signal(sig, lambda signum, frame: sys.exit(128 + signum))
    try:
        client = cluster.connect(**cluster_options(args))
    except LlaisysError as e:
        print(f"llaisys-chat serve: error: {e}", file=sys.stderr)
        return 1
    try:
        server = Server(client, client.spec["model"], args.api_key)
        print(f"llaisys-chat serve: {server.model} on {counted(client.n_ranks, 'rank')} at http://{args.host}:{args.port}/v1",
              file=sys.stderr, flush=True)
        uvicorn.run(build_app(server), host=args.host, port=args.port, log_level="warning")
        return 0
    finally:
        client.close()
