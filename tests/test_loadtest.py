"""hire loadtest against a real gRPC server on loopback: closed and open loop, hire.v1 and JetStream targets,
errors counted by status, SLO goodput, the report's numbers consistent with what was sent, plots and compare."""
from __future__ import annotations

import asyncio
import json
import random

import pytest
from click.testing import CliRunner

from cluster import loadtest as lt
from cluster.config import ServeConfig
from cluster.grpc_server import GrpcServer
from cluster.requests import Served
from hire.checkpoint import load_model
from hire.cli import main
from hire.engine import Engine


@pytest.fixture(scope="module")
def engine() -> Engine:
    return Engine(load_model("stories260K"), slots=8, max_len=128)


def against_server(engine: Engine, run):
    """Start a gRPC server over `engine` on a free port, await run(port), stop the server."""
    async def main_() -> object:
        server = GrpcServer(Served(engine, "stories260K"), ServeConfig(grpc_port=0, queue_size=256))
        port = await server.start()
        try:
            return await run(port)
        finally:
            await server.stop(grace=0)
    return asyncio.run(main_())


def test_lengths():
    rng = random.Random(0)
    assert lt.Dist("7").sample(rng) == 7
    assert all(10 <= lt.Dist("uniform:10:20").sample(rng) <= 20 for _ in range(100))
    assert abs(sum(lt.Dist("normal:50:5").sample(rng) for _ in range(2000)) / 2000 - 50) < 1
    for bad in ("x", "0", "uniform:1", "normal:1:2:3", "gamma:1:2", "12.5", "exponential:-1"):
        with pytest.raises(ValueError):
            lt.Dist(bad)


def test_closed_and_open_loop_reports(engine):
    workload = lt.Workload(lt.Dist("uniform:8:24"), lt.Dist("16"), seed=3)
    loads = [lt.Load(concurrency=1), lt.Load(concurrency=8), lt.Load(rate=40.0)]
    report = against_server(engine, lambda port: lt.loadtest(f"grpc://127.0.0.1:{port}", loads, workload, 24,
                                                             None, lt.Slo(ttft_ms=60_000), progress=False))
    assert report["workload"]["vocab"] == 512  # asked from the server
    for run in report["runs"]:
        assert run["requests"] == run["completed"] == 24 and not run["errors"]
        assert run["output_tokens_per_s"] == pytest.approx(24 * 16 / run["duration_s"], rel=0.01)
        assert run["goodput_requests_per_s"] == run["requests_per_s"]  # a 60 s TTFT bound holds for all
        for metric in ("ttft_ms", "tpot_ms", "itl_ms", "e2e_ms"):
            s = run[metric]
            assert 0 < s["p50"] <= s["p90"] <= s["p99"]
        assert run["ttft_ms"]["p99"] <= run["e2e_ms"]["p99"]
    closed1, closed8 = report["runs"][:2]
    assert closed8["output_tokens_per_s"] > closed1["output_tokens_per_s"]  # batching: 8 clients share each step


def test_errors_are_counted_by_status_and_slo_cuts_goodput(engine):
    # 120 prompt tokens + 16 output tokens run past the 128-token context: INVALID_ARGUMENT for each.
    mixed = lt.Workload(lt.Dist("uniform:8:130"), lt.Dist("8"), seed=1)
    report = against_server(engine, lambda port: lt.loadtest(
        f"grpc://127.0.0.1:{port}", [lt.Load(concurrency=4)], mixed, 40, None, lt.Slo(ttft_ms=0.001),
        progress=False))
    (run,) = report["runs"]
    assert run["errors"]["INVALID_ARGUMENT"] > 0
    assert run["completed"] + run["errors"]["INVALID_ARGUMENT"] == run["requests"] == 40
    assert run["goodput_requests_per_s"] == 0  # nobody gets a first token within a microsecond


def test_jetstream_target(engine):
    workload = lt.Workload(lt.Dist("12"), lt.Dist("10"), vocab=512)
    report = against_server(engine, lambda port: lt.loadtest(
        f"jetstream://127.0.0.1:{port}", [lt.Load(concurrency=2)], workload, 6, None, lt.Slo(), progress=False))
    (run,) = report["runs"]
    assert run["completed"] == 6 and run["e2e_ms"]["p50"] > 0


