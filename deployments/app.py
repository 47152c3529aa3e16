"""The application builder that `serve_config.yaml` names (`import_path: deployments.app:build_app`).

    serve run serve_config.yaml                                   # the tiny demo model, CPU when there is no GPU
    serve run deployments.app:build_app model=/path/to/Qwen3-8B tensor_parallel_size=2

Its `args` are checked by LLMAppArgs before anything starts; a bad value fails the deploy with its name and
limit. The app is two deployments: OpenAIIngress (HTTP, tokenization, validation) -> LLMServer (one engine per
replica; its tensor-parallel ranks are Ray actors in the replica's placement group, one bundle per rank).
"""

from __future__ import annotations

import logging
import os
import socket
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, create_model, model_validator
from ray import serve
from ray.serve import Application

from deployments.ingress import OpenAIIngress
from deployments.launch import API_KEY_ENV
from deployments.llm_server import LLMServer
from deployments.request_router import least_loaded_request_router_config, prefix_request_router_config
from nanovllm_ray.config import Config
from nanovllm_ray.router import PrefixRoutingConfig

logger = logging.getLogger("ray.serve")

DEFAULT_MODEL = "checkpoints/qwen3-tiny"
MIN_BUNDLE_CPUS = 0.01
ENGINE_SETTINGS = Config.settings()  # (name, type, default, help) of each engine setting: declared in Config only


class _ServiceArgs(BaseModel):
    """The service's own args. LLMAppArgs adds every engine setting of nanovllm_ray.Config, with its type, default
    and help taken from there (vLLM's names)."""

    model_config = ConfigDict(extra="forbid")

    # -- the model
    model: str = Field(DEFAULT_MODEL, description="Hugging Face Qwen3 directory (relative to the launch dir)")
    demo_shape: Literal["tiny", "tiny-untied", "qwen3-0.6b", "qwen3-8b"] | None = Field(
        None, description="write a demo checkpoint of this shape (random weights) at `model` if it is absent; "
                          "the default model gets the tiny one")
    served_model_name: str | None = Field(None, description="the model id clients send (default: directory name)")
    replica_num_cpus: float = Field(1.0, ge=0, description="CPUs of a replica's engine core when it runs the one rank")
    # -- the service
    api_key: str | None = Field(
        None, description="require 'Authorization: Bearer <key>'; 'env:NAME' reads the key from the variable NAME "
                          "where the app is built and refuses the deploy if it is unset; unset: NANOVLLM_API_KEY "
                          "there, if set")
    num_replicas: int | Literal["auto"] = Field(1, description="LLMServer replicas (engines); 'auto' autoscales")
    autoscaling_config: dict[str, Any] | None = None
    routing: Literal["auto", "prefix_aware", "ray"] = Field(
        "auto", description="how the ingress picks an LLMServer replica: prefix_aware (by cached prefix against "
                            "load), ray (Serve's power of two choices); auto: prefix_aware with more than one")
    prefix_routing: dict[str, Any] = Field(
        default_factory=dict, description="tunables of prefix-aware routing (nanovllm_ray.router.PrefixRoutingConfig)")
    max_ongoing_requests: int = Field(256, ge=1, description="requests one LLMServer replica takes at once")
    max_queued_requests: int = Field(512, ge=-1, description="requests waiting for a replica; beyond: 503/429")
    ingress_num_replicas: int | Literal["auto"] = Field(
        "auto", description="OpenAI ingress replicas (HTTP, tokenizing, detokenizing); auto: one per LLMServer "
                            "replica on GPUs (at least two), one on the CPU")
    ingress_num_cpus: float = Field(0.0, ge=0)
    ingress_max_ongoing_requests: int = Field(1024, ge=1)
    ingress_max_queued_requests: int = Field(2048, ge=-1)
    overload_status_code: Literal[429, 503] = 503
    retry_after_s: float | None = Field(None, ge=0)
    max_request_body_bytes: int = Field(2 * 1024 * 1024, ge=1024)
    max_prompts_per_request: int = Field(64, ge=1, description="prompts x n in one request")
    default_max_tokens: int | None = Field(None, ge=1, description="cap when a chat request sets no max_tokens")
    fast_path: bool = Field(True, description="the ingress sends a request's add to the picked replica's engine "
                                              "core itself, beside the LLMServer call (pinned to that replica): a "
                                              "first token that does not wait for the Serve call")

    # (enable_prefix_caching below is an engine setting: LLMAppArgs, the only class made from this one, has it)

    @model_validator(mode="after")
    def _check(self) -> _ServiceArgs:
        PrefixRoutingConfig.from_kwargs(**self.prefix_routing)
        if self.routing == "prefix_aware" and not self.enable_prefix_caching:
            raise ValueError("routing='prefix_aware' needs enable_prefix_caching=true")
        return self

    def use_prefix_routing(self) -> bool:
        if self.routing != "auto":
            return self.routing == "prefix_aware"
        if not self.enable_prefix_caching:
            return False
        if self.num_replicas == "auto" or self.autoscaling_config is not None:
            return int((self.autoscaling_config or {}).get("max_replicas", 4)) > 1
        return self.num_replicas > 1

    def config_kwargs(self) -> dict[str, Any]:
        """The engine settings as given (a value out of range fails in Config, with its name and limit)."""
        return {name: getattr(self, name) for name, *_ in ENGINE_SETTINGS}


