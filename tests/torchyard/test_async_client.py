"""`AsyncClient`, the twin for asyncio code, against the real API over real HTTP."""

from __future__ import annotations

import pytest

from tests.torchyard.conftest import uploads_seen
from tests.torchyard.finished import WEIGHTS, finish
from tests.torchyard.local_specs import sources_of, write_local_spec
from torchyard import ApiError, AsyncClient, AsyncJob, LocalSpecError

pytestmark = pytest.mark.anyio


@pytest.fixture
def anyio_backend() -> str:
    return "asyncio"


async def test_submit_follow_wait_metrics_download_as_the_sync_client_does(server, token, tmp_path):
    spec_path = write_local_spec(tmp_path)
    before = uploads_seen(server)
    async with AsyncClient(server.url, token) as client:
        job = await client.submit(spec_path)
        assert isinstance(job, AsyncJob) and job.status == "queued"
        again = await client.submit(spec_path)
        assert uploads_seen(server) - before == 2  # the second submit sent no dataset bytes
        assert (await again.refresh()).info["dataset_sources"] == sources_of(tmp_path)

        finish(server, job.id)
        events = [event async for event in job.follow()]
        assert [e.event for e in events][-1] == "end"
        assert "metrics" in [e.event for e in events]
        resumed = [event async for event in job.follow(last_event_id=events[-3].id)]
        assert resumed == events[-2:]

        assert (await job.wait(timeout=30)).status == "succeeded"
        assert (await job.metrics(["loss"])).series("loss")[1] == [1.0, 0.5, 0.25]
        assert await job.logs() == ["epoch 0 done"]
        out = await job.download(tmp_path / "best.safetensors")
        assert out.read_bytes() == WEIGHTS

        assert (await again.cancel()).status == "cancelled"
        listed = [j.id async for j in client.jobs(page_size=1)]
        assert listed == [again.id, job.id]
        assert len(await client.datasets.list()) == 2


async def test_async_errors_carry_detail_and_path(server, token, tmp_path):
    bad = write_local_spec(tmp_path, model={"layers": [{"type": "nosuchlayer"}]})
    async with AsyncClient(server.url, token) as client:
        with pytest.raises(ApiError) as caught:
            await client.submit(bad)
        assert caught.value.status == 422
        assert caught.value.path == "model.layers[0].type"
        with pytest.raises(ApiError) as missing:
            await client.job("0" * 20)
        assert missing.value.status == 404
        (tmp_path / "data" / "val.npz").unlink()
        with pytest.raises(LocalSpecError) as local:
            await client.submit(bad)
        assert local.value.path == "data.validation"
