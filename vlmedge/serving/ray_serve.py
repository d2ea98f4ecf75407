"""The same app as a Ray Serve deployment: one replica per GPU (or per `num_cpus` CPUs), each with
its own pipeline and batcher, behind Serve's HTTP proxy.

    vlmedge serve bundles/shapes-vlm --ray --replicas 4 --device cuda      # from the command line
    serve run vlmedge.serving.ray_serve:app_builder bundle=bundles/shapes-vlm replicas=2
    # or in a Serve config file: import_path: vlmedge.serving.ray_serve:app_builder, args: {bundle: ...}

The bundle path must be readable on every node that runs a replica (shared storage, or the same
path on each). Each replica serves /metrics for itself; Ray's own metrics cover the cluster.
"""

from __future__ import annotations

import json
from dataclasses import fields, replace
from typing import Any, Optional

from ray import serve
from ray.serve import Application

from vlmedge.serving.app import create_app
from vlmedge.serving.options import ServeOptions, api_key_from_env

GPU_DEVICES = ("cuda", "tensorrt")


@serve.deployment(name="vlmedge")
@serve.ingress()
class VlmedgeDeployment:
    """One replica: the app of vlmedge.serving.app with its own pipeline (loaded at replica start)."""

    def __init__(self, options: ServeOptions):
        self.options = options

    def __serve_build_asgi_app__(self):
        return create_app(self.options)


def deployment(options: ServeOptions, replicas: int = 1, autoscaling: Optional[dict] = None,
               num_cpus: Optional[float] = None, num_gpus: Optional[float] = None) -> Application:
    """The application for `serve.run`: `replicas` copies (or `autoscaling`, Serve's autoscaling_config),
    one GPU each when the device is a GPU, each admitting up to max_queue requests."""
    options.check()
    if num_gpus is None:
        num_gpus = 1.0 if options.device in GPU_DEVICES else 0.0
    if num_cpus is None:
        num_cpus = 1.0
    if options.threads is None and not num_gpus:  # replicas sharing a machine must not each take every core
        options = replace(options, threads=max(1, int(num_cpus)))
    settings: dict[str, Any] = {
        "ray_actor_options": {"num_cpus": num_cpus, "num_gpus": num_gpus},
        # the replica's own queue bounds it (429); Serve's proxy holds at most as many more (503 past that)
        "max_ongoing_requests": options.max_queue + 1,
        "max_queued_requests": options.max_queue,
        "graceful_shutdown_timeout_s": options.timeout_s + 5,
    }
    if autoscaling:
        settings["autoscaling_config"] = autoscaling
    else:
        settings["num_replicas"] = replicas
    return VlmedgeDeployment.options(**settings).bind(options)


def _parse(value: Any, kind: type) -> Any:
    if kind is bool and isinstance(value, str):
        return value.lower() in ("1", "true", "yes")
    return kind(value) if value is not None else None


def app_builder(args: dict[str, Any]) -> Application:
    """For `serve run vlmedge.serving.ray_serve:app_builder bundle=... [replicas=N] [autoscaling={json}]
    [num_cpus=X] [num_gpus=X] [api_key_env=VAR] [max_batch=N ...]` and Serve config files (`args:`):
    any ServeOptions field by name."""
    args = dict(args)
    if "bundle" not in args:
        raise ValueError("vlmedge app_builder: missing argument bundle=PATH (a bundle or engine directory)")
    replicas = int(args.pop("replicas", 1))
    autoscaling = args.pop("autoscaling", None)
    if isinstance(autoscaling, str):
        autoscaling = json.loads(autoscaling)
    num_cpus = _parse(args.pop("num_cpus", None), float)
    num_gpus = _parse(args.pop("num_gpus", None), float)
    key_env = args.pop("api_key_env", None)
    types = {"bundle": str, "device": str, "model_name": str, "api_key": str, "max_batch": int, "max_queue": int,
             "max_body_bytes": int, "max_header_bytes": int, "max_pixels": int, "threads": int, "workers": int, "max_wait_ms": float,
             "timeout_s": float, "shared_threads": bool}
    known = {f.name for f in fields(ServeOptions)}
    unknown = sorted(set(args) - known)
    if unknown:
        raise ValueError(f"vlmedge app_builder: unknown argument(s) {', '.join(unknown)}; expected {', '.join(sorted(known))}")
    options = ServeOptions(**{k: _parse(v, types[k]) for k, v in args.items()})
    if key_env:
        options = replace(options, api_key=api_key_from_env(key_env))
    return deployment(options, replicas, autoscaling, num_cpus, num_gpus)


def serve_ray(options: ServeOptions, host: str, port: int, replicas: int = 1, autoscaling: Optional[dict] = None,
              num_cpus: Optional[float] = None, num_gpus: Optional[float] = None, address: Optional[str] = None,
              log=print) -> None:
    """Start (or join, with `address`) a Ray cluster, run the deployment behind Serve's proxy on
    host:port, and block until Ctrl-C or SIGTERM; then shut the application down and stop what this
    process started (a local Ray instance with its agents; a joined cluster is only left)."""
    import signal

    import ray

    def stop(signum, frame):  # SIGTERM as Ctrl-C, so that the cleanup below runs
        raise KeyboardInterrupt

    previous = signal.getsignal(signal.SIGTERM)
    try:
        ray.init(address=address, include_dashboard=False, ignore_reinit_error=True)
        signal.signal(signal.SIGTERM, stop)  # after ray.init, whose own handler aborts the process
        serve.start(http_options={"host": host, "port": port})
        app = deployment(options, replicas, autoscaling, num_cpus, num_gpus)
        scale = f"autoscaling {json.dumps(autoscaling)}" if autoscaling else f"{replicas} replica(s)"
        log(f"serving {options.bundle} on Ray Serve at http://{host}:{port} with {scale}; Ctrl-C to stop")
        serve.run(app, name="vlmedge", route_prefix="/", blocking=True)
    except KeyboardInterrupt:
        pass
    finally:
        signal.signal(signal.SIGTERM, signal.SIG_IGN)  # a second SIGTERM must not cut the cleanup short
        try:
            if ray.is_initialized():
                serve.shutdown()
        finally:
            ray.shutdown()  # stops the local instance this process started (raylet, GCS, agents)
            signal.signal(signal.SIGTERM, previous)
