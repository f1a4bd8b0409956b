"""Response-length prediction in vLLM's API server process (an ASGI middleware), off the engine loop.

    ECOSERVE_MIDDLEWARE_PREDICTOR=default ECOSERVE_TRUST_CLIENT_HINTS=1 vllm serve MODEL \\
        --middleware ecoserve_sched.engines.vllm_middleware.EcoServePredictMiddleware \\
        --scheduler-cls ecoserve_sched.engines.vllm_scheduler.EcoServeVllmAutoScheduler

vLLM builds the class with ``app.add_middleware(cls)`` (no arguments), so it is configured by
environment variables (:class:`MiddlewareConfig`). For every HTTP ``POST`` it:

1. reads the body, at most ``ECOSERVE_MIDDLEWARE_MAX_BODY_BYTES`` (streamed bodies included);
2. in a thread pool (never on the event loop): parses it with ``json.loads``, the parser FastAPI
   uses for vLLM's endpoints, and removes every ``rl_*`` key from each ``vllm_xargs`` /
   ``extra_args`` mapping anywhere in it - the client's hints never reach the engine from a
   body it read (one it cannot vet passes as sent when hints are not trusted: below);
3. for ``/v1/chat/completions`` (the ``messages``), ``/v1/completions`` (a single ``prompt``
   string), SageMaker's ``/invocations`` (either, :func:`predict_field`), the Anthropic
   Messages API's ``/v1/messages`` and the Responses API's ``/v1/responses`` (the chat vLLM
   makes of each, :func:`anthropic_messages`, :func:`responses_messages`), runs the predictor
   on the text the user sent, as the bundle's input spec reads it (e.g. the last user message,
   prefixed with the served model's name), and sets ``rl_bucket``,
   ``rl_pred_tokens`` and ``rl_reserve_tokens`` in ``vllm_xargs``;
4. passes the body on: the original bytes when nothing changed; with the predicted
   ``vllm_xargs`` appended as the object's last member when no client hint was found (no full
   re-serialisation: see :func:`_append_xargs`); else re-serialised from the parsed document.

With the middleware in front, ``ECOSERVE_TRUST_CLIENT_HINTS=1`` on the scheduler trusts only
hints this process set. Failures never fail a request: a body that is not JSON goes on untouched
(vLLM rejects it); a predictor error, a prediction slower than ``ECOSERVE_MIDDLEWARE_TIMEOUT_S``,
or more than ``ECOSERVE_MIDDLEWARE_MAX_PENDING`` predictions in flight, sends the request on
without hints (the scheduler then predicts itself if it has ``ECOSERVE_PREDICTOR``, else uses its
default reservation), counted in :attr:`counters` and logged (at most once a minute per kind;
the counters again at shutdown). Bodies the middleware cannot vet (over the size limit, form
data, which the audio endpoints take, or a body that would take the checking thread past
``MAX_PENDING x MAX_BODY_BYTES`` bytes waiting) go on untouched when hints are not trusted, and
are refused (413 / 415 / 503) when they are, since they could carry hints.

Imports at module load: the standard library and ``rlpredict.records`` (numpy); the predictor
(ONNX Runtime) and the settings parser are imported when the middleware is built.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import os
import re
import time
from collections.abc import Awaitable, Callable, Mapping, MutableMapping
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass, fields
from typing import Any

from rlpredict.inputs import last_user_message
from rlpredict.records import TRACE_MESSAGES, RecordError, parse_messages
from rlpredict.untrusted_text import holds_no_text, is_valid_unicode

logger = logging.getLogger(__name__)

Scope = MutableMapping[str, Any]
Message = MutableMapping[str, Any]
Receive = Callable[[], Awaitable[Message]]
Send = Callable[[Message], Awaitable[None]]
ASGIApp = Callable[[Scope, Receive, Send], Awaitable[None]]

ENV_PREFIX = "ECOSERVE_MIDDLEWARE_"
#: Endpoints whose requests are predicted, and the field holding what the user sent
#: (``ANTHROPIC``: the Messages API's ``system`` and ``messages``, ``anthropic_messages``).
ANTHROPIC = "system+messages"
#: The Responses API's ``instructions`` and ``input`` (``responses_messages``).
RESPONSES = "instructions+input"
PREDICT_PATHS = {"/v1/chat/completions": "messages", "/v1/completions": "prompt", "/v1/messages": ANTHROPIC,
                 "/v1/responses": RESPONSES}
#: SageMaker's route, which vLLM hands chat and completion bodies alike (``predict_field``).
INVOCATIONS = "/invocations"
PREDICTED_ROUTES = frozenset({*PREDICT_PATHS, INVOCATIONS})
#: Mappings that become ``SamplingParams.extra_args`` (vLLM's request models and /inference).
XARG_FIELDS = ("vllm_xargs", "extra_args")
HINT_PREFIX = "rl_"
#: Seconds between two warnings of the same kind (each says how many it stands for).
WARN_EVERY_S = 60.0
FORM_TYPES = ("multipart/form-data", "application/x-www-form-urlencoded")


def media_type(value: bytes) -> str:
    """The media type of a Content-Type value as the form parser reads it (python-multipart:
    latin-1 text, any Unicode space stripped). Was: ``bytes.strip()``, which kept a trailing
    ``\\xa0`` or ``\\x85``, so such a form passed as "not JSON" with its hints."""
    return value.decode("latin-1").split(";")[0].strip().lower()


@dataclass(slots=True)
class MiddlewareConfig:
    """Settings of the middleware; ``from_env`` reads ``ECOSERVE_MIDDLEWARE_<FIELD>`` plus the one
    it shares with the scheduler, ``ECOSERVE_TRUST_CLIENT_HINTS``."""

    predictor: str | None = None  # bundle folder or "default"; None: strip client hints only
    max_body_bytes: int = 4 << 20  # larger bodies are not parsed (refused under trust)
    threads: int = 2  # prediction threads (ONNX Runtime releases the GIL)
    max_pending: int = 16  # predictions queued or running; beyond: no prediction (shed). The
    # checking thread (bodies that get no prediction) holds at most max_pending x max_body_bytes
    timeout_s: float = 1.0  # a prediction not back by then: the request goes on without one
    generator: str | None = None  # the model name for the predictor (else ECOSERVE_GENERATOR, else
    # vLLM's served model name, as the scheduler plug-in gives it; else the request's "model")
    trust_client_hints: bool = False  # ECOSERVE_TRUST_CLIENT_HINTS: refuse unvettable bodies

    @classmethod
    def from_env(cls, environ: Mapping[str, str] | None = None) -> MiddlewareConfig:
        """The settings in ``environ`` (default ``os.environ``), parsed and range-checked by the
        scheduler's ``parse_setting`` (errors name the variable and what it accepts)."""
        from .vllm_scheduler import parse_setting  # lazy: imports vLLM's scheduler

        env = os.environ if environ is None else environ
        names = {f.name: f"{ENV_PREFIX}{f.name.upper()}" for f in fields(cls)}
        names["trust_client_hints"] = "ECOSERVE_TRUST_CLIENT_HINTS"
        values = {name: parse_setting(var, env[var], *_LIMITS[name])  # blank is unset, as the scheduler's
                  for name, var in names.items() if env.get(var, "").strip()}
        if "generator" not in values and "ECOSERVE_GENERATOR" in env:  # the scheduler's, shared
            values["generator"] = parse_setting("ECOSERVE_GENERATOR", env["ECOSERVE_GENERATOR"], str, None, None)
        return cls(**values)


