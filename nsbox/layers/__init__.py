"""The isolation layers, one module each.

Every layer has the same shape:

- `plan(spec, ...) -> XPlan`: pure; a frozen dataclass that can be printed and compared.
  Invalid requests fail here, before anything on the system changes.
- `XPlan.describe() -> list[str]`: what the layer will do, in words (`nsbox plan`).
- one or more step functions, verbs that run in exactly one role and appear once in
  `nsbox.launch.SEQUENCE` (e.g. `userns.unshare` in the holder, `userns.write_maps` in
  the launcher).
"""
