"""The OpenAI-compatible ingress: FastAPI under `serve.ingress`. It checks the API key and the body, tokenizes
and applies the chat template (nanovllm_ray/serving), then calls the LLMServer through a DeploymentHandle with
the token ids as the first argument, one call per choice, and streams Server-Sent Events or answers JSON."""

# No `from __future__ import annotations` here: FastAPI reads the endpoints' annotations at run time.
import asyncio
import hmac
import json
import logging
import math
import os
import time
import uuid
from collections.abc import AsyncIterator
from typing import Any

from fastapi import FastAPI, Request
from fastapi.responses import JSONResponse, Response, StreamingResponse
from pydantic import BaseModel, ValidationError
from ray import serve
from ray.exceptions import RayActorError
from ray.serve.exceptions import BackPressureError
from ray.serve.handle import DeploymentHandle

from deployments.fast_path import avoid_replica, pick_replica
from nanovllm_ray import stages
from nanovllm_ray.config import Config
from nanovllm_ray.engine.async_engine import ERROR, REFUSED, EngineDeadError, RequestFailedError
from nanovllm_ray.engine.core import CoreRef
from nanovllm_ray.engine.llm_engine import RequestError, load_tokenizer
from nanovllm_ray.engine.output import Delta, RequestOutput, RequestState
from nanovllm_ray.serving.openai_protocol import (
    ChatChoiceLogprobs,
    ChatCompletionChoice,
    ChatCompletionRequest,
    ChatCompletionResponse,
    ChatCompletionStreamResponse,
    ChatResponseMessage,
    ChatTokenLogprob,
    CompletionChoice,
    CompletionLogprobs,
    CompletionRequest,
    CompletionResponse,
    ModelCard,
    ModelList,
    OpenAIError,
    PromptTokensDetails,
    TopLogprob,
    UsageInfo,
)
from nanovllm_ray.serving.request_processor import Choice, RequestProcessor

logger = logging.getLogger("ray.serve")

# A choice whose replica dies before its response starts is sent again, twice at most: a replica killed a moment ago
# may still be routed to once (it answers "unavailable" until Ray learns that it died; the routers then avoid it).
START_ATTEMPTS = 3
HEALTH_ATTEMPTS = 2  # /health answers within HEALTH_ATTEMPTS x HEALTH_TIMEOUT_S (a Kubernetes probe's timeout)
HEALTH_TIMEOUT_S = 1.0

app = FastAPI(title="nanovllm-ray", description="OpenAI-compatible API of a nano-vllm-style Qwen3 engine")


@app.exception_handler(OpenAIError)
async def _openai_error(request: Request, e: OpenAIError) -> JSONResponse:
    headers = {"Retry-After": str(math.ceil(e.retry_after_s))} if e.retry_after_s is not None else None
    return JSONResponse(e.body(), status_code=e.status, headers=headers)