#: (type, lowest, highest) of each setting.
_LIMITS: dict[str, tuple[type, float | None, float | None]] = {
    "predictor": (str, None, None), "max_body_bytes": (int, 1024, 1 << 30), "threads": (int, 1, 64),
    "max_pending": (int, 1, 1_000_000), "timeout_s": (float, 0.001, 3600), "generator": (str, None, None),
    "trust_client_hints": (bool, None, None)}
#: The middleware's own variables (the scheduler's ``from_env`` knows them, and logs any other
#: ``ECOSERVE_MIDDLEWARE_*`` name as unknown: one environment reaches both processes).
SETTINGS = tuple(f"{ENV_PREFIX}{name.upper()}" for name in _LIMITS if name != "trust_client_hints")


# ---- the body: hints out, predictions in (pure functions, run in the thread pool) ------------------
def strip_hints(doc: Any) -> int:
    """Remove every ``rl_*`` key from each ``vllm_xargs`` / ``extra_args`` mapping in ``doc`` (any
    depth, in place); returns how many were removed."""
    removed, stack = 0, [doc]
    while stack:
        node = stack.pop()
        if isinstance(node, dict):
            for key, value in node.items():
                if key in XARG_FIELDS and isinstance(value, dict):
                    for k in [k for k in value if isinstance(k, str) and k.startswith(HINT_PREFIX)]:
                        del value[k]
                        removed += 1
                if isinstance(value, dict | list):
                    stack.append(value)
        elif isinstance(node, list):
            stack.extend(v for v in node if isinstance(v, dict | list))
    return removed


def predict_field(path: str | None, doc: Any) -> str | None:
    """The field of ``doc`` holding what the user sent on ``path``, or None where nothing is
    predicted. On ``/invocations`` vLLM validates the body as each request type it serves in
    turn and takes the first that fits, chat before completion: a body whose ``messages`` is a
    list of objects with a string ``role`` is read as a chat (a chat with no user text gets no
    prediction, as on ``/v1/chat/completions``), else one with a ``prompt`` as a completion;
    anything else (a pooling request, SageMaker's session calls) is not predicted. Was: the
    route was only stripped, so a SageMaker deployment got the scheduler's default
    reservation."""
    field = PREDICT_PATHS.get(path or "")
    if field is not None or path != INVOCATIONS or not isinstance(doc, dict):
        return field
    messages = doc.get("messages")
    if isinstance(messages, list) and all(isinstance(m, dict) and isinstance(m.get("role"), str) for m in messages):
        return "messages"
    return "prompt" if "prompt" in doc else None


