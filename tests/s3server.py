"""A real S3-compatible HTTP server for the tests: moto's server mode, started as a process and
stopped by its process id. It checks credentials: only the access key it issues at start-up is
accepted, so a test can also try wrong ones."""

from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

MOTO_SERVER = str(Path(sys.executable).parent / "moto_server")
# The requests moto answers before it starts checking credentials: the three that create the
# test's IAM user, its policy and its access key.
_UNCHECKED_REQUESTS = 3
_ALLOW_ALL = {
    "Version": "2012-10-17",
    "Statement": [{"Effect": "Allow", "Action": "*", "Resource": "*"}],
}


def free_port(host: str = "127.0.0.1") -> int:
    with socket.socket() as s:
        s.bind((host, 0))
        return s.getsockname()[1]


class S3Server:
    """``moto_server`` on ``host``; ``env`` holds the AWS variables a client needs."""

    def __init__(self, host: str = "127.0.0.1", log: Path | None = None):
        import boto3

        self.host, self.port = host, free_port(host)
        self.endpoint = f"{host}:{self.port}"
        self.url = f"http://{self.endpoint}"
        out = open(log, "w") if log else subprocess.DEVNULL  # noqa: SIM115 - closed with the process
        self.proc = subprocess.Popen(
            [MOTO_SERVER, "-H", host, "-p", str(self.port)],
            stdout=out,
            stderr=subprocess.STDOUT,
            env={**os.environ, "INITIAL_NO_AUTH_ACTION_COUNT": str(_UNCHECKED_REQUESTS)},
        )
        try:
            self._wait()
            iam = boto3.client(
                "iam",
                endpoint_url=self.url,
                region_name="us-east-1",
                aws_access_key_id="setup",
                aws_secret_access_key="setup",
            )
            iam.create_user(UserName="raytrain")
            iam.put_user_policy(
                UserName="raytrain", PolicyName="all", PolicyDocument=json.dumps(_ALLOW_ALL)
            )
            key = iam.create_access_key(UserName="raytrain")["AccessKey"]
        except BaseException:
            self.stop()
            raise
        self.access_key, self.secret_key = key["AccessKeyId"], key["SecretAccessKey"]
        self.env = {
            "AWS_ACCESS_KEY_ID": self.access_key,
            "AWS_SECRET_ACCESS_KEY": self.secret_key,
            "AWS_DEFAULT_REGION": "us-east-1",
            "AWS_EC2_METADATA_DISABLED": "true",
        }

    def _wait(self, timeout: float = 30) -> None:
        deadline = time.monotonic() + timeout
        while True:
            try:
                socket.create_connection((self.host, self.port), timeout=1).close()
                return
            except OSError:
                if self.proc.poll() is not None or time.monotonic() > deadline:
                    raise RuntimeError(f"moto_server did not start on {self.endpoint}") from None
                time.sleep(0.2)

    def client(self):
        import boto3

        return boto3.client(
            "s3",
            endpoint_url=self.url,
            region_name="us-east-1",
            aws_access_key_id=self.access_key,
            aws_secret_access_key=self.secret_key,
        )

    def create_bucket(self, name: str) -> None:
        self.client().create_bucket(Bucket=name)

    def keys(self, bucket: str, prefix: str = "") -> list[str]:
        pages = (
            self.client().get_paginator("list_objects_v2").paginate(Bucket=bucket, Prefix=prefix)
        )
        return [item["Key"] for page in pages for item in page.get("Contents", [])]

    def uri(self, bucket: str, prefix: str = "") -> str:
        """A storage URI that names this server in its query."""
        path = f"{bucket}/{prefix}".rstrip("/")
        return f"s3://{path}?endpoint_override={self.endpoint}&scheme=http"

    def stop(self) -> None:
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(timeout=10)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()