def test_unreachable_target_reports_errors_not_a_hang():
    async def run() -> dict:
        target = lt.connect("grpc://127.0.0.1:1", timeout=5)
        records, _ = await lt.drive(target, lt.Workload(vocab=100).items(), lt.Load(concurrency=2), 4, None,
                                    progress=False)
        await target.close()
        return lt.summarize(records, 1.0, lt.Load(concurrency=2), lt.Slo())
    run = asyncio.run(asyncio.wait_for(run(), 60))
    assert run["completed"] == 0 and sum(run["errors"].values()) == 4 and "UNAVAILABLE" in run["errors"]


def test_cli_writes_report_plot_and_compares(engine, tmp_path):
    prompts = tmp_path / "prompts.jsonl"
    prompts.write_text("\n".join(json.dumps({"prompt": p, "max_tokens": 8}) for p in ("Once upon", "The cat")))

    async def run(port: int) -> list:
        outs = []
        for name in ("a", "b"):
            args = ["loadtest", "--target", f"grpc://127.0.0.1:{port}", "--concurrency", "1", "--concurrency", "4",
                    "--requests", "8", "--prompts", str(prompts), "--out", str(tmp_path / f"{name}.json"),
                    "--plot", str(tmp_path / f"{name}.png"), "--no-progress"]
            outs.append(await asyncio.to_thread(CliRunner().invoke, main, args))
        return outs

    for result in against_server(engine, run):
        assert result.exit_code == 0, result.output
    a = json.loads((tmp_path / "a.json").read_text())
    assert [r["load"]["concurrency"] for r in a["runs"]] == [1, 4] and a["runs"][0]["completed"] == 8
    assert (tmp_path / "a.png").read_bytes()[:4] == b"\x89PNG"
    result = CliRunner().invoke(main, ["loadtest", "--compare", str(tmp_path / "a.json"), str(tmp_path / "b.json")])
    rows = json.loads(result.output)
    assert result.exit_code == 0 and {r["metric"] for r in rows} >= {"ttft_ms.p99", "output_tokens_per_s"}
    assert all(r["b_over_a"] > 0 for r in rows)
    bad = CliRunner().invoke(main, ["loadtest", "--target", "grpc://x:1", "--rate", "1", "--concurrency", "1"])
    assert bad.exit_code == 2 and "do not mix" in bad.output


def test_windows_report_each_stretch_of_the_run():
    # Requests ending at 0.5, 1.5, 2.5 and 3.5 s; the one ending in [2, 3) failed.
    records = [lt.Record(start=t, arrivals=[(0.1, 1), (0.5, 3)], end=0.5, wanted=4) for t in (0.0, 1.0, 3.0)]
    records.append(lt.Record(start=2.0, end=0.5, status="UNAVAILABLE", wanted=4))
    report = lt.summarize(records, 4.0, lt.Load(concurrency=1), lt.Slo(), window=2.0)
    first, second = report["windows"]
    assert (first["t_s"], first["requests"], first["completed"], first["errors"]) == (0.0, 2, 2, {})
    assert (second["t_s"], second["requests"], second["completed"]) == (2.0, 2, 1)
    assert second["errors"] == {"UNAVAILABLE": 1} and second["requests_per_s"] == 0.5
    assert first["e2e_ms"]["p50"] == 500.0 and "load" not in first and "windows" not in first
    assert "windows" not in lt.summarize(records, 4.0, lt.Load(concurrency=1), lt.Slo())


def test_longest_gap_is_the_longest_stretch_without_a_completion():
    # Completions at 0.5, 1.5 and 4.5 s of a 6 s run; a failure at 3 s does not count as one.
    records = [lt.Record(start=t, arrivals=[(0.2, 2)], end=0.5, wanted=2) for t in (0.0, 1.0, 4.0)]
    records.append(lt.Record(start=2.0, end=1.0, status="UNAVAILABLE", wanted=2))
    report = lt.summarize(records, 6.0, lt.Load(rate=1.0), lt.Slo(), window=3.0)
    assert report["longest_gap_s"] == 3.0  # 1.5 -> 4.5
    assert report["longest_request_s"] == 1.0  # the failure took longest
    assert [w["longest_gap_s"] for w in report["windows"]] == [1.5, 1.5]  # 1.5 -> 3.0; 3.0 -> 4.5 (-> 6.0)
    assert lt.summarize(records[3:], 6.0, lt.Load(rate=1.0), lt.Slo())["longest_gap_s"] == 6.0
