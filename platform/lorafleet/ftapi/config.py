"""The ``files`` section of the server's config (``ServeConfig.files``): upload limits and per-tenant quotas."""

from __future__ import annotations

from typing import Optional

from pydantic import Field

from lorafleet.config.base import StrictModel


class FileSettings(StrictModel):
    """Training files tenants upload through ``POST /v1/files``. The content lives under
    ``<tenancy.state_dir>/files/<tenant id>/<file id>.jsonl``: on a multi-node cluster point
    ``tenancy.state_dir`` at a filesystem every node mounts. The quotas hold for every tenant."""

    max_file_bytes: int = Field(100 * 2**20, ge=1024, description="Largest file one upload may carry (413 above it). The upload route "
                                "streams its body to disk under this limit (plus 64 KiB of multipart headers) instead of limits.max_body_bytes.")
    max_line_bytes: int = Field(2**20, ge=1024, description="Longest line (one training example) accepted; a longer line is refused (400) "
                                "without being held in memory.")
    max_files: Optional[int] = Field(100, ge=1, description="Files one tenant may hold at once (429 beyond; null: no limit).")
    max_total_bytes: Optional[int] = Field(2**30, ge=1024, description="Bytes of all of one tenant's files together (429 beyond; null: no limit).")
