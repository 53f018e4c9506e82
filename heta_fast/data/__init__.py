"""Package data: the project's curated evaluation set (``curated_qa.jsonl``)."""