def predictor_input(doc: dict, field: str, last_user: bool = False) -> str | list[dict[str, str]] | None:
    """What the user sent, as the predictor takes it: the chat's messages, read by the rule of
    ``rlpredict annotate`` and the trace reader (``records.parse_messages`` with
    ``TRACE_MESSAGES``: roles as ``ROLE_ALIASES`` map them, text parts joined), or the
    completion's single prompt string; None when there is no user text or the messages are not
    valid (was: a rule of its own, to which ``"role": "User"`` was no user). ``last_user``: the
    predictor reads the last user message alone (``responses_messages``'s ``stored``)."""
    if field == ANTHROPIC:
        value: Any = anthropic_messages(doc)
    elif field == RESPONSES:
        value = responses_messages(doc, stored=last_user)
    else:
        value = doc.get(field)
    if field == "prompt":
        if doc.get("prompt_embeds") is not None:  # vLLM makes a request of each embeds entry too,
            return None  # all sharing the body's hints: several prompts (was: the text's hints for all)
        if isinstance(value, list) and len(value) == 1:
            value = value[0]
        # (was: a blank prompt predicted, and a lone surrogate counted as a predictor failure, where
        # a chat's is no text; a reviewer's finds)
        return value if isinstance(value, str) and not holds_no_text(value) and is_valid_unicode(value) else None
    try:
        messages = parse_messages(value, field, TRACE_MESSAGES)
    except RecordError:
        return None
    if last_user:  # the text it reads (was: any user message's: an image-only last turn was
        return None if holds_no_text(last_user_message(messages)) else messages  # predicted as empty text)
    return messages if any(m["role"] == "user" and not holds_no_text(m["content"]) for m in messages) else None


#: The text of a system block Claude Code sends with a per-request hash, which vLLM drops.
BILLING_HEADER = "x-anthropic-billing-header"


def anthropic_messages(doc: dict) -> list[dict[str, Any]] | None:
    """The chat messages vLLM builds from an Anthropic Messages API body (``/v1/messages``), as
    far as their text goes: the top-level ``system`` first (a string whole, or its text blocks
    joined without a separator, Claude Code's billing header left out), then each message, its text
    blocks as text parts and its images as media parts (skipped when read); a user's
    ``tool_result`` becomes a ``tool`` message of its own, before the user's, and a user message
    left with no content is dropped; an assistant's ``tool_result`` is the text part ``Tool
    result: ...``; thinking and tool calls are not text. None if the body has no such list.
    Where the served model's chat template wants the system text first (or it has none), vLLM
    merges the inline system messages' text into the leading one; not done here."""
    messages = doc.get("messages")
    if not isinstance(messages, list):
        return None
    out: list[dict[str, Any]] = []
    system = doc.get("system")
    text = system if isinstance(system, str) else _system_text(system)  # a string is kept whole
    if text:
        out.append({"role": "system", "content": text})
    for m in messages:
        if not isinstance(m, dict):
            return None
        role, content = m.get("role"), m.get("content")
        if role == "system":
            if text := _system_text(content):
                out.append({"role": "system", "content": text})
            continue
        msg: dict[str, Any] = {"role": role}
        if isinstance(content, str):
            msg["content"] = content
        elif isinstance(content, list):
            parts: list[dict[str, Any]] = []
            for block in content:
                if not isinstance(block, dict):
                    return None
                kind = block.get("type")
                if kind == "text" and isinstance(block.get("text"), str) and block["text"]:
                    parts.append({"type": "text", "text": block["text"]})
                elif kind == "image" and block.get("source"):
                    parts.append({"type": "image_url", "image_url": {"url": ""}})
                elif kind == "tool_result" and role == "user":
                    out.extend(_user_tool_result(block.get("content")))
                elif kind == "tool_result":
                    result = block.get("content")
                    parts.append({"type": "text", "text": f"Tool result: {str(result) if result else ''}"})
            if parts:
                msg["content"] = parts[0]["text"] if len(parts) == 1 and parts[0]["type"] == "text" else parts
        else:
            return None
        if role != "user" or "content" in msg:
            out.append(msg)
    return out


def responses_messages(doc: dict, stored: bool = False) -> list[dict[str, Any]] | None:
    """The chat messages vLLM builds from a Responses API body (``/v1/responses``), as far as
    their text goes: ``instructions`` as a system message, then a string ``input`` as the user's
    message, or each input item in turn. An item with a ``role`` is a message as it is, except an
    assistant's with a text (a string, or its first part's): that is an assistant message of that
    text, or the text of the assistant message just before it if that has none yet. A function's
    or custom tool's output is a ``tool`` message. Reasoning and tool calls carry no text; they
    open an assistant message or join the one just before it, as vLLM merges them (a tool call
    joins one whose ``tool_calls`` is absent or a list, a reasoning one without reasoning). None
    where vLLM would refuse an item (encrypted reasoning, a type it does not take), and where it
    reads more than the body (``previous_response_id``: a conversation it holds; gpt-oss's
    ``previous_input_messages``) unless ``stored``: then the messages of the body's own input,
    which come after the stored ones, so that their last user message, if they hold one, is the
    whole chat's (enough for a predictor that reads the last user message alone)."""
    if not stored and (doc.get("previous_response_id") is not None or doc.get("previous_input_messages")):
        return None
    instructions, items = doc.get("instructions"), doc.get("input")
    out: list[dict[str, Any]] = []
    own: set[int] = set()  # the tool-call lists made here (alive in ``out``: their ids stay unique)
    if isinstance(instructions, str) and instructions:
        out.append({"role": "system", "content": instructions})
    if isinstance(items, str):
        return [*out, {"role": "user", "content": items}]
    if not isinstance(items, list):
        return None
    for item in items:
        if not isinstance(item, dict):
            return None
        kind = item.get("type")
        prev = out[-1] if out and out[-1].get("role") == "assistant" else None
        if kind in ("function_call", "custom_tool_call"):
            calls = None if prev is None else prev.get("tool_calls")
            if prev is not None and (calls is None or isinstance(calls, list)):
                if calls is None or id(calls) not in own:  # a new list once: the client's stays as
                    prev["tool_calls"] = calls = [*(calls or [])]  # sent (was: a copy per call,
                    own.add(id(calls))  # quadratic: 40,000 items 0.85 s; a reviewer's find)
                calls.append(kind)
            else:
                out.append({"role": "assistant", "tool_calls": [kind]})
        elif kind == "reasoning":
            if item.get("encrypted_content"):
                return None
            if prev is not None and prev.get("reasoning") is None:
                prev["reasoning"] = True
            else:
                out.append({"role": "assistant", "reasoning": True})
        elif kind in ("function_call_output", "custom_tool_call_output"):
            out.append({"role": "tool", "content": item.get("output")})
        elif "role" not in item:
            return None
        elif item["role"] != "assistant":
            out.append({**item})  # a copy: a merge must not change the body passed on
        else:
            content = item.get("content")
            if isinstance(content, list) and content:
                if not isinstance(content[0], dict):
                    return None
                text = content[0].get("text")
            else:
                text = content if isinstance(content, str) else None
            if text is None:
                out.append({**item})
            elif prev is not None and prev.get("content") is None:
                prev["content"] = text
            else:
                out.append({"role": "assistant", "content": text})
    return out