LLMAppArgs = create_model(
    "LLMAppArgs", __base__=_ServiceArgs, __module__=__name__,
    **{name: (typ, Field(default, description=help)) for name, typ, default, help in ENGINE_SETTINGS})
LLMAppArgs.__doc__ = "Everything a user tunes: the service's own args and every engine setting (nanovllm_ray.Config)."


def build_app(args: dict[str, Any] | LLMAppArgs | None = None) -> Application:
    args = args if isinstance(args, LLMAppArgs) else LLMAppArgs.model_validate(args or {})
    model = os.path.abspath(args.model)  # replicas may start in another directory
    shape = args.demo_shape or ("tiny" if args.model == DEFAULT_MODEL else None)
    if shape is not None and not os.path.isfile(os.path.join(model, "config.json")):
        from nanovllm_ray.demo_model import ensure_demo_checkpoint

        logger.info("writing a %s demo checkpoint (random weights) to %s", shape, model)
        ensure_demo_checkpoint(model, shape)
    # The one Config of the app: built (and checked) here, before any replica starts, and passed to each deployment.
    config = Config.from_kwargs(model, **args.config_kwargs())
    prefix_routing = None
    if args.use_prefix_routing():  # the router actor's index is fed by the engines' cache events
        prefix_routing = PrefixRoutingConfig.from_kwargs(**args.prefix_routing).to_dict()
        config = config.replace(enable_kv_cache_events=True)
    name = args.served_model_name or os.path.basename(model.rstrip("/"))
    api_key = resolve_api_key(args.api_key)
    tp = config.tensor_parallel_size
    use_gpu = _use_gpu(config.device)

    llm_options: dict[str, Any] = dict(
        max_ongoing_requests=args.max_ongoing_requests, max_queued_requests=args.max_queued_requests,
        backpressure_config={"status_code": args.overload_status_code, "retry_after_s": args.retry_after_s})
    if args.num_replicas == "auto" or args.autoscaling_config is not None:
        llm_options["autoscaling_config"] = args.autoscaling_config or {"min_replicas": 1, "max_replicas": 4}
    else:
        llm_options["num_replicas"] = args.num_replicas
    # One bundle per rank, on one node (STRICT_PACK). The replica (a thin client: 0 resources) and its engine core
    # share bundle 0; with one rank in the core's process the core holds that bundle's GPU and CPUs, with more
    # ranks each rank actor holds its bundle's.
    gpu = {"GPU": 1} if use_gpu else {}
    if config.uses_rank_actors:
        bundles = [{"CPU": config.worker_num_cpus, **gpu} for _ in range(tp)]
        core_cpus, core_gpus = 0.0, 0.0
    else:
        core_cpus = max(args.replica_num_cpus, MIN_BUNDLE_CPUS)  # Ray refuses a bundle of zeros
        bundles = [{"CPU": core_cpus, **gpu}]
        core_gpus = 1.0 if use_gpu else 0.0
    llm_options.update(ray_actor_options={"num_cpus": 0, "num_gpus": 0}, placement_group_bundles=bundles,
                       placement_group_strategy="STRICT_PACK")
    # The ingress's handle routes by cached prefix, or as Serve does; both take the fast path's pins
    # (deployments/request_router.py).
    llm_options["request_router_config"] = (least_loaded_request_router_config() if prefix_routing is None else
                                            prefix_request_router_config(config.block_size, prefix_routing))
    llm = LLMServer.options(**llm_options).bind(config, name, core_num_cpus=core_cpus, core_num_gpus=core_gpus,
                                                prefix_routing=prefix_routing)
    ingress = serve.deployment(OpenAIIngress).options(
        num_replicas=ingress_replicas(args, use_gpu),
        ray_actor_options={"num_cpus": args.ingress_num_cpus, "runtime_env": {"env_vars": INGRESS_ENV}},
        max_ongoing_requests=args.ingress_max_ongoing_requests, max_queued_requests=args.ingress_max_queued_requests,
        backpressure_config={"status_code": args.overload_status_code, "retry_after_s": args.retry_after_s})
    return ingress.bind(llm, config, name, api_key=api_key, max_request_body_bytes=args.max_request_body_bytes,
                        max_prompts_per_request=args.max_prompts_per_request,
                        default_max_tokens=args.default_max_tokens, fast_path=args.fast_path)


