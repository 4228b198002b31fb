"""`kiln.client.Client`: the REST API of `kiln serve` from Python (httpx).

    from kiln.client import Client

    api = Client("http://127.0.0.1:8080", token=None)
    job = api.start(config={...})
    api.wait(job["id"], "running")
    api.stop(job["id"]); api.wait(job["id"], "paused")
    api.resume(job["id"]); api.wait(job["id"], "succeeded")

Errors come back as `ApiError` (status code and the server's one-line `detail`).
"""

from __future__ import annotations

import json
import time
from collections.abc import Iterator
from typing import Any

__all__ = ["ApiError", "Client"]


class ApiError(Exception):
    def __init__(self, status: int, detail: Any) -> None:
        super().__init__(f"{status}: {detail}")
        self.status = status
        self.detail = detail


class Client:
    def __init__(self, url: str, token: str | None = None, timeout_s: float = 30.0) -> None:
        import httpx

        headers = {"Authorization": f"Bearer {token}"} if token else {}
        self.http = httpx.Client(base_url=url.rstrip("/"), headers=headers, timeout=timeout_s)

    def _call(self, method: str, path: str, **kwargs: Any) -> Any:
        response = self.http.request(method, path, **kwargs)
        if response.status_code >= 400:
            try:
                detail = response.json().get("detail")
            except ValueError:
                detail = response.text
            raise ApiError(response.status_code, detail)
        if response.status_code == 204:
            return None
        kind = response.headers.get("content-type", "")
        return response.json() if kind.startswith("application/json") else response.text

    def health(self) -> dict[str, Any]:
        return self._call("GET", "/api/health")

    # ---- configs
    def add_config(self, name: str, config: dict[str, Any]) -> dict[str, Any]:
        return self._call("POST", "/api/training/configs", json={"name": name, "config": config})

    def configs(self) -> list[dict[str, Any]]:
        return self._call("GET", "/api/training/configs")

    def config(self, config_id: str) -> dict[str, Any]:
        return self._call("GET", f"/api/training/configs/{config_id}")

    def delete_config(self, config_id: str) -> None:
        self._call("DELETE", f"/api/training/configs/{config_id}")

    # ---- jobs
    def start(
        self,
        config: dict[str, Any] | None = None,
        config_id: str | None = None,
        dataset_path: str | None = None,
        name: str | None = None,
        nproc: int = 1,
    ) -> dict[str, Any]:
        body = {"config": config, "config_id": config_id, "dataset_path": dataset_path}
        body.update(name=name, nproc=nproc)
        return self._call("POST", "/api/training/jobs/start", json=body)

    def jobs(self) -> list[dict[str, Any]]:
        return self._call("GET", "/api/training/jobs")

    def status(self, job_id: str) -> dict[str, Any]:
        return self._call("GET", f"/api/training/jobs/{job_id}/status")

    def stop(self, job_id: str) -> dict[str, Any]:
        return self._call("POST", f"/api/training/jobs/{job_id}/stop")

    def resume(self, job_id: str) -> dict[str, Any]:
        return self._call("POST", f"/api/training/jobs/{job_id}/resume")

    def logs(self, job_id: str, tail: int = 200) -> str:
        return self._call("GET", f"/api/training/jobs/{job_id}/logs", params={"tail": tail})

    def metrics(self, job_id: str) -> dict[str, Any]:
        return self._call("GET", f"/api/training/jobs/{job_id}/metrics")

    def history(self, job_id: str, **params: int) -> dict[str, list[dict[str, Any]]]:
        return self._call("GET", f"/api/training/jobs/{job_id}/metrics/history", params=params)

    def throughput(self, job_id: str) -> dict[str, Any]:
        return self._call("GET", f"/api/training/jobs/{job_id}/throughput")

    def checkpoints(self, job_id: str) -> list[dict[str, Any]]:
        return self._call("GET", f"/api/training/jobs/{job_id}/checkpoints")

    def download(self, checkpoint_id: str) -> bytes:
        response = self.http.get(f"/api/training/checkpoints/{checkpoint_id}/download")
        if response.status_code != 200:
            raise ApiError(response.status_code, response.text)
        return response.content

    def wait(
        self, job_id: str, *states: str, timeout_s: float = 300.0, until: Any = None
    ) -> dict[str, Any]:
        """Poll the job until its state is one of `states` (or `until(job)` is true)."""
        deadline = time.monotonic() + timeout_s
        while True:
            job = self.status(job_id)
            if job["state"] in states or (until is not None and until(job)):
                return job
            if time.monotonic() > deadline:
                raise TimeoutError(f"job {job_id} is {job['state']} after {timeout_s}s")
            time.sleep(0.2)

    def events(self, job_id: str, last_event_id: int | None = None) -> Iterator[dict[str, Any]]:
        """The job's Server-Sent Events as {"event", "id", "data"} until its `end` event."""
        headers = {} if last_event_id is None else {"Last-Event-ID": str(last_event_id)}
        with self.http.stream(
            "GET", f"/api/training/jobs/{job_id}/events", headers=headers, timeout=None
        ) as response:
            event: dict[str, Any] = {}
            for line in response.iter_lines():
                if not line:
                    if event:
                        yield event
                        if event.get("event") == "end":
                            return
                    event = {}
                    continue
                key, _, value = line.partition(": ")
                event[key] = json.loads(value) if key == "data" else value