def _system_text(content: Any) -> str | None:
    """A system message's text as vLLM takes it: a string (None if it is Claude Code's billing
    header), or the text blocks' texts joined, billing headers left out."""
    if isinstance(content, str):
        return None if content.startswith(BILLING_HEADER) else content
    if not isinstance(content, list):
        return None
    texts = [b["text"] for b in content if isinstance(b, dict) and b.get("type") == "text"
             and isinstance(b.get("text"), str) and b["text"] and not b["text"].startswith(BILLING_HEADER)]
    return "".join(texts) or None


def _user_tool_result(content: Any) -> list[dict[str, Any]]:
    """The messages vLLM makes of a user's ``tool_result`` with this ``content``: a ``tool``
    message of its text (a string, or its text items joined by newlines), then a user message of
    its images if it has any, then a ``tool`` message of its tool references if it has any (a
    screenshot's result thus ends the chat with a user message with no text, as in vLLM)."""
    if not isinstance(content, list):
        return [{"role": "tool", "content": content if isinstance(content, str) else ""}]
    items = [i for i in content if isinstance(i, dict)]
    text = "\n".join(str(i.get("text", "")) for i in items if i.get("type") == "text")
    out: list[dict[str, Any]] = [{"role": "tool", "content": text}]
    images = sum(1 for i in items if i.get("type") == "image" and _image_url(i.get("source", {})))
    if images:
        out.append({"role": "user", "content": [{"type": "image_url", "image_url": {"url": ""}}] * images})
    refs = sum(1 for i in items if i.get("type") == "tool_reference" and (i.get("tool_name") or i.get("name")))
    if refs:
        out.append({"role": "tool", "content": [{"type": "tool_reference"}] * refs})
    return out


def _image_url(source: Any) -> bool:
    """Whether vLLM gets an image URL from an image block's ``source``: a ``url`` source's URL if
    not empty, else always (a base64 data URI)."""
    if not isinstance(source, dict):
        return False  # (vLLM fails such a request)
    return bool(source.get("url")) if source.get("type") == "url" else True


def cannot_hold_hints(body: bytes) -> bool:
    """A JSON object or array in UTF-8 in which no hint key can be spelt: no ``rl_``, no
    backslash (``\\u0072l_``), no ``%`` (a form parser's ``%72l_``), no NUL byte (UTF-16 and
    UTF-32 put NULs between the letters of ``rl_``). Such a body, sent as JSON
    (``_json_type``), needs no parse to be passed on."""
    return body[:1] in (b"{", b"[") and not any(t in body for t in (b"rl_", b"\\", b"%", b"\x00"))


def _json_type(types: list[bytes]) -> bool:
    """One Content-Type header, ``application/json`` or a ``+json`` type, with no other charset
    than UTF-8: the only bodies the fast path takes (a reviewer of it sent a multipart form
    under a type this check's parser and python-multipart's read apart, in UTF-7, whose
    ``+AHI-l+AF8-bucket`` Starlette decoded to ``rl_bucket``)."""
    if len(types) != 1:
        return False
    kind = media_type(types[0])
    charset = re.search(rb"charset\s*=\s*\"?([^\s;\"]+)", types[0], re.IGNORECASE)
    return (kind == "application/json" or kind.endswith("+json")) and \
        (charset is None or charset.group(1).lower() in (b"utf-8", b"utf8"))


@dataclass(slots=True)
class Rewrite:
    """The outcome for one body: the bytes to send on (None: the original) and what happened."""

    body: bytes | None
    outcome: str  # not_json | no_text | predicted | shed | busy | predictor_error | other_path | error
    stripped: int = 0
    error: BaseException | None = None


def _hints(out: Any, limits: Mapping[str, tuple[int, int]]) -> dict[str, int]:
    """A prediction as scheduler hints, each checked against the scheduler's ``HINT_LIMITS``."""
    hints = {}
    for key in ("bucket", "pred_tokens", "reserve_tokens"):
        value = getattr(out, key)
        n = int(value)
        lo, hi = limits[f"rl_{key}"]
        if n != value or not lo <= n <= hi:
            raise ValueError(f"the predictor returned {key}={value!r}, not an integer in [{lo}, {hi}]")
        hints[f"rl_{key}"] = n
    return hints