# The ingress replicas run their user code (FastAPI) and their handle's request router on the event loop that serves
# HTTP, not on threads of their own (Serve's defaults): a request's body, its SSE events and the fast path's pick then
# cross no thread. On the 2-core machine at concurrency 1 that took about 1 ms off a first token's way.
INGRESS_ENV = {"RAY_SERVE_RUN_USER_CODE_IN_SEPARATE_THREAD": "0", "RAY_SERVE_RUN_ROUTER_IN_SEPARATE_LOOP": "0"}


def resolve_api_key(value: str | None) -> str | None:
    """The key the ingress enforces. Read here, in the process that builds the app: under `serve run` against a
    running cluster that is a task on the cluster, which does not see the shell's environment (scripts/run.sh
    and `python -m deployments.launch` fold the shell's NANOVLLM_API_KEY into the config for that reason)."""
    if value is None:
        return os.environ.get(API_KEY_ENV) or None
    if value.startswith("env:"):
        name = value.removeprefix("env:")
        key = os.environ.get(name)
        if not key:
            raise ValueError(f"api_key={value!r}: the environment variable {name} is not set where the application "
                             f"is built (host {socket.gethostname()}); refusing to serve without the key. On a running "
                             "cluster Serve builds the app there, not in the shell that ran `serve run`: set it in the "
                             "cluster's environment or the application's runtime_env.env_vars, or start with "
                             "`python -m deployments.launch CONFIG` (scripts/run.sh), which passes the shell's key")
        return key
    if not value:
        raise ValueError("api_key is empty; leave it out (null) to serve without a key")
    return value


def ingress_replicas(args: _ServiceArgs, use_gpu: bool) -> int:
    """One ingress replica per GPU replica, at least two. Measured on H200s: one ingress replica was near a full core
    (detokenizing and formatting 256 streams) when the engine ran at 19k tokens/s; but every ingress replica reads
    from every engine core once per engine step, and those reads take GIL time from the core's engine thread
    (two replicas with four ingress replicas: decode steps 6.5 ms and 34.9k tokens/s; with two: 5.8 ms and 36.6k)."""
    if args.ingress_num_replicas != "auto":
        return args.ingress_num_replicas
    if not use_gpu:
        return 1
    llm = args.num_replicas
    if llm == "auto" or args.autoscaling_config is not None:
        llm = int((args.autoscaling_config or {}).get("max_replicas", 4))
    return max(2, llm)


def _use_gpu(device: str) -> bool:
    if device != "auto":
        return device == "cuda"
    import ray

    if ray.is_initialized():
        return ray.cluster_resources().get("GPU", 0) >= 1
    import torch

    return torch.cuda.is_available()