class _Run:
    """The LLMServer calls of one HTTP request, one per choice, merged into one stream of deltas. Each choice's
    RequestState (the shared output path) detokenizes and applies stop strings here, off the engine's loop.

    A choice's tokens come from the engine core through the ingress's reader for that core (a subscription:
    one message per engine step for all of this ingress's requests there); its LLMServer call streams only
    where to read and any error, and stays open while the request runs. Cancelling the call (a client gone
    away, a stop string found here) aborts the request on the engine. A choice whose replica or engine dies
    before the response has started is sent again (Serve routes it to a live replica): the client never knew. For a
    stream that is before its first event; a response sent whole (resend_late) starts only when every choice has
    finished, so its choices are sent again, from the start, whenever their replica dies."""

    def __init__(self, ingress: "OpenAIIngress", request_id: str, choices: list[Choice], tokenizer,
                 resend_late: bool = False) -> None:
        self.request_id = request_id
        self.created = int(time.time())
        self.choices = choices
        self._tokenizer = tokenizer
        self.states = [self._state(f"{request_id}-{c.index}", c) for c in choices]
        self._resend_late = resend_late
        self.cores: list[str | None] = [None] * len(choices)  # the engine core each choice runs on
        self._rids = [s.request_id for s in self.states]  # each choice's engine request id (a new one per attempt)
        self._attempts = [0] * len(choices)
        self._fast: list = [None] * len(choices)  # the channel a choice's add went on, when the ingress sent it
        self._ingress = ingress
        self._queue: asyncio.Queue = asyncio.Queue()  # (choice, engine request id, output or error)
        self._tasks: list[asyncio.Task | None] = [None] * len(choices)
        self._gens: list = [None] * len(choices)
        self._pending: list[tuple[int, Any]] = []  # what arrived before the response started
        self._live = set(range(len(choices)))

    def _state(self, request_id: str, c: Choice) -> RequestState:
        return RequestState(request_id, c.params, self._tokenizer, len(c.prompt_token_ids))

    def _resend(self, i: int, error: BaseException) -> bool:
        """Send choice i again, from its start, if its replica or engine was lost and it has attempts left."""
        if not (_replica_lost(error) and self._attempts[i] < START_ATTEMPTS - 1):
            return False
        rid = self._rids[i]
        logger.warning("request %s: %s; sending it again", rid, type(error).__name__)
        self._cancel(i)
        self._ingress.routes.pop(rid, None)
        self._attempts[i] += 1
        self._rids[i] = f"{self.states[i].request_id}-r{self._attempts[i]}"
        self.states[i] = self._state(self.states[i].request_id, self.choices[i])
        self.cores[i] = None
        self._send(i)
        return True

    def _send(self, i: int, pin: str | None = None) -> None:
        """Call the LLMServer for choice i; pin: the replica whose engine core has its add already (fast path)."""
        ingress, c, rid = self._ingress, self.choices[i], self._rids[i]
        ingress.routes[rid] = (self, i)
        core = ingress.cores_by_replica.get(pin) if pin is not None else None
        conn = ingress.conns.get(core.core_id) if core is not None else None
        if conn is not None:
            try:
                conn.send([("add", rid, c.prompt_token_ids, c.params, ingress.subscriber)])
                self._fast[i], self.cores[i] = conn, core.core_id
            except (RuntimeError, OSError):  # its channel closed since the pick: the ordinary path
                conn = None
        pin = pin if conn is not None else None
        if stages.ENABLED:
            stages.stamp("ingress_call", rid)
        gen = ingress.llm.generate.remote(c.prompt_token_ids, c.params, rid, ingress.subscriber, pin=pin)
        self._gens[i] = gen
        self._tasks[i] = asyncio.create_task(self._pump(i, rid, gen))

    async def start(self) -> None:
        """Send every choice, and wait until each has its first output: a refusal becomes an error response
        before any byte of a stream is sent."""
        for i in range(len(self.choices)):
            self._send(i, await self._ingress.pick(self._rids[i], self.choices[i].prompt_token_ids))
        started: set[int] = set()
        try:
            while len(started) < len(self.states):
                i, rid, item = await self._queue.get()
                if rid != self._rids[i]:
                    continue  # from an attempt given up
                if isinstance(item, BaseException):
                    if self._resend(i, item):
                        continue
                    raise _as_openai_error(item)
                started.add(i)
                self._pending.append((i, item))
                if stages.ENABLED:
                    stages.stamp("ingress_first", rid)
        except BaseException:
            self.close()
            raise

    async def _pump(self, i: int, rid: str, gen) -> None:
        """The choice's LLMServer call: where its tokens are (a CoreRef), or an error."""
        try:
            async for item in gen:
                if isinstance(item, CoreRef):
                    self.cores[i] = item.core_id
                    self._ingress.ensure_reader(item)
                else:  # an LLMServer that streams the outputs itself
                    self._queue.put_nowait((i, rid, item))
        except asyncio.CancelledError:
            raise
        except BaseException as e:  # handed to the reader, which raises it as an OpenAI error
            self._queue.put_nowait((i, rid, e))

    def deliver(self, i: int, rid: str, item: RequestOutput | BaseException) -> None:
        """An output from the engine core's channel. A refusal or a failure becomes the error the LLMServer's call
        would raise: before the response has started, an HTTP error, not a 200 whose stream carries it."""
        if isinstance(item, RequestOutput) and item.finish_reason in (REFUSED, ERROR):
            item = RequestError(item.error) if item.finish_reason == REFUSED else RequestFailedError(item.error)
        self._queue.put_nowait((i, rid, item))

    async def events(self) -> AsyncIterator[tuple[int, Delta]]:
        """(choice, what it added) as the engine produces it."""
        try:
            while self._live:
                if self._pending:
                    i, item = self._pending.pop(0)
                else:
                    i, rid, item = await self._queue.get()
                    if rid != self._rids[i]:
                        continue
                if i not in self._live:
                    continue  # after a stop string: dropped
                if isinstance(item, BaseException):
                    if self._resend_late and self._resend(i, item):
                        continue
                    raise _as_openai_error(item)
                if item.finish_reason == ERROR:  # the engine could not run this choice
                    raise _as_openai_error(RequestFailedError(item.error))
                state = self.states[i]
                delta = state.update(item)
                if state.finished:
                    self._live.discard(i)
                    if state.stopped_by_string and not item.finished:
                        self._cancel(i)
                yield i, delta
        finally:
            self.close()

    async def drain(self) -> None:
        async for _ in self.events():
            pass

    def _cancel(self, i: int) -> None:
        task = self._tasks[i]
        if task is not None and not task.done():
            task.cancel()
            self._gens[i].cancel()
        conn, self._fast[i] = self._fast[i], None
        if conn is not None:  # the add went on our channel: so does its abort (the call may never land)
            try:
                conn.send([("abort", self._rids[i])])
            except (RuntimeError, OSError):  # the channel is gone with its engine: nothing left to abort
                pass

    def close(self) -> None:
        """Stop the calls of choices still running (a client gone away: the LLMServer aborts them); those that
        finished end by themselves."""
        for i, state in enumerate(self.states):
            self._ingress.routes.pop(self._rids[i], None)
            if i in self._live or not state.finished or state.stopped_by_string:
                self._cancel(i)


