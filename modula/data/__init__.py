"""The built-in domain suite, user data (parquet / JSONL, local or s3://), parquet I/O to storage, tokenisation with the prompt masked out of the loss, sequence packing, Ray Data pipelines."""
