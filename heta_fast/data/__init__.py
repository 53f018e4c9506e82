"""Data the project ships: its own curated attribution set (``curated_qa.jsonl``; README.md beside it)."""