def _replica_lost(e: BaseException) -> bool:
    """The LLMServer replica or its engine died (not this request's fault): worth sending again elsewhere."""
    return any(isinstance(err, (EngineDeadError, RayActorError)) for err in (e, getattr(e, "cause", None)))


def _as_openai_error(e: BaseException) -> OpenAIError:
    cause = getattr(e, "cause", None)
    for err in (e, cause):
        if isinstance(err, OpenAIError):
            return err
        if isinstance(err, RequestError):
            return OpenAIError(str(err.args[0]) if err.args else str(err))
        if isinstance(err, BackPressureError):
            return OpenAIError(f"the server is overloaded: {err.message} Retry later.", status=err.status_code,
                               code="overloaded", retry_after_s=err.retry_after_s)
        if isinstance(err, EngineDeadError):
            return OpenAIError(f"engine unavailable: {err} The replica is being replaced; retry later.",
                               status=503, code="engine_dead")
        if isinstance(err, RequestFailedError):
            logger.error("request failed on the engine: %s", err)
            return OpenAIError(str(err), status=500, code="engine_error")
        if isinstance(err, RayActorError):  # the LLMServer replica itself died
            return OpenAIError(f"engine unavailable: the replica serving this request died ({type(err).__name__}); "
                               "retry later.", status=503, code="replica_died")
    logger.error("request failed: %r", e)
    return OpenAIError(f"internal error: {type(e).__name__}: {e}", status=500)


def _event(chunk: BaseModel) -> str:
    return f"data: {chunk.model_dump_json()}\n\n"


