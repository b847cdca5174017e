"""A private moto S3 server on a free loopback port, for integration tests.

Nothing here touches os.environ: in-process clients get explicit test credentials, and a
subprocess (a Celery worker) gets ``MotoS3.env()`` merged into its environment.
"""

from __future__ import annotations

import json
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from typing import TYPE_CHECKING

import boto3
import httpx
from moto.server import ThreadedMotoServer

from storage.objects import S3_CLIENT_CONFIG

if TYPE_CHECKING:
    from mypy_boto3_s3 import S3Client

REGION = "us-east-1"
ACCESS_KEY_ID = "test"
SECRET_ACCESS_KEY = "test"


@dataclass(frozen=True)
class MotoS3:
    endpoint_url: str

    def client(self) -> S3Client:
        return boto3.client(
            "s3",
            endpoint_url=self.endpoint_url,
            aws_access_key_id=ACCESS_KEY_ID,
            aws_secret_access_key=SECRET_ACCESS_KEY,
            region_name=REGION,
            config=S3_CLIENT_CONFIG,
        )

    def create_bucket(self, name: str, *, public_read: bool = True) -> None:
        """Create ``name``; public_read lets anyone GET its objects, as output links need.

        moto, like S3, answers an unsigned GET of a private object with 403, so the bucket gets
        the same anonymous-read policy an operator would set (no ACLs: new AWS buckets refuse them).
        """
        client = self.client()
        client.create_bucket(Bucket=name)
        if public_read:
            policy = {
                "Version": "2012-10-17",
                "Statement": [
                    {
                        "Effect": "Allow",
                        "Principal": "*",
                        "Action": "s3:GetObject",
                        "Resource": f"arn:aws:s3:::{name}/*",
                    }
                ],
            }
            client.put_bucket_policy(Bucket=name, Policy=json.dumps(policy))

    def env(self) -> dict[str, str]:
        """What a worker subprocess needs to reach this server through open_object_store()."""
        return {
            "AWS_ACCESS_KEY_ID": ACCESS_KEY_ID,
            "AWS_SECRET_ACCESS_KEY": SECRET_ACCESS_KEY,
            "AWS_DEFAULT_REGION": REGION,
            "DREAMQ_S3_ENDPOINT_URL": self.endpoint_url,
        }


@contextmanager
def moto_s3_server() -> Iterator[MotoS3]:
    # Port 0: the kernel picks a free port at bind time, so there is no pick-then-bind race.
    # That matters here: if the bind failed inside moto's thread, start() would wait forever.
    # start() returns only after the socket is bound and listening, so no readiness wait.
    server = ThreadedMotoServer(ip_address="127.0.0.1", port=0, verbose=False)
    server.start()
    host, port = server.get_host_and_port()
    endpoint_url = f"http://{host}:{port}"
    try:
        yield MotoS3(endpoint_url)
    finally:
        # moto's backends are process-global, shared by every server in this process and kept
        # after stop(): reset them so the next server starts empty.
        httpx.post(f"{endpoint_url}/moto-api/reset", timeout=10)
        server.stop()
