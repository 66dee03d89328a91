"""Multi-LoRA serving: one vLLM engine per Ray Serve replica, many adapters, OpenAI API.

* ``config.py``      ``ServeConfig`` (the one config model) and ``load_serve_config``
* ``engine.py``      ``engine_setup`` / ``frontend_args``: ServeConfig -> vLLM engine and frontend arguments (CPU/GPU differences live here)
* ``frontend.py``    ``Frontend``: the engine with vLLM's own OpenAI serving classes; the one seam (adapter version -> LoRARequest)
* ``server.py``      ``LoRAServer``: the one Serve deployment (FastAPI ingress + engine in each replica), its routes
* ``limits.py``      what lorafleet adds to vLLM's request checks: body bound, caps, refused fields
* ``tenancy.py``     keys, tenants, routing of ``model`` to the admitted adapter version, quotas, adapter management
* ``adapters.py``    ``Adapter`` identity, sources (MLflow registry, allowed local folders), content-hashed cache
* ``validation.py``  what an adapter folder must be before any engine sees it
* ``registry.py``    the tenant/adapter registry (SQLAlchemy: SQLite or PostgreSQL); ``registry_view.py`` its cached per-process view
* ``migrations/``    the registry schema's alembic migrations, run when a registry is opened
* ``slots.py``       pins, LoRA slot admission, unloading retired versions
* ``quotas.py``      per-tenant rate/token/concurrency quotas shared by every replica
* ``metrics.py``     Prometheus metrics served at ``GET /metrics``, summed over replicas
* ``errors.py``      the OpenAI error shape of lorafleet's own refusals
* ``app.py``         ``build_app``: the ``import_path`` of ``serve/*.yaml``
* ``cli.py``         ``serve_main``: ``lorafleet serve --config FILE``

The design (request path, where each check runs, what crosses a process boundary) is
``docs/serving.md``.

Importing this package imports neither Ray nor vLLM; the modules that need them do.
"""

from lorafleet.serve.config import ServeConfig, load_serve_config

__all__ = ["ServeConfig", "load_serve_config"]