def _sse(events: AsyncIterator[str]) -> StreamingResponse:
    async def body() -> AsyncIterator[str]:
        try:
            async for e in events:
                yield e
        except OpenAIError as e:  # after the stream started: an error event, as vLLM sends
            yield f"data: {json.dumps(e.body())}\n\n"
        yield "data: [DONE]\n\n"

    return StreamingResponse(body(), media_type="text/event-stream")


def _json(value: Any) -> str:
    return json.dumps(value, ensure_ascii=False, separators=(",", ":"))


def _chunk_head(run: _Run, model: str, obj: str) -> str:
    """A stream chunk up to its one choice's object. (Defined above the ingress class: `serve.ingress` captures
    the class's globals when it decorates it.)"""
    return (f'data: {{"id":{_json(run.request_id)},"object":"{obj}","created":{run.created},'
            f'"model":{_json(model)},"choices":[')


@serve.ingress(app)
class OpenAIIngress:
    def __init__(self, llm: DeploymentHandle, config: Config, served_model_name: str, api_key: str | None = None,
                 max_request_body_bytes: int = 2 * 1024 * 1024, max_prompts_per_request: int = 64,
                 default_max_tokens: int | None = None, fast_path: bool = True) -> None:
        self.model_name = served_model_name
        self.model_path = config.model
        self.max_model_len = config.max_model_len
        self.processor = RequestProcessor(load_tokenizer(config.tokenizer or config.model), served_model_name,
                                          config.max_model_len, config.hf_config["vocab_size"],
                                          max_prompts_per_request, default_max_tokens)
        self.api_key = api_key
        self.max_body = max_request_body_bytes
        # Calls to the LLMServer over Serve's gRPC transport rather than Ray object references: on the 2-core CPU
        # machine a stream hop carried 17k items/s to 64 streams that way, 3k the other (README, served path).
        self.llm = llm.options(stream=True, _by_reference=False)
        self.llm_unary = llm.options(_by_reference=False)
        # This replica's subscription at each engine core: the tokens of its requests, one message per step.
        self.subscriber = f"ingress-{os.getpid()}-{uuid.uuid4().hex[:8]}"
        self.routes: dict[str, tuple[_Run, int]] = {}  # engine request id -> (run, choice)
        self._readers: dict[str, asyncio.Task] = {}  # engine core id -> its reader
        # The fast path: a request's add goes from here to the engine core of the replica the request router
        # picks, on this replica's channel there, while the LLMServer call (pinned to that replica) follows.
        self.fast_path = fast_path
        self.conns: dict[str, Any] = {}  # engine core id -> our connected channel there
        self.cores_by_replica: dict[str, CoreRef] = {}  # LLMServer replica -> its engine core

    async def pick(self, request_id: str, token_ids: list[int]) -> str | None:
        """The replica to add this request on ourselves (its engine core's channel is up), or None: the ordinary
        path, where the LLMServer sends the add (no channel yet, the replica's queue full, fast path off)."""
        if not self.fast_path:
            return None
        known = {r for r, core in self.cores_by_replica.items() if core.core_id in self.conns}
        if not known:
            return None
        return await pick_replica(self.llm.app_name, self.llm.deployment_name, request_id, token_ids, known)

    # ---- the token streams from the engine cores ------------------------------------------------------------

    def ensure_reader(self, core: CoreRef) -> None:
        if core.replica:
            self.cores_by_replica[core.replica] = core
        task = self._readers.get(core.core_id)
        if task is None or task.done():
            self._readers[core.core_id] = asyncio.get_running_loop().create_task(self._read(core))

    async def _read(self, core: CoreRef) -> None:
        """Read this replica's outputs from one engine core over its channel (a frame per engine step while it
        keeps up, each with everything since the last), and hand each request's to its run, merged. The
        connection ending means the core is gone (or its engine died): its requests here fail."""
        try:
            conn = await core.connect(self.subscriber)
        except OSError as e:
            self._fail_core(core.core_id, e)
            return
        self.conns[core.core_id] = conn
        try:
            while True:
                items = await conn.recv()
                by_request: dict[str, list[tuple]] = {}
                for t in items:
                    by_request.setdefault(t[0], []).append(t)
                for rid, packed in by_request.items():
                    route = self.routes.get(rid)
                    if route is not None:
                        route[0].deliver(route[1], rid,
                                         RequestOutput.merge([RequestOutput.unpack(t) for t in packed]))
        except Exception as e:  # the channel closed (ChannelClosed), or anything else: never leave requests waiting
            logger.warning("engine core %s: reader stops: %r", core.core_id, e)
            self._fail_core(core.core_id, e)
        finally:
            self.conns.pop(core.core_id, None)
            conn.close()

    def _fail_core(self, core_id: str, error: BaseException) -> None:
        dead = error if isinstance(error, EngineDeadError) else EngineDeadError(
            f"the engine core is gone: {type(error).__name__}: {error}")
        for rid, (run, i) in list(self.routes.items()):
            if run.cores[i] == core_id:
                run.deliver(i, rid, dead)
        self._readers.pop(core_id, None)
        for replica in [r for r, core in self.cores_by_replica.items() if core.core_id == core_id]:
            del self.cores_by_replica[replica]
            avoid_replica(self.llm.app_name, self.llm.deployment_name, replica)  # the retries go elsewhere

    # ---- endpoints -----------------------------------------------------------------------------------------

    @app.get("/health")
    async def health(self) -> Response:
        """200 while an LLMServer replica has a live engine; 503 (OpenAI error body) when none answers that it
        has. Each check goes to one replica, so a dead one is retried on another (a dead replica also leaves
        within a second, and Serve routes around it)."""
        error: BaseException | None = None
        for _ in range(HEALTH_ATTEMPTS):
            # asyncio.wait, not wait_for: a call given up is cancelled without waiting for the cancellation to land
            # (a call queued in Serve's router while no replica is up can take seconds to let go)
            call = asyncio.ensure_future(self.llm_unary.check_engine.remote())
            done, _ = await asyncio.wait({call}, timeout=HEALTH_TIMEOUT_S)
            if not done:
                call.add_done_callback(lambda f: f.cancelled() or f.exception())  # nothing left unretrieved
                call.cancel()
                error = TimeoutError(f"no LLMServer replica answered within {HEALTH_TIMEOUT_S} s")
                continue
            try:
                call.result()
                return Response(status_code=200)
            except BackPressureError:
                return Response(status_code=200)  # alive, only busy
            except Exception as e:  # a dead engine, a replica gone
                error = e
        cause = getattr(error, "cause", None) or error
        body = OpenAIError(f"engine unavailable: {type(cause).__name__}: {cause}", status=503,
                           code="engine_unavailable").body()
        return JSONResponse(body, status_code=503)

    @app.get("/v1/models")
    async def models(self, request: Request) -> ModelList:
        self._authorize(request)
        return ModelList(data=[ModelCard(id=self.model_name, root=self.model_path, max_model_len=self.max_model_len)])

    @app.post("/v1/completions")
    async def completions(self, request: Request) -> Response:
        return await self._serve(request, CompletionRequest, self.processor.completion, "cmpl",
                                 self._stream_completion, self._completion_response)

    @app.post("/v1/chat/completions")
    async def chat_completions(self, request: Request) -> Response:
        return await self._serve(request, ChatCompletionRequest, self.processor.chat, "chatcmpl",
                                 self._stream_chat, self._chat_response)

    async def _serve(self, request: Request, model, make_choices, id_prefix: str, stream, respond) -> Response:
        """Authorize, validate, start one engine request per choice; stream (SSE) or answer once all finish."""
        arrival = time.monotonic()
        self._authorize(request)
        req = await self._parse(request, model)
        run = _Run(self, f"{id_prefix}-{uuid.uuid4().hex}", make_choices(req), self.processor.tokenizer,
                   resend_late=not req.stream)
        if stages.ENABLED:
            for rid in run._rids:
                stages.stamp("ingress_in", rid, arrival)
        await run.start()
        if req.stream:
            include_usage = bool(req.stream_options and req.stream_options.include_usage)
            return _sse(stream(run, req, include_usage))
        await run.drain()
        return JSONResponse(respond(run, req).model_dump())

    # ---- request checks ------------------------------------------------------------------------------------

    def _authorize(self, request: Request) -> None:
        if self.api_key is None:
            return
        auth = request.headers.get("authorization", "")
        scheme, _, token = auth.partition(" ")
        if scheme.lower() != "bearer" or not hmac.compare_digest(token.strip().encode(), self.api_key.encode()):
            raise OpenAIError("Incorrect or missing API key: send 'Authorization: Bearer <key>'", status=401,
                              code="invalid_api_key")

    async def _parse(self, request: Request, model: type[BaseModel]):
        length = request.headers.get("content-length")
        if length is not None and length.isdigit() and int(length) > self.max_body:
            raise OpenAIError(f"request body of {length} bytes is over the limit of {self.max_body}", status=413)
        body = bytearray()
        async for chunk in request.stream():
            body += chunk
            if len(body) > self.max_body:
                raise OpenAIError(f"request body is over the limit of {self.max_body} bytes", status=413)
        try:
            data = json.loads(body)
        except (json.JSONDecodeError, UnicodeDecodeError) as e:
            raise OpenAIError(f"request body is not valid JSON: {e}") from e
        except RecursionError:
            raise OpenAIError("request body is nested too deeply to parse") from None
        if not isinstance(data, dict):
            raise OpenAIError(f"request body must be a JSON object, not {type(data).__name__}")
        try:
            return model.model_validate(data)
        except RecursionError:
            raise OpenAIError("request body is nested too deeply to validate") from None
        except ValidationError as e:
            err = e.errors()[0]
            param = ".".join(str(x) for x in err["loc"]) or None
            raise OpenAIError(f"{param}: {err['msg']}" if param else err["msg"], param=param) from e

    # ---- responses -----------------------------------------------------------------------------------------

    def _usage(self, run: _Run) -> UsageInfo:
        # A prompt counts once however many samples it has (n), as in vLLM.
        prompts: dict[int, RequestState] = {}
        for c, state in zip(run.choices, run.states):
            prompts.setdefault(c.prompt_index, state)
        prompt_tokens = sum(s.num_prompt_tokens for s in prompts.values())
        completion = sum(s.num_generated_tokens for s in run.states)
        return UsageInfo(prompt_tokens=prompt_tokens, completion_tokens=completion,
                         total_tokens=prompt_tokens + completion,
                         prompt_tokens_details=PromptTokensDetails(
                             cached_tokens=sum(s.num_cached_tokens for s in prompts.values())))

    def _completion_logprobs_for(self, ids: list[int], lps: list, offset: int) -> CompletionLogprobs:
        out = CompletionLogprobs()
        for tid, (lp, top) in zip(ids, lps):
            tok = self.processor.token_text(tid)
            out.tokens.append(tok)
            out.token_logprobs.append(lp)
            out.top_logprobs.append({self.processor.token_text(t): v for t, v in top})
            out.text_offset.append(offset)
            offset += len(tok)
        return out

    def _chat_logprobs(self, ids: list[int], lps: list) -> ChatChoiceLogprobs:
        content = []
        for tid, (lp, top) in zip(ids, lps):
            tok = self.processor.token_text(tid)
            content.append(ChatTokenLogprob(
                token=tok, logprob=lp, bytes=list(tok.encode()),
                top_logprobs=[TopLogprob(token=(s := self.processor.token_text(t)), logprob=v, bytes=list(s.encode()))
                              for t, v in top]))
        return ChatChoiceLogprobs(content=content)

    def _completion_response(self, run: _Run, req: CompletionRequest) -> CompletionResponse:
        choices = []
        for c, s in zip(run.choices, run.states):
            lp = self._completion_logprobs_for(s.token_ids, s.logprobs, 0) if c.params.logprobs is not None else None
            choices.append(CompletionChoice(index=c.index, text=s.text, logprobs=lp, finish_reason=s.finish_reason,
                                            stop_reason=s.stop_reason,
                                            token_ids=s.token_ids if req.return_token_ids else None))
        return CompletionResponse(id=run.request_id, created=run.created, model=self.model_name, choices=choices,
                                  usage=self._usage(run))

    def _chat_response(self, run: _Run, req: ChatCompletionRequest) -> ChatCompletionResponse:
        choices = []
        for c, s in zip(run.choices, run.states):
            lp = self._chat_logprobs(s.token_ids, s.logprobs) if req.logprobs else None
            choices.append(ChatCompletionChoice(index=c.index, message=ChatResponseMessage(content=s.text),
                                                logprobs=lp, finish_reason=s.finish_reason,
                                                stop_reason=s.stop_reason))
        return ChatCompletionResponse(id=run.request_id, created=run.created, model=self.model_name,
                                      choices=choices, usage=self._usage(run))

    # Stream chunks are formatted by hand, not through pydantic: one per choice per engine step, under hundreds of
    # streams, where building and dumping a model per chunk was a large share of the ingress's time.

    async def _stream_completion(self, run: _Run, req: CompletionRequest, include_usage: bool) -> AsyncIterator[str]:
        head = _chunk_head(run, self.model_name, "text_completion")
        offsets = [0] * len(run.states)
        async for i, d in run.events():
            c, s = run.choices[i], run.states[i]
            if not (d.text or d.token_ids or s.finished):
                continue
            choice: dict[str, Any] = {"index": c.index, "text": d.text, "logprobs": None,
                                      "finish_reason": s.finish_reason, "stop_reason": s.stop_reason}
            if c.params.logprobs is not None:
                choice["logprobs"] = self._completion_logprobs_for(d.token_ids, d.logprobs, offsets[i]).model_dump()
            if req.return_token_ids:
                choice["token_ids"] = d.token_ids
            offsets[i] += len(d.text)
            if stages.ENABLED:
                stages.stamp("ingress_sse", run._rids[i])
            yield f"{head}{_json(choice)}]}}\n\n"
        if include_usage:
            yield _event(CompletionResponse(id=run.request_id, created=run.created, model=self.model_name,
                                            choices=[], usage=self._usage(run)))

    async def _stream_chat(self, run: _Run, req: ChatCompletionRequest, include_usage: bool) -> AsyncIterator[str]:
        head = _chunk_head(run, self.model_name, "chat.completion.chunk")
        for c in run.choices:  # OpenAI opens each choice with the role
            yield f'{head}{{"index":{c.index},"delta":{{"role":"assistant","content":""}},"logprobs":null,' \
                  '"finish_reason":null}]}\n\n'
        async for i, d in run.events():
            c, s = run.choices[i], run.states[i]
            if not (d.text or s.finished or (req.logprobs and d.token_ids)):
                continue
            choice: dict[str, Any] = {"index": c.index, "delta": {"content": d.text} if d.text else {},
                                      "logprobs": None, "finish_reason": s.finish_reason,
                                      "stop_reason": s.stop_reason}
            if req.logprobs:
                choice["logprobs"] = self._chat_logprobs(d.token_ids, d.logprobs).model_dump()
            yield f"{head}{_json(choice)}]}}\n\n"
        if include_usage:
            yield _event(ChatCompletionStreamResponse(id=run.request_id, created=run.created, model=self.model_name,
                                                      choices=[], usage=self._usage(run)))