# ---- the middleware ---------------------------------------------------------------------------------
class EcoServePredictMiddleware:
    """ASGI middleware: strips client ``rl_*`` hints and sets predicted ones (module docstring).

    ``config`` and ``predictor`` (any object with ``predict(requests, generators)``, see
    ``ecoserve_sched.predictor``) are for tests and embedding; vLLM passes neither.
    """

    def __init__(self, app: ASGIApp, config: MiddlewareConfig | None = None,
                 predictor: Any = None) -> None:
        self.app = app
        self.setup_error: str | None = None
        try:  # the scheduler module checks the vLLM version at import: inside, too
            from .vllm_scheduler import HINT_LIMITS

            self.cfg = config if config is not None else MiddlewareConfig.from_env()
            if predictor is None and self.cfg.predictor:
                predictor = load_bundle(self.cfg.predictor)
        except Exception as e:  # EcoServeSetupError (defined in that module), or its import's
            if config is not None:
                raise
            # Built by the server (Starlette builds its middleware stack at the first call, the
            # lifespan's): an exception there is read by uvicorn as "lifespan unsupported", and
            # the server ran, answering 500 to every request. Failing the startup stops it.
            self.setup_error = str(e)
            logger.error("EcoServe middleware: %s", e)
            return
        self._limits = HINT_LIMITS
        self.predictor = predictor
        # a predictor that reads the last user message alone can predict a Responses request that
        # continues a stored conversation from its own input (``responses_messages``)
        self._last_user = getattr(getattr(predictor, "input_spec", None), "mode", None) == "last_user"
        self._pool = ThreadPoolExecutor(self.cfg.threads, thread_name_prefix="ecoserve-predict")
        # bodies that get no prediction (other endpoints, shed, timed out) are checked here,
        # never queued behind predictions; at most plain_limit bytes of them wait or run
        self._plain_pool = ThreadPoolExecutor(1, thread_name_prefix="ecoserve-strip")
        self._pending = 0  # predictions submitted and not finished (touched on the loop only)
        self._plain_bytes = 0  # bytes of the bodies the checking thread holds (queued or running)
        self._stuck: set[Future] = set()  # predictions past their timeout, still running
        self.counters = dict.fromkeys(
            ("requests", "predicted", "stripped_requests", "stripped_keys", "not_json", "no_text",
             "shed", "timeouts", "busy", "predictor_errors", "oversized", "form_bodies", "refused",
             "errors", "unauthorized"), 0)
        self._auth: Any = _UNSET  # vLLM's --api-key middleware, found in the stack at the first call
        self.predict_s: list[float] = []  # seconds per prediction (bounded, for benchmarks)
        self._warned: dict[str, tuple[float, int]] = {}  # kind -> (last warning, since then)
        from .vllm_scheduler import log_through_vllm

        log_through_vllm(logger)
        mode = f"predictor {self.cfg.predictor or type(predictor).__name__}" if predictor else "no predictor"
        logger.info("EcoServe middleware: %s on %s; client rl_* hints stripped from every JSON body; "
                    "max body %d bytes, %d threads, at most %d pending, %g s per prediction; "
                    "ECOSERVE_TRUST_CLIENT_HINTS=%d", mode, ", ".join([*PREDICT_PATHS, INVOCATIONS]),
                    self.cfg.max_body_bytes, self.cfg.threads, self.cfg.max_pending,
                    self.cfg.timeout_s, self.cfg.trust_client_hints)
        if predictor is not None and not self.cfg.trust_client_hints:
            logger.warning("EcoServe middleware: ECOSERVE_TRUST_CLIENT_HINTS is off, so the scheduler "
                           "ignores the hints set here; set it to 1 in the environment of `vllm serve`")

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if self.setup_error is not None:
            await self._setup_failed(scope, receive, send)
            return
        if scope["type"] == "lifespan":
            await self.app(scope, self._log_at_shutdown(receive), send)
            return
        if scope["type"] != "http" or scope.get("method") != "POST":
            await self.app(scope, receive, send)
            return
        self.counters["requests"] += 1
        if self._refused_by_vllm(scope):  # no key: vLLM answers 401 and nothing reaches the engine
            self.counters["unauthorized"] += 1
            await self.app(scope, receive, send)  # so the body is never read (was: parsed first)
            return
        types = [v for k, v in scope.get("headers") or () if k.lower() == b"content-type"]
        if len(types) > 1 and self.cfg.trust_client_hints:  # which one the app reads is its choice
            self.counters["form_bodies"] += 1
            await self._refuse(send, 415, "more than one Content-Type header: the body cannot be "
                               "checked for rl_* hints while ECOSERVE_TRUST_CLIENT_HINTS=1")
            return
        if types and media_type(types[0]) in FORM_TYPES:  # audio endpoints: vllm_xargs is a form field
            self.counters["form_bodies"] += 1
            if self.cfg.trust_client_hints:
                await self._refuse(send, 415, "form data cannot be checked for rl_* hints while "
                                   "ECOSERVE_TRUST_CLIENT_HINTS=1; send JSON")
                return
            await self.app(scope, receive, send)
            return
        chunks, size, more = [], 0, True
        chunk, message = b"", {}  # (a limit below 0 reads nothing)
        while more and size <= self.cfg.max_body_bytes:
            message = await receive()
            if message["type"] != "http.request":  # the client left: let the app see it
                await self.app(scope, _replay(chunks, True, receive, message), send)
                return
            chunk = message.get("body", b"")
            chunks.append(chunk)
            size += len(chunk)
            more = bool(message.get("more_body", False))
        if size > self.cfg.max_body_bytes:
            self.counters["oversized"] += 1
            self._warn("oversized", "a request body is over ECOSERVE_MIDDLEWARE_MAX_BODY_BYTES=%d; "
                           "%s", self.cfg.max_body_bytes,
                           "refused (413)" if self.cfg.trust_client_hints else "passed on unparsed")
            if self.cfg.trust_client_hints:
                await self._refuse(send, 413, f"request body over {self.cfg.max_body_bytes} bytes "
                                   "(ECOSERVE_MIDDLEWARE_MAX_BODY_BYTES)")
                return
            replay = _replay(chunks, more, receive)
            del chunks, chunk, message
            await self.app(scope, replay, send)
            return
        body, path, served = b"".join(chunks), _route(scope), _served_name(scope)
        chunks.clear()  # one copy of the body per waiting request (was: two)
        chunk, message = b"", {}
        result = None
        if self.predictor is not None and path in PREDICTED_ROUTES:
            if self._pending < self.cfg.max_pending and len(self._stuck) < self.cfg.threads:
                result = await self._predicted(body, path, served)
            else:  # every queue slot taken, or every thread held by a prediction past its timeout
                self.counters["shed"] += 1
                self._warn("shed", "%d predictions in flight (ECOSERVE_MIDDLEWARE_MAX_PENDING), %d of them "
                           "past ECOSERVE_MIDDLEWARE_TIMEOUT_S; requests go on without a prediction",
                           self._pending, len(self._stuck))
        if result is None and path not in PREDICTED_ROUTES and _json_type(types) and cannot_hold_hints(body):
            # nothing to strip, so not parsed (was: any JSON POST, to a path vLLM routes nowhere
            # or does not guard, parsed on the one checking thread: 16 unauthenticated 4 MiB
            # bodies made an authorized request wait 46 s, or refused it with 503)
            result = Rewrite(None, "other_path")
        if result is None:  # no prediction: the checking thread, if it has room
            if self._plain_bytes and self._plain_bytes + len(body) > self.plain_limit:
                self.counters["busy"] += 1
                self._warn("busy", "%d bytes of bodies wait for the checking thread (at most MAX_PENDING x "
                           "MAX_BODY_BYTES); %s", self._plain_bytes, "refused (503)" if self.cfg.trust_client_hints
                           else "passed on unparsed (the scheduler ignores client hints)")
                if self.cfg.trust_client_hints:
                    await self._refuse(send, 503, "the server is busy checking request bodies for rl_* "
                                       "hints; retry", retry_after=1)
                    return
                result = Rewrite(None, "busy")
            else:
                try:
                    result = await asyncio.wrap_future(self._submit(self._plain_pool, "_plain_bytes", len(body),
                                                                    body, path, False, served))
                except Exception as e:  # a bug, or a document json cannot write back: never fail for it
                    result = Rewrite(None, "error", error=e)
        self._count(result)
        if result.outcome == "error" and self.cfg.trust_client_hints:  # it may carry hints
            await self._refuse(send, 400, "the request body could not be checked for rl_* hints")
            return
        if result.outcome == "not_json" and self.cfg.trust_client_hints and body.strip():
            # a form in disguise (a Content-Type this check does not read as a form, that the
            # app's form parser does) would reach the scheduler with the client's hints
            self.counters["form_bodies"] += 1
            await self._refuse(send, 415, "a body that is not JSON cannot be checked for rl_* hints "
                               "while ECOSERVE_TRUST_CLIENT_HINTS=1; send JSON")
            return
        if result.body is not None:
            scope = dict(scope, headers=[(k, str(len(result.body)).encode() if k == b"content-length" else v)
                                         for k, v in scope.get("headers") or ()])
            body = result.body
        replay = _replay([body], False, receive)
        # the app holds the body until it has read it; this frame must not while the response
        # streams (was: one to two copies per open request, for the whole generation)
        del chunks, chunk, message, body, result
        await self.app(scope, replay, send)

    async def _predicted(self, body: bytes, path: str, served: str | None) -> Rewrite | None:
        """``rewrite`` with a prediction, in the prediction pool; None if it is not back within
        ``cfg.timeout_s`` (one not started by then never runs). A prediction counts as pending
        until its thread is done with it; one still running past its timeout holds its thread
        (``_stuck``), and once every thread is held so, later requests are shed at once: a hung
        predictor makes no request wait more than one timeout."""
        try:
            future = self._submit(self._pool, "_pending", 1, body, path, True, served)
            return await asyncio.wait_for(asyncio.wrap_future(future), self.cfg.timeout_s)
        except asyncio.TimeoutError:
            if not future.cancel() and not future.done():  # running: it holds its thread until it
                self._stuck.add(future)  # returns (a done one already ran _finished: was kept here)
            self.counters["timeouts"] += 1
            self._warn("timeout", "a prediction took longer than ECOSERVE_MIDDLEWARE_TIMEOUT_S=%g s; "
                       "requests go on without a prediction", self.cfg.timeout_s)
            return None
        except Exception as e:  # a bug, or a document json cannot write back: never fail for it
            return Rewrite(None, "error", error=e)

    def _submit(self, pool: ThreadPoolExecutor, counter: str, amount: int, *args: Any) -> Future:
        """``rewrite(*args)`` in ``pool``, with ``amount`` added to ``self.<counter>`` until its
        thread is done with it (or it is cancelled before it starts), whatever happens to the
        request that awaits it (was: dropped when that request was cancelled, the work still
        queued)."""
        loop = asyncio.get_running_loop()
        box = [args]  # taken out by the thread: the body is let go when ``rewrite`` returns (was:
        # held by the pool's work item until its thread took the next one, after we resumed)

        def call() -> Any:
            return self.rewrite(*box.pop())

        future = pool.submit(call)  # (a pool shut down raises: nothing counted)
        setattr(self, counter, getattr(self, counter) + amount)

        def done(f: Future) -> None:  # in the worker thread, or here if cancelled before it ran
            with contextlib.suppress(RuntimeError):  # the loop is closed: the server is gone
                loop.call_soon_threadsafe(self._finished, counter, amount, f)

        future.add_done_callback(done)  # before wrap_future's: the count drops before we resume
        return future

    def _finished(self, counter: str, amount: int, future: Future) -> None:
        setattr(self, counter, getattr(self, counter) - amount)
        self._stuck.discard(future)

    @property
    def plain_limit(self) -> int:
        """Bytes of bodies the checking thread may hold: ``max_pending`` bodies of the largest
        size (64 MiB by default). Counted in bytes, not bodies: a burst of small requests never
        fills it (was: 16 bodies, so under trusted hints 31 of 64 small requests got 503), and
        one body always gets in."""
        return self.cfg.max_pending * self.cfg.max_body_bytes

    def _log_at_shutdown(self, receive: Receive) -> Receive:
        """``receive`` of the lifespan protocol, logging the counters when the server stops."""
        async def logged() -> Message:
            message = await receive()
            if message.get("type") == "lifespan.shutdown":
                logger.info("EcoServe middleware: counters at shutdown: %s",
                            ", ".join(f"{k} {v}" for k, v in self.counters.items()))
            return message

        return logged

    def rewrite(self, body: bytes, path: str | None, predict: bool, served: str | None = None) -> Rewrite:
        """The body with client hints removed and, if ``predict``, predicted ones set (the
        predictor given ``cfg.generator``, else ``served``: vLLM's served model name, else the
        request's "model"). Runs in the thread pool; never raises."""
        try:
            doc = json.loads(body)
        except (ValueError, RecursionError):  # not JSON (or UTF-8/16/32): vLLM rejects it too
            return Rewrite(None, "not_json")
        stripped = strip_hints(doc)
        outcome, hints, error = "other_path", None, None
        field = predict_field(path, doc)
        if field is not None and isinstance(doc, dict):
            request = predictor_input(doc, field, self._last_user)
            xargs = doc.get("vllm_xargs")
            if request is None or not (xargs is None or isinstance(xargs, dict)):
                outcome = "no_text"
            elif not predict:
                outcome = "shed" if self.predictor is not None else "other_path"
            else:
                generator = self.cfg.generator or served or (
                    doc["model"] if isinstance(doc.get("model"), str) else None)
                t0 = time.perf_counter()
                try:
                    hints = _hints(self.predictor.predict([request], [generator])[0], self._limits)
                    outcome = "predicted"
                except Exception as e:  # any predictor failure: no hints, the request goes on
                    outcome, error = "predictor_error", e
                if len(self.predict_s) < 100_000:
                    self.predict_s.append(time.perf_counter() - t0)
                if hints:
                    doc["vllm_xargs"] = {**(xargs or {}), **hints}
        if not stripped and not hints:
            return Rewrite(None, outcome, 0, error)
        if stripped or json.detect_encoding(body) not in ("utf-8", "utf-8-sig"):
            return Rewrite(json.dumps(doc, separators=(",", ":")).encode(), outcome, stripped, error)
        return Rewrite(_append_xargs(body, doc["vllm_xargs"]), outcome, 0, error)

    def _count(self, r: Rewrite) -> None:
        c = self.counters
        if r.outcome in ("not_json", "no_text", "predicted"):
            c[r.outcome] += 1
        elif r.outcome == "error":
            c["errors"] += 1
            self._warn("error", "checking a request body failed (%r); %s", r.error,
                           "refused (400)" if self.cfg.trust_client_hints else "passed on unchanged")
        elif r.outcome == "predictor_error":
            c["predictor_errors"] += 1
            self._warn("predictor", "the predictor failed (%r); requests go on without a "
                           "prediction", r.error)
        if r.stripped:
            c["stripped_requests"] += 1
            c["stripped_keys"] += r.stripped

    def _warn(self, kind: str, msg: str, *args: Any) -> None:
        """A warning of ``kind``: the first, then at most one every ``WARN_EVERY_S`` seconds,
        saying how many happened since the last (was: once per server, so one client's bad
        text hid a predictor that broke later)."""
        now = time.monotonic()
        last, since = self._warned.get(kind, (None, 0))
        if last is not None and now - last < WARN_EVERY_S:
            self._warned[kind] = (last, since + 1)
            return
        self._warned[kind] = (now, 0)
        more = f"; {since} more since the last warning" if since else ""
        logger.warning("EcoServe middleware: " + msg + " (counted in counters; at most one warning a "
                       "minute of each kind" + more + ")", *args)

    def _refused_by_vllm(self, scope: Scope) -> bool:
        """Whether vLLM's ``--api-key`` middleware, inside this one, will refuse the request:
        its own rule (a guarded path without a valid bearer token), asked of it."""
        if self._auth is _UNSET:
            self._auth = _vllm_authentication(self.app)
        if self._auth is None:
            return False
        auth, guarded = self._auth
        path = str(scope.get("path", "")).removeprefix(str(scope.get("root_path", "") or ""))
        try:
            from starlette.datastructures import Headers

            return path.startswith(guarded) and not auth.verify_token(Headers(scope=scope))
        except Exception:  # its interface changed: read the body as before
            return False

    async def _setup_failed(self, scope: Scope, receive: Receive, send: Send) -> None:
        """A setting or the bundle is unusable: the server's startup fails with the error (its
        lifespan protocol), and anything that reaches it anyway gets the error, not the app."""
        why = f"EcoServe middleware: {self.setup_error}"
        if scope["type"] == "lifespan":
            message = await receive()
            if message["type"] == "lifespan.startup":
                await send({"type": "lifespan.startup.failed", "message": why})
            else:
                await send({"type": "lifespan.shutdown.complete"})
        elif scope["type"] == "http":
            await _send_error(send, 500, why, "InternalServerError")
        elif scope["type"] == "websocket":
            await send({"type": "websocket.close", "code": 1011, "reason": why[:120]})

    async def _refuse(self, send: Send, status: int, why: str, retry_after: int | None = None) -> None:
        self.counters["refused"] += 1
        await _send_error(send, status, why, "ServiceUnavailableError" if status == 503 else "BadRequestError",
                          retry_after)


