"""Object storage for every input and output: one URI layer over ``pyarrow.fs`` (``storage.fs``),
the node-local index cache (``storage.cache``) and the commit protocol on object stores
(``storage.commit``, see docs/storage.md). Pure I/O: no Ray here."""

from .fs import (Location, StorageError, check_new_output, check_writable, copy, copy_prefix_to_local, delete, delete_tree, exists, expand,
                 file_sha256, get_file, glob, is_dir, is_file, is_remote, list_dir, normalise, open_input_file, open_input_stream, probe, put_file,
                 put_tree, read_bytes, read_json, resolve, scrub, size, storage_error, write_bytes, write_json)

__all__ = ["Location", "StorageError", "check_new_output", "check_writable", "copy", "copy_prefix_to_local", "delete", "delete_tree", "exists", "expand",
           "file_sha256", "get_file", "glob", "is_dir", "is_file", "is_remote", "list_dir", "normalise", "open_input_file", "open_input_stream", "probe",
           "put_file", "put_tree", "read_bytes", "read_json", "resolve", "scrub", "size", "storage_error", "write_bytes", "write_json"]
