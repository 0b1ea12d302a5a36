"""Output: one owner for the directory (`directory`), its manifest, chunk files, summary and readers."""