async def _send_error(send: Send, status: int, why: str, kind: str, retry_after: int | None = None) -> None:
    """An OpenAI-style JSON error response (vLLM's shape)."""
    body = json.dumps({"error": {"message": why, "type": kind, "param": None, "code": status}}).encode()
    headers = [(b"content-type", b"application/json"), (b"content-length", str(len(body)).encode())]
    if retry_after is not None:
        headers.append((b"retry-after", str(retry_after).encode()))
    await send({"type": "http.response.start", "status": status, "headers": headers})
    await send({"type": "http.response.body", "body": body})


def _append_xargs(body: bytes, xargs: dict) -> bytes:
    """``body`` (a UTF-8 JSON object holding no client hint) with ``"vllm_xargs": xargs`` added
    as its last member: a duplicate key, if the client sent one, that ``json.loads`` (FastAPI) and
    pydantic both resolve to the last. Saves re-serialising the whole body (the GIL) for every
    request; bodies with client hints are re-serialised instead, so that safety never depends on
    which duplicate a parser keeps."""
    end = body.rstrip()
    return end[:-1] + b',"vllm_xargs":' + json.dumps(xargs, separators=(",", ":")).encode() + b"}"


def load_bundle(name: str) -> Any:
    """The predictor bundle ``name`` (a folder, or "default": the shipped one), loaded and run
    once; a bundle that cannot be used is a start-up error naming the variable."""
    from rlpredict.serve.runtime import Predictor  # lazy: ONNX Runtime, no torch

    from .vllm_scheduler import EcoServeSetupError

    t0 = time.perf_counter()
    try:
        predictor = Predictor.load(None if name == "default" else name, threads=1)
        predictor.predict(["Hello"], ["warm-up"])
    except Exception as e:
        raise EcoServeSetupError(f"{ENV_PREFIX}PREDICTOR={name!r}: cannot use this predictor bundle "
                                 f"({e}); expected a folder written by `rlpredict export`, or "
                                 "'default' for the shipped one") from e
    logger.info("EcoServe middleware: predictor %s loaded and checked in %.2f s", name, time.perf_counter() - t0)
    return predictor


