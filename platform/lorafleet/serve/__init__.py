"""Multi-LoRA serving: one vLLM engine per Ray Serve replica, many adapters, OpenAI API.

* ``config.py``      ``ServeConfig`` (the one config model) and ``load_serve_config``
* ``engine.py``      ``engine_setup``: ServeConfig -> vLLM engine arguments (CPU/GPU differences live here)
* ``adapters.py``    ``Adapter`` identity, sources (MLflow registry, allowed local folders), content-hashed cache
* ``protocol.py``    OpenAI request schemas (unknown fields refused) and the OpenAI error shape
* ``generation.py``  ``AdapterEngine``: OpenAI requests -> ``AsyncLLM.generate`` with the adapter's LoRARequest
* ``metrics.py``     Prometheus metrics served at ``GET /metrics``
* ``deployment.py``  the Serve deployments: ``OpenAIIngress`` (FastAPI) and ``EngineDeployment`` (multiplexed)
* ``app.py``         ``build_app``: the ``import_path`` of ``serve/*.yaml``
* ``cli.py``         ``serve_main``: ``lorafleet serve --config FILE``

Importing this package imports neither Ray nor vLLM; the modules that need them do.
"""

from lorafleet.serve.config import ServeConfig, load_serve_config

__all__ = ["ServeConfig", "load_serve_config"]
