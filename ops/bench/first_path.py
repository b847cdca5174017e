"""Benchmark of the first path: submit-to-success time and the API's accept latency.

Runs against a live stack (`make dev` prints the three values it needs):

    .venv/bin/python ops/bench/first_path.py --url http://127.0.0.1:8000 --key dq_... \
        --redis-url redis://127.0.0.1:PORT/0

Prints a table. Submit-to-success waits for the job's terminal event on Redis pub/sub, so the
figure is the time a client would see with a webhook, not a polling interval.
"""

from __future__ import annotations

import argparse
import statistics
import time

import httpx
import redis

from storage import keys


def percentile(values: list[float], q: float) -> float:
    ordered = sorted(values)
    index = min(len(ordered) - 1, max(0, round(q / 100 * (len(ordered) - 1))))
    return ordered[index]


def body(key: str, seed: int) -> dict[str, object]:
    return {
        "key": key,
        "model_id": "demo",
        "prompt": "a red fox in the snow",
        "width": 64,
        "height": 64,
        "num_inference_steps": 2,
        "seed": seed,
    }


def submit_to_success(
    client: httpx.Client, r: redis.Redis, key: str, n: int
) -> list[tuple[float, float]]:
    """(wall seconds from POST to the success event, generationTime) for n jobs one at a time."""
    pubsub = r.pubsub()
    pubsub.subscribe(keys.JOB_EVENTS)
    pubsub.get_message(timeout=5)
    results = []
    for seed in range(n):
        start = time.perf_counter()
        answer = client.post("/api/v4/dreambooth", json=body(key, seed)).json()
        job_id = str(answer["id"])
        while True:
            message = pubsub.get_message(timeout=30)
            if message is None:
                raise TimeoutError(f"job {job_id} did not finish")
            if message["type"] == "message" and message["data"].decode() == f"{job_id} success":
                break
        wall = time.perf_counter() - start
        fetched = client.post(f"/api/v4/dreambooth/fetch/{job_id}", json={"key": key}).json()
        results.append((wall, fetched["generationTime"]))
    pubsub.close()
    return results


def accept_latency(client: httpx.Client, key: str, n: int) -> list[float]:
    latencies = []
    for seed in range(n):
        start = time.perf_counter()
        response = client.post("/api/v4/dreambooth", json=body(key, seed))
        latencies.append(time.perf_counter() - start)
        assert response.status_code == 200, response.text
    return latencies


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--url", required=True)
    parser.add_argument("--key", required=True)
    parser.add_argument("--redis-url", required=True)
    parser.add_argument("--jobs", type=int, default=20, help="jobs timed submit-to-success")
    parser.add_argument("--submissions", type=int, default=1000, help="sequential submissions")
    args = parser.parse_args()

    with httpx.Client(base_url=args.url, timeout=30) as client:
        r = redis.Redis.from_url(args.redis_url)
        submit_to_success(client, r, args.key, 2)  # warm-up: the model loads on first use
        runs = submit_to_success(client, r, args.key, args.jobs)
        accepts = accept_latency(client, args.key, args.submissions)

    walls = [w for w, _ in runs]
    overheads = [w - g for w, g in runs]
    ms = 1000.0
    print("| measure (64x64, 2 steps, tiny model) | n | p50 | p99 | mean |")
    print("|---|---|---|---|---|")
    print(
        f"| submit -> success (wall) | {len(walls)} | {percentile(walls, 50) * ms:.1f} ms | "
        f"{percentile(walls, 99) * ms:.1f} ms | {statistics.mean(walls) * ms:.1f} ms |"
    )
    print(
        f"| of which outside the pipeline call | {len(overheads)} | "
        f"{percentile(overheads, 50) * ms:.1f} ms | {percentile(overheads, 99) * ms:.1f} ms | "
        f"{statistics.mean(overheads) * ms:.1f} ms |"
    )
    print(
        f"| accept latency, sequential | {len(accepts)} | {percentile(accepts, 50) * ms:.2f} ms | "
        f"{percentile(accepts, 99) * ms:.2f} ms | {statistics.mean(accepts) * ms:.2f} ms |"
    )


if __name__ == "__main__":
    main()