_UNSET = object()


def _vllm_authentication(app: Any, depth: int = 64) -> tuple[Any, tuple[str, ...]] | None:
    """vLLM's ``AuthenticationMiddleware`` among the apps inside ``app`` (each middleware holds
    the next as ``.app``) and its guarded path prefixes; None when the server has no
    ``--api-key`` (or a vLLM without that middleware)."""
    import sys

    for _ in range(depth):
        if app is None:
            return None
        if type(app).__name__ == "AuthenticationMiddleware" and callable(getattr(app, "verify_token", None)):
            guarded = getattr(sys.modules.get(type(app).__module__), "GUARDED_PREFIX", None)
            if isinstance(guarded, str):
                guarded = (guarded,)
            ok = isinstance(guarded, tuple) and all(isinstance(g, str) for g in guarded)
            return (app, guarded) if ok else None
        app = getattr(app, "app", None)
    return None


def _route(scope: Scope) -> str:
    """The request's path without the server's ``root_path`` (``--root-path``), as Starlette's
    router reads it: the root is cut only where a ``/`` follows it (was: any prefix, so with
    ``--root-path /`` nothing was predicted)."""
    path, root = str(scope.get("path", "")), str(scope.get("root_path", "") or "")
    if not root or not path.startswith(root):
        return path
    if path == root:
        return ""
    return path[len(root):] if path[len(root)] == "/" else path


def _served_name(scope: Scope) -> str | None:
    """vLLM's first served model name (what its scheduler plug-in gives the predictor), from the
    app's state; None where the app has none (a test app)."""
    try:
        return str(scope["app"].state.openai_serving_models.base_model_paths[0].name)
    except (KeyError, AttributeError, IndexError, TypeError):
        return None


def _replay(chunks: list[bytes], more: bool, receive: Receive, last: Message | None = None) -> Receive:
    """A ``receive`` that yields the body read so far (one message), then ``last`` if given, then
    defers to ``receive`` (the rest of a streamed body, or the client's disconnect)."""
    queue: list[Message] = [{"type": "http.request", "body": b"".join(chunks), "more_body": more}]
    chunks.clear()  # joined: the pieces are not held while the response streams
    if last is not None:
        queue.append(last)

    async def replay() -> Message:
        return queue.pop(0) if queue else await receive()

    return replay
