"""The archiver: every prediction event, once, as Parquet in the object store."""
