"""Images: a local OCI store, archive import, and a layer unpacker that cannot write outside its target.

- `store`: blobs, names, cached root filesystems, locks. The CLI calls its plain functions
  (`import_image`, `list_images`, `inspect`, `remove`, `rootfs_for`, `use_rootfs`,
  `unpack_to`, `image_config`), each returning data or raising StepError.
- `layout`: OCI image layouts and `docker save` archives as data (read and write).
- `unpack`: applies layers inside a user+mount namespace that sees only the target.
- `reference`: image references, platforms, and `ensure` (`nsbox run --pull`): the store
  lookup a run makes; it loads `registry` (the HTTP client that pulls) only to pull.

Read `unpack` first: it is where untrusted bytes meet the filesystem.
"""
