"""An independent S3 client (boto3) for the backup tests: checks what wings stored, and
tampers with it. Answers JSON on stdout.

usage: s3_tool.py ENDPOINT create-bucket BUCKET
       s3_tool.py ENDPOINT objects BUCKET            -> [{"key", "size", "sha256"}]
       s3_tool.py ENDPOINT uploads BUCKET            -> [{"key", "upload_id"}] (unfinished multipart)
       s3_tool.py ENDPOINT flip BUCKET KEY OFFSET    -> rewrites the object with one byte changed
"""

import hashlib
import json
import sys

import boto3
from botocore.config import Config


def client(endpoint):
    return boto3.client(
        "s3",
        endpoint_url=endpoint,
        region_name="us-east-1",
        aws_access_key_id="test",
        aws_secret_access_key="test",
        config=Config(s3={"addressing_style": "path"}, retries={"max_attempts": 1}),
    )


def main():
    endpoint, command, *args = sys.argv[1:]
    s3 = client(endpoint)
    if command == "create-bucket":
        s3.create_bucket(Bucket=args[0])
        out = {"ok": True}
    elif command == "objects":
        out = []
        for page in s3.get_paginator("list_objects_v2").paginate(Bucket=args[0]):
            for obj in page.get("Contents", []):
                body = s3.get_object(Bucket=args[0], Key=obj["Key"])["Body"].read()
                out.append(
                    {"key": obj["Key"], "size": obj["Size"], "sha256": hashlib.sha256(body).hexdigest()}
                )
    elif command == "uploads":
        listed = s3.list_multipart_uploads(Bucket=args[0])
        out = [{"key": u["Key"], "upload_id": u["UploadId"]} for u in listed.get("Uploads", [])]
    elif command == "flip":
        bucket, key, offset = args[0], args[1], int(args[2])
        body = bytearray(s3.get_object(Bucket=bucket, Key=key)["Body"].read())
        body[offset] ^= 0x01
        s3.put_object(Bucket=bucket, Key=key, Body=bytes(body))
        out = {"ok": True, "size": len(body)}
    else:
        raise SystemExit(f"unknown command {command}")
    json.dump(out, sys.stdout)


if __name__ == "__main__":
    main()
